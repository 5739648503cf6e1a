package metrics_test

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
	"github.com/helexa/cortex-extproc/routing/coldload"
)

// The catalogue of the reason tests: one model per way a request can fail.
func reasonCatalogue() *catalogue.Catalogue {
	return catalogue.New([]*catalogue.Profile{
		{ID: "Warm/Model", Harness: "candle", VRAMMB: 4000},
		{ID: "Cold/Model", Harness: "candle", VRAMMB: 8000},
		{ID: "Huge/Model", Harness: "candle", VRAMMB: 100000},                              // fits no device, ever
		{ID: "Pinned/Model", Harness: "candle", VRAMMB: 4000, PinnedOn: []string{"ghost"}}, // pinned to a neuron nobody configured
		{ID: "Pair/Model", Harness: "candle", VRAMMB: 8000, MinDevices: 2},                 // only a two-device neuron qualifies
		{ID: "Low/Model", Harness: "candle", VRAMMB: 20000, ResidencyPriority: prio(10)},   // may displace nothing
		{ID: "High/Model", Harness: "candle", VRAMMB: 20000, ResidencyPriority: prio(500)},
	}, map[string]string{"r/warm": "Warm/Model", "r/gone": "Gone/Model"}, "h")
}

type reasonNode struct {
	name    string
	healthy bool
	devices []int64 // MB each
	models  []*fleet.Model
	loading []string // pre-warming
}

func reasonSnapshot(nodes ...reasonNode) *fleet.Snapshot {
	s := &fleet.Snapshot{Round: 1}
	for _, rn := range nodes {
		n := &fleet.Node{Name: rn.name, Cluster: "neuron-" + rn.name, Healthy: rn.healthy, Models: rn.models,
			Discovery: &neuron.Discovery{}, Health: &neuron.Health{Activation: &neuron.Activation{State: "ready", Pending: rn.loading}}}
		for i, mb := range rn.devices {
			used := int64(0)
			for _, m := range rn.models {
				if m.VRAMUsedMB != nil && len(m.Devices) > 0 && m.Devices[0] == i {
					used += *m.VRAMUsedMB
				}
			}
			n.Discovery.Devices = append(n.Discovery.Devices, neuron.Device{Index: i, VRAMTotalMB: mb})
			n.Health.Devices = append(n.Health.Devices, neuron.DeviceHealth{Index: i, VRAMFreeMB: mb - used})
		}
		s.Nodes = append(s.Nodes, n)
	}
	return s
}

func resident(id string, st neuron.Status, endpoint string, mb int64) *fleet.Model {
	return &fleet.Model{Model: neuron.Model{ID: id, Status: st, Devices: []int{0}, VRAMUsedMB: &mb}, Endpoint: endpoint}
}

// reasonFleet is a fleet whose neuron loads the test controls.
type reasonFleet struct {
	snap     atomic.Pointer[fleet.Snapshot]
	failLoad bool          // every /models/load fails
	gate     chan struct{} // loads wait for it to close (nil: they succeed at once)
	// markLoaded, when set, replaces publishing the loaded model.
	markLoaded func(node string)
}

type reasonNeuron struct {
	f    *reasonFleet
	name string
}

