package extproc_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
	"github.com/helexa/cortex-extproc/routing/coldload"
)

// coldFleet is a fleet whose neurons have nothing loaded, a catalogue model
// that fits on either, and fake neuron APIs whose loads the test controls.
type coldFleet struct {
	cat     *catalogue.Catalogue
	snap    atomic.Pointer[fleet.Snapshot]
	mu      sync.Mutex
	loads   map[string]int // node → /models/load calls
	release chan struct{}  // closed to let loads finish
	failOn  map[string]error
}

func newColdFleet(nodes ...string) *coldFleet {
	f := &coldFleet{
		cat:     catalogue.New([]*catalogue.Profile{{ID: "Cold/Model", Harness: "candle", VRAMMB: 8000}}, map[string]string{"helexa/cold": "Cold/Model"}, "h"),
		loads:   map[string]int{},
		release: make(chan struct{}),
		failOn:  map[string]error{},
	}
	s := &fleet.Snapshot{Round: 1}
	for _, n := range nodes {
		s.Nodes = append(s.Nodes, &fleet.Node{Name: n, Cluster: "neuron-" + n, Healthy: true,
			Discovery: &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}}},
			Health:    &neuron.Health{Devices: []neuron.DeviceHealth{{Index: 0, VRAMFreeMB: 24000}}}})
	}
	f.snap.Store(s)
	return f
}

type fakeNeuron struct {
	f    *coldFleet
	name string
}

func (n fakeNeuron) Discovery(context.Context) (*neuron.Discovery, error) {
	return nil, errors.New("unused")
}
func (n fakeNeuron) Models(context.Context) ([]neuron.Model, error) { return nil, errors.New("unused") }
func (n fakeNeuron) Health(ctx context.Context) (*neuron.Health, error) {
	return n.f.snap.Load().Node(n.name).Health, nil
}
func (n fakeNeuron) Endpoint(context.Context, string) (string, error) {
	return "http://" + n.name + ":13131", nil
}
func (n fakeNeuron) Unload(context.Context, string) error { return nil }
func (n fakeNeuron) Load(ctx context.Context, spec neuron.LoadSpec) error {
	n.f.mu.Lock()
	n.f.loads[n.name]++
	err := n.f.failOn[n.name]
	n.f.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-n.f.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// markLoaded plays the poller's owner: publish a snapshot with the model loaded.
func (f *coldFleet) markLoaded(_ context.Context, node, model string, _ []int, _ int64) error {
	old := f.snap.Load()
	s := &fleet.Snapshot{Round: old.Round + 1}
	for _, n := range old.Nodes {
		c := *n
		if n.Name == node {
			c.Models = append(append([]*fleet.Model{}, n.Models...), &fleet.Model{
				Model: neuron.Model{ID: model, Status: neuron.StatusLoaded}, Endpoint: "http://" + node + ":13131"})
		}
		s.Nodes = append(s.Nodes, &c)
	}
	f.snap.Store(s)
	return nil
}

func (f *coldFleet) loadCalls() map[string]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]int{}
	for k, v := range f.loads {
		out[k] = v
	}
	return out
}

func (f *coldFleet) start(t *testing.T, coldTimeout time.Duration) (*harness, *coldload.Loader) {
	return f.startWithUsage(t, coldTimeout, routing.NewUsage())
}

func (f *coldFleet) startWithUsage(t *testing.T, coldTimeout time.Duration, usage *routing.Usage) (*harness, *coldload.Loader) {
	loader := coldload.New(coldload.Config{Timeout: coldTimeout, MaxEvictions: 3, MaxWaiters: 1000, FailureCooldown: time.Minute},
		coldload.Deps{
			Catalogue:  func() *catalogue.Catalogue { return f.cat },
			Fleet:      f.snap.Load,
			Neuron:     func(n string) neuron.API { return fakeNeuron{f: f, name: n} },
			MarkLoaded: f.markLoaded,
			Usage:      usage,
		})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		loader.Close(ctx)
	})
	r := routing.NewRouter(func() *catalogue.Catalogue { return f.cat }, f.snap.Load, loader, usage)
	return start(t, r, extproc.Options{ColdLoadTimeout: coldTimeout, MaxMessageTimeout: time.Hour}), loader
}

