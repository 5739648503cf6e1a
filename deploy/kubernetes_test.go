package deploy

import (
	"fmt"
	"strings"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
)

// checkCortexContainer checks the cortex-extproc container of a pod
// template against the service config it mounts.
func checkCortexContainer(t *testing.T, dep *appsv1.Deployment, cfg serviceConfig) {
	t.Helper()
	name := "Deployment " + dep.Name
	spec := &dep.Spec.Template.Spec
	c := container(t, spec, name, "cortex-extproc")

	if c.Image != releaseImage(t) {
		t.Errorf("%s: image %q, want %q (the tag deploy/build-image.sh builds for this release)", name, c.Image, releaseImage(t))
	}

	// Probes: plain HTTP on the admin port, which stays reachable when the
	// ext_proc port serves TLS or mTLS (the kubelet's gRPC probes cannot).
	adminHost, adminPort := listenPort(t, cfg.Admin.Listen)
	if adminHost != "0.0.0.0" && adminHost != "" {
		t.Errorf("[admin] listen %q: the kubelet's probes reach the pod IP, not loopback", cfg.Admin.Listen)
	}
	_, grpcPort := listenPort(t, cfg.Extproc.Listen)
	if p := containerPort(t, c, intstr.FromString("grpc")); p != grpcPort {
		t.Errorf("%s: container port grpc is %d, [extproc] listen port %d", name, p, grpcPort)
	}
	if p := containerPort(t, c, intstr.FromString("admin")); p != adminPort {
		t.Errorf("%s: container port admin is %d, [admin] listen port %d", name, p, adminPort)
	}
	for probeName, want := range map[string]struct {
		probe *corev1.Probe
		path  string
	}{"liveness": {c.LivenessProbe, "/healthz"}, "readiness": {c.ReadinessProbe, "/readyz"}} {
		p := want.probe
		switch {
		case p == nil:
			t.Errorf("%s: no %s probe", name, probeName)
		case p.HTTPGet == nil:
			t.Errorf("%s: %s probe %+v is not an HTTP GET on the admin port; gRPC and TCP probes break when extproc.tls_* are set", name, probeName, p.ProbeHandler)
		case p.HTTPGet.Path != want.path || containerPort(t, c, p.HTTPGet.Port) != adminPort || p.HTTPGet.Scheme == corev1.URISchemeHTTPS:
			t.Errorf("%s: %s probe GET %s %s on port %d, want GET http %s on the admin port %d", name, probeName, p.HTTPGet.Scheme, p.HTTPGet.Path, containerPort(t, c, p.HTTPGet.Port), want.path, adminPort)
		}
	}

	sc := c.SecurityContext
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
		t.Errorf("%s: container security context %+v, want no privilege escalation, read-only root, drop ALL", name, sc)
	}
	if psc := spec.SecurityContext; psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Errorf("%s: pod runAsNonRoot not set", name)
	}
	limit, hasLimit := c.Resources.Limits[corev1.ResourceMemory]
	if _, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok || !hasLimit || c.Resources.Requests.Cpu().IsZero() {
		t.Errorf("%s: resources %+v, want memory request and limit and a CPU request", name, c.Resources)
	}
	checkGoMemLimit(t, name, c, limit)
	if !strings.Contains(strings.Join(c.Args, " "), "--config /etc/cortex-extproc/cortex-extproc.toml") {
		t.Errorf("%s: args %v do not point at the mounted config", name, c.Args)
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
			t.Errorf("%s: config mounted with subPath; catalogue updates would never arrive", name)
		}
		for _, v := range spec.Volumes {
			if v.Name == m.Name && (v.ConfigMap == nil || v.ConfigMap.Name != "cortex-extproc-config") {
				t.Errorf("%s: /etc/cortex-extproc comes from %+v, want ConfigMap cortex-extproc-config", name, v.VolumeSource)
			}
		}
	}
	if !mounted {
		t.Errorf("%s: nothing mounted at /etc/cortex-extproc", name)
	}
}

