package deploy

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	toml "github.com/pelletier/go-toml/v2"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/helexa/cortex-extproc/internal/config"
)

const chartDir = "helm/cortex-extproc"

// renderChart renders the chart as `helm template NAME deploy/helm/cortex-extproc
// -n NS --set ...` would (values schema included) and decodes every object
// strictly into its Kubernetes type.
func renderChart(release, namespace string, values map[string]any) (k8sObjects, error) {
	ch, err := loader.Load(chartDir)
	if err != nil {
		return nil, err
	}
	vals, err := chartutil.ToRenderValuesWithSchemaValidation(ch, values,
		common.ReleaseOptions{Name: release, Namespace: namespace, Revision: 1, IsInstall: true}, nil, false)
	if err != nil {
		return nil, err
	}
	files, err := engine.Render(ch, vals)
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	out := k8sObjects{}
	for _, n := range names {
		if strings.HasSuffix(n, "NOTES.txt") {
			continue
		}
		objs, err := decodeObjects(filepath.Base(n), []byte(files[n]))
		if err != nil {
			return nil, err
		}
		for k, o := range objs {
			if o.GetNamespace() != namespace {
				return nil, fmt.Errorf("%s is in namespace %q, want the release's %q", k, o.GetNamespace(), namespace)
			}
			out[k] = o
		}
	}
	return out, nil
}

// byKindName re-keys objects "Kind/name", dropping the file.
func byKindName(objs k8sObjects) map[string]any {
	out := map[string]any{}
	for k, o := range objs {
		_, kn, _ := strings.Cut(k, ":")
		out[kn] = o
	}
	return out
}

// The labels only a Helm release carries.
var helmLabels = []string{"app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"}

// The chart's Envoy objects are named after the release; the manifests'
// after the component.
var chartToManifestName = map[string]string{"cortex-extproc-envoy": "cortex-envoy", "cortex-extproc-envoy-config": "envoy-config"}

// generic turns an object into JSON values with the release's labels
// removed and the chart's names mapped to the manifests'.
func generic(t *testing.T, o any, fromChart bool) any {
	t.Helper()
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	var walk func(v any) any
	walk = func(v any) any {
		switch x := v.(type) {
		case map[string]any:
			for _, l := range helmLabels {
				delete(x, l)
			}
			for k, e := range x {
				x[k] = walk(e)
			}
		case []any:
			for i, e := range x {
				x[i] = walk(e)
			}
		case string:
			if n, ok := chartToManifestName[x]; ok && fromChart {
				return n
			}
		}
		return v
	}
	return walk(v)
}

// TestHelmChartRendersTheManifests: with the default values (and the
// ServiceMonitor on) the chart renders the objects of deploy/kubernetes
// (separate Deployments), field for field; the configs they carry are
// compared as cortex-extproc and Envoy read them.
func TestHelmChartRendersTheManifests(t *testing.T) {
	rendered, err := renderChart("cortex-extproc", "cortex", map[string]any{"serviceMonitor": map[string]any{"enabled": true}})
	if err != nil {
		t.Fatal(err)
	}
	chart := byKindName(rendered)
	all := manifests(t)
	want := map[string]any{}
	for k, o := range all {
		file, kn, _ := strings.Cut(k, ":")
		switch file {
		case "envoy-sidecar.yaml", "namespace.yaml":
			continue // the sidecar variant and the namespace are not the chart's
		}
		if kn == "NetworkPolicy/cortex-edge" {
			continue
		}
		want[kn] = o
	}
	for kn, m := range want {
		name := kn
		kind, n, _ := strings.Cut(kn, "/")
		for cn, mn := range chartToManifestName {
			if mn == n {
				name = kind + "/" + cn
			}
		}
		c, ok := chart[name]
		if !ok {
			t.Errorf("the chart renders no %s (for %s in deploy/kubernetes)", name, kn)
			continue
		}
		delete(chart, name)
		switch mo := m.(type) {
		case *corev1.ConfigMap:
			compareConfigMaps(t, kn, c.(*corev1.ConfigMap), mo)
			continue
		case *monitoringv1.ServiceMonitor:
			// The manifest's covers the sidecar's Service too.
			cs := c.(*monitoringv1.ServiceMonitor)
			svc := object[corev1.Service](t, rendered, "service.yaml:Service/cortex-extproc")
			if !reflect.DeepEqual(generic(t, cs.Spec.Endpoints, true), generic(t, mo.Spec.Endpoints, false)) || !selects(&cs.Spec.Selector, svc.Labels) {
				t.Errorf("ServiceMonitor: chart %+v, manifest %+v", cs.Spec, mo.Spec)
			}
			continue
		}
		got, exp := generic(t, c, true), generic(t, m, false)
		if !reflect.DeepEqual(got, exp) {
			gb, _ := yaml.Marshal(got)
			eb, _ := yaml.Marshal(exp)
			t.Errorf("%s: the chart renders\n%s\ndeploy/kubernetes has\n%s", kn, gb, eb)
		}
	}
	for name := range chart {
		t.Errorf("the chart renders %s, which deploy/kubernetes lacks", name)
	}
}

