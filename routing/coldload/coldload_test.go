package coldload

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"
)

// eventLog records neuron calls across all fake neurons, in order.
type eventLog struct {
	mu     sync.Mutex
	events []string
}

func (e *eventLog) add(format string, args ...any) {
	e.mu.Lock()
	e.events = append(e.events, fmt.Sprintf(format, args...))
	e.mu.Unlock()
}

func (e *eventLog) all() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.events...)
}

type fakeResident struct {
	vram int64
	devs []int
}

// fakeNeuron is an in-memory neuron: /health reports free VRAM from what is
// resident, unload frees it, load takes it (failing when it does not fit,
// like a CUDA out-of-memory). Load can be held on a gate.
type fakeNeuron struct {
	name   string
	events *eventLog
	sizes  map[string]int64 // load id → VRAM a load takes

	mu       sync.Mutex
	totals   []int64
	resident map[string]fakeResident
	loadErr  error // every Load fails with this
	// unloadErr makes every Unload fail.
	unloadErr error
	// healthErr makes /health fail.
	healthErr error

	gate    chan struct{} // non-nil: Load waits for it (or its ctx)
	started chan string   // non-nil: Load sends the model id when called
	loads   atomic.Int32
	// loadReturned is when the last Load returned (for the benchmark).
	loadReturned atomic.Int64
}

// fakeFrom builds a neuron whose real state matches n's snapshot.
func fakeFrom(n *fleet.Node, events *eventLog, sizes map[string]int64) *fakeNeuron {
	f := &fakeNeuron{name: n.Name, events: events, sizes: sizes, resident: map[string]fakeResident{}}
	for _, d := range n.Discovery.Devices {
		f.totals = append(f.totals, d.VRAMTotalMB)
	}
	for _, m := range n.Models {
		f.resident[m.ID] = fakeResident{vram: *m.VRAMUsedMB, devs: m.Devices}
	}
	return f
}

func (f *fakeNeuron) free() []int64 {
	free := append([]int64(nil), f.totals...)
	for _, r := range f.resident {
		for _, d := range r.devs {
			free[d] -= r.vram / int64(len(r.devs))
		}
	}
	return free
}

func (f *fakeNeuron) Discovery(context.Context) (*neuron.Discovery, error) {
	return nil, errors.New("not used")
}
func (f *fakeNeuron) Models(context.Context) ([]neuron.Model, error) {
	return nil, errors.New("not used")
}
func (f *fakeNeuron) Endpoint(context.Context, string) (string, error) {
	return "", errors.New("not used")
}

func (f *fakeNeuron) Health(context.Context) (*neuron.Health, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.healthErr != nil {
		return nil, f.healthErr
	}
	h := &neuron.Health{UptimeSecs: 100}
	for i, v := range f.free() {
		h.Devices = append(h.Devices, neuron.DeviceHealth{Index: i, VRAMFreeMB: v, VRAMUsedMB: f.totals[i] - v})
	}
	return h, nil
}

func (f *fakeNeuron) Unload(_ context.Context, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unloadErr != nil {
		return f.unloadErr
	}
	if _, ok := f.resident[id]; !ok {
		return fmt.Errorf("neuron %s: POST /models/unload: 404: %s is not loaded", f.name, id)
	}
	delete(f.resident, id)
	f.events.add("%s unload %s", f.name, id)
	return nil
}

func (f *fakeNeuron) Load(ctx context.Context, spec neuron.LoadSpec) error {
	f.loads.Add(1)
	defer func() { f.loadReturned.Store(time.Now().UnixNano()) }()
	f.events.add("%s load %s", f.name, spec.ModelID)
	if f.started != nil {
		f.started <- spec.ModelID
	}
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.loadErr != nil {
		return f.loadErr
	}
	need := f.sizes[spec.ModelID]
	k := int64(len(spec.Devices))
	free := f.free()
	for _, d := range spec.Devices {
		if free[d]*k < need {
			return fmt.Errorf("neuron %s: POST /models/load: 500: CUDA out of memory on device %d", f.name, d)
		}
	}
	f.resident[spec.ModelID] = fakeResident{vram: need, devs: spec.Devices}
	return nil
}