// coldStream sends headers and body of one request and returns the stream
// after the headers reply.
func coldStream(t *testing.T, ctx context.Context, h *harness, model string) extprocv3.ExternalProcessor_ProcessClient {
	t.Helper()
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"model":"` + model + `"}`)
	if err := s.Send(post("/v1/chat/completions", body)); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Recv(); err != nil || r.GetRequestHeaders() == nil {
		t.Fatalf("headers reply %v %v", r, err)
	}
	if err := s.Send(bodyMsg(body)); err != nil {
		t.Fatal(err)
	}
	return s
}

func TestColdLoadOverrideThenRoute(t *testing.T) {
	f := newColdFleet("beast")
	h, _ := f.start(t, 30*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := coldStream(t, ctx, h, "helexa/cold")

	// First: one standalone override, before any load finished.
	r, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if r.GetOverrideMessageTimeout() == nil || r.Response != nil {
		t.Fatalf("first reply to the body is %v, want a standalone override_message_timeout", r)
	}
	if got := r.GetOverrideMessageTimeout().AsDuration(); got != 31*time.Minute {
		t.Errorf("override %s, want cold_load.timeout + 1m = 31m", got)
	}
	close(f.release)

	// Then: the real answer, routed to where the model was loaded.
	r, err = s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if r.GetOverrideMessageTimeout() != nil {
		t.Fatal("a second override for the same message: Envoy ignores it")
	}
	got := setHeaders(r.GetRequestBody().GetResponse().GetHeaderMutation())
	if got["x-cortex-cluster"] != "neuron-beast" || got["x-cortex-cold-start"] != "true" || got["x-cortex-model"] != "Cold/Model" {
		t.Errorf("headers %v", got)
	}
	if string(r.GetRequestBody().GetResponse().GetBodyMutation().GetBody()) != `{"model":"Cold/Model"}` {
		t.Errorf("body %s", r.GetRequestBody().GetResponse().GetBodyMutation().GetBody())
	}
	s.CloseSend()
	if n := f.loadCalls()["beast"]; n != 1 {
		t.Errorf("%d load calls, want 1", n)
	}
}

func TestColdLoadSingleFlightManyWaiters(t *testing.T) {
	f := newColdFleet("beast")
	h, loader := f.start(t, 30*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	const n = 200
	streams := make([]extprocv3.ExternalProcessor_ProcessClient, n)
	for i := range streams {
		streams[i] = coldStream(t, ctx, h, "Cold/Model")
		if r, err := streams[i].Recv(); err != nil || r.GetOverrideMessageTimeout() == nil {
			t.Fatalf("stream %d: %v %v", i, r, err)
		}
	}
	// Every request is now held; one client hangs up mid-load.
	waitFor(t, func() bool { in := loader.InProgress(); return len(in) == 1 && in[0].Waiters == n })
	hungUpCtx, hangUp := context.WithCancel(ctx)
	gone := coldStream(t, hungUpCtx, h, "Cold/Model")
	if r, err := gone.Recv(); err != nil || r.GetOverrideMessageTimeout() == nil {
		t.Fatalf("extra stream: %v %v", r, err)
	}
	hangUp()
	waitFor(t, func() bool { in := loader.InProgress(); return len(in) == 1 && in[0].Waiters == n })

	close(f.release)
	var wg sync.WaitGroup
	var routed atomic.Int32
	for _, s := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := s.Recv()
			if err != nil {
				t.Error(err)
				return
			}
			if setHeaders(r.GetRequestBody().GetResponse().GetHeaderMutation())["x-cortex-node"] == "beast" {
				routed.Add(1)
			}
			s.CloseSend()
		}()
	}
	wg.Wait()
	if routed.Load() != n {
		t.Errorf("%d of %d requests routed to beast", routed.Load(), n)
	}
	if calls := f.loadCalls(); calls["beast"] != 1 {
		t.Errorf("load calls %v, want exactly one", calls)
	}
}

func TestColdLoadFailureFallsBackToNextNode(t *testing.T) {
	f := newColdFleet("alpha", "beta")
	f.failOn["alpha"] = &neuron.StatusError{Node: "alpha", Op: "POST /models/load", Status: 422, Reason: "quant not found"}
	close(f.release)
	h, _ := f.start(t, 30*time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := coldStream(t, ctx, h, "Cold/Model")
	if r, err := s.Recv(); err != nil || r.GetOverrideMessageTimeout() == nil {
		t.Fatalf("first reply %v %v, want the override", r, err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got := setHeaders(r.GetRequestBody().GetResponse().GetHeaderMutation())
	if got["x-cortex-node"] != "beta" || got["x-cortex-cold-start"] != "true" {
		t.Fatalf("routed %v, want beta after alpha's load failed", got)
	}
	s.CloseSend()
	// alpha sorts first and has as much room, so it was tried first.
	if calls := f.loadCalls(); calls["alpha"] != 1 || calls["beta"] != 1 {
		t.Errorf("load calls %v, want alpha then beta once each", calls)
	}
	if f.snap.Load().Node("beta").Model("Cold/Model") == nil {
		t.Error("model not marked loaded on beta")
	}
}

func TestColdLoadTimeoutIsOwn503(t *testing.T) {
	f := newColdFleet("beast")
	h, _ := f.start(t, 300*time.Millisecond) // the load never finishes
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := coldStream(t, ctx, h, "Cold/Model")
	r, err := s.Recv()
	if err != nil || r.GetOverrideMessageTimeout() == nil {
		t.Fatalf("%v %v", r, err)
	}
	r, err = s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	checkImmediate(t, r, errCase{status: 503, code: "service_unavailable", typ: "api_error", retryAfter: "5", contains: "Cold/Model"})
	s.CloseSend()
}

func TestWaitBudgetStaysInsideEnvoys(t *testing.T) {
	for _, c := range []struct {
		cold, max, override, wait time.Duration
	}{
		{30 * time.Minute, time.Hour, 31 * time.Minute, 30 * time.Minute},
		{time.Hour, time.Hour, time.Hour, time.Hour - 5*time.Second},
		{2 * time.Hour, time.Hour, time.Hour, time.Hour - 5*time.Second},
	} {
		s := extproc.New(nil, extproc.Options{ColdLoadTimeout: c.cold, MaxMessageTimeout: c.max})
		o, w := s.WaitBudget()
		if o != c.override || w != c.wait {
			t.Errorf("cold %s max %s: override %s wait %s, want %s %s", c.cold, c.max, o, w, c.override, c.wait)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
