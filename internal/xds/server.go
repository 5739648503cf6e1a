// Package xds serves the neuron clusters to Envoy over ADS (CDS), from the
// same gRPC port as ext_proc (envoy-ext-proc.md §9.2, envoy/envoy-xds.yaml):
// one cluster per neuron inference endpoint, rebuilt whenever the fleet
// snapshot changes the cluster set, and an extproc.Upstream that names a
// cluster in x-cortex-cluster only once Envoy has acknowledged it
// (pitfall 17: an unknown cluster answers the client 503 NC).
//
// Every Envoy gets the same snapshot whatever its node.id: the cache keys
// all nodes to one entry, so a node.id that differs from what an operator
// expected can never leave an Envoy without clusters.
//
// Acknowledgement is conservative: a cluster is named only when every
// connected Envoy stream that subscribed to clusters holds a snapshot
// version containing it. One Envoy that lags or rejects an update holds
// back the new clusters for all (requests for them get 503 with
// Retry-After), never sends a request into a cluster some Envoy lacks.
// When no Envoy is connected at all the last acknowledged set stays in use:
// a disconnected Envoy keeps the clusters it had.
//
// Only state-of-the-world xDS is served (ads_config.api_type: GRPC); a
// delta (DELTA_GRPC) stream is refused with a message saying so.
package xds

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	clusterservice "github.com/envoyproxy/go-control-plane/envoy/service/cluster/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/internal/fleet"
)

// DefaultAckWait is how long Upstream.Value waits for Envoy to acknowledge
// a cluster that is not usable yet (typically a model that just finished
// loading on a new port) before answering 503.
const DefaultAckWait = 2 * time.Second

// snapshotKey is the one cache entry every Envoy node reads.
const snapshotKey = "cortex-extproc"

// keepVersions is how many past versions stay known besides those an Envoy
// holds, so an ACK that arrives after a newer snapshot was set still counts.
const keepVersions = 8

// Fleet is where the clusters come from; *fleet.Poller implements it.
type Fleet interface {
	Snapshot() *fleet.Snapshot
	// Changed returns a channel closed at the next publish after the call.
	Changed() <-chan struct{}
}

// Options configure a Server.
type Options struct {
	Fleet Fleet // required
	// ClusterHeader is the header Envoy's route reads the cluster from;
	// default "x-cortex-cluster".
	ClusterHeader string
	// AckWait bounds how long Upstream.Value waits for an unacknowledged
	// cluster; 0 means DefaultAckWait, negative means answer at once.
	AckWait time.Duration
	Log     *slog.Logger
}

// Server is the xDS control plane for the neuron clusters.
type Server struct {
	opt   Options
	log   *slog.Logger
	cache cachev3.SnapshotCache
	xds   serverv3.Server
	stop  context.CancelFunc

	updateMu sync.Mutex // serializes update; guards seq
	seq      uint64

	mu            sync.Mutex
	current       *version
	versions      map[string]*version
	recent        []string // version ids, oldest first
	streams       map[int64]*streamState
	everConnected bool
	usable        map[string]string // routeKey -> cluster, acknowledged by every stream
	changed       chan struct{}     // closed and replaced on every state change
}

// version is one snapshot version as served.
type version struct {
	id       string
	hash     string
	routes   map[string]string // routeKey -> cluster name
	clusters []string
}

// streamState is one Envoy stream that subscribed to clusters.
type streamState struct {
	node        string
	acked       *version // what Envoy holds; nil: nothing we know of
	sentNonce   string
	sentVersion string
	lastNack    string // version whose NACK was last logged
}

// allNodes maps every Envoy node to the one snapshot.
type allNodes struct{}

func (allNodes) ID(*corev3.Node) string { return snapshotKey }

