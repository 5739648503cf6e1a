package deploy

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	toml "github.com/pelletier/go-toml/v2"
	"sigs.k8s.io/yaml"

	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

// repoRoot is where docker-compose.yaml lives; its relative paths start here.
const repoRoot = ".."

type composeFile struct {
	Name     string                    `json:"name"`
	Services map[string]composeService `json:"services"`
}

type composeService struct {
	Image     string        `json:"image"`
	Build     *composeBuild `json:"build"`
	Command   []string      `json:"command"`
	Volumes   []string      `json:"volumes"`
	Ports     []string      `json:"ports"`
	DependsOn map[string]struct {
		Condition string `json:"condition"`
	} `json:"depends_on"`
	StopGracePeriod string `json:"stop_grace_period"`
}

type composeBuild struct {
	Context    string            `json:"context"`
	Dockerfile string            `json:"dockerfile"`
	Target     string            `json:"target"`
	Args       map[string]string `json:"args"`
}

func loadCompose(t *testing.T) composeFile {
	t.Helper()
	var c composeFile
	if err := yaml.UnmarshalStrict(readFile(t, filepath.Join(repoRoot, "docker-compose.yaml")), &c); err != nil {
		// Strict: a key this test does not model (e.g. a string command)
		// must be added here, not silently skipped.
		t.Fatalf("docker-compose.yaml: %v", err)
	}
	for _, want := range []string{"envoy", "cortex-extproc"} {
		if _, ok := c.Services[want]; !ok {
			t.Fatalf("docker-compose.yaml has no %q service", want)
		}
	}
	return c
}

// hostPath maps a path inside a service's container to the file in the
// repository that a bind mount puts there, or "" when none does.
func (s composeService) hostPath(containerPath string) string {
	for _, v := range s.Volumes {
		parts := strings.Split(v, ":")
		if len(parts) < 2 {
			continue
		}
		host, ctr := parts[0], parts[1]
		if containerPath == ctr {
			return filepath.Join(repoRoot, host)
		}
		if rest, ok := strings.CutPrefix(containerPath, strings.TrimSuffix(ctr, "/")+"/"); ok {
			return filepath.Join(repoRoot, host, rest)
		}
	}
	return ""
}

// flagValue returns the value of --name in a command (either "--name v" or
// "--name=v").
func flagValue(cmd []string, name string) string {
	for i, a := range cmd {
		if v, ok := strings.CutPrefix(a, name+"="); ok {
			return v
		}
		if a == name && i+1 < len(cmd) {
			return cmd[i+1]
		}
	}
	return ""
}

func TestComposeReferencedFilesExist(t *testing.T) {
	c := loadCompose(t)
	stageRE := regexp.MustCompile(`(?im)^FROM\s+\S+\s+AS\s+(\S+)\s*$`)
	for name, s := range c.Services {
		if s.Build != nil {
			ctx := filepath.Join(repoRoot, s.Build.Context)
			if st, err := os.Stat(ctx); err != nil || !st.IsDir() {
				t.Errorf("service %s: build context %s is not a directory", name, ctx)
				continue
			}
			df := filepath.Join(ctx, s.Build.Dockerfile)
			data, err := os.ReadFile(df)
			if err != nil {
				t.Errorf("service %s: dockerfile: %v", name, err)
				continue
			}
			var stages []string
			for _, m := range stageRE.FindAllStringSubmatch(string(data), -1) {
				stages = append(stages, m[1])
			}
			if s.Build.Target != "" && !slices.Contains(stages, s.Build.Target) {
				t.Errorf("service %s: build target %q is not a stage of %s (stages %v)", name, s.Build.Target, df, stages)
			}
			// Every package the Dockerfile builds must exist.
			for _, m := range regexp.MustCompile(`\./cmd/[\w-]+`).FindAllString(string(data), -1) {
				if _, err := os.Stat(filepath.Join(ctx, m)); err != nil {
					t.Errorf("%s builds %s, which does not exist", df, m)
				}
			}
		} else if s.Image == "" {
			t.Errorf("service %s has neither image nor build", name)
		}
		for dep := range s.DependsOn {
			if _, ok := c.Services[dep]; !ok {
				t.Errorf("service %s depends on %q, which is not a service", name, dep)
			}
		}
		for _, v := range s.Volumes {
			host := strings.Split(v, ":")[0]
			if !strings.HasPrefix(host, ".") {
				continue // a named volume
			}
			if _, err := os.Stat(filepath.Join(repoRoot, host)); err != nil {
				t.Errorf("service %s mounts %s: %v", name, host, err)
			}
		}
	}
}