// rig is a Loader over fake neurons built from a snapshot.
type rig struct {
	l       *Loader
	usage   *routing.Usage
	events  *eventLog
	neurons map[string]*fakeNeuron
	snapPtr atomic.Pointer[fleet.Snapshot]
	marked  chan string // "node model" per MarkLoaded
	obs     *recordingObserver
	// markLoaded, when set, replaces the default MarkLoaded.
	markLoaded func(ctx context.Context, node, model string, devices []int, vramMB int64) error
}

type recordingObserver struct {
	mu      sync.Mutex
	evicted []string
}

func (o *recordingObserver) LoadStarted(string, string)                       {}
func (o *recordingObserver) LoadFinished(string, string, bool, time.Duration) {}
func (o *recordingObserver) WaitersChanged(int)                               {}
func (o *recordingObserver) Evicted(node, model string) {
	o.mu.Lock()
	o.evicted = append(o.evicted, node+" "+model)
	o.mu.Unlock()
}

func newRig(t testing.TB, cfg Config, snap *fleet.Snapshot) *rig {
	cat := ft.TieredCatalogue()
	sizes := map[string]int64{}
	for _, p := range cat.Models() {
		sizes[p.LoadID()] = p.VRAMMB
	}
	r := &rig{usage: routing.NewUsage(), events: &eventLog{}, neurons: map[string]*fakeNeuron{},
		marked: make(chan string, 100), obs: &recordingObserver{}}
	r.snapPtr.Store(snap)
	for _, n := range snap.Nodes {
		r.neurons[n.Name] = fakeFrom(n, r.events, sizes)
	}
	r.l = New(cfg, Deps{
		Catalogue: func() *catalogue.Catalogue { return cat },
		Fleet:     r.snapPtr.Load,
		Neuron: func(node string) neuron.API {
			if f := r.neurons[node]; f != nil {
				return f
			}
			return nil
		},
		MarkLoaded: func(ctx context.Context, node, model string, devices []int, vramMB int64) error {
			if r.markLoaded != nil {
				return r.markLoaded(ctx, node, model, devices, vramMB)
			}
			r.marked <- node + " " + model
			return nil
		},
		Usage:    r.usage,
		Observer: r.obs,
	})
	return r
}

// snap is the rig's current fleet view.
func (r *rig) snap() *fleet.Snapshot { return r.snapPtr.Load() }

// poll plays a poll round: each node as its fake neuron now is, with
// readings requested now.
func (r *rig) poll() {
	old := r.snap()
	s := &fleet.Snapshot{Round: old.Round + 1}
	now := time.Now()
	for _, n := range old.Nodes {
		c := *n
		f := r.neurons[n.Name]
		f.mu.Lock()
		h := &neuron.Health{UptimeSecs: 100}
		for i, v := range f.free() {
			h.Devices = append(h.Devices, neuron.DeviceHealth{Index: i, VRAMFreeMB: v, VRAMUsedMB: f.totals[i] - v})
		}
		c.Models = nil
		for id, res := range f.resident {
			v := res.vram
			c.Models = append(c.Models, &fleet.Model{Model: neuron.Model{ID: id, Harness: "candle", Status: neuron.StatusLoaded,
				Devices: res.devs, VRAMUsedMB: &v}, Endpoint: "http://" + n.Name + ":13131"})
		}
		f.mu.Unlock()
		slices.SortFunc(c.Models, func(a, b *fleet.Model) int { return strings.Compare(a.ID, b.ID) })
		c.Health, c.HealthAt, c.ModelsAt = h, now, now
		s.Nodes = append(s.Nodes, &c)
	}
	r.snapPtr.Store(s)
}

func (r *rig) close(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r.l.Close(ctx)
}

type waitResult struct {
	node string
	err  *apierr.Error
}

// join starts a request that joins model's flight and waits with ctx.
func (r *rig) join(t testing.TB, ctx context.Context, model string) <-chan waitResult {
	t.Helper()
	f, err := r.l.Join(model)
	if err != nil {
		t.Fatalf("Join(%s): %v", model, err)
	}
	out := make(chan waitResult, 1)
	go func() {
		node, err := waitFlight(f, ctx)
		out <- waitResult{node, err}
	}()
	return out
}