// New builds the control plane. Nothing is served until Register and the
// gRPC server runs; no snapshot exists until Run computes the first.
func New(opt Options) *Server {
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	if opt.ClusterHeader == "" {
		opt.ClusterHeader = "x-cortex-cluster"
	}
	if opt.AckWait == 0 {
		opt.AckWait = DefaultAckWait
	}
	s := &Server{
		opt:      opt,
		log:      opt.Log,
		versions: map[string]*version{},
		streams:  map[int64]*streamState{},
		changed:  make(chan struct{}),
	}
	cpLog := cpLogger{l: opt.Log.With("component", "xds")}
	s.cache = cachev3.NewSnapshotCache(true, allNodes{}, cpLog)
	ctx, cancel := context.WithCancel(context.Background())
	s.stop = cancel
	s.xds = serverv3.NewServer(ctx, s.cache, serverv3.CallbackFuncs{
		StreamRequestFunc:  s.onRequest,
		StreamResponseFunc: s.onResponse,
		StreamClosedFunc:   s.onClosed,
		DeltaStreamOpenFunc: func(context.Context, int64, string) error {
			return status.Error(codes.Unimplemented, "cortex-extproc serves state-of-the-world xDS only: set dynamic_resources.ads_config.api_type: GRPC (not DELTA_GRPC) in Envoy's config")
		},
	})
	return s
}

// Register adds the aggregated discovery service (ADS, what
// envoy-xds.yaml uses) and the cluster discovery service to g.
func (s *Server) Register(g grpc.ServiceRegistrar) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
	clusterservice.RegisterClusterDiscoveryServiceServer(g, s.xds)
}

// Run keeps the snapshot in step with the fleet until ctx is done, then
// ends the xDS streams (Stop).
func (s *Server) Run(ctx context.Context) {
	defer s.Stop()
	for {
		ch := s.opt.Fleet.Changed()
		s.update(ctx, s.opt.Fleet.Snapshot())
		select {
		case <-ctx.Done():
			return
		case <-ch:
		}
	}
}

// Stop ends every xDS stream; Envoy keeps the clusters it has. Call it
// before a graceful gRPC stop, which would otherwise wait for these
// never-ending streams. Safe to call more than once.
func (s *Server) Stop() { s.stop() }

// Version is the snapshot version being served, "" before the first.
func (s *Server) Version() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current == nil {
		return ""
	}
	return s.current.id
}

// update sets a new snapshot if the fleet's cluster set differs from the
// one served.
func (s *Server) update(ctx context.Context, fs *fleet.Snapshot) {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	p := planFor(fs, s.log)

	s.mu.Lock()
	prev := s.current
	s.mu.Unlock()
	if prev != nil && prev.hash == p.hash {
		return
	}
	s.seq++
	v := &version{id: fmt.Sprintf("%d-%s", s.seq, p.hash), hash: p.hash, routes: p.routes}
	res := make([]types.Resource, 0, len(p.clusters))
	for i, c := range p.clusters {
		res = append(res, c)
		v.clusters = append(v.clusters, p.specs[i].name)
	}
	snap, err := cachev3.NewSnapshot(v.id, map[resourcev3.Type][]types.Resource{resourcev3.ClusterType: res})
	if err == nil {
		err = snap.Consistent()
	}
	if err != nil {
		s.log.Error("cannot build the xDS cluster snapshot; Envoy keeps the previous clusters", "version", v.id, "error", err)
		return
	}

	// Known before Envoy can see it, so its ACK is recognised.
	s.mu.Lock()
	s.versions[v.id] = v
	s.recent = append(s.recent, v.id)
	s.current = v
	s.prune()
	s.signal()
	s.mu.Unlock()

	var added, removed []string
	var before []string
	if prev != nil {
		before = prev.clusters
	}
	for _, c := range v.clusters {
		if !slices.Contains(before, c) {
			added = append(added, c)
		}
	}
	for _, c := range before {
		if !slices.Contains(v.clusters, c) {
			removed = append(removed, c)
		}
	}
	s.log.Info("xDS neuron clusters updated; new ones are used once Envoy acknowledges them",
		"version", v.id, "clusters", len(v.clusters), "added", added, "removed", removed)
	if err := s.cache.SetSnapshot(ctx, snapshotKey, snap); err != nil && ctx.Err() == nil {
		s.log.Error("cannot hand the xDS snapshot to connected Envoys", "version", v.id, "error", err)
	}
}

// prune forgets versions no stream holds, except the current and the most
// recent ones. Caller holds mu.
func (s *Server) prune() {
	if len(s.recent) > keepVersions {
		s.recent = slices.Clone(s.recent[len(s.recent)-keepVersions:])
	}
	keep := map[string]bool{s.current.id: true}
	for _, id := range s.recent {
		keep[id] = true
	}
	for _, st := range s.streams {
		if st.acked != nil {
			keep[st.acked.id] = true
		}
	}
	for id := range s.versions {
		if !keep[id] {
			delete(s.versions, id)
		}
	}
}