// checkGoMemLimit: GOMEMLIMIT is a literal below the container's memory
// limit with room for what the Go runtime does not count (stacks of
// threads, cgo), so the GC works harder before the OOM killer acts. Equal
// to the limit (resourceFieldRef limits.memory) it would not.
func checkGoMemLimit(t *testing.T, owner string, c *corev1.Container, limit resource.Quantity) {
	t.Helper()
	v, literal := envValue(c, "GOMEMLIMIT")
	if !literal || v == "" {
		t.Errorf("%s: GOMEMLIMIT is not set to a value (%q)", owner, v)
		return
	}
	bytes, err := parseGoMemLimit(v)
	if err != nil {
		t.Errorf("%s: GOMEMLIMIT %q: %v", owner, v, err)
		return
	}
	if lim := limit.Value(); bytes > lim*95/100 || bytes < lim/2 {
		t.Errorf("%s: GOMEMLIMIT %s = %d bytes, container limit %s = %d: want between 50%% and 95%% of the limit", owner, v, bytes, limit.String(), lim)
	}
}

// parseGoMemLimit reads GOMEMLIMIT as the Go runtime does: a number with
// an optional unit B, KiB, MiB, GiB or TiB.
func parseGoMemLimit(s string) (int64, error) {
	units := []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if n, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = n, u.mult
			break
		}
	}
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || fmt.Sprint(n) != s {
		return 0, fmt.Errorf("not a Go memory limit (a number and B, KiB, MiB, GiB or TiB)")
	}
	return n * mult, nil
}

// shutdownBudget is how long cortex-extproc may take to stop with cfg.
func shutdownBudget(t *testing.T, cfg serviceConfig) time.Duration {
	t.Helper()
	return cfg.shutdownDelay(t) + cfg.drainTimeout(t) + service.ShutdownOverhead
}

// checkShutdownDelayCovers: the shutdown delay outlasts the health checks
// of the Envoy in front, so that Envoy has taken the instance out before
// its listener closes.
func checkShutdownDelayCovers(t *testing.T, name string, b *bootstrapv3.Bootstrap, cfg serviceConfig) {
	t.Helper()
	need, hc := healthCheckWindow(t, name, b)
	if got := cfg.shutdownDelay(t); got < need {
		t.Errorf("%s: extproc.shutdown_delay %s, but Envoy's health check (%s) may keep sending new streams for %s", name, got, hc, need)
	}
}

// healthCheckWindow is the shutdown_delay the ext_proc cluster's health
// check needs (config.ShutdownDelayFor).
func healthCheckWindow(t *testing.T, name string, b *bootstrapv3.Bootstrap) (time.Duration, string) {
	t.Helper()
	cl := extProcCluster(t, b)
	hcs := cl.GetHealthChecks()
	if len(hcs) != 1 || hcs[0].GetGrpcHealthCheck().GetServiceName() != service.HealthExtProc {
		t.Fatalf("%s: the ext_proc cluster must have one gRPC health check of service %q, has %v", name, service.HealthExtProc, hcs)
	}
	hc := hcs[0]
	interval, timeout, threshold := hc.GetInterval().AsDuration(), hc.GetTimeout().AsDuration(), int(hc.GetUnhealthyThreshold().GetValue())
	return config.ShutdownDelayFor(interval, timeout, threshold), fmt.Sprintf("every %s, timeout %s, unhealthy_threshold %d", interval, timeout, threshold)
}

// grace is a pod's terminationGracePeriodSeconds.
func grace(t *testing.T, dep *appsv1.Deployment) time.Duration {
	t.Helper()
	g := dep.Spec.Template.Spec.TerminationGracePeriodSeconds
	if g == nil {
		t.Fatalf("Deployment %s: no terminationGracePeriodSeconds (the default 30s is shorter than cortex-extproc's shutdown)", dep.Name)
	}
	return time.Duration(*g) * time.Second
}

