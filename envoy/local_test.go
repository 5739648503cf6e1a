package envoy_test

// The demo without Docker (run-local.sh): envoy-local.yaml, the
// cortex-extproc config it goes with, and the command lines the script
// runs must agree with each other and with the docker-compose demo they
// copy. Envoy itself is not needed: what it would reject is checked by the
// validator (TestShippedEnvoyConfigsValidate, TestShippedConfigsRouteOnlyInference
// cover envoy-local.yaml like every shipped config).

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"sigs.k8s.io/yaml"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/envoy"
	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

const (
	localEnvoy  = "envoy-local.yaml"
	localConfig = "local/cortex-extproc.toml"
	runLocal    = "run-local.sh"
)

// loadLocalConfig reads local/cortex-extproc.toml the way `cortex-extproc
// validate` does: the config with its defaults, every problem Validate
// finds, and the catalogue it names.
func loadLocalConfig(t *testing.T) config.Config {
	t.Helper()
	res, err := config.Load(localConfig)
	if err != nil {
		t.Fatalf("%s: %v", localConfig, err)
	}
	if len(res.Unknown) > 0 {
		t.Errorf("%s: keys cortex-extproc does not know: %v", localConfig, res.Unknown)
	}
	for _, p := range res.Config.Validate() {
		t.Errorf("%s: %s", localConfig, p.String())
	}
	if _, err := catalogue.LoadFile(res.Config.ModelsConfig); err != nil {
		t.Errorf("%s: models_config: %v", localConfig, err)
	}
	if len(res.Config.Neurons) == 0 {
		t.Fatalf("%s: no [[neurons]]", localConfig)
	}
	return res.Config
}

func loadLocalEnvoy(t *testing.T) (*bootstrapv3.Bootstrap, []byte) {
	t.Helper()
	data, err := os.ReadFile(localEnvoy)
	if err != nil {
		t.Fatal(err)
	}
	b, err := envoy.ParseBootstrapYAML(data)
	if err != nil {
		t.Fatalf("%s: %v", localEnvoy, err)
	}
	return b, data
}

func hostPort(t *testing.T, what, addr string) (string, int) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s %q: %v", what, addr, err)
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s %q: port: %v", what, addr, err)
	}
	return h, port
}

func socket(a *corev3.Address) (string, int) {
	sa := a.GetSocketAddress()
	return sa.GetAddress(), int(sa.GetPortValue())
}

// clusterSocket is a single-endpoint cluster's address.
func clusterSocket(t *testing.T, c *clusterv3.Cluster) (string, int) {
	t.Helper()
	eps := c.GetLoadAssignment().GetEndpoints()
	if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 1 {
		t.Fatalf("cluster %s: want exactly one endpoint", c.GetName())
	}
	return socket(eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress())
}

// The config validates, and Envoy's clusters are exactly cortex-extproc's
// ext_proc listener and its [[neurons]], at the same loopback addresses.
func TestLocalEnvoyAgreesWithLocalConfig(t *testing.T) {
	cfg := loadLocalConfig(t)
	b, data := loadLocalEnvoy(t)
	settings := envoy.ExtProcSettings{
		MaxRequestBytes:   int64(cfg.ExtProc.MaxRequestBytes),
		MaxMessageTimeout: cfg.ExtProc.MaxMessageTimeout,
		ClusterHeader:     cfg.Upstream.ClusterHeader,
	}
	if err := envoy.ValidateBootstrapYAMLFor(data, settings); err != nil {
		t.Errorf("%s against %s: %v", localEnvoy, localConfig, err)
	}

	clusters := map[string]*clusterv3.Cluster{}
	for _, c := range b.GetStaticResources().GetClusters() {
		clusters[c.GetName()] = c
	}
	want := map[string][2]any{}
	eh, ep := hostPort(t, "extproc.listen", cfg.ExtProc.Listen)
	want["extproc"] = [2]any{eh, ep}
	for _, n := range cfg.Neurons {
		u, err := url.Parse(n.Endpoint)
		if err != nil || u.Port() == "" {
			t.Fatalf("neuron %s: endpoint %q: want http://127.0.0.1:PORT", n.Name, n.Endpoint)
		}
		p, _ := strconv.Atoi(u.Port())
		name := n.Cluster
		if name == "" {
			name = "neuron-" + n.Name
		}
		want[name] = [2]any{u.Hostname(), p}
	}
	for name, addr := range want {
		c := clusters[name]
		if c == nil {
			t.Errorf("%s has no cluster %q (%s)", localEnvoy, name, localConfig)
			continue
		}
		if c.GetType() != clusterv3.Cluster_STATIC {
			t.Errorf("cluster %s is %v; loopback addresses need no DNS: STATIC", name, c.GetType())
		}
		if h, p := clusterSocket(t, c); h != addr[0] || p != addr[1] {
			t.Errorf("cluster %s points at %s:%d; %s says %s:%d", name, h, p, localConfig, addr[0], addr[1])
		}
	}
	for name := range clusters {
		if _, ok := want[name]; !ok {
			t.Errorf("cluster %s belongs to nothing in %s", name, localConfig)
		}
	}
	for what, a := range map[string]*corev3.Address{
		"listener": b.GetStaticResources().GetListeners()[0].GetAddress(),
		"admin":    b.GetAdmin().GetAddress(),
	} {
		if h, _ := socket(a); h != "127.0.0.1" {
			t.Errorf("%s %s binds %s: the local demo stays on loopback", localEnvoy, what, h)
		}
	}
}