// eventually polls cond; the deadline is a hang guard, not an assertion on speed.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func receive[T any](t testing.TB, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
		panic("unreachable")
	}
}

func (r *rig) waiters(model string) int {
	for _, f := range r.l.InProgress() {
		if f.Model == model {
			return f.Waiters
		}
	}
	return 0
}

func twoNodes() *fleet.Snapshot {
	return ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000))), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 12000))))
}

func TestColdLoadManyWaitersShareOneLoad(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{})

	const n = 200
	results := make(chan waitResult, n)
	var joined sync.WaitGroup
	for range n {
		joined.Add(1)
		go func() {
			f, err := r.l.Join("org/small")
			joined.Done()
			if err != nil {
				results <- waitResult{err: err}
				return
			}
			node, werr := waitFlight(f, context.Background())
			results <- waitResult{node, werr}
		}()
	}
	joined.Wait()
	eventually(t, "all waiters to join the flight", func() bool { return r.waiters("org/small") == n })
	close(beast.gate)
	for range n {
		res := receive(t, "a waiter's result", results)
		if res.err != nil || res.node != "beast" {
			t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
		}
	}
	if got := beast.loads.Load() + r.neurons["rig2"].loads.Load(); got != 1 {
		t.Errorf("%d /models/load calls for %d concurrent requests, want 1", got, n)
	}
	if got := receive(t, "MarkLoaded", r.marked); got != "beast org/small" {
		t.Errorf("MarkLoaded(%s), want beast org/small", got)
	}
	if r.usage.LastAccess("beast", "org/small").IsZero() {
		t.Error("a freshly loaded model has no last access, so it would be the first to be evicted")
	}
	if len(r.l.InProgress()) != 0 {
		t.Errorf("flight still listed after it finished: %+v", r.l.InProgress())
	}
}

func TestColdLoadCancelledWaiterLeavesTheLoadRunning(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{})
	beast.started = make(chan string, 1)

	ctx, hangUp := context.WithCancel(context.Background())
	first := r.join(t, ctx, "org/small")
	second := r.join(t, context.Background(), "org/small")
	receive(t, "the load to start", beast.started)

	hangUp()
	res := receive(t, "the hung-up waiter", first)
	if res.err == nil || res.err.Status != 503 || res.err.RetryAfter != 5 || !strings.Contains(res.err.Message, "still loading on beast") {
		t.Fatalf("hung-up waiter got (%q, %v), want 503 still loading on beast, Retry-After 5", res.node, res.err)
	}
	if w := r.waiters("org/small"); w != 1 {
		t.Errorf("%d waiters after one hung up, want 1", w)
	}

	close(beast.gate)
	if res := receive(t, "the remaining waiter", second); res.err != nil || res.node != "beast" {
		t.Fatalf("remaining waiter got (%q, %v), want beast: one client's hang-up must not cancel the load", res.node, res.err)
	}
}

func TestColdLoadWithNoWaitersLeftStillCompletes(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{})
	beast.started = make(chan string, 1)

	ctx, hangUp := context.WithCancel(context.Background())
	only := r.join(t, ctx, "org/small")
	receive(t, "the load to start", beast.started)
	hangUp()
	receive(t, "the hung-up waiter", only)

	close(beast.gate)
	if got := receive(t, "MarkLoaded after the load", r.marked); got != "beast org/small" {
		t.Fatalf("MarkLoaded(%s), want beast org/small", got)
	}
	if _, ok := beast.resident["org/small"]; !ok {
		t.Error("the model is not resident on beast after a load nobody waited for")
	}
}

func TestColdLoadFailureTriesTheNextNode(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	r.neurons["beast"].loadErr = errors.New("neuron beast: POST /models/load: 422: quant q4 not found")

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/small"))
	if res.err != nil || res.node != "rig2" {
		t.Fatalf("waiter got (%q, %v), want rig2 after beast failed", res.node, res.err)
	}
	want := []string{"beast load org/small", "rig2 load org/small"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("neuron calls %v, want %v", got, want)
	}
}