func TestKubernetesManifestsAgree(t *testing.T) {
	objs := manifests(t)
	cm := object[corev1.ConfigMap](t, objs, "configmap.yaml:ConfigMap/cortex-extproc-config")
	cfg := parseServiceConfig(t, "configmap cortex-extproc.toml", []byte(cm.Data["cortex-extproc.toml"]))
	if _, ok := cm.Data[cfg.ModelsConfig]; !ok {
		t.Errorf("ConfigMap lacks %q, the models_config of its cortex-extproc.toml", cfg.ModelsConfig)
	}
	_, extprocPort := listenPort(t, cfg.Extproc.Listen)

	// Separate Deployments.
	dep := object[appsv1.Deployment](t, objs, "deployment.yaml:Deployment/cortex-extproc")
	if r := dep.Spec.Replicas; r == nil || *r != 2 {
		t.Errorf("cortex-extproc replicas = %s, want 2", fmtPtr(r))
	}
	checkCortexContainer(t, dep, cfg)
	if g, need := grace(t, dep), shutdownBudget(t, cfg); g < need {
		t.Errorf("Deployment cortex-extproc: terminationGracePeriodSeconds %s < shutdown_delay + drain_timeout + %s = %s: the kubelet would kill held requests", g, service.ShutdownOverhead, need)
	}
	pdb := object[policyv1.PodDisruptionBudget](t, objs, "pdb.yaml:PodDisruptionBudget/cortex-extproc")
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != 1 || !selects(pdb.Spec.Selector, dep.Spec.Template.Labels) {
		t.Errorf("PDB %+v does not keep 1 cortex-extproc pod available", pdb.Spec)
	}
	envoyCM := object[corev1.ConfigMap](t, objs, "envoy-deployment.yaml:ConfigMap/envoy-config")
	b := bootstrap(t, "envoy-deployment.yaml#envoy.yaml", []byte(envoyCM.Data["envoy.yaml"]), cfg)
	checkNeuronClusters(t, "envoy-deployment.yaml", b, cfg)
	checkClusterHeader(t, "envoy-deployment.yaml", b, cfg)
	checkShutdownDelayCovers(t, "envoy-deployment.yaml", b, cfg)
	host, port, err := clusterAddress(extProcCluster(t, b))
	if err != nil {
		t.Fatal(err)
	}
	svcName, ns, _ := strings.Cut(host, ".")
	svc, ok := objs["service.yaml:Service/"+svcName].(*corev1.Service)
	if !ok || !strings.HasPrefix(ns, svc.Namespace+".svc") {
		t.Errorf("Envoy's ext_proc cluster host %s is not a Service in service.yaml", host)
	} else {
		if svc.Spec.ClusterIP != "None" {
			t.Errorf("Service %s is not headless: Envoy would pin its HTTP/2 connection to one replica", svcName)
		}
		if !selectsPods(svc.Spec.Selector, dep.Spec.Template.Labels) || len(svc.Spec.Ports) == 0 || int(svc.Spec.Ports[0].Port) != port || port != extprocPort {
			t.Errorf("Service %s ports %+v, Envoy port %d, extproc listen port %d: must all agree", svcName, svc.Spec.Ports, port, extprocPort)
		}
	}

	// Sidecar variant.
	edge := object[appsv1.Deployment](t, objs, "envoy-sidecar.yaml:Deployment/cortex-edge")
	checkCortexContainer(t, edge, cfg)
	envoyC := container(t, &edge.Spec.Template.Spec, "Deployment cortex-edge", "envoy")
	sideCM := object[corev1.ConfigMap](t, objs, "envoy-sidecar.yaml:ConfigMap/cortex-edge-envoy")
	sb := bootstrap(t, "envoy-sidecar.yaml#envoy.yaml", []byte(sideCM.Data["envoy.yaml"]), cfg)
	checkNeuronClusters(t, "envoy-sidecar.yaml", sb, cfg)
	checkClusterHeader(t, "envoy-sidecar.yaml", sb, cfg)
	if h, p, err := clusterAddress(extProcCluster(t, sb)); err != nil || h != "127.0.0.1" || p != extprocPort {
		t.Errorf("sidecar Envoy's ext_proc cluster is %s:%d (%v), want 127.0.0.1:%d", h, p, err, extprocPort)
	}
	// Envoy exits at once on SIGTERM: in the sidecar it must outlive
	// cortex-extproc's shutdown, or the answers to held requests are lost.
	var sleep time.Duration
	if l := envoyC.Lifecycle; l != nil && l.PreStop != nil && l.PreStop.Sleep != nil {
		sleep = time.Duration(l.PreStop.Sleep.Seconds) * time.Second
	}
	if need := shutdownBudget(t, cfg); sleep < need {
		t.Errorf("cortex-edge: Envoy's preStop sleep is %s, shorter than cortex-extproc's shutdown (%s): held requests would lose their answers", sleep, need)
	}
	if g := grace(t, edge); g < sleep+10*time.Second {
		t.Errorf("cortex-edge: terminationGracePeriodSeconds %s leaves Envoy less than 10s after its %s preStop sleep", g, sleep)
	}
}

