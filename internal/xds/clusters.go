package xds

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/helexa/cortex-extproc/envoy"
	"github.com/helexa/cortex-extproc/internal/fleet"
)

// ConnectTimeout is the connect_timeout of every neuron cluster.
const ConnectTimeout = 5 * time.Second

const (
	httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	tlsSocketName  = "envoy.transport_sockets.tls"
)

// addr is a parsed inference endpoint: what an Envoy cluster can express.
// A path prefix in the endpoint URL is not part of it (Envoy clusters carry
// no path), and neurons serve /v1/... at the root.
type addr struct {
	scheme string // http | https
	host   string // lower-case hostname, or an IP literal without brackets
	port   uint32
}

func (a addr) String() string {
	return a.scheme + "://" + net.JoinHostPort(a.host, strconv.FormatUint(uint64(a.port), 10))
}

func (a addr) isIP() bool { return net.ParseIP(a.host) != nil }

func parseAddr(endpoint string) (addr, error) {
	u, err := url.Parse(endpoint)
	if err != nil {
		return addr{}, fmt.Errorf("%q is not a URL: %w", endpoint, err)
	}
	a := addr{scheme: strings.ToLower(u.Scheme), host: strings.ToLower(u.Hostname())}
	switch a.scheme {
	case "http":
		a.port = 80
	case "https":
		a.port = 443
	default:
		return addr{}, fmt.Errorf("%q: scheme must be http or https", endpoint)
	}
	if a.host == "" {
		return addr{}, fmt.Errorf("%q has no host", endpoint)
	}
	if p := u.Port(); p != "" {
		n, err := strconv.ParseUint(p, 10, 16)
		if err != nil || n == 0 {
			return addr{}, fmt.Errorf("%q: port %q is not in 1-65535", endpoint, p)
		}
		a.port = uint32(n)
	}
	return a, nil
}

// routeKey identifies "this neuron's inference endpoint at this address";
// it maps to the cluster that reaches it.
func routeKey(node string, a addr) string { return node + "\x00" + a.String() }

type clusterSpec struct {
	name string
	node string
	addr addr
}

// plan is the cluster set for one fleet snapshot.
type plan struct {
	clusters []*clusterv3.Cluster // sorted by name, each validated
	specs    []clusterSpec        // same order
	routes   map[string]string    // routeKey -> cluster name
	hash     string               // identifies the cluster set's content
}