func TestColdLoadFailureEverywhereTellsEveryWaiterWhy(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	beast, rig2 := r.neurons["beast"], r.neurons["rig2"]
	beast.gate = make(chan struct{})
	beast.loadErr = errors.New("neuron beast: POST /models/load: 422: repo org/small not found")
	rig2.loadErr = errors.New("neuron rig2: POST /models/load: 503: cuda_unavailable")

	var results []<-chan waitResult
	for range 3 {
		results = append(results, r.join(t, context.Background(), "org/small"))
	}
	close(beast.gate)
	for _, ch := range results {
		res := receive(t, "a waiter", ch)
		if res.err == nil || res.err.Status != 503 || res.err.Code != apierr.CodeServiceUnavailable || res.err.RetryAfter != 5 {
			t.Fatalf("waiter got (%q, %v), want 503 service_unavailable Retry-After 5", res.node, res.err)
		}
		for _, s := range []string{`cold load of "org/small" failed on beast: neuron beast: POST /models/load: 422: repo org/small not found`,
			"rig2: neuron rig2: POST /models/load: 503: cuda_unavailable", "Check the neuron's logs"} {
			if !strings.Contains(res.err.Message, s) {
				t.Errorf("message %q does not say %q", res.err.Message, s)
			}
		}
	}

	// Both nodes are now in cool-down: the next request is told at once, with the reasons.
	_, err := r.l.Join("org/small")
	if err == nil || err.RetryAfter != 5 || !strings.Contains(err.Message, "repo org/small not found") {
		t.Fatalf("Join during cool-down = %v, want an immediate 503 naming the last failure", err)
	}
	if got := beast.loads.Load() + rig2.loads.Load(); got != 2 {
		t.Errorf("%d loads, want 2 (no new load during cool-down)", got)
	}
}

func TestColdLoadCooldownExcludesTheFailedNodeUntilItExpires(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{FailureCooldown: time.Minute}, twoNodes())
	defer r.close(t)
	var now atomic.Int64
	now.Store(ft.Epoch.UnixNano())
	r.l.now = func() time.Time { return time.Unix(0, now.Load()) }
	beast, rig2 := r.neurons["beast"], r.neurons["rig2"]
	beast.loadErr = errors.New("neuron beast: POST /models/load: 500: CUDA out of memory")

	if res := receive(t, "the first request", r.join(t, context.Background(), "org/small")); res.node != "rig2" {
		t.Fatalf("first request got (%q, %v), want rig2", res.node, res.err)
	}
	// beast is the roomier node, but it is cooling down.
	rig2.mu.Lock()
	delete(rig2.resident, "org/small")
	rig2.mu.Unlock()
	r.poll()
	if res := receive(t, "the second request", r.join(t, context.Background(), "org/small")); res.node != "rig2" {
		t.Fatalf("second request got (%q, %v), want rig2 while beast cools down", res.node, res.err)
	}
	if got := beast.loads.Load(); got != 1 {
		t.Errorf("beast got %d loads during its cool-down, want 1", got)
	}

	now.Add(int64(time.Minute))
	beast.mu.Lock()
	beast.loadErr = nil
	beast.mu.Unlock()
	if res := receive(t, "a request after the cool-down", r.join(t, context.Background(), "org/small")); res.node != "beast" {
		t.Fatalf("after the cool-down got (%q, %v), want beast again", res.node, res.err)
	}
}

func TestColdLoadTimeoutAnswers503(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{Timeout: 50 * time.Millisecond}, twoNodes())
	defer r.close(t)
	r.neurons["beast"].gate = make(chan struct{}) // never opened: the load hangs

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/small"))
	if res.err == nil || res.err.Status != 503 || res.err.RetryAfter != 5 ||
		!strings.Contains(res.err.Message, "beast: timed out after 50ms (cold_load.timeout)") {
		t.Fatalf("waiter got (%q, %v), want 503 naming the timeout on beast", res.node, res.err)
	}
	if got := r.neurons["rig2"].loads.Load(); got != 0 {
		t.Errorf("rig2 got %d loads after the flight's time was up, want 0", got)
	}
}