// selectsPods is a Service's flat selector matching pod labels.
func selectsPods(sel, podLabels map[string]string) bool {
	if len(sel) == 0 {
		return false
	}
	for k, v := range sel {
		if podLabels[k] != v {
			return false
		}
	}
	return true
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

// TestNetworkPoliciesAdmitOnlyEnvoyAndTheScraper: the ext_proc port admits
// only Envoy's pods (none from outside the pod in the sidecar variant),
// the admin port only the metrics scraper, and no rule opens every port.
func TestNetworkPoliciesAdmitOnlyEnvoyAndTheScraper(t *testing.T) {
	objs := manifests(t)
	dep := object[appsv1.Deployment](t, objs, "deployment.yaml:Deployment/cortex-extproc")
	envoyDep := object[appsv1.Deployment](t, objs, "envoy-deployment.yaml:Deployment/cortex-envoy")
	edge := object[appsv1.Deployment](t, objs, "envoy-sidecar.yaml:Deployment/cortex-edge")
	checkNetworkPolicy(t, object[networkingv1.NetworkPolicy](t, objs, "networkpolicy.yaml:NetworkPolicy/cortex-extproc"), dep,
		map[string]func(networkingv1.NetworkPolicyPeer) bool{
			"grpc":  func(p networkingv1.NetworkPolicyPeer) bool { return isEnvoyPeer(p, envoyDep) },
			"admin": isScraperPeer,
		})
	checkNetworkPolicy(t, object[networkingv1.NetworkPolicy](t, objs, "networkpolicy.yaml:NetworkPolicy/cortex-edge"), edge,
		map[string]func(networkingv1.NetworkPolicyPeer) bool{
			"http":  nil, // clients, from anywhere
			"admin": isScraperPeer,
		})
}

// checkNetworkPolicy checks that pol selects dep's pods, restricts ingress,
// and admits exactly the container ports in allowed, each only from peers
// the function accepts (nil: from anywhere). Every other port, the ext_proc
// port of a sidecar pod included, admits nobody.
func checkNetworkPolicy(t *testing.T, pol *networkingv1.NetworkPolicy, dep *appsv1.Deployment, allowed map[string]func(networkingv1.NetworkPolicyPeer) bool) {
	t.Helper()
	name := "NetworkPolicy " + pol.Name
	if !selects(&pol.Spec.PodSelector, dep.Spec.Template.Labels) {
		t.Errorf("%s does not select the pods of Deployment %s", name, dep.Name)
	}
	if len(pol.Spec.PolicyTypes) != 1 || pol.Spec.PolicyTypes[0] != networkingv1.PolicyTypeIngress {
		t.Errorf("%s: policyTypes %v, want [Ingress]", name, pol.Spec.PolicyTypes)
	}
	// Named ports are the pods' container port names.
	portName := map[int]string{}
	for _, c := range dep.Spec.Template.Spec.Containers {
		for _, p := range c.Ports {
			portName[int(p.ContainerPort)] = p.Name
		}
	}
	admitted := map[string]bool{}
	for i, rule := range pol.Spec.Ingress {
		if len(rule.Ports) == 0 {
			t.Errorf("%s: ingress[%d] admits every port", name, i)
			continue
		}
		for _, p := range rule.Ports {
			pn := p.Port.String()
			if p.Port.Type == intstr.Int {
				pn = portName[p.Port.IntValue()]
			}
			accept, ok := allowed[pn]
			if !ok {
				t.Errorf("%s: ingress[%d] admits port %s, which must admit nobody from outside the pod", name, i, p.Port.String())
				continue
			}
			admitted[pn] = true
			if accept == nil {
				continue
			}
			if len(rule.From) == 0 {
				t.Errorf("%s: ingress[%d] admits port %s from anywhere", name, i, pn)
			}
			for _, peer := range rule.From {
				if !accept(peer) {
					t.Errorf("%s: ingress[%d] admits port %s from %+v", name, i, pn, peer)
				}
			}
		}
	}
	for pn := range allowed {
		if !admitted[pn] {
			t.Errorf("%s admits nobody on port %s", name, pn)
		}
	}
}

// isEnvoyPeer: exactly the Envoy Deployment's pods, in the same namespace.
func isEnvoyPeer(p networkingv1.NetworkPolicyPeer, envoy *appsv1.Deployment) bool {
	return p.IPBlock == nil && p.NamespaceSelector == nil && p.PodSelector != nil && selects(p.PodSelector, envoy.Spec.Template.Labels)
}

// isScraperPeer: the Prometheus Operator's pods in namespace monitoring.
func isScraperPeer(p networkingv1.NetworkPolicyPeer) bool {
	return p.IPBlock == nil && p.NamespaceSelector != nil && p.PodSelector != nil &&
		selects(p.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": "monitoring"}) &&
		!selects(p.NamespaceSelector, map[string]string{"kubernetes.io/metadata.name": "cortex"}) &&
		selects(p.PodSelector, map[string]string{"app.kubernetes.io/name": "prometheus"}) &&
		!selects(p.PodSelector, map[string]string{"app.kubernetes.io/name": "cortex-envoy"})
}

// TestServiceMonitorScrapesTheAdminPort: the ServiceMonitor selects the
// Service of each variant through its metrics port, which leads to the
// admin listener.
func TestServiceMonitorScrapesTheAdminPort(t *testing.T) {
	objs := manifests(t)
	cm := object[corev1.ConfigMap](t, objs, "configmap.yaml:ConfigMap/cortex-extproc-config")
	cfg := parseServiceConfig(t, "configmap cortex-extproc.toml", []byte(cm.Data["cortex-extproc.toml"]))
	_, adminPort := listenPort(t, cfg.Admin.Listen)
	sm := object[monitoringv1.ServiceMonitor](t, objs, "servicemonitor.yaml:ServiceMonitor/cortex-extproc")
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port == "" || sm.Spec.Endpoints[0].Path != "/metrics" {
		t.Fatalf("ServiceMonitor endpoints %+v, want one: port metrics, path /metrics", sm.Spec.Endpoints)
	}
	port := sm.Spec.Endpoints[0].Port
	for _, v := range []struct{ svc, dep string }{
		{"service.yaml:Service/cortex-extproc", "deployment.yaml:Deployment/cortex-extproc"},
		{"envoy-sidecar.yaml:Service/cortex-edge", "envoy-sidecar.yaml:Deployment/cortex-edge"},
	} {
		svc := object[corev1.Service](t, objs, v.svc)
		dep := object[appsv1.Deployment](t, objs, v.dep)
		if !selects(&sm.Spec.Selector, svc.Labels) {
			t.Errorf("ServiceMonitor does not select Service %s (labels %v)", svc.Name, svc.Labels)
		}
		var sp *corev1.ServicePort
		for i := range svc.Spec.Ports {
			if svc.Spec.Ports[i].Name == port {
				sp = &svc.Spec.Ports[i]
			}
		}
		if sp == nil {
			t.Errorf("Service %s has no port %q for the ServiceMonitor", svc.Name, port)
			continue
		}
		c := container(t, &dep.Spec.Template.Spec, dep.Name, "cortex-extproc")
		if got := containerPort(t, c, sp.TargetPort); got != adminPort {
			t.Errorf("Service %s port %s leads to container port %d, the admin listener is on %d", svc.Name, port, got, adminPort)
		}
	}
}

// TestShippedEnvoyHealthChecksFitTheDefaultShutdownDelay: the default
// extproc.shutdown_delay covers the ext_proc health check of every Envoy
// config we ship.
func TestShippedEnvoyHealthChecksFitTheDefaultShutdownDelay(t *testing.T) {
	files := map[string][]byte{}
	for _, f := range []string{"../envoy/envoy.yaml", "../envoy/envoy-xds.yaml", "../envoy/envoy-original-dst.yaml", "compose/envoy.yaml"} {
		files[f] = readFile(t, f)
	}
	objs := manifests(t)
	for k, cm := range ofType[corev1.ConfigMap](objs) {
		if y, ok := cm.Data["envoy.yaml"]; ok {
			files[k] = []byte(y)
		}
	}
	for name, data := range files {
		b, err := envoyBootstrap(data)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		need, hc := healthCheckWindow(t, name, b)
		if need > config.DefaultShutdownDelay {
			t.Errorf("%s: the ext_proc health check (%s) needs shutdown_delay %s, the default is %s", name, hc, need, config.DefaultShutdownDelay)
		}
	}
}

func fmtPtr[T any](p *T) string {
	if p == nil {
		return "unset"
	}
	return fmt.Sprint(*p)
}
