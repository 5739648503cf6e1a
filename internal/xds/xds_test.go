package xds

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/envoy"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
)

type wantCluster struct {
	typ  clusterv3.Cluster_DiscoveryType
	host string
	port uint32
}

func checkClusters(t *testing.T, got map[string]*clusterv3.Cluster, want map[string]wantCluster) {
	t.Helper()
	if len(got) != len(want) {
		names := make([]string, 0, len(got))
		for n := range got {
			names = append(names, n)
		}
		t.Fatalf("clusters %v, want %d: %v", names, len(want), want)
	}
	for name, w := range want {
		c := got[name]
		if c == nil {
			t.Fatalf("no cluster %q", name)
		}
		if c.GetType() != w.typ {
			t.Errorf("%s: type %s, want %s", name, c.GetType(), w.typ)
		}
		if c.GetEdsClusterConfig() != nil {
			t.Errorf("%s: uses EDS; endpoints must be inline", name)
		}
		if got := c.GetConnectTimeout().AsDuration(); got != 5*time.Second {
			t.Errorf("%s: connect_timeout %s, want 5s", name, got)
		}
		la := c.GetLoadAssignment()
		if la.GetClusterName() != name || len(la.GetEndpoints()) != 1 || len(la.GetEndpoints()[0].GetLbEndpoints()) != 1 {
			t.Fatalf("%s: load_assignment %v, want one endpoint", name, la)
		}
		sa := la.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if sa.GetAddress() != w.host || sa.GetPortValue() != w.port {
			t.Errorf("%s: address %s:%d, want %s:%d", name, sa.GetAddress(), sa.GetPortValue(), w.host, w.port)
		}
		opts := &upstreamhttpv3.HttpProtocolOptions{}
		if err := c.GetTypedExtensionProtocolOptions()[httpOptionsKey].UnmarshalTo(opts); err != nil {
			t.Errorf("%s: no HttpProtocolOptions: %v", name, err)
		} else if opts.GetExplicitHttpConfig().GetHttpProtocolOptions() == nil {
			t.Errorf("%s: upstream protocol is not explicit HTTP/1.1: %v", name, opts)
		}
		if err := envoy.ValidateMessage(c); err != nil {
			t.Errorf("%s: served a cluster that fails validation: %v", name, err)
		}
	}
}

func TestClustersServedOverADSAndNamedOnlyAfterACK(t *testing.T) {
	ff := newFakeFleet(
		node("beast", "neuron-beast", "http://beast.internal:13131",
			"qwen=http://beast.internal:13131", "llama=http://beast.internal:8001", "phi=http://beast.internal:8001"),
		node("rig2", "gpu-rig2", "http://10.0.0.12:13131"),
		node("v6", "neuron-v6", "http://[fd00::5]:13131", "big=https://[FD00::5]:9443"),
	)
	h := start(t, ff)
	u := h.srv.Upstream()
	if u.Header() != "x-cortex-cluster" || u.DynamicMetadataKey() != "" {
		t.Fatalf("Header %q, DynamicMetadataKey %q; want x-cortex-cluster and none", u.Header(), u.DynamicMetadataKey())
	}

	e := h.connect("edge-1", "")
	resp, cs := e.recv()
	checkClusters(t, cs, map[string]wantCluster{
		"neuron-beast":                     {clusterv3.Cluster_STRICT_DNS, "beast.internal", 13131},
		"neuron-beast-beast.internal-8001": {clusterv3.Cluster_STRICT_DNS, "beast.internal", 8001},
		"gpu-rig2":                         {clusterv3.Cluster_STATIC, "10.0.0.12", 13131},
		"neuron-v6":                        {clusterv3.Cluster_STATIC, "fd00::5", 13131},
		"neuron-v6-fd00--5-9443":           {clusterv3.Cluster_STATIC, "fd00::5", 9443},
	})
	if cs["neuron-beast"].GetTransportSocket() != nil {
		t.Error("http endpoint got a TLS transport socket")
	}
	tc := &tlsv3.UpstreamTlsContext{}
	if err := cs["neuron-v6-fd00--5-9443"].GetTransportSocket().GetTypedConfig().UnmarshalTo(tc); err != nil {
		t.Errorf("https endpoint has no TLS transport socket: %v", err)
	}
	if resp.GetVersionInfo() != h.srv.Version() || resp.GetVersionInfo() == "" {
		t.Fatalf("response version %q, server version %q", resp.GetVersionInfo(), h.srv.Version())
	}

	// Envoy has the clusters but has not said it accepted them.
	msg := refused(t, u, target("beast", "http://beast.internal:13131")).Message
	if !strings.Contains(msg, "neuron beast's Envoy cluster is not yet acknowledged by Envoy (xDS)") {
		t.Errorf("refusal message %q does not say what is wrong", msg)
	}
	refused(t, u, target("rig2", "http://10.0.0.12:13131"))

	e.ack(resp)
	h.holds("edge-1", resp.GetVersionInfo())
	accepted(t, u, target("beast", "http://beast.internal:13131"), "neuron-beast")
	accepted(t, u, target("beast", "http://beast.internal:8001"), "neuron-beast-beast.internal-8001")
	accepted(t, u, target("rig2", "http://10.0.0.12:13131"), "gpu-rig2")
	accepted(t, u, target("v6", "https://[fd00::5]:9443"), "neuron-v6-fd00--5-9443")
	// An address no cluster was built for is never named.
	refused(t, u, target("beast", "http://beast.internal:9999"))
	refused(t, u, target("rig2", "http://beast.internal:13131"))
	if !strings.Contains(h.logs.String(), "Envoy acknowledged the neuron clusters") {
		t.Errorf("ACK not logged:\n%s", h.logs)
	}
}

