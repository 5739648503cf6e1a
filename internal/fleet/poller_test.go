package fleet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeAPI is an in-memory neuron whose answers a test changes between rounds.
type fakeAPI struct {
	mu          sync.Mutex
	disc        *neuron.Discovery
	discErr     error
	models      []neuron.Model
	modelsErr   error
	health      *neuron.Health
	healthErr   error
	endpoints   map[string]string
	endpointErr map[string]error
	calls       map[string]int
	// modelsGate, when set, makes Models signal modelsEntered and wait for
	// a value (or ctx) before answering.
	modelsGate    chan struct{}
	modelsEntered chan struct{}
	// endpointGate, when set, makes Endpoint signal endpointEntered and
	// wait for a value (or ctx) before answering.
	endpointGate    chan struct{}
	endpointEntered chan struct{}
	// healthGate, when set, makes Health signal healthEntered and wait
	// for a value (or ctx) before answering.
	healthGate    chan struct{}
	healthEntered chan struct{}
}

func newFakeAPI(models ...neuron.Model) *fakeAPI {
	f := &fakeAPI{
		disc:        &neuron.Discovery{Hostname: "h", MaxPromptTokens: 32768, Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24564}}},
		models:      models,
		health:      &neuron.Health{UptimeSecs: 100},
		endpoints:   map[string]string{},
		endpointErr: map[string]error{},
		calls:       map[string]int{},
	}
	for _, m := range models {
		f.endpoints[m.ID] = "http://10.0.0.1:8000/" + m.ID
	}
	return f
}

func (f *fakeAPI) set(fn func(f *fakeAPI)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeAPI) count(call string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[call]
}

func (f *fakeAPI) Discovery(ctx context.Context) (*neuron.Discovery, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["discovery"]++
	if f.discErr != nil {
		return nil, f.discErr
	}
	d := *f.disc
	return &d, nil
}

// passGate, when gate is set, signals entered and waits for a value on
// gate or for ctx.
func passGate(ctx context.Context, gate, entered chan struct{}) error {
	if gate == nil {
		return nil
	}
	entered <- struct{}{}
	select {
	case <-gate:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeAPI) Models(ctx context.Context) ([]neuron.Model, error) {
	f.mu.Lock()
	f.calls["models"]++
	gate, entered := f.modelsGate, f.modelsEntered
	f.mu.Unlock()
	if err := passGate(ctx, gate, entered); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.modelsErr != nil {
		return nil, f.modelsErr
	}
	out := make([]neuron.Model, len(f.models))
	copy(out, f.models)
	return out, nil
}

func (f *fakeAPI) Health(ctx context.Context) (*neuron.Health, error) {
	f.mu.Lock()
	gate, entered := f.healthGate, f.healthEntered
	f.mu.Unlock()
	if err := passGate(ctx, gate, entered); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["health"]++
	if f.healthErr != nil {
		return nil, f.healthErr
	}
	h := *f.health
	return &h, nil
}

func (f *fakeAPI) Endpoint(ctx context.Context, id string) (string, error) {
	f.mu.Lock()
	gate, entered := f.endpointGate, f.endpointEntered
	f.mu.Unlock()
	if err := passGate(ctx, gate, entered); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls["endpoint:"+id]++
	if err := f.endpointErr[id]; err != nil {
		return "", err
	}
	if u, ok := f.endpoints[id]; ok {
		return u, nil
	}
	return "", fmt.Errorf("404: %w", neuron.ErrNotFound)
}

func (f *fakeAPI) Load(context.Context, neuron.LoadSpec) error { return errors.New("not used") }
func (f *fakeAPI) Unload(context.Context, string) error        { return errors.New("not used") }

// logBuffer collects slog text output from the owner goroutine.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// count returns how many log lines have msg="..." exactly.
func (b *logBuffer) count(msg string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), fmt.Sprintf("msg=%q ", msg))
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type hookLog struct {
	mu     sync.Mutex
	polls  []string
	health []string
	remove []string
}

func (h *hookLog) cfg(c PollerConfig) PollerConfig {
	c.OnPoll = func(node string, ok bool) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.polls = append(h.polls, fmt.Sprintf("%s=%v", node, ok))
	}
	c.OnHealth = func(node string, healthy bool) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.health = append(h.health, fmt.Sprintf("%s=%v", node, healthy))
	}
	c.OnRemove = func(node string) {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.remove = append(h.remove, node)
	}
	return c
}