func TestColdLoadWaiterCap(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{MaxWaiters: 2}, twoNodes())
	defer r.close(t)
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{})

	ctx, hangUp := context.WithCancel(context.Background())
	first := r.join(t, ctx, "org/small")
	second := r.join(t, context.Background(), "org/small")
	for _, model := range []string{"org/small", "org/mid"} {
		if _, err := r.l.Join(model); err == nil || err.Status != 503 || err.RetryAfter != 5 || !strings.Contains(err.Message, "cold_load.max_waiters") {
			t.Fatalf("Join(%s) over the cap = %v, want 503 Retry-After 5 naming max_waiters", model, err)
		}
	}
	hangUp()
	receive(t, "the hung-up waiter", first)
	third := r.join(t, context.Background(), "org/small") // a slot is free again

	close(beast.gate)
	for _, ch := range []<-chan waitResult{second, third} {
		if res := receive(t, "a waiter", ch); res.err != nil {
			t.Fatalf("waiter within the cap got %v", res.err)
		}
	}
}

func TestColdLoadEvictsLeastRecentlyUsedBeforeLoading(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}))
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	// r/b was never used through us, r/c before r/a.
	r.usage.Touch("beast", "r/c")
	eventually(t, "a later timestamp", func() bool {
		r.usage.Touch("beast", "r/a")
		return r.usage.LastAccess("beast", "r/a").After(r.usage.LastAccess("beast", "r/c"))
	})

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	// 21920 free: r/b brings it to 41920, enough for 40000; r/a and r/c stay.
	want := []string{"beast unload r/b", "beast load org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("neuron calls %v, want %v", got, want)
	}
	if !reflect.DeepEqual(r.obs.evicted, []string{"beast r/b"}) {
		t.Errorf("observer saw evictions %v, want [beast r/b]", r.obs.evicted)
	}
}

func TestColdLoadRechecksTheNeuronAfterEachEviction(t *testing.T) {
	defer goleak.VerifyNone(t)
	// The neuron reports 20000 MB per resident, but each really frees 15000.
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}))
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	beast := r.neurons["beast"]
	for id := range beast.resident {
		beast.resident[id] = fakeResident{vram: 15000, devs: []int{0}}
	}
	// Something the snapshot does not list keeps the real free VRAM at 21920.
	beast.resident["r/other"] = fakeResident{vram: 81920 - 21920 - 45000, devs: []int{0}}
	// r/a and r/b were never used through us: evicted first, by name.
	r.usage.Touch("beast", "r/c")

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	// The plan said one eviction (21920+20000); the neuron then showed 36920
	// free, so a second one was needed before the load could fit.
	want := []string{"beast unload r/a", "beast unload r/b", "beast load org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("neuron calls %v, want %v", got, want)
	}
}

func TestColdLoadWithoutFreshHealthCountsWhatEvictionsFreed(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 1920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}, ft.Res{ID: "r/d", VRAM: 20000}))
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	r.neurons["beast"].healthErr = errors.New("neuron beast: GET /health: 503")

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	// 1920 + 20000 + 20000 = 41920: two evictions, not three.
	want := []string{"beast unload r/a", "beast unload r/b", "beast load org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("neuron calls %v, want %v", got, want)
	}
}

func TestColdLoadNoRoomAfterAllTriesTheNextNodeWithoutCooldown(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	// The snapshot is stale: beast has filled up with a model it has not
	// listed yet, so its fresh /health shows no room and nothing to evict.
	r.neurons["beast"].resident["r/new"] = fakeResident{vram: ft.RTX4090, devs: []int{0}}

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/small"))
	if res.err != nil || res.node != "rig2" {
		t.Fatalf("waiter got (%q, %v), want rig2", res.node, res.err)
	}
	if got, want := r.events.all(), []string{"rig2 load org/small"}; !reflect.DeepEqual(got, want) {
		t.Errorf("neuron calls %v, want %v", got, want)
	}
	if r.l.inCooldown("beast", "org/small") {
		t.Error("beast is in cool-down although no load failed there; it was only full for a moment")
	}
}