func TestNACKKeepsClusterRefusedAndIsLogged(t *testing.T) {
	ff := newFakeFleet(node("beast", "neuron-beast", "http://10.0.0.11:13131"))
	h := start(t, ff)
	u := h.srv.Upstream()
	e := h.connect("edge-1", "")
	resp, _ := e.recv()

	e.nack(resp, "", "cluster neuron-beast: static cluster cannot be updated by CDS")
	// The server answers a NACK by resending its version: once that
	// arrives, the NACK has been processed.
	again, _ := e.recv()
	if again.GetVersionInfo() != resp.GetVersionInfo() {
		t.Fatalf("resent version %q, want %q", again.GetVersionInfo(), resp.GetVersionInfo())
	}
	refused(t, u, target("beast", "http://10.0.0.11:13131"))
	logs := h.logs.String()
	if !strings.Contains(logs, "NACK") || !strings.Contains(logs, "static cluster cannot be updated by CDS") || !strings.Contains(logs, "version="+resp.GetVersionInfo()) {
		t.Errorf("NACK not logged with Envoy's error and the rejected version:\n%s", logs)
	}

	e.ack(again)
	h.holds("edge-1", again.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")
}

func TestFleetChangesProduceNewVersions(t *testing.T) {
	beast := node("beast", "neuron-beast", "http://10.0.0.11:13131", "qwen=http://10.0.0.11:13131")
	ff := newFakeFleet(beast)
	h := start(t, ff)
	u := h.srv.Upstream()
	e := h.connect("edge-1", "")
	v1, _ := e.recv()
	e.ack(v1)
	h.holds("edge-1", v1.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")

	// A neuron joins the fleet.
	rig3 := node("rig3", "neuron-rig3", "http://rig3.internal:13131")
	ff.publish(beast, rig3)
	v2, cs := e.recv()
	if v2.GetVersionInfo() == v1.GetVersionInfo() {
		t.Fatalf("new cluster set served under the old version %q", v1.GetVersionInfo())
	}
	checkClusters(t, cs, map[string]wantCluster{
		"neuron-beast": {clusterv3.Cluster_STATIC, "10.0.0.11", 13131},
		"neuron-rig3":  {clusterv3.Cluster_STRICT_DNS, "rig3.internal", 13131},
	})
	refused(t, u, target("rig3", "http://rig3.internal:13131"))
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast") // still in what Envoy holds
	e.ack(v2)
	h.holds("edge-1", v2.GetVersionInfo())
	accepted(t, u, target("rig3", "http://rig3.internal:13131"), "neuron-rig3")

	// beast moves (config reload with a new endpoint): same cluster name,
	// new address, and not routable there until Envoy has the new address.
	moved := node("beast", "neuron-beast", "http://10.0.0.21:13131", "qwen=http://10.0.0.21:13131")
	ff.publish(moved, rig3)
	v3, cs := e.recv()
	checkClusters(t, cs, map[string]wantCluster{
		"neuron-beast": {clusterv3.Cluster_STATIC, "10.0.0.21", 13131},
		"neuron-rig3":  {clusterv3.Cluster_STRICT_DNS, "rig3.internal", 13131},
	})
	refused(t, u, target("beast", "http://10.0.0.21:13131"))
	e.ack(v3)
	h.holds("edge-1", v3.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.21:13131"), "neuron-beast")
	refused(t, u, target("beast", "http://10.0.0.11:13131")) // the old address is gone

	// A model's endpoint moves to another port: its own cluster.
	ported := node("beast", "neuron-beast", "http://10.0.0.21:13131", "qwen=http://10.0.0.21:8002")
	ff.publish(ported, rig3)
	v4, cs := e.recv()
	checkClusters(t, cs, map[string]wantCluster{
		"neuron-beast":                {clusterv3.Cluster_STATIC, "10.0.0.21", 13131},
		"neuron-beast-10.0.0.21-8002": {clusterv3.Cluster_STATIC, "10.0.0.21", 8002},
		"neuron-rig3":                 {clusterv3.Cluster_STRICT_DNS, "rig3.internal", 13131},
	})
	e.ack(v4)
	h.holds("edge-1", v4.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.21:8002"), "neuron-beast-10.0.0.21-8002")

	// A neuron leaves.
	ff.publish(ported)
	v5, cs := e.recv()
	if _, ok := cs["neuron-rig3"]; ok || len(cs) != 2 {
		t.Fatalf("removed neuron's cluster still served: %v", cs)
	}
	e.ack(v5)
	h.holds("edge-1", v5.GetVersionInfo())
	refused(t, u, target("rig3", "http://rig3.internal:13131"))
}

func TestSameClusterSetKeepsVersion(t *testing.T) {
	a := node("beast", "neuron-beast", "http://10.0.0.11:13131", "qwen=http://10.0.0.11:13131")
	srv := New(Options{Fleet: newFakeFleet(a), Log: slog.New(slog.DiscardHandler)})
	defer srv.Stop()
	ctx := context.Background()
	srv.update(ctx, &fleet.Snapshot{Nodes: []*fleet.Node{a}})
	v1 := srv.Version()
	if v1 == "" {
		t.Fatal("no version after the first update")
	}
	// Poll noise: health, queue depth, another model on the same address.
	b := node("beast", "neuron-beast", "http://10.0.0.11:13131", "qwen=http://10.0.0.11:13131", "phi=http://10.0.0.11:13131")
	b.Healthy = false
	b.Models[0].QueueDepth = 7
	srv.update(ctx, &fleet.Snapshot{Nodes: []*fleet.Node{b}, Round: 9})
	if got := srv.Version(); got != v1 {
		t.Fatalf("version changed %q -> %q although the cluster set did not", v1, got)
	}
	c := node("beast", "neuron-beast", "http://10.0.0.11:13131", "qwen=http://10.0.0.11:13132")
	srv.update(ctx, &fleet.Snapshot{Nodes: []*fleet.Node{c}})
	if got := srv.Version(); got == v1 {
		t.Fatal("version unchanged although a cluster was added")
	}
}

func TestEveryConnectedEnvoyMustACK(t *testing.T) {
	beast := node("beast", "neuron-beast", "http://10.0.0.11:13131")
	ff := newFakeFleet(beast)
	h := start(t, ff)
	u := h.srv.Upstream()

	// Two Envoys with different node ids get the same clusters.
	e1 := h.connect("edge-1", "")
	e2 := h.connect("some-other-id", "")
	r1, c1 := e1.recv()
	r2, c2 := e2.recv()
	if r1.GetVersionInfo() != r2.GetVersionInfo() || len(c1) != 1 || len(c2) != 1 {
		t.Fatalf("node ids got different snapshots: %q %v / %q %v", r1.GetVersionInfo(), c1, r2.GetVersionInfo(), c2)
	}
	e1.ack(r1)
	h.holds("edge-1", r1.GetVersionInfo())
	refused(t, u, target("beast", "http://10.0.0.11:13131")) // some-other-id has not ACKed
	e2.ack(r2)
	h.holds("some-other-id", r2.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")

	// A new neuron: only edge-1 accepts it.
	ff.publish(beast, node("rig3", "neuron-rig3", "http://10.0.0.13:13131"))
	n1, _ := e1.recv()
	n2, _ := e2.recv()
	e1.ack(n1)
	h.holds("edge-1", n1.GetVersionInfo())
	e2.nack(n2, r2.GetVersionInfo(), "rejected for the test")
	resent, _ := e2.recv()
	if resent.GetVersionInfo() != n2.GetVersionInfo() {
		t.Fatalf("resent %q, want %q", resent.GetVersionInfo(), n2.GetVersionInfo())
	}
	refused(t, u, target("rig3", "http://10.0.0.13:13131"))
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")

	// The lagging Envoy goes away: the one left has rig3.
	e2.cancel()
	h.waitFor("the second stream to close", func(s *Server) bool { return len(s.streams) == 1 })
	accepted(t, u, target("rig3", "http://10.0.0.13:13131"), "neuron-rig3")

	// The last Envoy disconnects: it keeps its clusters, so they stay usable.
	e1.cancel()
	h.waitFor("all streams to close", func(s *Server) bool { return len(s.streams) == 0 })
	accepted(t, u, target("rig3", "http://10.0.0.13:13131"), "neuron-rig3")

	// It reconnects already holding the current version: usable at once.
	e3 := h.connect("edge-1", n1.GetVersionInfo())
	h.holds("edge-1", n1.GetVersionInfo())
	accepted(t, u, target("rig3", "http://10.0.0.13:13131"), "neuron-rig3")
	e3.cancel()
}

func TestFreshEnvoyHoldsBackUntilItACKs(t *testing.T) {
	ff := newFakeFleet(node("beast", "neuron-beast", "http://10.0.0.11:13131"))
	h := start(t, ff)
	u := h.srv.Upstream()
	e1 := h.connect("edge-1", "")
	r1, _ := e1.recv()
	e1.ack(r1)
	h.holds("edge-1", r1.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")

	// A second Envoy starts with nothing: conservative, nobody is sure to
	// have the cluster until it ACKs too.
	e2 := h.connect("edge-2", "")
	h.waitFor("the second stream to subscribe", func(s *Server) bool { return len(s.streams) == 2 })
	refused(t, u, target("beast", "http://10.0.0.11:13131"))
	r2, _ := e2.recv()
	e2.ack(r2)
	h.holds("edge-2", r2.GetVersionInfo())
	accepted(t, u, target("beast", "http://10.0.0.11:13131"), "neuron-beast")
}

func TestValueWaitsBrieflyForACK(t *testing.T) {
	ff := newFakeFleet(node("beast", "neuron-beast", "http://10.0.0.11:13131"))
	h := start(t, ff)
	waiting := &Upstream{s: h.srv, header: "x-cortex-cluster", wait: bound}
	e := h.connect("edge-1", "")
	resp, _ := e.recv()

	type result struct {
		v   string
		err *apierr.Error
	}
	done := make(chan result, 1)
	go func() {
		v, err := waiting.Value(target("beast", "http://10.0.0.11:13131"))
		done <- result{v, err}
	}()
	e.ack(resp)
	r := <-done
	if r.err != nil || r.v != "neuron-beast" {
		t.Fatalf("Value while the ACK was on its way = %q, %v; want neuron-beast", r.v, r.err)
	}
}

func TestNoEnvoyConnectedSaysSo(t *testing.T) {
	ff := newFakeFleet(node("beast", "neuron-beast", "http://10.0.0.11:13131"))
	h := start(t, ff)
	// Even a long AckWait answers at once: nothing could ACK.
	u := &Upstream{s: h.srv, header: "x-cortex-cluster", wait: time.Hour}
	err := refused(t, u, target("beast", "http://10.0.0.11:13131"))
	if !strings.Contains(err.Message, "No Envoy has subscribed") || !strings.Contains(err.Message, "ads_config") {
		t.Errorf("message %q does not point at Envoy's xDS config", err.Message)
	}
	err = refused(t, u, target("beast", "not a url"))
	if !strings.Contains(err.Message, "endpoint") {
		t.Errorf("message %q does not name the bad endpoint", err.Message)
	}
}

func TestDeltaXDSRefusedWithAdvice(t *testing.T) {
	h := start(t, newFakeFleet(node("beast", "neuron-beast", "http://10.0.0.11:13131")))
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(h.conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The server may refuse before the request is even sent (Send then
	// returns io.EOF); the status comes from Recv either way.
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resourcev3.ClusterType}); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	_, err = st.Recv()
	if status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "api_type: GRPC") {
		t.Fatalf("delta stream: %v; want Unimplemented naming api_type: GRPC", err)
	}
}