// normalizedBootstrap is a config as JSON without what differs between
// envoy.yaml and envoy-local.yaml by design: the node, the listener's
// address and how the clusters reach their endpoints.
func normalizedBootstrap(t *testing.T, path string) map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var m map[string]any
	if err := json.Unmarshal(js, &m); err != nil {
		t.Fatal(err)
	}
	delete(m, "node")
	sr, _ := m["static_resources"].(map[string]any)
	for _, l := range asList(sr["listeners"]) {
		delete(l, "address")
	}
	for _, c := range asList(sr["clusters"]) {
		delete(c, "load_assignment")
		delete(c, "type")
		delete(c, "dns_lookup_family")
	}
	return m
}

func asList(v any) []map[string]any {
	var out []map[string]any
	l, _ := v.([]any)
	for _, e := range l {
		if m, ok := e.(map[string]any); ok {
			out = append(out, m)
		}
	}
	return out
}

// firstDifference names the first path where a and b differ.
func firstDifference(path string, a, b any) string {
	switch av := a.(type) {
	case map[string]any:
		bv, ok := b.(map[string]any)
		if !ok {
			return path
		}
		keys := map[string]bool{}
		for k := range av {
			keys[k] = true
		}
		for k := range bv {
			keys[k] = true
		}
		sorted := make([]string, 0, len(keys))
		for k := range keys {
			sorted = append(sorted, k)
		}
		sort.Strings(sorted)
		for _, k := range sorted {
			if d := firstDifference(path+"."+k, av[k], bv[k]); d != "" {
				return d
			}
		}
		return ""
	case []any:
		bv, ok := b.([]any)
		if !ok || len(av) != len(bv) {
			return path
		}
		for i := range av {
			if d := firstDifference(fmt.Sprintf("%s[%d]", path, i), av[i], bv[i]); d != "" {
				return d
			}
		}
		return ""
	}
	if !reflect.DeepEqual(a, b) {
		return path
	}
	return ""
}

// envoy-local.yaml is envoy.yaml on loopback: the same route table, the
// same ext_proc filter and timeouts, the same clusters. A change to
// envoy.yaml must be copied over.
func TestLocalEnvoyIsEnvoyYAMLOnLoopback(t *testing.T) {
	shipped, local := normalizedBootstrap(t, "envoy.yaml"), normalizedBootstrap(t, localEnvoy)
	if d := firstDifference("", shipped, local); d != "" {
		t.Errorf("%s differs from envoy.yaml at %s: only the node, the listener's address and the clusters' endpoints (and their type) may differ; copy envoy.yaml's change over", localEnvoy, d)
	}
}

// printCommands runs run-local.sh --print-commands (after bash -n): each
// process's command line, by label.
func printCommands(t *testing.T) map[string][]string {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not found: run-local.sh is a bash script")
	}
	if out, err := exec.Command(bash, "-n", runLocal).CombinedOutput(); err != nil {
		t.Fatalf("bash -n %s: %v\n%s", runLocal, err, out)
	}
	cmd := exec.Command(bash, runLocal, "--print-commands")
	cmd.Env = append(os.Environ(), "BIN_DIR=") // names as given, not a build directory
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("%s --print-commands: %v\n%s", runLocal, err, ee.Stderr)
		}
		t.Fatal(err)
	}
	cmds := map[string][]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Split(line, "\t")
		if len(f) < 2 {
			t.Fatalf("%s --print-commands: line %q is not LABEL<TAB>COMMAND…", runLocal, line)
		}
		cmds[f[0]] = f[1:]
	}
	return cmds
}

// sameFile reports whether two paths name the same file.
func sameFile(t *testing.T, a, b string) bool {
	t.Helper()
	sa, err := os.Stat(a)
	if err != nil {
		t.Errorf("%v", err)
		return false
	}
	sb, err := os.Stat(b)
	if err != nil {
		t.Errorf("%v", err)
		return false
	}
	return os.SameFile(sa, sb)
}

// composeCommands are the neuron-sim command lines of docker-compose.yaml,
// by service.
func composeCommands(t *testing.T) map[string][]string {
	t.Helper()
	data, err := os.ReadFile("../docker-compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Services map[string]struct {
			Command []string `json:"command"`
		} `json:"services"`
	}
	if err := yaml.Unmarshal(data, &c); err != nil {
		t.Fatalf("docker-compose.yaml: %v", err)
	}
	out := map[string][]string{}
	for name, s := range c.Services {
		out[name] = s.Command
	}
	return out
}

