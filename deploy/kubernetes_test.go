package deploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"sigs.k8s.io/yaml"
)

// k8sObject models the parts of the manifests the checks below read.
type k8sObject struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name      string            `json:"name"`
		Namespace string            `json:"namespace"`
		Labels    map[string]string `json:"labels"`
	} `json:"metadata"`
	Data map[string]string `json:"data"`
	Spec struct {
		Replicas     *int `json:"replicas"`
		MinAvailable *int `json:"minAvailable"`
		// {matchLabels: …} on workloads and PDBs, flat labels on Services.
		Selector map[string]any `json:"selector"`
		// Service
		ClusterIP string `json:"clusterIP"`
		Ports     []struct {
			Name string `json:"name"`
			Port int    `json:"port"`
		} `json:"ports"`
		Template struct {
			Metadata struct {
				Labels map[string]string `json:"labels"`
			} `json:"metadata"`
			Spec struct {
				SecurityContext struct {
					RunAsNonRoot *bool `json:"runAsNonRoot"`
				} `json:"securityContext"`
				Containers []k8sContainer `json:"containers"`
				Volumes    []struct {
					Name      string `json:"name"`
					ConfigMap *struct {
						Name string `json:"name"`
					} `json:"configMap"`
				} `json:"volumes"`
			} `json:"spec"`
		} `json:"template"`
	} `json:"spec"`
}

type k8sContainer struct {
	Name  string   `json:"name"`
	Image string   `json:"image"`
	Args  []string `json:"args"`
	Ports []struct {
		ContainerPort int `json:"containerPort"`
	} `json:"ports"`
	LivenessProbe  *k8sProbe `json:"livenessProbe"`
	ReadinessProbe *k8sProbe `json:"readinessProbe"`
	Resources      struct {
		Requests map[string]string `json:"requests"`
		Limits   map[string]string `json:"limits"`
	} `json:"resources"`
	SecurityContext struct {
		AllowPrivilegeEscalation *bool `json:"allowPrivilegeEscalation"`
		ReadOnlyRootFilesystem   *bool `json:"readOnlyRootFilesystem"`
		Capabilities             struct {
			Drop []string `json:"drop"`
		} `json:"capabilities"`
	} `json:"securityContext"`
	VolumeMounts []struct {
		Name      string `json:"name"`
		MountPath string `json:"mountPath"`
		SubPath   string `json:"subPath"`
	} `json:"volumeMounts"`
}

type k8sProbe struct {
	GRPC *struct {
		Port    int    `json:"port"`
		Service string `json:"service"`
	} `json:"grpc"`
}

// manifests loads every object of deploy/kubernetes/*.yaml, keyed by
// "file:Kind/name".
func manifests(t *testing.T) map[string]k8sObject {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes (%v)", err)
	}
	out := map[string]k8sObject{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, doc := range strings.Split(string(data), "\n---\n") {
			var o k8sObject
			if err := yaml.Unmarshal([]byte(doc), &o); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if o.Kind == "" {
				continue
			}
			if o.Metadata.Namespace != "cortex" && o.Kind != "Namespace" {
				t.Errorf("%s: %s/%s is in namespace %q, want cortex", f, o.Kind, o.Metadata.Name, o.Metadata.Namespace)
			}
			out[filepath.Base(f)+":"+o.Kind+"/"+o.Metadata.Name] = o
		}
	}
	return out
}

func object(t *testing.T, objs map[string]k8sObject, key string) k8sObject {
	t.Helper()
	o, ok := objs[key]
	if !ok {
		t.Fatalf("manifest object %s missing", key)
	}
	return o
}

func container(t *testing.T, o k8sObject, name string) k8sContainer {
	t.Helper()
	for _, c := range o.Spec.Template.Spec.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("%s has no container %q", o.Metadata.Name, name)
	return k8sContainer{}
}