// signal wakes Upstream.Value waiters. Caller holds mu.
func (s *Server) signal() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// recompute sets usable to the routes every stream's held version has.
// With no stream connected it keeps the last set. Caller holds mu.
func (s *Server) recompute() {
	defer s.signal()
	if len(s.streams) == 0 {
		return
	}
	var out map[string]string
	first := true
	for _, st := range s.streams {
		var r map[string]string
		if st.acked != nil {
			r = st.acked.routes
		}
		if first {
			out = make(map[string]string, len(r))
			for k, v := range r {
				out[k] = v
			}
			first = false
			continue
		}
		for k, name := range out {
			if r[k] != name {
				delete(out, k)
			}
		}
	}
	s.usable = out
}

// onRequest tracks what each Envoy holds. A DiscoveryRequest's
// version_info is the last version Envoy applied (an ACK when it equals
// what we sent); with error_detail set it is a NACK of what we sent.
func (s *Server) onRequest(id int64, req *discoveryv3.DiscoveryRequest) error {
	if req.GetTypeUrl() != resourcev3.ClusterType {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st, known := s.streams[id]
	if !known {
		st = &streamState{node: req.GetNode().GetId()}
		s.streams[id] = st
		s.everConnected = true
		s.log.Info("Envoy subscribed to neuron clusters over xDS", "envoy_node", st.node, "stream", id, "has_version", req.GetVersionInfo())
	}
	if d := req.GetErrorDetail(); d != nil {
		rejected := "unknown"
		if req.GetResponseNonce() == st.sentNonce {
			rejected = st.sentVersion
		}
		if rejected != st.lastNack {
			st.lastNack = rejected
			s.log.Warn("Envoy rejected (NACK) the neuron cluster snapshot; it keeps its previous clusters and new ones are not routed to until a later version is accepted",
				"envoy_node", st.node, "stream", id, "version", rejected, "kept_version", req.GetVersionInfo(), "error", d.GetMessage())
		}
		if !known {
			s.recompute()
		}
		return nil
	}
	v := s.versions[req.GetVersionInfo()]
	if v != st.acked {
		st.acked = v
		if v != nil {
			s.log.Info("Envoy acknowledged the neuron clusters", "envoy_node", st.node, "stream", id, "version", v.id, "clusters", len(v.clusters))
		}
	} else if known {
		return nil
	}
	s.recompute()
	return nil
}

func (s *Server) onResponse(_ context.Context, id int64, _ *discoveryv3.DiscoveryRequest, resp *discoveryv3.DiscoveryResponse) {
	if resp.GetTypeUrl() != resourcev3.ClusterType {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.streams[id]; st != nil {
		st.sentNonce, st.sentVersion = resp.GetNonce(), resp.GetVersionInfo()
	}
}

func (s *Server) onClosed(id int64, node *corev3.Node) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.streams[id]; !ok {
		return
	}
	delete(s.streams, id)
	s.log.Info("Envoy xDS stream closed; Envoy keeps its clusters and reconnects", "envoy_node", node.GetId(), "stream", id, "streams_left", len(s.streams))
	s.recompute()
}

// lookup returns the acknowledged cluster for key, whether any Envoy ever
// subscribed, and a channel closed at the next state change.
func (s *Server) lookup(key string) (cluster string, ok, connected bool, changed <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cluster, ok = s.usable[key]
	return cluster, ok, s.everConnected, s.changed
}

// cpLogger adapts go-control-plane's logger to slog. Its Infof lines are
// per-request chatter, so they go to debug.
type cpLogger struct{ l *slog.Logger }

func (c cpLogger) logf(level slog.Level, format string, args ...any) {
	if c.l.Enabled(context.Background(), level) {
		c.l.Log(context.Background(), level, fmt.Sprintf(format, args...))
	}
}

func (c cpLogger) Debugf(format string, args ...any) { c.logf(slog.LevelDebug, format, args...) }
func (c cpLogger) Infof(format string, args ...any)  { c.logf(slog.LevelDebug, format, args...) }
func (c cpLogger) Warnf(format string, args ...any)  { c.logf(slog.LevelWarn, format, args...) }
func (c cpLogger) Errorf(format string, args ...any) { c.logf(slog.LevelError, format, args...) }