func TestColdLoadMarksLoadedBeforeReleasingWaiters(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{})

	// probe is a second request on the same flight. Asked from inside
	// MarkLoaded with an expired context, it must still be waiting.
	probe, err := r.l.Join("org/small")
	if err != nil {
		t.Fatal(err)
	}
	waiter := r.join(t, context.Background(), "org/small")
	var releasedEarly atomic.Value
	r.markLoaded = func(context.Context, string, string, []int, int64) error {
		expired, cancel := context.WithCancel(context.Background())
		cancel()
		node, err := waitFlight(probe, expired)
		if node != "" || err == nil || !strings.Contains(err.Message, "still loading") {
			releasedEarly.Store(fmt.Sprintf("(%q, %v)", node, err))
		}
		return nil
	}

	close(beast.gate)
	if res := receive(t, "the waiter", waiter); res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	if v := releasedEarly.Load(); v != nil {
		t.Fatalf("a waiter was released with %s before the model was marked loaded", v)
	}
}

func TestColdLoadAnswersAtOnceWhenNothingCanTakeTheModel(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	defer r.close(t)

	if _, err := r.l.Join("org/tp2"); err == nil || err.Code != apierr.CodeNoFeasibleNeuron || !strings.Contains(err.Message, "beast: 1 device") {
		t.Fatalf("Join(org/tp2) = %v, want no_feasible_neuron naming beast's single device", err)
	}
	if _, err := r.l.Join("org/unknown"); err == nil || err.Status != 404 {
		t.Fatalf("Join(org/unknown) = %v, want 404", err)
	}
	if n := r.l.waiters.Load(); n != 0 {
		t.Errorf("%d waiter slots held after refusals, want 0", n)
	}
	if got := r.events.all(); len(got) != 0 {
		t.Errorf("neuron calls %v for refused loads, want none", got)
	}
}

func TestColdLoadCloseCancelsLoadsInProgress(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, twoNodes())
	beast := r.neurons["beast"]
	beast.gate = make(chan struct{}) // never opened
	beast.started = make(chan string, 1)
	waiter := r.join(t, context.Background(), "org/small")
	receive(t, "the load to start", beast.started)

	expired, cancel := context.WithCancel(context.Background())
	cancel()
	r.l.Close(expired)
	if res := receive(t, "the waiter", waiter); res.err == nil || !strings.Contains(res.err.Message, "shutting down") {
		t.Fatalf("waiter got (%q, %v), want 503 shutting down", res.node, res.err)
	}
	if _, err := r.l.Join("org/small"); err == nil || err.Status != 503 {
		t.Fatalf("Join after Close = %v, want 503", err)
	}
	if got := r.neurons["rig2"].loads.Load(); got != 0 {
		t.Errorf("rig2 got %d loads during shutdown, want 0", got)
	}
}

// BenchmarkColdLoadWaiters holds 10,000 requests on one slow load and
// reports what each costs while waiting and how long releasing them all takes.
func BenchmarkColdLoadWaiters(b *testing.B) {
	const n = 10000
	var heapPer, stackPer, releaseMS float64
	iters := 0
	for b.Loop() {
		r := newRig(b, Config{MaxWaiters: n}, twoNodes())
		beast := r.neurons["beast"]
		beast.gate = make(chan struct{})
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)

		var done sync.WaitGroup
		done.Add(n)
		for range n {
			go func() {
				defer done.Done()
				f, err := r.l.Join("org/small")
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := waitFlight(f, context.Background()); err != nil {
					b.Error(err)
				}
			}()
		}
		eventually(b, "all waiters to join", func() bool { return r.waiters("org/small") == n })
		runtime.GC()
		runtime.ReadMemStats(&after)

		close(beast.gate)
		done.Wait()
		end := time.Now()
		releaseMS += float64(end.Sub(time.Unix(0, beast.loadReturned.Load())).Microseconds()) / 1000
		heapPer += float64(after.HeapAlloc-before.HeapAlloc) / n
		stackPer += float64(after.StackInuse-before.StackInuse) / n
		iters++
		r.close(b)
	}
	b.ReportMetric(heapPer/float64(iters), "heap-B/waiter")
	b.ReportMetric(stackPer/float64(iters), "stack-B/waiter")
	b.ReportMetric(releaseMS/float64(iters), "release-ms")
}

// waitFlight waits as a request does and gives its slot back.
func waitFlight(f routing.Flight, ctx context.Context) (string, *apierr.Error) {
	defer f.Release()
	return f.Wait(ctx)
}