func TestComposeNeuronsHaveServicesAndEnvoyClusters(t *testing.T) {
	c := loadCompose(t)
	ce := c.Services["cortex-extproc"]
	cfgPath := ce.hostPath(flagValue(ce.Command, "--config"))
	if cfgPath == "" {
		t.Fatalf("cortex-extproc's --config %q is not mounted from the repository (volumes %v)", flagValue(ce.Command, "--config"), ce.Volumes)
	}
	cfg := parseServiceConfig(t, cfgPath, readFile(t, cfgPath))
	if _, err := os.Stat(filepath.Join(filepath.Dir(cfgPath), cfg.ModelsConfig)); err != nil {
		t.Errorf("models_config %q (relative to %s): %v", cfg.ModelsConfig, cfgPath, err)
	}

	ev := c.Services["envoy"]
	envoyPath := ev.hostPath("/etc/envoy/envoy.yaml")
	if envoyPath == "" {
		t.Fatalf("the envoy service does not mount a config at /etc/envoy/envoy.yaml (volumes %v)", ev.Volumes)
	}
	b := bootstrap(t, envoyPath, readFile(t, envoyPath), cfg)
	checkClusterHeader(t, envoyPath, b, cfg)

	clusters := map[string]bool{}
	for _, n := range cfg.Neurons {
		host, port := endpointHostPort(t, n.Endpoint)
		svc, ok := c.Services[host]
		if !ok {
			t.Errorf("neuron %s: endpoint host %q is not a compose service", n.Name, host)
			continue
		}
		if _, lp := listenPort(t, flagValue(svc.Command, "--listen")); lp != port {
			t.Errorf("neuron %s: service %s listens on port %d, endpoint says %d", n.Name, host, lp, port)
		}
		name := clusterName(n.Name, n.Cluster)
		clusters[name] = true
		cl := staticCluster(b, name)
		if cl == nil {
			t.Errorf("neuron %s: Envoy has no cluster %q", n.Name, name)
			continue
		}
		if h, p, err := clusterAddress(cl); err != nil || h != host || p != port {
			t.Errorf("neuron %s: cluster %s points at %s:%d (%v), want %s:%d", n.Name, name, h, p, err, host, port)
		}
	}

	ep := extProcCluster(t, b)
	clusters[ep.GetName()] = true
	_, extprocPort := listenPort(t, cfg.Extproc.Listen)
	if h, p, err := clusterAddress(ep); err != nil || h != "cortex-extproc" || p != extprocPort {
		t.Errorf("Envoy's ext_proc cluster points at %s:%d (%v), want cortex-extproc:%d ([extproc] listen)", h, p, err, extprocPort)
	}
	for _, cl := range b.GetStaticResources().GetClusters() {
		if !clusters[cl.GetName()] {
			t.Errorf("Envoy cluster %q belongs to no [[neurons]] entry", cl.GetName())
		}
	}

	if want := fmt.Sprintf(":%d", listenerPort(b)); !slices.ContainsFunc(ev.Ports, func(p string) bool { return strings.HasSuffix(p, want) }) {
		t.Errorf("envoy service ports %v do not publish the listener port %s", ev.Ports, want)
	}
	if _, adminPort := listenPort(t, cfg.Admin.Listen); !slices.ContainsFunc(ce.Ports, func(p string) bool { return strings.HasSuffix(p, fmt.Sprintf(":%d", adminPort)) }) {
		t.Errorf("cortex-extproc ports %v do not publish the admin port %d", ce.Ports, adminPort)
	}
}

// The simulators must start with the command lines compose gives them, and
// the fleet must offer what compose/models.toml promises: a warm alias and
// one that needs a cold load.
func TestComposeSimulatorsStartAndCoverTheDemo(t *testing.T) {
	c := loadCompose(t)
	ce := c.Services["cortex-extproc"]
	cfgPath := ce.hostPath(flagValue(ce.Command, "--config"))
	cfg := parseServiceConfig(t, cfgPath, readFile(t, cfgPath))

	var cat struct {
		Models []struct {
			ID string `toml:"id"`
		} `toml:"models"`
		Aliases map[string]string `toml:"aliases"`
	}
	if err := toml.Unmarshal(readFile(t, filepath.Join(filepath.Dir(cfgPath), cfg.ModelsConfig)), &cat); err != nil {
		t.Fatal(err)
	}
	inCatalogue := map[string]bool{}
	for _, m := range cat.Models {
		inCatalogue[m.ID] = true
	}

	resident := map[string]bool{}
	for _, n := range cfg.Neurons {
		host, _ := endpointHostPort(t, n.Endpoint)
		svc := c.Services[host]
		cmd, err := neuronsim.ParseCommandLine(svc.Command, io.Discard)
		if err != nil {
			t.Errorf("service %s: neuron-sim flags: %v", host, err)
			continue
		}
		if cmd.Options.Name != n.Name {
			t.Errorf("service %s: --name %q, want the neuron name %q", host, cmd.Options.Name, n.Name)
		}
		opts := cmd.Options
		if cmd.CataloguePath != "" {
			p := svc.hostPath(cmd.CataloguePath)
			if p == "" {
				t.Errorf("service %s: --catalogue %s is not mounted", host, cmd.CataloguePath)
				continue
			}
			if opts.Sizes, opts.Capabilities, err = neuronsim.CatalogueInfo(readFile(t, p)); err != nil {
				t.Errorf("service %s: %v", host, err)
				continue
			}
		}
		sim, err := neuronsim.New(opts)
		if err != nil {
			t.Errorf("service %s: simulator does not start: %v", host, err)
			continue
		}
		for _, m := range sim.Models() {
			if !inCatalogue[m.ID] {
				t.Errorf("service %s holds %s, which compose's catalogue lacks", host, m.ID)
			}
			if m.Status == neuron.StatusLoaded {
				resident[m.ID] = true
			}
		}
		sim.Close()
	}

	var warm, cold []string
	for alias, target := range cat.Aliases {
		if !inCatalogue[target] {
			t.Errorf("alias %s targets %s, which is not in the catalogue", alias, target)
		}
		if resident[target] {
			warm = append(warm, alias)
		} else {
			cold = append(cold, alias)
		}
	}
	if len(warm) == 0 || len(cold) == 0 {
		t.Errorf("aliases resident at start: %v, needing a cold load: %v; the demo needs at least one of each", warm, cold)
	}
}