// checkCortexContainer checks the cortex-extproc container against the
// service config it mounts.
func checkCortexContainer(t *testing.T, dep k8sObject, cfg serviceConfig) {
	t.Helper()
	c := container(t, dep, "cortex-extproc")
	host, port := listenPort(t, cfg.Extproc.Listen)
	if host != "0.0.0.0" && host != "" {
		t.Errorf("[extproc] listen %q: the kubelet's gRPC probes reach the pod IP, not loopback", cfg.Extproc.Listen)
	}
	for probeName, p := range map[string]*k8sProbe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		if p == nil || p.GRPC == nil || p.GRPC.Port != port || p.GRPC.Service != probeName {
			got := "no gRPC probe"
			if p != nil && p.GRPC != nil {
				got = fmt.Sprintf("gRPC port %d service %q", p.GRPC.Port, p.GRPC.Service)
			}
			t.Errorf("%s: %s probe is %s, want gRPC on port %d service %q", dep.Metadata.Name, probeName, got, port, probeName)
		}
	}
	sc := c.SecurityContext
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		strings.Join(sc.Capabilities.Drop, ",") != "ALL" {
		t.Errorf("%s: container security context %+v, want no privilege escalation, read-only root, drop ALL", dep.Metadata.Name, sc)
	}
	if rn := dep.Spec.Template.Spec.SecurityContext.RunAsNonRoot; rn == nil || !*rn {
		t.Errorf("%s: pod runAsNonRoot not set", dep.Metadata.Name)
	}
	if c.Resources.Requests["memory"] == "" || c.Resources.Limits["memory"] == "" || c.Resources.Requests["cpu"] == "" {
		t.Errorf("%s: resources %+v, want requests and limits", dep.Metadata.Name, c.Resources)
	}
	if !strings.Contains(strings.Join(c.Args, " "), "--config /etc/cortex-extproc/cortex-extproc.toml") {
		t.Errorf("%s: args %v do not point at the mounted config", dep.Metadata.Name, c.Args)
	}
	// The config must be mounted as a directory from the ConfigMap: a
	// subPath mount never sees ConfigMap updates.
	var mounted bool
	for _, m := range c.VolumeMounts {
		if m.MountPath != "/etc/cortex-extproc" {
			continue
		}
		mounted = true
		if m.SubPath != "" {
			t.Errorf("%s: config mounted with subPath; catalogue updates would never arrive", dep.Metadata.Name)
		}
		for _, v := range dep.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && (v.ConfigMap == nil || v.ConfigMap.Name != "cortex-extproc-config") {
				t.Errorf("%s: /etc/cortex-extproc comes from %+v, want ConfigMap cortex-extproc-config", dep.Metadata.Name, v)
			}
		}
	}
	if !mounted {
		t.Errorf("%s: nothing mounted at /etc/cortex-extproc", dep.Metadata.Name)
	}
}