func (n reasonNeuron) Discovery(context.Context) (*neuron.Discovery, error) {
	return nil, errors.New("unused")
}
func (n reasonNeuron) Models(context.Context) ([]neuron.Model, error) {
	return nil, errors.New("unused")
}
func (n reasonNeuron) Health(context.Context) (*neuron.Health, error) {
	return n.f.snap.Load().Node(n.name).Health, nil
}
func (n reasonNeuron) Endpoint(context.Context, string) (string, error) {
	return "http://" + n.name + ":13131", nil
}
func (n reasonNeuron) Unload(context.Context, string) error { return nil }
func (n reasonNeuron) Load(ctx context.Context, _ neuron.LoadSpec) error {
	if n.f.failLoad {
		return errors.New("neuron says: 500 CUDA out of memory")
	}
	if n.f.gate != nil {
		select {
		case <-n.f.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (f *reasonFleet) publishLoaded(_ context.Context, node, model string, _ []int, _ int64) error {
	if f.markLoaded != nil {
		f.markLoaded(node)
		return nil
	}
	old := f.snap.Load()
	s := &fleet.Snapshot{Round: old.Round + 1}
	for _, n := range old.Nodes {
		c := *n
		if n.Name == node {
			c.Models = append(append([]*fleet.Model{}, n.Models...), resident(model, neuron.StatusLoaded, "http://"+node+":13131", 8000))
		}
		s.Nodes = append(s.Nodes, &c)
	}
	f.snap.Store(s)
	return nil
}

// reasonServer is an ext_proc server over f with the Prometheus observer.
type reasonServer struct {
	m      *metrics.Metrics
	client extprocv3.ExternalProcessorClient
	loader *coldload.Loader
}

type serverOpts struct {
	noLoader    bool
	loadTimeout time.Duration // the flight's (default 1h)
	waitTimeout time.Duration // the request's (extproc cold_load timeout; default 1h)
	maxWaiters  int
	maxBytes    int
	upstream    extproc.Upstream
}

func startReasonServer(t *testing.T, f *reasonFleet, o serverOpts) *reasonServer {
	t.Helper()
	cat := reasonCatalogue()
	m := metrics.New()
	m.SetCatalogue(cat, 1)
	usage := routing.NewUsage()
	var loader *coldload.Loader
	if !o.noLoader {
		loader = coldload.New(coldload.Config{Timeout: cmp(o.loadTimeout, time.Hour), MaxWaiters: o.maxWaiters, FailureCooldown: time.Hour},
			coldload.Deps{
				Catalogue:  func() *catalogue.Catalogue { return cat },
				Fleet:      f.snap.Load,
				Neuron:     func(n string) neuron.API { return reasonNeuron{f: f, name: n} },
				MarkLoaded: f.publishLoaded,
				Usage:      usage,
				Observer:   m,
			})
		t.Cleanup(func() {
			ctx, cancel := context.WithCancel(context.Background())
			cancel() // abandon loads still held at the gate
			loader.Close(ctx)
		})
	}
	var loads routing.ColdLoads // nil, not a nil *coldload.Loader, without a loader
	if loader != nil {
		loads = loader
	}
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, f.snap.Load, loads, usage)
	srv := extproc.NewGRPCServer(extproc.New(r, extproc.Options{
		Observer: m, MaxRequestBytes: o.maxBytes, ColdLoadTimeout: cmp(o.waitTimeout, time.Hour), Upstream: o.upstream,
	}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(lis)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); srv.Stop() })
	return &reasonServer{m: m, client: extprocv3.NewExternalProcessorClient(conn), loader: loader}
}

func prio(p int) *int { return &p }

func cmp(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// sendHeaders opens an ext_proc stream and sends a request's headers as
// Envoy does, with the given body mode; the caller closes the stream.
func (s *reasonServer) sendHeaders(t *testing.T, ctx context.Context, mode filterv3.ProcessingMode_BodySendMode, bodiless bool, kv ...[2]string) extprocv3.ExternalProcessor_ProcessClient {
	t.Helper()
	st, err := s.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	hs := &corev3.HeaderMap{}
	for _, h := range kv {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: h[0], RawValue: []byte(h[1])})
	}
	if err := st.Send(&extprocv3.ProcessingRequest{
		Request:        &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hs, EndOfStream: bodiless}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: mode},
	}); err != nil {
		t.Fatal(err)
	}
	return st
}

// post plays Envoy for one request and returns the HTTP status the client
// gets (200 when routed) and Retry-After.
func (s *reasonServer) post(t *testing.T, body string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := s.sendHeaders(t, ctx, filterv3.ProcessingMode_BUFFERED, false, [2]string{":method", "POST"}, [2]string{":path", "/v1/chat/completions"},
		[2]string{"content-type", "application/json"}, [2]string{"content-length", strconv.Itoa(len(body))}, [2]string{"x-request-id", "reason-test"})
	defer st.CloseSend()
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}}); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := st.Recv()
		if err != nil {
			t.Fatalf("body reply: %v", err)
		}
		if r.Response == nil && r.GetOverrideMessageTimeout() != nil {
			continue
		}
		ir := r.GetImmediateResponse()
		if ir == nil {
			return 200, ""
		}
		retry := ""
		for _, h := range ir.GetHeaders().GetSetHeaders() {
			if h.GetHeader().GetKey() == "retry-after" {
				retry = string(h.GetHeader().GetRawValue())
			}
		}
		return int(ir.GetStatus().GetCode()), retry
	}
}

