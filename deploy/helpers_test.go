package deploy

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	toml "github.com/pelletier/go-toml/v2"

	"github.com/helexa/cortex-extproc/envoy"
	"github.com/helexa/cortex-extproc/internal/config"
)

// serviceConfig is the part of cortex-extproc.toml (contract.md) that other
// deployment files must agree with.
type serviceConfig struct {
	ModelsConfig string `toml:"models_config"`
	Extproc      struct {
		Listen            string `toml:"listen"`
		MaxRequestBytes   int64  `toml:"max_request_bytes"`
		MaxMessageTimeout string `toml:"max_message_timeout"`
	} `toml:"extproc"`
	Admin struct {
		Listen string `toml:"listen"`
	} `toml:"admin"`
	Upstream struct {
		Mode          string `toml:"mode"`
		ClusterHeader string `toml:"cluster_header"`
	} `toml:"upstream"`
	Neurons []struct {
		Name     string `toml:"name"`
		Endpoint string `toml:"endpoint"`
		Cluster  string `toml:"cluster"`
	} `toml:"neurons"`

	full config.Config // as cortex-extproc reads it
}

func parseServiceConfig(t *testing.T, name string, data []byte) serviceConfig {
	t.Helper()
	var c serviceConfig
	if err := toml.Unmarshal(data, &c); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(c.Neurons) == 0 {
		t.Fatalf("%s: no [[neurons]]", name)
	}
	// The same text through cortex-extproc's own loader, defaults applied.
	res, err := config.Parse("cortex-extproc.toml", data)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	if len(res.Unknown) > 0 {
		t.Errorf("%s: keys cortex-extproc does not know: %v", name, res.Unknown)
	}
	c.full = res.Config
	return c
}

// shutdownDelay and drainTimeout are extproc.shutdown_delay and
// extproc.drain_timeout, defaults included.
func (c serviceConfig) shutdownDelay(*testing.T) time.Duration { return c.full.ExtProc.ShutdownDelay }
func (c serviceConfig) drainTimeout(*testing.T) time.Duration  { return c.full.ExtProc.DrainTimeout }

// envoyBootstrap parses an Envoy config without checking it against a
// cortex-extproc config.
func envoyBootstrap(data []byte) (*bootstrapv3.Bootstrap, error) {
	return envoy.ParseBootstrapYAML(data)
}

// envoySettings are what the Envoy config must agree with, from this
// config and cortex-extproc's defaults.
func (c serviceConfig) envoySettings(t *testing.T) envoy.ExtProcSettings {
	t.Helper()
	s := envoy.DefaultExtProcSettings
	if c.Extproc.MaxRequestBytes > 0 {
		s.MaxRequestBytes = c.Extproc.MaxRequestBytes
	}
	if c.Extproc.MaxMessageTimeout != "" {
		d, err := time.ParseDuration(c.Extproc.MaxMessageTimeout)
		if err != nil {
			t.Fatalf("extproc.max_message_timeout: %v", err)
		}
		s.MaxMessageTimeout = d
	}
	if c.Upstream.ClusterHeader != "" {
		s.ClusterHeader = c.Upstream.ClusterHeader
	}
	return s
}

// clusterName is a neuron's Envoy cluster: `cluster`, else "neuron-<name>"
// (contract.md).
func clusterName(name, cluster string) string {
	if cluster != "" {
		return cluster
	}
	return "neuron-" + name
}

// endpointHostPort splits a neuron endpoint URL, with the neuron's default
// port when none is given.
func endpointHostPort(t *testing.T, endpoint string) (string, int) {
	t.Helper()
	u, err := url.Parse(endpoint)
	if err != nil || u.Hostname() == "" {
		t.Fatalf("neuron endpoint %q is not a URL with a host", endpoint)
	}
	port := 13131
	if p := u.Port(); p != "" {
		port, _ = strconv.Atoi(p)
	}
	return u.Hostname(), port
}