// run-local.sh starts one neuron-sim per [[neurons]] entry, on its
// endpoint, with compose's fleet (devices, models, latencies), whose models
// fit; cortex-extproc with local/cortex-extproc.toml; Envoy with
// envoy-local.yaml; and it checks exactly the ports they listen on.
func TestRunLocalCommands(t *testing.T) {
	cfg := loadLocalConfig(t)
	b, _ := loadLocalEnvoy(t)
	cmds := printCommands(t)
	compose := composeCommands(t)

	used := map[int]string{}
	use := func(port int, what string) {
		if other, dup := used[port]; dup {
			t.Errorf("port %d is both %s's and %s's", port, other, what)
		}
		used[port] = what
	}
	for _, n := range cfg.Neurons {
		args, ok := cmds[n.Name]
		if !ok {
			t.Errorf("%s starts no process labelled %q for neuron %s", runLocal, n.Name, n.Name)
			continue
		}
		if !strings.HasSuffix(args[0], "neuron-sim") {
			t.Errorf("%s: %s runs %s, want neuron-sim", runLocal, n.Name, args[0])
			continue
		}
		sim, err := neuronsim.ParseCommandLine(args[1:], io.Discard)
		if err != nil {
			t.Errorf("%s: %s's neuron-sim flags: %v", runLocal, n.Name, err)
			continue
		}
		u, _ := url.Parse(n.Endpoint)
		if sim.Options.Name != n.Name {
			t.Errorf("%s: sim --name %q, want the neuron name %q", runLocal, sim.Options.Name, n.Name)
		}
		if h, p := hostPort(t, n.Name+" --listen", sim.Listen); h != u.Hostname() || strconv.Itoa(p) != u.Port() {
			t.Errorf("%s: %s listens on %s, its endpoint is %s", runLocal, n.Name, sim.Listen, n.Endpoint)
		} else {
			use(p, n.Name)
		}
		if !sameFile(t, sim.CataloguePath, cfg.ModelsConfig) {
			t.Errorf("%s: %s reads --catalogue %s, cortex-extproc %s: they must be one file", runLocal, n.Name, sim.CataloguePath, cfg.ModelsConfig)
		}

		// The same simulated machine as compose's service of that name.
		if cc, ok := compose[n.Name]; !ok {
			t.Errorf("docker-compose.yaml has no service %q to copy", n.Name)
		} else if want, err := neuronsim.ParseCommandLine(cc, io.Discard); err != nil {
			t.Errorf("docker-compose.yaml %s: %v", n.Name, err)
		} else if !reflect.DeepEqual(sim.Options, want.Options) {
			t.Errorf("%s: %s's simulator differs from compose's:\n run-local %+v\n compose   %+v", runLocal, n.Name, sim.Options, want.Options)
		}

		// Its resident models fit its devices: the simulator starts.
		opts := sim.Options
		data, err := os.ReadFile(sim.CataloguePath)
		if err != nil {
			t.Fatal(err)
		}
		if opts.Sizes, opts.Capabilities, err = neuronsim.CatalogueInfo(data); err != nil {
			t.Fatalf("%s: %v", sim.CataloguePath, err)
		}
		s, err := neuronsim.New(opts)
		if err != nil {
			t.Errorf("%s: %s's simulator does not start: %v", runLocal, n.Name, err)
			continue
		}
		s.Close()
	}

	ce := cmds["cortex-extproc"]
	if len(ce) != 4 || !strings.HasSuffix(ce[0], "cortex-extproc") || ce[1] != "serve" || ce[2] != "--config" || !sameFile(t, ce[3], localConfig) {
		t.Errorf("%s runs cortex-extproc as %q, want cortex-extproc serve --config …/%s", runLocal, ce, localConfig)
	}
	_, p := hostPort(t, "extproc.listen", cfg.ExtProc.Listen)
	use(p, "cortex-extproc's ext_proc")
	_, p = hostPort(t, "admin.listen", cfg.Admin.Listen)
	use(p, "cortex-extproc's admin")

	ev := cmds["envoy"]
	if i := slices.Index(ev, "-c"); i < 0 || i+1 == len(ev) || !sameFile(t, ev[i+1], localEnvoy) {
		t.Errorf("%s runs Envoy as %q, want -c …/%s", runLocal, ev, localEnvoy)
	}
	_, p = socket(b.GetStaticResources().GetListeners()[0].GetAddress())
	use(p, "Envoy's listener")
	_, p = socket(b.GetAdmin().GetAddress())
	use(p, "Envoy's admin")
	if len(cmds) != len(cfg.Neurons)+2 {
		t.Errorf("%s starts %d processes, want the %d neurons, cortex-extproc and envoy", runLocal, len(cmds), len(cfg.Neurons))
	}

	// The ports it checks before starting are exactly those in use.
	text, err := os.ReadFile(runLocal)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ports="([0-9 ]+)"$`).FindSubmatch(text)
	if m == nil {
		t.Fatalf(`%s: no ports="…" line`, runLocal)
	}
	var checked, want []int
	for _, f := range strings.Fields(string(m[1])) {
		p, _ := strconv.Atoi(f)
		checked = append(checked, p)
	}
	for p := range used {
		want = append(want, p)
	}
	slices.Sort(checked)
	slices.Sort(want)
	if !slices.Equal(checked, want) {
		t.Errorf("%s checks ports %v before starting, the processes use %v", runLocal, checked, want)
	}
}