// refusedAtHeaders plays Envoy for a request cortex-extproc answers at its
// request headers, and returns the status the client gets.
func (s *reasonServer) refusedAtHeaders(t *testing.T, method, path string, mode filterv3.ProcessingMode_BodySendMode, bodiless bool) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st := s.sendHeaders(t, ctx, mode, bodiless, [2]string{":method", method}, [2]string{":path", path}, [2]string{"x-request-id", "refused-test"})
	defer st.CloseSend()
	r, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	ir := r.GetImmediateResponse()
	if ir == nil {
		t.Fatalf("%s %s was not answered at its headers: %v", method, path, r)
	}
	return int(ir.GetStatus().GetCode())
}

// requests is requests_total summed over its labels.
func (s *reasonServer) requests(t *testing.T) float64 {
	n := 0.0
	for _, v := range s.counter(t, "cortex_extproc_requests_total", "outcome") {
		n += v
	}
	return n
}

// reasons is request_errors_total by reason.
func (s *reasonServer) reasons(t *testing.T) map[string]float64 {
	return s.counter(t, "cortex_extproc_request_errors_total", "reason")
}

// counter sums the counter name by the values of label.
func (s *reasonServer) counter(t *testing.T, name, label string) map[string]float64 {
	t.Helper()
	fams, err := s.m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, mt := range f.GetMetric() {
			for _, l := range mt.GetLabel() {
				if l.GetName() == label {
					out[l.GetValue()] += mt.GetCounter().GetValue()
				}
			}
		}
	}
	return out
}