// planFor derives the neuron clusters from a fleet snapshot:
//
//   - every neuron gets its configured cluster (Node.Cluster) at the host
//     and port of its configured endpoint, whether or not it lists models,
//     so the cluster is acknowledged before the first request needs it;
//   - a model whose inference endpoint has another scheme, host or port
//     gets a cluster of its own, "<Node.Cluster>-<host>-<port>", shared by
//     every model of that neuron at that address.
//
// Health does not matter: an unhealthy neuron keeps its clusters, so a
// flapping neuron does not churn Envoy's configuration. Resources that fail
// validation are left out (and logged): Envoy would NACK the whole update.
func planFor(s *fleet.Snapshot, log *slog.Logger) plan {
	p := plan{routes: map[string]string{}}
	owner := map[string]string{} // cluster name -> route key
	var specs []clusterSpec
	take := func(name, node string, a addr) {
		key := routeKey(node, a)
		if prev, ok := owner[name]; ok && prev != key {
			sum := sha256.Sum256([]byte(key))
			name += "-" + hex.EncodeToString(sum[:4])
		}
		owner[name] = key
		p.routes[key] = name
		specs = append(specs, clusterSpec{name: name, node: node, addr: a})
	}
	nodes := s.Nodes
	mains := make(map[string]addr, len(nodes))
	for _, n := range nodes {
		a, err := parseAddr(n.Endpoint)
		if err != nil {
			log.Error("neuron endpoint unusable for an Envoy cluster; no xDS cluster for this neuron, fix its endpoint in the config", "node", n.Name, "error", err)
			continue
		}
		if prev, dup := owner[n.Cluster]; dup {
			log.Error("two neurons use the same Envoy cluster name; only the first gets it over xDS, give each neuron its own `cluster`",
				"node", n.Name, "cluster", n.Cluster, "first", strings.SplitN(prev, "\x00", 2)[0])
			continue
		}
		mains[n.Name] = a
		take(n.Cluster, n.Name, a)
	}
	for _, n := range nodes {
		main, ok := mains[n.Name]
		if !ok {
			continue
		}
		for _, m := range n.Models {
			if m.Endpoint == "" {
				continue // not resolved yet: routing cannot pick it either
			}
			a, err := parseAddr(m.Endpoint)
			if err != nil {
				log.Warn("model endpoint unusable for an Envoy cluster; requests for it get 503 until the neuron answers a valid URL",
					"node", n.Name, "model", m.ID, "error", err)
				continue
			}
			if a == main {
				continue
			}
			if _, done := p.routes[routeKey(n.Name, a)]; done {
				continue
			}
			take(sanitize(n.Cluster+"-"+a.host+"-"+strconv.FormatUint(uint64(a.port), 10)), n.Name, a)
		}
	}
	slices.SortFunc(specs, func(a, b clusterSpec) int { return strings.Compare(a.name, b.name) })

	h := sha256.New()
	for _, sp := range specs {
		c, err := buildCluster(sp)
		if err != nil {
			log.Error("neuron cluster failed validation; not serving it over xDS (Envoy would reject the whole update)",
				"node", sp.node, "cluster", sp.name, "error", err)
			delete(p.routes, routeKey(sp.node, sp.addr))
			continue
		}
		p.clusters = append(p.clusters, c)
		p.specs = append(p.specs, sp)
		fmt.Fprintf(h, "%s\x00%s\x00%s\n", sp.name, sp.node, sp.addr)
	}
	p.hash = hex.EncodeToString(h.Sum(nil))[:12]
	return p
}

// sanitize keeps a generated cluster name to characters that are safe in
// an HTTP header value and in Envoy's stat names.
func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			return r
		}
		return '-'
	}, s)
}

// buildCluster makes the CDS resource: STRICT_DNS for a hostname (Envoy
// re-resolves it), STATIC for an IP, endpoints inline (no EDS, so nothing
// has to be warmed separately), HTTP/1.1 upstream, TLS for https.
func buildCluster(sp clusterSpec) (*clusterv3.Cluster, error) {
	typ := clusterv3.Cluster_STRICT_DNS
	if sp.addr.isIP() {
		typ = clusterv3.Cluster_STATIC
	}
	httpOpts, err := anypb.New(&upstreamhttpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_{
			ExplicitHttpConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &upstreamhttpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{
					HttpProtocolOptions: &corev3.Http1ProtocolOptions{},
				},
			},
		},
	})
	if err != nil {
		return nil, err
	}
	c := &clusterv3.Cluster{
		Name:                 sp.name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(ConnectTimeout),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{
			ClusterName: sp.name,
			Endpoints: []*endpointv3.LocalityLbEndpoints{{
				LbEndpoints: []*endpointv3.LbEndpoint{{
					HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
						Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
							Address:       sp.addr.host,
							PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: sp.addr.port},
						}}},
					}},
				}},
			}},
		},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{httpOptionsKey: httpOpts},
	}
	if sp.addr.scheme == "https" {
		// Encryption to the neuron; the certificate is not verified (no CA
		// bundle is known here). Operators who need verification use the
		// static envoy.yaml with a validation_context.
		tc := &tlsv3.UpstreamTlsContext{}
		if !sp.addr.isIP() {
			tc.Sni = sp.addr.host
		}
		a, err := anypb.New(tc)
		if err != nil {
			return nil, err
		}
		c.TransportSocket = &corev3.TransportSocket{Name: tlsSocketName, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: a}}
	}
	if err := errors.Join(envoy.ValidateMessage(c), envoy.CheckCluster(c)); err != nil {
		return nil, err
	}
	return c, nil
}