// compareConfigMaps compares cortex-extproc.toml as cortex-extproc reads
// it, models.toml as TOML, and envoy.yaml as YAML.
func compareConfigMaps(t *testing.T, name string, chart, manifest *corev1.ConfigMap) {
	t.Helper()
	if !reflect.DeepEqual(generic(t, chart.ObjectMeta, true), generic(t, manifest.ObjectMeta, false)) {
		t.Errorf("%s: metadata %+v, manifest %+v", name, chart.ObjectMeta, manifest.ObjectMeta)
	}
	keys := func(m map[string]string) []string {
		var ks []string
		for k := range m {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		return ks
	}
	if !reflect.DeepEqual(keys(chart.Data), keys(manifest.Data)) {
		t.Errorf("%s: keys %v, manifest %v", name, keys(chart.Data), keys(manifest.Data))
	}
	for k, mv := range manifest.Data {
		cv := chart.Data[k]
		var same bool
		switch {
		case k == "cortex-extproc.toml":
			a, errA := config.Parse("cortex-extproc.toml", []byte(cv))
			b, errB := config.Parse("cortex-extproc.toml", []byte(mv))
			same = errA == nil && errB == nil && reflect.DeepEqual(a.Config, b.Config) && len(a.Unknown) == 0
		case strings.HasSuffix(k, ".toml"):
			var a, b map[string]any
			same = toml.Unmarshal([]byte(cv), &a) == nil && toml.Unmarshal([]byte(mv), &b) == nil && reflect.DeepEqual(a, b)
		default:
			var a, b any
			same = yaml.Unmarshal([]byte(cv), &a) == nil && yaml.Unmarshal([]byte(mv), &b) == nil && reflect.DeepEqual(a, b)
		}
		if !same {
			t.Errorf("%s: %s differs from the manifest's:\n--- chart\n%s\n--- deploy/kubernetes\n%s", name, k, cv, mv)
		}
	}
}

// TestHelmChartObjectsHoldTogether renders other values and checks what
// the manifests are checked for: the Envoy config against the
// cortex-extproc config, the probes, the shutdown budget, the policy.
func TestHelmChartObjectsHoldTogether(t *testing.T) {
	cases := map[string]struct {
		release, namespace string
		values             map[string]any
	}{
		"defaults": {"cortex-extproc", "cortex", nil},
		"another release, three neurons, longer drain": {"edge", "inference", map[string]any{
			"neurons": []any{
				map[string]any{"name": "a", "endpoint": "http://a.gpu:13131"},
				map[string]any{"name": "b", "endpoint": "http://10.0.0.7:8000", "cluster": "gpu-b"},
				map[string]any{"name": "c", "endpoint": "http://c.gpu"},
			},
			"config":                        map[string]any{"drainTimeout": "2m", "maxRequestBytes": 8 << 20},
			"terminationGracePeriodSeconds": 160,
			"image":                         map[string]any{"tag": "0.1.0-rc.1"},
		}},
		"mTLS, own Envoy": {"cortex-extproc", "cortex", map[string]any{
			"tls":   map[string]any{"secretName": "cortex-extproc-tls", "clientCA": true},
			"envoy": map[string]any{"enabled": false},
		}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			objs, err := renderChart(tc.release, tc.namespace, tc.values)
			if err != nil {
				t.Fatal(err)
			}
			fullname := tc.release
			if !strings.Contains(tc.release, "cortex-extproc") {
				fullname = tc.release + "-cortex-extproc"
			}
			cm := object[corev1.ConfigMap](t, objs, "configmap.yaml:ConfigMap/"+fullname+"-config")
			cfg := parseServiceConfig(t, "chart cortex-extproc.toml", []byte(cm.Data["cortex-extproc.toml"]))
			if ps := validateConfig(t, cfg); len(ps) > 0 {
				t.Errorf("rendered cortex-extproc.toml has problems: %v", ps)
			}
			dep := object[appsv1.Deployment](t, objs, "deployment.yaml:Deployment/"+fullname)
			c := container(t, &dep.Spec.Template.Spec, dep.Name, "cortex-extproc")
			_, adminPort := listenPort(t, cfg.Admin.Listen)
			for _, p := range []struct {
				name  string
				probe *corev1.Probe
			}{{"liveness", c.LivenessProbe}, {"readiness", c.ReadinessProbe}} {
				if p.probe == nil || p.probe.HTTPGet == nil || containerPort(t, c, p.probe.HTTPGet.Port) != adminPort {
					t.Errorf("%s probe %+v is not HTTP on the admin port %d", p.name, p.probe, adminPort)
				}
			}
			limit := c.Resources.Limits[corev1.ResourceMemory]
			checkGoMemLimit(t, dep.Name, c, limit)
			if g, need := grace(t, dep), shutdownBudget(t, cfg); g < need {
				t.Errorf("terminationGracePeriodSeconds %s < %s", g, need)
			}
			if tls, _ := tc.values["tls"].(map[string]any); tls != nil {
				if cfg.full.ExtProc.TLSCertFile == "" || cfg.full.ExtProc.ClientCAFile == "" {
					t.Errorf("tls.secretName set, but cortex-extproc.toml has no TLS files: %+v", cfg.full.ExtProc)
				}
				var mounted bool
				for _, v := range dep.Spec.Template.Spec.Volumes {
					mounted = mounted || (v.Secret != nil && v.Secret.SecretName == tls["secretName"])
				}
				if !mounted {
					t.Errorf("Secret %v not mounted", tls["secretName"])
				}
			}
			envoyCM, ok := objs["envoy.yaml:ConfigMap/"+fullname+"-envoy-config"].(*corev1.ConfigMap)
			if envoy, _ := tc.values["envoy"].(map[string]any); envoy != nil && envoy["enabled"] == false {
				if ok {
					t.Error("envoy.enabled=false still renders Envoy")
				}
				return
			}
			if !ok {
				t.Fatalf("no Envoy ConfigMap (have %v)", objs.keys())
			}
			b := bootstrap(t, "chart envoy.yaml", []byte(envoyCM.Data["envoy.yaml"]), cfg)
			checkNeuronClusters(t, "chart envoy.yaml", b, cfg)
			checkClusterHeader(t, "chart envoy.yaml", b, cfg)
			checkShutdownDelayCovers(t, "chart envoy.yaml", b, cfg)
			host, port, err := clusterAddress(extProcCluster(t, b))
			if wantHost := fullname + "-grpc." + tc.namespace + ".svc.cluster.local"; err != nil || host != wantHost {
				t.Errorf("Envoy's ext_proc cluster is %s:%d (%v), want the headless Service %s", host, port, err, wantHost)
			}
			envoyDep := object[appsv1.Deployment](t, objs, "envoy.yaml:Deployment/"+fullname+"-envoy")
			pol := object[networkingv1.NetworkPolicy](t, objs, "networkpolicy.yaml:NetworkPolicy/"+fullname)
			checkNetworkPolicy(t, pol, dep, map[string]func(networkingv1.NetworkPolicyPeer) bool{
				"grpc":  func(p networkingv1.NetworkPolicyPeer) bool { return isEnvoyPeer(p, envoyDep) },
				"admin": isScraperPeer,
			})
			if _, ok := objs["servicemonitor.yaml:ServiceMonitor/"+fullname]; ok {
				t.Error("a ServiceMonitor by default: it needs the Prometheus Operator's CRD, so it is opt-in")
			}
		})
	}
}