func listenPort(t *testing.T, addr string) (string, int) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("listen address %q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("listen address %q: port is not a number", addr)
	}
	return h, n
}

// bootstrap parses an Envoy config and validates it against the
// cortex-extproc config it fronts.
func bootstrap(t *testing.T, name string, data []byte, cfg serviceConfig) *bootstrapv3.Bootstrap {
	t.Helper()
	if err := envoy.ValidateBootstrapYAMLFor(data, cfg.envoySettings(t)); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	b, err := envoy.ParseBootstrapYAML(data)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return b
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// staticCluster returns the static cluster called name, or nil.
func staticCluster(b *bootstrapv3.Bootstrap, name string) *clusterv3.Cluster {
	for _, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			return c
		}
	}
	return nil
}

// clusterAddress is the single host:port a cluster's load_assignment names.
func clusterAddress(c *clusterv3.Cluster) (string, int, error) {
	eps := c.GetLoadAssignment().GetEndpoints()
	if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 1 {
		return "", 0, fmt.Errorf("cluster %q: want exactly one endpoint", c.GetName())
	}
	sa := eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
	return sa.GetAddress(), int(sa.GetPortValue()), nil
}

// extProcCluster is the cluster the first ext_proc filter talks to.
func extProcCluster(t *testing.T, b *bootstrapv3.Bootstrap) *clusterv3.Cluster {
	t.Helper()
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				m, err := f.GetTypedConfig().UnmarshalNew()
				if err != nil {
					continue
				}
				hcm, ok := m.(*hcmv3.HttpConnectionManager)
				if !ok {
					continue
				}
				for _, hf := range hcm.GetHttpFilters() {
					m, err := hf.GetTypedConfig().UnmarshalNew()
					if err != nil {
						continue
					}
					if ep, ok := m.(*extprocv3.ExternalProcessor); ok {
						name := ep.GetGrpcService().GetEnvoyGrpc().GetClusterName()
						if c := staticCluster(b, name); c != nil {
							return c
						}
						t.Fatalf("ext_proc cluster %q not found", name)
					}
				}
			}
		}
	}
	t.Fatal("no ext_proc filter")
	return nil
}

// routeClusterHeaders lists the cluster_header of every route.
func routeClusterHeaders(t *testing.T, b *bootstrapv3.Bootstrap) []string {
	t.Helper()
	var out []string
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				m, err := f.GetTypedConfig().UnmarshalNew()
				if err != nil {
					continue
				}
				if hcm, ok := m.(*hcmv3.HttpConnectionManager); ok {
					for _, vh := range hcm.GetRouteConfig().GetVirtualHosts() {
						for _, r := range vh.GetRoutes() {
							if h := r.GetRoute().GetClusterHeader(); h != "" {
								out = append(out, h)
							}
						}
					}
				}
			}
		}
	}
	return out
}

// checkClusterHeader checks that Envoy routes on the header cortex-extproc
// sets ([upstream] cluster_header, default x-cortex-cluster).
func checkClusterHeader(t *testing.T, name string, b *bootstrapv3.Bootstrap, cfg serviceConfig) {
	t.Helper()
	want := cfg.Upstream.ClusterHeader
	if want == "" {
		want = "x-cortex-cluster"
	}
	hs := routeClusterHeaders(t, b)
	if len(hs) == 0 {
		t.Errorf("%s: no route takes its cluster from a header, but cortex-extproc runs in mode %q", name, cfg.Upstream.Mode)
	}
	for _, h := range hs {
		if h != want {
			t.Errorf("%s: a route reads cluster_header %q, cortex-extproc sets %q", name, h, want)
		}
	}
}

// listenerPort is the port of the first listener.
func listenerPort(b *bootstrapv3.Bootstrap) int {
	ls := b.GetStaticResources().GetListeners()
	if len(ls) == 0 {
		return 0
	}
	return int(ls[0].GetAddress().GetSocketAddress().GetPortValue())
}
