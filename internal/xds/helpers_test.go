package xds

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.uber.org/goleak"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// bound is the generous upper limit for anything a test waits on.
const bound = 20 * time.Second

// fakeFleet publishes hand-made snapshots like fleet.Poller does.
type fakeFleet struct {
	mu   sync.Mutex
	snap *fleet.Snapshot
	ch   chan struct{}
}

func newFakeFleet(nodes ...*fleet.Node) *fakeFleet {
	return &fakeFleet{snap: &fleet.Snapshot{Nodes: nodes}, ch: make(chan struct{})}
}

func (f *fakeFleet) Snapshot() *fleet.Snapshot {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.snap
}

func (f *fakeFleet) Changed() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.ch
}

func (f *fakeFleet) publish(nodes ...*fleet.Node) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.snap = &fleet.Snapshot{Nodes: nodes, Round: f.snap.Round + 1}
	close(f.ch)
	f.ch = make(chan struct{})
}

// node builds a fleet node; models are "id=endpoint" pairs.
func node(name, cluster, endpoint string, models ...string) *fleet.Node {
	n := &fleet.Node{Name: name, Cluster: cluster, Endpoint: endpoint, Healthy: true}
	for _, m := range models {
		id, ep, _ := strings.Cut(m, "=")
		n.Models = append(n.Models, &fleet.Model{Model: neuron.Model{ID: id, Status: neuron.StatusLoaded}, Endpoint: ep})
	}
	return n
}

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type harness struct {
	t    *testing.T
	srv  *Server
	conn *grpc.ClientConn
	logs *syncBuffer
}

// start runs a Server for ff on a loopback gRPC port with the updater
// running, and a client connection to it. Everything stops at cleanup.
func start(t *testing.T, ff *fakeFleet) *harness {
	t.Helper()
	logs := &syncBuffer{}
	srv := New(Options{Fleet: ff, AckWait: -1, Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	g := grpc.NewServer()
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { _ = g.Serve(lis); close(served) }()
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { srv.Run(ctx); close(ran) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		<-ran
		g.Stop()
		<-served
	})
	return &harness{t: t, srv: srv, conn: conn, logs: logs}
}

// envoy plays Envoy's side of an ADS stream subscribed to clusters.
type fakeEnvoy struct {
	t      *testing.T
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
	nodeID string
}

// connect opens an ADS stream as Envoy does on startup (or with the
// version it already holds, as after a reconnect).
func (h *harness) connect(nodeID, haveVersion string) *fakeEnvoy {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	h.t.Cleanup(cancel)
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(h.conn).StreamAggregatedResources(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	e := &fakeEnvoy{t: h.t, stream: st, cancel: cancel, nodeID: nodeID}
	e.send(&discoveryv3.DiscoveryRequest{
		Node:        &corev3.Node{Id: nodeID, Cluster: "cortex-edge"},
		TypeUrl:     resourcev3.ClusterType,
		VersionInfo: haveVersion,
	})
	return e
}

func (e *fakeEnvoy) send(r *discoveryv3.DiscoveryRequest) {
	e.t.Helper()
	if err := e.stream.Send(r); err != nil {
		e.t.Fatalf("send: %v", err)
	}
}

// recv waits (bounded by the stream deadline) for the next cluster update.
func (e *fakeEnvoy) recv() (*discoveryv3.DiscoveryResponse, map[string]*clusterv3.Cluster) {
	e.t.Helper()
	resp, err := e.stream.Recv()
	if err != nil {
		e.t.Fatalf("recv: %v", err)
	}
	if resp.GetTypeUrl() != resourcev3.ClusterType {
		e.t.Fatalf("response type %q, want clusters", resp.GetTypeUrl())
	}
	cs := map[string]*clusterv3.Cluster{}
	for _, a := range resp.GetResources() {
		c := &clusterv3.Cluster{}
		if err := a.UnmarshalTo(c); err != nil {
			e.t.Fatal(err)
		}
		cs[c.GetName()] = c
	}
	return resp, cs
}

func (e *fakeEnvoy) ack(resp *discoveryv3.DiscoveryResponse) {
	e.t.Helper()
	e.send(&discoveryv3.DiscoveryRequest{TypeUrl: resourcev3.ClusterType, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()})
}

func (e *fakeEnvoy) nack(resp *discoveryv3.DiscoveryResponse, kept, msg string) {
	e.t.Helper()
	e.send(&discoveryv3.DiscoveryRequest{
		TypeUrl: resourcev3.ClusterType, VersionInfo: kept, ResponseNonce: resp.GetNonce(),
		ErrorDetail: &statuspb.Status{Code: 3, Message: msg},
	})
}

// waitFor blocks until cond (read under the server lock) holds; every
// state change wakes it. Bounded; fails the test at the bound.
func (h *harness) waitFor(what string, cond func(s *Server) bool) {
	h.t.Helper()
	deadline := time.NewTimer(bound)
	defer deadline.Stop()
	for {
		h.srv.mu.Lock()
		ok := cond(h.srv)
		ch := h.srv.changed
		h.srv.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			h.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// holds waits until the stream of nodeID has reported holding version.
func (h *harness) holds(nodeID, version string) {
	h.t.Helper()
	h.waitFor(nodeID+" holding "+version, func(s *Server) bool {
		for _, st := range s.streams {
			if st.node == nodeID && st.acked != nil && st.acked.id == version {
				return true
			}
		}
		return false
	})
}

func target(nodeName, endpoint string) *routing.Target {
	return &routing.Target{Model: "m", Node: nodeName, Endpoint: endpoint}
}

// refused asserts Value names no cluster and answers 503 Retry-After 2.
func refused(t *testing.T, u *Upstream, tg *routing.Target) *apierr.Error {
	t.Helper()
	v, err := u.Value(tg)
	if err == nil {
		t.Fatalf("Value(%s, %s) = %q, want a refusal: the cluster is not acknowledged", tg.Node, tg.Endpoint, v)
	}
	if err.Status != 503 || err.RetryAfter != 2 || v != "" {
		t.Fatalf("Value(%s) = %q, %v; want \"\", 503 with Retry-After 2", tg.Node, v, err)
	}
	return err
}

func accepted(t *testing.T, u *Upstream, tg *routing.Target, want string) {
	t.Helper()
	v, err := u.Value(tg)
	if err != nil || v != want {
		t.Fatalf("Value(%s, %s) = %q, %v; want %q", tg.Node, tg.Endpoint, v, err, want)
	}
}