func validateConfig(t *testing.T, cfg serviceConfig) []config.Problem {
	t.Helper()
	c := cfg.full
	c.ModelsConfig = "" // not on disk here
	c.File = ""
	return c.Validate()
}

// TestHelmChartRefusesBadValues: values that would break a rolling restart
// or the pod fail to render, saying what to change.
func TestHelmChartRefusesBadValues(t *testing.T) {
	cases := map[string]struct {
		values map[string]any
		want   string
	}{
		"grace shorter than the shutdown": {map[string]any{"terminationGracePeriodSeconds": 30},
			"terminationGracePeriodSeconds 30 is shorter than cortex-extproc's shutdown: config.shutdownDelay + config.drainTimeout + 15s = 65s"},
		"GOMEMLIMIT at the container limit": {map[string]any{"goMemLimit": "1GiB"},
			"goMemLimit 1GiB is not below resources.limits.memory 1Gi: set it to about 90% of the limit (e.g. 921MiB)"},
		"no neurons": {map[string]any{"neurons": []any{}}, "neurons is empty"},
		"TLS with the bundled Envoy": {map[string]any{"tls": map[string]any{"secretName": "s"}},
			"set envoy.enabled=false and give your own Envoy's extproc cluster an UpstreamTlsContext"},
		"https neuron": {map[string]any{"neurons": []any{map[string]any{"name": "a", "endpoint": "https://a:443"}}},
			"neuron a: endpoint https://a:443: the chart's Envoy config reaches neurons over plain http://host:port"},
		"duration in milliseconds": {map[string]any{"config": map[string]any{"shutdownDelay": "500ms"}},
			"must be Go durations in whole seconds, minutes or hours"},
		"schema: replicas as text":        {map[string]any{"replicas": "two"}, "replicas"},
		"schema: neuron without endpoint": {map[string]any{"neurons": []any{map[string]any{"name": "a"}}}, "endpoint"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := renderChart("cortex-extproc", "cortex", tc.values)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestHelmChartLints is `helm lint`: no warnings or errors.
func TestHelmChartLints(t *testing.T) {
	res := lint.RunAll(chartDir, nil, "cortex")
	for _, m := range res.Messages {
		if m.Severity >= support.WarningSev {
			t.Errorf("helm lint: %s", m.Error())
		}
	}
}

// releaseImage is the image the manifests and the chart's defaults must
// run: the one deploy/build-image.sh builds on the release tag of the
// chart's appVersion.
func releaseImage(t *testing.T) string {
	t.Helper()
	return "ghcr.io/helexa/cortex-extproc:" + chartAppVersion(t)
}

func chartAppVersion(t *testing.T) string {
	t.Helper()
	var meta struct {
		Version    string `json:"version"`
		AppVersion string `json:"appVersion"`
	}
	if err := yaml.Unmarshal(readFile(t, filepath.Join(chartDir, "Chart.yaml")), &meta); err != nil {
		t.Fatal(err)
	}
	if meta.AppVersion == "" || meta.AppVersion == "latest" {
		t.Fatalf("Chart.yaml appVersion %q: pin a release version", meta.AppVersion)
	}
	return meta.AppVersion
}