func (h *hookLog) get() (polls, health, remove []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.polls...), append([]string(nil), h.health...), append([]string(nil), h.remove...)
}

type harness struct {
	t    *testing.T
	p    *Poller
	logs *logBuffer
	ctx  context.Context
}

// start runs a poller whose rounds the test triggers with poll(): the
// interval is long enough that only the first round runs by itself.
func start(t *testing.T, cfg PollerConfig, neurons ...Neuron) *harness {
	t.Helper()
	if cfg.Interval == 0 {
		cfg.Interval = time.Hour
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	p := NewPoller(cfg, neurons, log)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return after cancel")
		}
	})
	select {
	case <-p.Ready():
	case <-ctx.Done():
		t.Fatalf("poller never became ready")
	}
	return &harness{t: t, p: p, logs: logs, ctx: ctx}
}

func (h *harness) poll(n int) *Snapshot {
	h.t.Helper()
	for range n {
		if err := h.p.PollNow(h.ctx); err != nil {
			h.t.Fatalf("PollNow: %v", err)
		}
	}
	return h.p.Snapshot()
}

func (h *harness) node(name string) *Node {
	h.t.Helper()
	n := h.p.Snapshot().Node(name)
	if n == nil {
		h.t.Fatalf("node %q missing from snapshot", name)
	}
	return n
}