func chat(model string) string {
	return `{"model":"` + model + `","messages":[{"role":"user","content":"hi"}]}`
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestEveryErrorCaseHasAReason drives each row of routing.md's error table,
// and every other way cortex-extproc refuses a request it decided on,
// through ext_proc with the Prometheus observer, and checks the status, the
// Retry-After and the reason the metric counts. None may be unclassified.
func TestEveryErrorCaseHasAReason(t *testing.T) {
	warm := reasonNode{name: "beast", healthy: true, devices: []int64{24000},
		models: []*fleet.Model{resident("Warm/Model", neuron.StatusLoaded, "http://beast:13131", 4000)}}
	cases := []struct {
		name   string
		nodes  []reasonNode
		opts   serverOpts
		setup  func(*reasonFleet)
		body   string
		status int
		retry  string
		reason apierr.Reason
	}{
		// routing.md's table, in order.
		{name: "body not JSON", nodes: []reasonNode{warm}, body: `{"model":`, status: 400, reason: apierr.ReasonInvalidBody},
		{name: "model missing", nodes: []reasonNode{warm}, body: `{"messages":[]}`, status: 400, reason: apierr.ReasonInvalidBody},
		{name: "model not a string", nodes: []reasonNode{warm}, body: `{"model":7}`, status: 400, reason: apierr.ReasonInvalidBody},
		{name: "unknown model", nodes: []reasonNode{warm}, body: chat("Nope/Nope"), status: 404, reason: apierr.ReasonUnknownModel},
		{name: "alias to an unknown model", nodes: []reasonNode{warm}, body: chat("r/gone"), status: 404, reason: apierr.ReasonUnknownModel},
		{name: "no healthy node", nodes: []reasonNode{{name: "beast", devices: []int64{24000}}}, body: chat("r/warm"), status: 503, retry: "5", reason: apierr.ReasonNoHealthy},
		{name: "feasible node unhealthy", body: chat("Pair/Model"), status: 503, retry: "3", reason: apierr.ReasonFeasibleUnhealthy,
			nodes: []reasonNode{warm, {name: "duo", devices: []int64{24000, 24000}}}},
		{name: "model recovering", body: chat("Cold/Model"), status: 503, retry: "2", reason: apierr.ReasonRecovering,
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, models: []*fleet.Model{resident("Cold/Model", neuron.StatusRecovering, "http://beast:13131", 8000)}}}},
		{name: "no feasible neuron (never fits)", nodes: []reasonNode{warm}, body: chat("Huge/Model"), status: 503, reason: apierr.ReasonNoFeasible},
		{name: "no feasible neuron (pinned elsewhere)", nodes: []reasonNode{warm}, body: chat("Pinned/Model"), status: 503, reason: apierr.ReasonNoFeasible},
		{name: "cold load failed", nodes: []reasonNode{warm}, setup: func(f *reasonFleet) { f.failLoad = true },
			body: chat("Cold/Model"), status: 503, retry: "5", reason: apierr.ReasonLoadFailed},
		{name: "cold load timed out", nodes: []reasonNode{warm}, setup: func(f *reasonFleet) { f.gate = make(chan struct{}) },
			opts: serverOpts{loadTimeout: 50 * time.Millisecond}, body: chat("Cold/Model"), status: 503, retry: "5", reason: apierr.ReasonLoadTimeout},
		{name: "wait for the cold load timed out", nodes: []reasonNode{warm}, setup: func(f *reasonFleet) { f.gate = make(chan struct{}) },
			opts: serverOpts{waitTimeout: 50 * time.Millisecond}, body: chat("Cold/Model"), status: 503, retry: "5", reason: apierr.ReasonLoadTimeout},
		{name: "endpoint not resolvable", body: chat("Warm/Model"), status: 503, retry: "2", reason: apierr.ReasonEndpointUnresolved,
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, models: []*fleet.Model{resident("Warm/Model", neuron.StatusLoaded, "", 4000)}}}},

		// Beyond the table.
		{name: "model id with a bidi override", nodes: []reasonNode{warm}, body: chat("Warm/Model\u202e"), status: 400, reason: apierr.ReasonInvalidModelID},
		{name: "body too large", nodes: []reasonNode{warm}, opts: serverOpts{maxBytes: 64}, body: chat("Warm/Model") + "                                               ",
			status: 413, reason: apierr.ReasonBodyTooLarge},
		{name: "no neurons configured", body: chat("r/warm"), status: 503, retry: "5", reason: apierr.ReasonNoNeurons},
		{name: "pre-warming", body: chat("Cold/Model"), status: 503, retry: "2", reason: apierr.ReasonPreWarming,
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, loading: []string{"Cold/Model"}}}},
		{name: "resident but not servable", body: chat("Odd/Model"), status: 503, retry: "5", reason: apierr.ReasonUnservable,
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, models: []*fleet.Model{{Model: neuron.Model{ID: "Odd/Model",
				Status: neuron.StatusLoaded, Servable: &neuron.Servable{OK: false, Reason: "insufficient_vram"}}, Endpoint: "http://beast:13131"}}}}},
		{name: "no room: nothing it may displace", body: chat("Low/Model"), status: 503, retry: "5", reason: apierr.ReasonNoRoom,
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, models: []*fleet.Model{resident("High/Model", neuron.StatusLoaded, "http://beast:13131", 20000)}}}},
		{name: "cold loads disabled", nodes: []reasonNode{warm}, opts: serverOpts{noLoader: true}, body: chat("Cold/Model"), status: 503, retry: "5", reason: apierr.ReasonColdLoadsDisabled},
		{name: "loaded, then its neuron left the fleet", nodes: []reasonNode{warm}, body: chat("Cold/Model"), status: 503, retry: "5", reason: apierr.ReasonNodeGone,
			setup: func(f *reasonFleet) { f.markLoaded = func(string) { f.snap.Store(&fleet.Snapshot{Round: 9}) } }},
		{name: "loaded, but no endpoint for it", nodes: []reasonNode{warm}, body: chat("Cold/Model"), status: 503, retry: "2", reason: apierr.ReasonEndpointUnresolved,
			setup: func(f *reasonFleet) { f.markLoaded = func(string) {} }},
		{name: "upstream address unusable", body: chat("Warm/Model"), status: 503, retry: "2", reason: apierr.ReasonEndpointUnresolved,
			opts:  serverOpts{upstream: extproc.NewOriginalDst(nil)},
			nodes: []reasonNode{{name: "beast", healthy: true, devices: []int64{24000}, models: []*fleet.Model{resident("Warm/Model", neuron.StatusLoaded, "/not-a-url", 4000)}}}},
	}
	seen := map[apierr.Reason]bool{}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := &reasonFleet{}
			f.snap.Store(reasonSnapshot(c.nodes...))
			if c.setup != nil {
				c.setup(f)
			}
			s := startReasonServer(t, f, c.opts)
			status, retry := s.post(t, c.body)
			if status != c.status || retry != c.retry {
				t.Errorf("status %d Retry-After %q, want %d %q", status, retry, c.status, c.retry)
			}
			got := s.reasons(t)
			if len(got) != 1 || got[string(c.reason)] != 1 {
				t.Errorf("request_errors_total by reason %v, want one %s", got, c.reason)
			}
			seen[c.reason] = true
		})
	}

	// Stateful ones: cool-down after a failed load, the waiter cap, shutdown.
	t.Run("cool-down after a failed load", func(t *testing.T) {
		f := &reasonFleet{failLoad: true}
		f.snap.Store(reasonSnapshot(warm))
		s := startReasonServer(t, f, serverOpts{})
		s.post(t, chat("Cold/Model"))
		if status, retry := s.post(t, chat("Cold/Model")); status != 503 || retry != "5" {
			t.Errorf("second request: %d %q, want 503 Retry-After 5", status, retry)
		}
		if got := s.reasons(t); got["load_failed"] != 1 || got["cooldown"] != 1 || len(got) != 2 {
			t.Errorf("reasons %v, want load_failed then cooldown", got)
		}
		seen[apierr.ReasonLoadFailed], seen[apierr.ReasonCooldown] = true, true
	})
	t.Run("too many requests held", func(t *testing.T) {
		f := &reasonFleet{gate: make(chan struct{})}
		f.snap.Store(reasonSnapshot(warm))
		s := startReasonServer(t, f, serverOpts{maxWaiters: 1})
		held := make(chan int, 1)
		go func() { st, _ := s.post(t, chat("Cold/Model")); held <- st }()
		waitFor(t, "the first request to be held", func() bool {
			in := s.loader.InProgress()
			return len(in) == 1 && in[0].Waiters == 1
		})
		if status, retry := s.post(t, chat("Cold/Model")); status != 503 || retry != "5" {
			t.Errorf("second request: %d %q, want 503 Retry-After 5", status, retry)
		}
		close(f.gate)
		if st := <-held; st != 200 {
			t.Errorf("held request: %d, want routed once the load finished", st)
		}
		if got := s.reasons(t); got["waiters_full"] != 1 || len(got) != 1 {
			t.Errorf("reasons %v, want one waiters_full", got)
		}
		seen[apierr.ReasonWaitersFull] = true
	})
	t.Run("shutting down", func(t *testing.T) {
		f := &reasonFleet{}
		f.snap.Store(reasonSnapshot(warm))
		s := startReasonServer(t, f, serverOpts{})
		s.loader.Close(context.Background())
		if status, retry := s.post(t, chat("Cold/Model")); status != 503 || retry != "5" {
			t.Errorf("%d %q, want 503 Retry-After 5", status, retry)
		}
		if got := s.reasons(t); got["shutting_down"] != 1 || len(got) != 1 {
			t.Errorf("reasons %v, want one shutting_down", got)
		}
		seen[apierr.ReasonShuttingDown] = true
	})

	// Refused at the request headers, before any decision: counted as
	// requests and errors (without model or node), so that the error
	// ratio stays a ratio.
	t.Run("refused before a decision", func(t *testing.T) {
		f := &reasonFleet{}
		f.snap.Store(reasonSnapshot(warm))
		s := startReasonServer(t, f, serverOpts{})
		buffered := filterv3.ProcessingMode_BUFFERED
		for _, c := range []struct {
			method, path string
			mode         filterv3.ProcessingMode_BodySendMode
			bodiless     bool
			status       int
		}{
			{"POST", "/models/load", buffered, false, 404},
			{"GET", "/admin", buffered, true, 404},
			{"POST", "/v1/chat/completions", buffered, true, 400},
			{"POST", "/v1/chat/completions", filterv3.ProcessingMode_STREAMED, false, 500},
		} {
			if got := s.refusedAtHeaders(t, c.method, c.path, c.mode, c.bodiless); got != c.status {
				t.Errorf("%s %s (%s): %d, want %d", c.method, c.path, c.mode, got, c.status)
			}
		}
		got := s.reasons(t)
		if got["path_not_routed"] != 2 || got["invalid_body"] != 1 || got["extproc_misconfigured"] != 1 || len(got) != 3 {
			t.Errorf("reasons %v, want path_not_routed 2, invalid_body 1, extproc_misconfigured 1", got)
		}
		if n := s.requests(t); n != 4 {
			t.Errorf("requests_total %v, want 4 (each refused request once)", n)
		}
		seen[apierr.ReasonPathNotRouted], seen[apierr.ReasonMisconfigured] = true, true
	})

	// What this test cannot drive deterministically (races between a
	// decision and the ledger, xDS acknowledgements) is covered by apierr's
	// source check.
	notDriven := map[apierr.Reason]bool{apierr.ReasonNotPolled: true, apierr.ReasonClusterNotAcked: true,
		apierr.ReasonEvictedAfterLoad: true}
	for _, r := range apierr.Reasons {
		if !seen[r] && !notDriven[r] {
			t.Errorf("reason %s is not driven by any case", r)
		}
	}
}