func TestKubernetesManifestsAgree(t *testing.T) {
	objs := manifests(t)
	cm := object(t, objs, "configmap.yaml:ConfigMap/cortex-extproc-config")
	cfg := parseServiceConfig(t, "configmap cortex-extproc.toml", []byte(cm.Data["cortex-extproc.toml"]))
	if _, ok := cm.Data[cfg.ModelsConfig]; !ok {
		t.Errorf("ConfigMap lacks %q, the models_config of its cortex-extproc.toml", cfg.ModelsConfig)
	}
	_, extprocPort := listenPort(t, cfg.Extproc.Listen)

	// Separate Deployments.
	dep := object(t, objs, "deployment.yaml:Deployment/cortex-extproc")
	if dep.Spec.Replicas == nil || *dep.Spec.Replicas != 2 {
		t.Errorf("cortex-extproc replicas = %v, want 2", dep.Spec.Replicas)
	}
	checkCortexContainer(t, dep, cfg)
	pdb := object(t, objs, "pdb.yaml:PodDisruptionBudget/cortex-extproc")
	if pdb.Spec.MinAvailable == nil || *pdb.Spec.MinAvailable != 1 || !selects(selectorLabels(pdb), dep.Spec.Template.Metadata.Labels) {
		t.Errorf("PDB %+v does not keep 1 cortex-extproc pod available", pdb.Spec)
	}
	envoyCM := object(t, objs, "envoy-deployment.yaml:ConfigMap/envoy-config")
	b := bootstrap(t, "envoy-deployment.yaml#envoy.yaml", []byte(envoyCM.Data["envoy.yaml"]), cfg)
	checkNeuronClusters(t, "envoy-deployment.yaml", b, cfg)
	checkClusterHeader(t, "envoy-deployment.yaml", b, cfg)
	host, port, err := clusterAddress(extProcCluster(t, b))
	if err != nil {
		t.Fatal(err)
	}
	svcName, ns, _ := strings.Cut(host, ".")
	svc, ok := objs["service.yaml:Service/"+svcName]
	if !ok || !strings.HasPrefix(ns, svc.Metadata.Namespace+".svc") {
		t.Errorf("Envoy's ext_proc cluster host %s is not a Service in service.yaml", host)
	} else {
		if svc.Spec.ClusterIP != "None" {
			t.Errorf("Service %s is not headless: Envoy would pin its HTTP/2 connection to one replica", svcName)
		}
		if !selects(selectorLabels(svc), dep.Spec.Template.Metadata.Labels) || len(svc.Spec.Ports) == 0 || svc.Spec.Ports[0].Port != port || port != extprocPort {
			t.Errorf("Service %s ports %+v, Envoy port %d, extproc listen port %d: must all agree", svcName, svc.Spec.Ports, port, extprocPort)
		}
	}

	// Sidecar variant.
	edge := object(t, objs, "envoy-sidecar.yaml:Deployment/cortex-edge")
	checkCortexContainer(t, edge, cfg)
	container(t, edge, "envoy")
	sideCM := object(t, objs, "envoy-sidecar.yaml:ConfigMap/cortex-edge-envoy")
	sb := bootstrap(t, "envoy-sidecar.yaml#envoy.yaml", []byte(sideCM.Data["envoy.yaml"]), cfg)
	checkNeuronClusters(t, "envoy-sidecar.yaml", sb, cfg)
	checkClusterHeader(t, "envoy-sidecar.yaml", sb, cfg)
	if h, p, err := clusterAddress(extProcCluster(t, sb)); err != nil || h != "127.0.0.1" || p != extprocPort {
		t.Errorf("sidecar Envoy's ext_proc cluster is %s:%d (%v), want 127.0.0.1:%d", h, p, err, extprocPort)
	}
}

// checkNeuronClusters checks that every [[neurons]] entry has its Envoy
// cluster, pointing at the neuron's endpoint.
func checkNeuronClusters(t *testing.T, name string, bs *bootstrapv3.Bootstrap, cfg serviceConfig) {
	t.Helper()
	for _, n := range cfg.Neurons {
		cn := clusterName(n.Name, n.Cluster)
		cl := staticCluster(bs, cn)
		if cl == nil {
			t.Errorf("%s: no Envoy cluster %q for neuron %s", name, cn, n.Name)
			continue
		}
		host, port := endpointHostPort(t, n.Endpoint)
		if h, p, err := clusterAddress(cl); err != nil || h != host || p != port {
			t.Errorf("%s: cluster %s points at %s:%d (%v), neuron endpoint is %s:%d", name, cn, h, p, err, host, port)
		}
	}
}

// selectorLabels returns an object's label selector in either shape.
func selectorLabels(o k8sObject) map[string]string {
	src := o.Spec.Selector
	if ml, ok := src["matchLabels"].(map[string]any); ok {
		src = ml
	}
	out := map[string]string{}
	for k, v := range src {
		if s, ok := v.(string); ok {
			out[k] = s
		}
	}
	return out
}

// selects reports whether every selector label is on the pod.
func selects(selector, pod map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for k, v := range selector {
		if pod[k] != v {
			return false
		}
	}
	return true
}