// waitFor polls the snapshot until cond holds; generous bound, no timing assertion.
func (h *harness) waitFor(what string, cond func(*Snapshot) bool) {
	h.t.Helper()
	for {
		ch := h.p.Changed()
		if cond(h.p.Snapshot()) {
			return
		}
		select {
		case <-ch:
		case <-h.ctx.Done():
			h.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func loaded(id string) neuron.Model {
	return neuron.Model{ID: id, Harness: "candle", Status: neuron.StatusLoaded, Devices: []int{0}}
}

func TestSnapshotBeforeFirstRoundAndReady(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	p := NewPoller(PollerConfig{Interval: time.Hour}, []Neuron{{Name: "b", Endpoint: "http://b:1", API: api}, {Name: "a", Endpoint: "http://a:1", API: api}}, nil)
	s := p.Snapshot()
	if s == nil || s.Round != 0 || s.AnyHealthy() || len(s.Nodes) != 2 || s.Nodes[0].Name != "a" || s.Nodes[0].Cluster != "neuron-a" {
		t.Fatalf("before Run: snapshot %+v, want round 0, configured nodes sorted, all unhealthy", s)
	}
	if allocs := testing.AllocsPerRun(100, func() { _ = p.Snapshot() }); allocs != 0 {
		t.Errorf("Snapshot() allocates %v times", allocs)
	}
	select {
	case <-p.Ready():
		t.Fatal("Ready closed before any round")
	default:
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("Ready not closed after the first round")
	}
	s = p.Snapshot()
	if s.Round != 1 || !s.Nodes[0].Healthy || !s.Nodes[1].Healthy || s.Nodes[0].Model("m").Endpoint == "" {
		t.Errorf("after first round: %+v", s.Nodes[0])
	}
	if err := p.Run(ctx); err == nil {
		t.Error("second Run should fail")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
	if err := p.PollNow(context.Background()); !errors.Is(err, ErrStopped) {
		t.Errorf("PollNow after stop = %v, want ErrStopped", err)
	}
	if err := p.MarkLoaded(context.Background(), "a", "m", nil, 0); !errors.Is(err, ErrStopped) {
		t.Errorf("MarkLoaded after stop = %v, want ErrStopped", err)
	}
}

func TestReadyWithNoNeurons(t *testing.T) {
	h := start(t, PollerConfig{})
	if s := h.p.Snapshot(); s.Round != 1 || len(s.Nodes) != 0 {
		t.Errorf("snapshot %+v", s)
	}
}

func TestIntervalDrivesRounds(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{Interval: 10 * time.Millisecond}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	h.waitFor("three rounds", func(s *Snapshot) bool { return s.Round >= 3 })
	if api.count("models") < 3 {
		t.Errorf("models polled %d times over 3 rounds", api.count("models"))
	}
}

func TestFailureThreshold(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	hooks := &hookLog{}
	h := start(t, hooks.cfg(PollerConfig{FailureThreshold: 3}), Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if n := h.node("a"); !n.Healthy || n.LastSuccess.IsZero() {
		t.Fatalf("healthy neuron not healthy after first round: %+v", n)
	}

	api.set(func(f *fakeAPI) { f.modelsErr = errors.New("connection refused") })
	for i := 1; i <= 2; i++ {
		h.poll(1)
		n := h.node("a")
		if !n.Healthy || n.ConsecutiveFailures != i || n.LastError != "connection refused" {
			t.Fatalf("after %d failures: healthy=%v failures=%d err=%q; want still healthy below threshold", i, n.Healthy, n.ConsecutiveFailures, n.LastError)
		}
		if n.Model("m") == nil {
			t.Fatalf("models dropped while still healthy")
		}
	}
	h.poll(1)
	if n := h.node("a"); n.Healthy || n.ConsecutiveFailures != 3 {
		t.Fatalf("after 3 failures: healthy=%v failures=%d; want unhealthy", n.Healthy, n.ConsecutiveFailures)
	}
	if h.p.Snapshot().AnyHealthy() {
		t.Fatal("AnyHealthy with the only node unhealthy")
	}

	api.set(func(f *fakeAPI) { f.modelsErr = nil })
	h.poll(1)
	if n := h.node("a"); !n.Healthy || n.ConsecutiveFailures != 0 || n.LastError != "" {
		t.Fatalf("after one success: %+v; want healthy again", n)
	}

	polls, health, _ := hooks.get()
	if want := "a=true a=false a=false a=false a=true"; strings.Join(polls, " ") != want {
		t.Errorf("OnPoll calls %q, want %q", polls, want)
	}
	if want := "a=false a=true a=false a=true"; strings.Join(health, " ") != want {
		t.Errorf("OnHealth calls %q, want %q", health, want)
	}
}

func TestNewNodeUnhealthyUntilFirstSuccess(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	api.modelsErr = errors.New("refused")
	h := start(t, PollerConfig{FailureThreshold: 3}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if n := h.node("a"); n.Healthy || n.ConsecutiveFailures != 1 {
		t.Fatalf("failing new node: %+v, want unhealthy", n)
	}
	api.set(func(f *fakeAPI) { f.modelsErr = nil })
	if n := h.poll(1).Node("a"); !n.Healthy {
		t.Fatal("not healthy on first success")
	}
	if h.logs.count("neuron healthy") != 1 || h.logs.count("neuron unhealthy; no longer routing to it") != 0 {
		t.Errorf("logs:\n%s", h.logs)
	}
}

func TestPollFailuresLoggedOncePerStateChange(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{FailureThreshold: 3}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	api.set(func(f *fakeAPI) {
		f.modelsErr = errors.New("invalid answer: unexpected end of JSON input")
		f.healthErr = errors.New("timeout")
		f.endpointErr["m"] = errors.New("boom")
	})
	h.poll(10)
	if got := h.logs.count("neuron poll failing"); got != 1 {
		t.Errorf("10 failing polls logged %d 'neuron poll failing' lines, want 1:\n%s", got, h.logs)
	}
	if got := h.logs.count("neuron unhealthy; no longer routing to it"); got != 1 {
		t.Errorf("'neuron unhealthy' logged %d times, want 1", got)
	}
	if got := h.logs.count("neuron /health failing; keeping its last reading"); got != 1 {
		t.Errorf("/health failure logged %d times, want 1", got)
	}

	api.set(func(f *fakeAPI) { f.modelsErr = errors.New("connection refused") })
	h.poll(3)
	if got := h.logs.count("neuron poll failing"); got != 2 {
		t.Errorf("a new error text should be logged once more: got %d lines", got)
	}

	api.set(func(f *fakeAPI) { f.modelsErr = nil })
	h.poll(5)
	if got := h.logs.count("neuron healthy again"); got != 1 {
		t.Errorf("recovery logged %d times, want 1:\n%s", got, h.logs)
	}
	if !strings.Contains(h.logs.String(), "node=a") || !strings.Contains(h.logs.String(), `error="connection refused"`) {
		t.Errorf("log lines should carry node and error keys:\n%s", h.logs)
	}
	// The endpoint was cached before the failures, so it is not re-asked.
	if got := h.logs.count("model endpoint not resolvable; requests routed there will get 503 until it is"); got != 0 {
		t.Errorf("cached endpoint re-resolved: %d failure lines", got)
	}
}

func TestDiscoveryCachedAndRefetchedOnRestart(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	h.poll(3)
	if got := api.count("discovery"); got != 1 {
		t.Fatalf("discovery fetched %d times over 4 rounds, want once (cached)", got)
	}
	if got := api.count("endpoint:m"); got != 1 {
		t.Fatalf("endpoint resolved %d times over 4 rounds, want once (cached)", got)
	}
	if d := h.node("a").Discovery; d == nil || d.MaxPromptTokens != 32768 {
		t.Fatalf("discovery not in snapshot: %+v", d)
	}

	// The neuron restarted: uptime went down. Its topology and endpoints
	// may have changed.
	api.set(func(f *fakeAPI) {
		f.health = &neuron.Health{UptimeSecs: 5}
		f.disc = &neuron.Discovery{Hostname: "h2", MaxPromptTokens: 65536}
		f.endpoints["m"] = "http://10.0.0.1:9000"
	})
	n := h.poll(1).Node("a")
	if api.count("discovery") != 2 || n.Discovery.Hostname != "h2" {
		t.Errorf("restart: discovery fetched %d times (want 2), hostname %q", api.count("discovery"), n.Discovery.Hostname)
	}
	if n.Model("m").Endpoint != "http://10.0.0.1:9000" {
		t.Errorf("restart: endpoint not re-resolved: %q", n.Model("m").Endpoint)
	}
	if h.logs.count("neuron restarted (uptime went down); refreshing discovery and endpoints") != 1 {
		t.Errorf("restart not logged:\n%s", h.logs)
	}
	api.set(func(f *fakeAPI) { f.health = &neuron.Health{UptimeSecs: 15} })
	h.poll(2)
	if api.count("discovery") != 2 || api.count("endpoint:m") != 2 {
		t.Errorf("after restart handled: discovery %d, endpoint %d calls; want caches used again", api.count("discovery"), api.count("endpoint:m"))
	}
}

func TestDiscoveryRefetchedWhileMaxPromptTokensZero(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	api.disc.MaxPromptTokens = 0
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	h.poll(2)
	if got := api.count("discovery"); got != 3 {
		t.Fatalf("discovery fetched %d times over 3 rounds while max_prompt_tokens is 0, want 3", got)
	}
	api.set(func(f *fakeAPI) { f.disc.MaxPromptTokens = 4096 })
	h.poll(3)
	if got := api.count("discovery"); got != 4 {
		t.Fatalf("discovery fetched %d times, want 4 (cached once max_prompt_tokens is set)", got)
	}
	if h.node("a").Discovery.MaxPromptTokens != 4096 {
		t.Error("new discovery not published")
	}
}

func TestDiscoveryFailureKeepsCacheAndRetries(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	api.discErr = errors.New("refused")
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if n := h.node("a"); n.Discovery != nil || !n.Healthy {
		t.Fatalf("discovery failure: %+v; want healthy (models decide) without discovery", n)
	}
	api.set(func(f *fakeAPI) { f.discErr = nil })
	if h.poll(1).Node("a").Discovery == nil {
		t.Fatal("discovery not retried")
	}
}

func TestHealthFailureKeepsLastReading(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	api.health = &neuron.Health{UptimeSecs: 100, Devices: []neuron.DeviceHealth{{Index: 0, VRAMFreeMB: 6500}},
		Models: []neuron.ModelHealth{{ID: "m", InFlight: 2, QueueDepth: 1}}}
	h := start(t, PollerConfig{FailureThreshold: 1}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	api.set(func(f *fakeAPI) { f.healthErr = errors.New("timeout") })
	n := h.poll(3).Node("a")
	if !n.Healthy {
		t.Fatal("a failing /health made the node unhealthy")
	}
	if n.Health == nil || n.FreeVRAM()[0] != 6500 || n.Model("m").Busyness() != 3 {
		t.Fatalf("last /health reading not kept: %+v", n.Health)
	}
}

func TestBusynessJoinedByID(t *testing.T) {
	api := newFakeAPI(loaded("b-model"), loaded("a-model"), loaded("quiet"))
	api.health = &neuron.Health{UptimeSecs: 1, Models: []neuron.ModelHealth{
		{ID: "a-model", InFlight: 1, QueueDepth: 3},
		{ID: "b-model", InFlight: 4},
		{ID: "not-listed", InFlight: 9},
	}}
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	n := h.node("a")
	var ids []string
	for _, m := range n.Models {
		ids = append(ids, m.ID)
	}
	if strings.Join(ids, ",") != "a-model,b-model,quiet" {
		t.Errorf("models not sorted by id: %v", ids)
	}
	for id, want := range map[string]int{"a-model": 4, "b-model": 4, "quiet": 0} {
		if got := n.Model(id).Busyness(); got != want {
			t.Errorf("%s busyness %d, want %d", id, got, want)
		}
	}
	if n.Model("a-model").QueueDepth != 3 || n.Model("not-listed") != nil {
		t.Error("health joined wrong")
	}
}

func TestEndpointCachedAndReResolved(t *testing.T) {
	api := newFakeAPI(loaded("m"), loaded("n"))
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if got := h.node("a").Model("m").Endpoint; got != "http://10.0.0.1:8000/m" {
		t.Fatalf("endpoint %q", got)
	}
	h.poll(2)
	if api.count("endpoint:m") != 1 {
		t.Fatalf("cached endpoint re-asked: %d calls", api.count("endpoint:m"))
	}

	// m disappears, then comes back somewhere else.
	api.set(func(f *fakeAPI) { f.models = []neuron.Model{loaded("n")} })
	if h.poll(1).Node("a").Model("m") != nil {
		t.Fatal("a model missing from /models stays in the snapshot")
	}
	api.set(func(f *fakeAPI) {
		f.models = []neuron.Model{loaded("m"), loaded("n")}
		f.endpoints["m"] = "http://10.0.0.1:8001"
	})
	if got := h.poll(1).Node("a").Model("m").Endpoint; got != "http://10.0.0.1:8001" {
		t.Fatalf("reappeared model's endpoint not re-resolved: %q", got)
	}
	if api.count("endpoint:n") != 1 {
		t.Errorf("n re-resolved needlessly: %d", api.count("endpoint:n"))
	}
}

func TestEndpointFailureRetriedEachRound(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	api.endpointErr["m"] = errors.New("404 not found")
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	n := h.poll(4).Node("a")
	if m := n.Model("m"); m == nil || m.Endpoint != "" || !n.Healthy {
		t.Fatalf("failed endpoint: %+v; want model listed with empty endpoint on a healthy node", m)
	}
	if api.count("endpoint:m") != 5 {
		t.Errorf("failed endpoint asked %d times over 5 rounds, want every round", api.count("endpoint:m"))
	}
	if got := h.logs.count("model endpoint not resolvable; requests routed there will get 503 until it is"); got != 1 {
		t.Errorf("endpoint failure logged %d times over 5 rounds, want once", got)
	}
	api.set(func(f *fakeAPI) { delete(f.endpointErr, "m") })
	if got := h.poll(1).Node("a").Model("m").Endpoint; got != "http://10.0.0.1:8000/m" {
		t.Fatalf("endpoint after recovery %q", got)
	}
	if h.logs.count("model endpoint resolved") != 1 {
		t.Errorf("recovery not logged:\n%s", h.logs)
	}
}

func TestUnknownStatusKeptAndLoggedOnce(t *testing.T) {
	m := loaded("m")
	m.Status = "quantizing"
	api := newFakeAPI(m)
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	got := h.poll(4).Node("a").Model("m")
	if got == nil || got.Status != "quantizing" {
		t.Fatalf("unknown-status model: %+v; want kept with its status", got)
	}
	if n := h.logs.count("neuron reports an unknown model status; not routing to it there"); n != 1 {
		t.Errorf("unknown status logged %d times over 5 rounds, want 1", n)
	}
	api.set(func(f *fakeAPI) { f.models[0].Status = "defragmenting" })
	h.poll(2)
	if n := h.logs.count("neuron reports an unknown model status; not routing to it there"); n != 2 {
		t.Errorf("a different unknown status should log once more: %d", n)
	}
}

func TestMarkLoaded(t *testing.T) {
	unloaded := neuron.Model{ID: "u", Status: neuron.StatusUnloaded, Servable: &neuron.Servable{OK: false, Reason: "insufficient_vram"}}
	api := newFakeAPI(unloaded)
	api.endpoints["fresh"] = "http://10.0.0.1:8002"
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api}, Neuron{Name: "b", Endpoint: "http://b:1", API: newFakeAPI()})
	round := h.p.Snapshot().Round

	if err := h.p.MarkLoaded(h.ctx, "a", "fresh", nil, 0); err != nil {
		t.Fatalf("MarkLoaded: %v", err)
	}
	m := h.node("a").Model("fresh")
	if m == nil || m.Status != neuron.StatusLoaded || !m.IsServable() || m.Endpoint != "http://10.0.0.1:8002" {
		t.Fatalf("after MarkLoaded: %+v; want loaded, servable, endpoint resolved", m)
	}
	if err := h.p.MarkLoaded(h.ctx, "a", "u", nil, 0); err != nil {
		t.Fatal(err)
	}
	if m := h.node("a").Model("u"); m.Status != neuron.StatusLoaded || !m.IsServable() || m.Endpoint == "" {
		t.Fatalf("unloaded model after MarkLoaded: %+v", m)
	}
	if h.p.Snapshot().Round != round || h.node("b").Model("fresh") != nil {
		t.Error("MarkLoaded ran a round or touched another node")
	}
	if err := h.p.MarkLoaded(h.ctx, "nope", "x", nil, 0); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("MarkLoaded on unknown node: %v", err)
	}

	// A later poll is the truth: the neuron evicted "fresh" since.
	h.poll(1)
	if h.node("a").Model("fresh") != nil || h.node("a").Model("u").Status != neuron.StatusUnloaded {
		t.Error("a poll started after the mark should replace it")
	}
}

func TestMarkLoadedSurvivesPollStartedBefore(t *testing.T) {
	api := newFakeAPI(neuron.Model{ID: "m", Status: neuron.StatusUnloaded})
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})

	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	api.set(func(f *fakeAPI) { f.modelsGate, f.modelsEntered = gate, entered })
	pollDone := make(chan error, 1)
	go func() { pollDone <- h.p.PollNow(h.ctx) }()
	<-entered // the round has read nothing yet from /models

	if err := h.p.MarkLoaded(h.ctx, "a", "m", nil, 0); err != nil {
		t.Fatal(err)
	}
	if h.node("a").Model("m").Status != neuron.StatusLoaded {
		t.Fatal("MarkLoaded not visible while a round is in flight")
	}
	api.set(func(f *fakeAPI) { f.modelsGate = nil })
	gate <- struct{}{} // the stale poll answers "unloaded"
	if err := <-pollDone; err != nil {
		t.Fatal(err)
	}
	if got := h.node("a").Model("m").Status; got != neuron.StatusLoaded {
		t.Fatalf("a poll started before the load finished undid MarkLoaded: status %q", got)
	}
	if got := h.poll(1).Node("a").Model("m").Status; got != neuron.StatusUnloaded {
		t.Fatalf("a poll started after the mark is authoritative: got %q", got)
	}
}

// A poll whose /health is slow asks for /models long after it started. A
// load that finished and was unloaded again in between (cortex-extproc
// evicted it) must not come back from MarkLoaded's mark: the listing was
// requested after the load, so it is the truth. (Deciding by when the poll
// started kept the mark, and the soak test routed requests to models
// evicted seconds before.) Repeated, as a fleet under cold-load churn does.
func TestMarkGivesWayToAListingRequestedAfterIt(t *testing.T) {
	api := newFakeAPI(loaded("warm"))
	api.endpoints["fresh"] = "http://10.0.0.1:8002"
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	for range 50 {
		gate, entered := make(chan struct{}), make(chan struct{}, 1)
		api.set(func(f *fakeAPI) { f.healthGate, f.healthEntered = gate, entered })
		pollDone := make(chan error, 1)
		go func() { pollDone <- h.p.PollNow(h.ctx) }()
		<-entered // the poll has started; /models is not asked yet

		// Loaded, and reported (the neuron lists it from now on) ...
		api.set(func(f *fakeAPI) { f.models = []neuron.Model{loaded("warm"), loaded("fresh")} })
		if err := h.p.MarkLoaded(h.ctx, "a", "fresh", []int{0}, 4000); err != nil {
			t.Fatal(err)
		}
		if h.node("a").Model("fresh") == nil {
			t.Fatal("MarkLoaded not visible while a poll is in flight")
		}
		// ... then unloaded again before the poll asks for /models.
		api.set(func(f *fakeAPI) { f.models = []neuron.Model{loaded("warm")}; f.healthGate = nil })
		gate <- struct{}{}
		if err := <-pollDone; err != nil {
			t.Fatal(err)
		}
		if m := h.node("a").Model("fresh"); m != nil {
			t.Fatalf("a model unloaded before the listing was requested is still listed: %+v", m)
		}
	}
}

func TestSetNeurons(t *testing.T) {
	apiA, apiB, apiC := newFakeAPI(loaded("m")), newFakeAPI(loaded("m")), newFakeAPI(loaded("k"))
	hooks := &hookLog{}
	h := start(t, hooks.cfg(PollerConfig{}),
		Neuron{Name: "a", Endpoint: "http://a:1", API: apiA},
		Neuron{Name: "b", Endpoint: "http://b:1", API: apiB})

	h.p.SetNeurons([]Neuron{
		{Name: "a", Endpoint: "http://a:1", API: apiA, Cluster: "custom-a"},
		{Name: "c", Endpoint: "http://c:1", API: apiC},
	})
	h.waitFor("b removed and c added", func(s *Snapshot) bool { return s.Node("b") == nil && s.Node("c") != nil })
	s := h.p.Snapshot()
	if c := s.Node("c"); c.Healthy || c.Cluster != "neuron-c" {
		t.Errorf("added node before its first poll: %+v; want unhealthy", c)
	}
	if a := s.Node("a"); !a.Healthy || a.Model("m") == nil || a.Cluster != "custom-a" {
		t.Errorf("kept node lost its state or kept its old cluster: %+v", a)
	}
	s = h.poll(1)
	if !s.Node("c").Healthy || s.Node("c").Model("k") == nil || len(s.Nodes) != 2 {
		t.Errorf("after a round: %+v", s.Nodes)
	}
	if apiB.count("models") != 1 {
		t.Errorf("removed node still polled: %d", apiB.count("models"))
	}
	_, health, removed := hooks.get()
	if strings.Join(removed, ",") != "b" || !strings.Contains(strings.Join(health, " "), "c=false c=true") {
		t.Errorf("hooks: removed %v health %v", removed, health)
	}

	// Same name, new endpoint: a different neuron, starting over.
	h.p.SetNeurons([]Neuron{{Name: "a", Endpoint: "http://a2:1", API: apiA}, {Name: "c", Endpoint: "http://c:1", API: apiC}})
	h.waitFor("a re-pointed", func(s *Snapshot) bool { return s.Node("a").Endpoint == "http://a2:1" })
	if h.node("a").Healthy {
		t.Error("re-pointed node kept the old neuron's health")
	}
}

func TestRunStopsWithCallsInFlight(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	api.modelsGate, api.modelsEntered = gate, entered
	p := NewPoller(PollerConfig{Interval: time.Hour, Timeout: time.Minute}, []Neuron{{Name: "a", Endpoint: "http://a:1", API: api}}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	<-entered
	waiter := make(chan error, 1)
	go func() { waiter <- p.PollNow(context.Background()) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return with a neuron call hanging")
	}
	if err := <-waiter; !errors.Is(err, ErrStopped) {
		t.Errorf("PollNow waiting across stop = %v, want ErrStopped", err)
	}
}

// TestWithHTTPNeuron runs the real client against an httptest neuron: the
// poller publishes what the neuron says, with the loopback endpoint
// rewritten, and a neuron answering garbage is a failed poll.
func TestWithHTTPNeuron(t *testing.T) {
	var mu sync.Mutex
	models := `[{"id": "Qwen/Qwen3-8B", "harness": "candle", "status": "loaded", "devices": [0], "vram_used_mb": null}]`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch r.RequestURI {
		case "/discovery":
			fmt.Fprint(w, `{"hostname": "beast", "devices": [{"index": 0, "vram_total_mb": 24564}], "max_prompt_tokens": 32768}`)
		case "/models":
			fmt.Fprint(w, models)
		case "/health":
			fmt.Fprint(w, `{"uptime_secs": 10, "models": [{"id": "Qwen/Qwen3-8B", "in_flight": 2, "queue_depth": 1}]}`)
		case "/models/Qwen%2FQwen3-8B/endpoint":
			fmt.Fprint(w, `{"url": "http://0.0.0.0:8081/"}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	c, err := neuron.New("beast", srv.URL, srv.Client())
	if err != nil {
		t.Fatal(err)
	}
	h := start(t, PollerConfig{FailureThreshold: 2}, Neuron{Name: "beast", Endpoint: srv.URL, API: c})
	n := h.node("beast")
	m := n.Model("Qwen/Qwen3-8B")
	if !n.Healthy || m == nil || m.Endpoint != "http://127.0.0.1:8081" || m.Busyness() != 3 || n.Discovery.Hostname != "beast" {
		t.Fatalf("snapshot from HTTP neuron: node %+v model %+v", n, m)
	}

	mu.Lock()
	models = `{"not": "a list"}`
	mu.Unlock()
	n = h.poll(2).Node("beast")
	if n.Healthy || !strings.Contains(n.LastError, "GET /models") {
		t.Fatalf("garbage /models: healthy=%v err=%q; want unhealthy with the error", n.Healthy, n.LastError)
	}
	if h.logs.count("neuron poll failing") != 1 {
		t.Errorf("logs:\n%s", h.logs)
	}
}

func TestSlowNeuronDoesNotHoldBackOthers(t *testing.T) {
	slow, fast := newFakeAPI(loaded("m")), newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{}, Neuron{Name: "slow", Endpoint: "http://s:1", API: slow}, Neuron{Name: "fast", Endpoint: "http://f:1", API: fast})

	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	slow.set(func(f *fakeAPI) { f.modelsGate, f.modelsEntered = gate, entered })
	fast.set(func(f *fakeAPI) { f.models = append(f.models, loaded("new")) })
	pollDone := make(chan error, 1)
	go func() { pollDone <- h.p.PollNow(h.ctx) }()
	<-entered
	h.waitFor("fast neuron's answer published while slow one hangs", func(s *Snapshot) bool {
		return s.Node("fast").Model("new") != nil
	})
	if h.p.Snapshot().Round != 1 {
		t.Error("round counted complete before every neuron answered")
	}
	close(gate)
	if err := <-pollDone; err != nil {
		t.Fatal(err)
	}
	if h.p.Snapshot().Round != 2 {
		t.Errorf("round %d after the second round completed", h.p.Snapshot().Round)
	}
}

// Two polls of one node can overlap (a suspect re-poll beside a round), and
// the one that asked for /models first can answer last. Its listing is
// older than the one the node shows and must not replace it.
func TestOlderListingNeverReplacesANewerOne(t *testing.T) {
	p := NewPoller(PollerConfig{}, []Neuron{{Name: "a", Endpoint: "http://a:1", API: newFakeAPI()}}, nil)
	ns := p.nodes["a"]
	t0 := time.Now()
	newer := pollResult{key: ns, seq: 1, healthAt: t0.Add(time.Second), health: &neuron.Health{UptimeSecs: 100},
		modelsAt: t0.Add(2 * time.Second), models: []neuron.Model{loaded("kept")}}
	older := pollResult{key: ns, seq: 2, healthAt: t0, health: &neuron.Health{UptimeSecs: 100},
		modelsAt: t0.Add(time.Second), models: []neuron.Model{loaded("kept"), loaded("evicted")}}
	p.apply(ns, newer)
	p.apply(ns, older)
	p.publish()
	n := p.Snapshot().Node("a")
	if n.Model("evicted") != nil || n.Model("kept") == nil || !n.ModelsAt.Equal(newer.modelsAt) {
		t.Fatalf("after an older listing: models %v at %v; want only kept, listed at %v", n.Models, n.ModelsAt, newer.modelsAt)
	}
	if !n.Healthy {
		t.Error("the older poll still succeeded: the node stays healthy")
	}
}
