package fleet

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// fakeClock is the clock SuspectGap is counted with; it moves only when a
// test says so.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// gateModels makes the next /models calls block until released, and
// returns a channel that receives one value per call that entered.
func gateModels(api *fakeAPI) (entered chan struct{}, release func()) {
	gate := make(chan struct{})
	entered = make(chan struct{}, 1024)
	api.set(func(f *fakeAPI) { f.modelsGate, f.modelsEntered = gate, entered })
	var once sync.Once
	return entered, func() {
		once.Do(func() {
			api.set(func(f *fakeAPI) { f.modelsGate, f.modelsEntered = nil, nil })
			close(gate)
		})
	}
}

func suspectNode(h *harness, name string) bool {
	return h.node(name).Suspect
}

// A neuron that stops answering between two polls: one failed request
// makes it unhealthy as soon as its re-poll fails, with no poll round and
// long before failure_threshold polls could have failed.
func TestSuspectFailedRepollMarksUnhealthyAtOnce(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	hooks := &hookLog{}
	var fast []string
	var fastMu sync.Mutex
	cfg := hooks.cfg(PollerConfig{FailureThreshold: 3, Now: newFakeClock().Now})
	cfg.OnSuspectUnhealthy = func(node string) {
		fastMu.Lock()
		fast = append(fast, node)
		fastMu.Unlock()
	}
	h := start(t, cfg, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	api.set(func(f *fakeAPI) {
		f.modelsErr = errors.New("dial tcp 10.0.0.1:13131: connect: connection refused")
		f.healthErr = errors.New("never asked")
	})
	healthBefore := api.count("health")

	h.p.Suspect("a")
	h.waitFor("a unhealthy", func(s *Snapshot) bool { return !s.Node("a").Healthy })

	n := h.node("a")
	if s := h.p.Snapshot(); s.Round != 1 {
		t.Errorf("round %d: a poll round ran; the re-poll alone must decide", s.Round)
	}
	if n.Suspect || n.ConsecutiveFailures != 1 || !strings.Contains(n.LastError, "suspect after a failed request, re-poll failed") ||
		!strings.Contains(n.LastError, "connection refused") {
		t.Errorf("node after the failed re-poll: suspect=%v failures=%d last_error=%q", n.Suspect, n.ConsecutiveFailures, n.LastError)
	}
	if n.Model("m") == nil {
		t.Error("the re-poll dropped what the neuron listed; an unhealthy node keeps its last listing")
	}
	if got := api.count("health") - healthBefore; got != 0 {
		t.Errorf("the re-poll asked /health %d times; /models alone decides", got)
	}
	if got := h.logs.count(msgSuspectUnhealthy); got != 1 {
		t.Errorf("%d %q lines, want 1:\n%s", got, msgSuspectUnhealthy, h.logs)
	}
	if !strings.Contains(h.logs.String(), "connection refused") {
		t.Errorf("the log does not say why:\n%s", h.logs)
	}
	polls, health, _ := hooks.get()
	if want := "a=true a=false"; strings.Join(polls, " ") != want {
		t.Errorf("OnPoll calls %q, want %q", polls, want)
	}
	if want := "a=false a=true a=false"; strings.Join(health, " ") != want {
		t.Errorf("OnHealth calls %q, want %q", health, want)
	}
	fastMu.Lock()
	defer fastMu.Unlock()
	if strings.Join(fast, " ") != "a" {
		t.Errorf("OnSuspectUnhealthy calls %q, want [a]", fast)
	}

	// Unhealthy now: further suspicion is ignored; the regular polls
	// bring it back on the first success.
	api.set(func(f *fakeAPI) { f.modelsErr, f.healthErr = nil, nil })
	if n := h.poll(1).Node("a"); !n.Healthy || n.ConsecutiveFailures != 0 || n.LastError != "" {
		t.Errorf("after a successful poll: %+v, want healthy again", n)
	}
}

// A suspicion the neuron answers (the client had merely hung up) changes
// nothing but the freshness of the snapshot.
func TestSuspectAnsweredRepollClearsSuspicion(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{FailureThreshold: 3, Now: newFakeClock().Now}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	entered, release := gateModels(api)
	defer release()

	h.p.Suspect("a")
	<-entered // the probe is in flight
	if !suspectNode(h, "a") {
		t.Error("snapshot does not show the node suspect while its re-poll runs")
	}
	if !h.node("a").Healthy {
		t.Error("suspicion alone took the node out")
	}
	release()
	h.waitFor("suspicion cleared", func(s *Snapshot) bool { return !s.Node("a").Suspect })
	n := h.node("a")
	if !n.Healthy || n.ConsecutiveFailures != 0 || n.LastError != "" || n.Model("m") == nil {
		t.Errorf("after an answered re-poll: %+v", n)
	}
	// Probe, then a full poll: /models twice beyond the first round.
	if got := api.count("models"); got != 3 {
		t.Errorf("/models asked %d times, want 3 (first round, probe, full re-poll)", got)
	}
	if h.logs.count(msgSuspectUnhealthy) != 0 {
		t.Errorf("logged unhealthy:\n%s", h.logs)
	}
}

// 500 failed requests at once: one re-poll, not 500; and none again
// before SuspectGap has passed on the poller's clock.
func TestSuspectStormCausesOneRepoll(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	other := newFakeAPI(loaded("m"))
	clock := newFakeClock()
	h := start(t, PollerConfig{FailureThreshold: 3, Now: clock.Now, SuspectGap: time.Second},
		Neuron{Name: "a", Endpoint: "http://a:1", API: api}, Neuron{Name: "b", Endpoint: "http://b:1", API: other})
	entered, release := gateModels(api)
	defer release()

	var wg sync.WaitGroup
	for range 500 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.p.Suspect("a")
		}()
	}
	<-entered
	wg.Wait()
	// Every Suspect call has returned; b's re-poll starts only after the
	// owner has taken every name left before it, a's included.
	otherEntered, otherRelease := gateModels(other)
	defer otherRelease()
	h.p.Suspect("b")
	<-otherEntered
	if got := api.count("models"); got != 2 {
		t.Errorf("/models asked %d times during the storm, want 2 (first round, one probe)", got)
	}
	release()
	otherRelease()
	h.waitFor("re-polls answered", func(s *Snapshot) bool { return !s.Node("a").Suspect && !s.Node("b").Suspect })
	if got := api.count("models"); got != 3 {
		t.Errorf("/models asked %d times in all, want 3 (first round, one probe, one full re-poll)", got)
	}
	if n := h.node("a"); !n.Healthy {
		t.Errorf("a answered its re-poll but is unhealthy: %+v", n)
	}
}

// Within SuspectGap of the last re-poll's start, Suspect is dropped; after
// it, the next one re-polls. The gap is counted on the poller's clock.
func TestSuspectGap(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	marker := newFakeAPI(loaded("m"))
	clock := newFakeClock()
	h := start(t, PollerConfig{Now: clock.Now, SuspectGap: time.Second},
		Neuron{Name: "a", Endpoint: "http://a:1", API: api}, Neuron{Name: "z", Endpoint: "http://z:1", API: marker})
	// repolled waits until the owner has taken every Suspect call made so
	// far: z's re-poll starts only after the names left before it.
	repolled := func() {
		t.Helper()
		entered, release := gateModels(marker)
		h.p.Suspect("z")
		<-entered
		release()
		h.waitFor("z answered", func(s *Snapshot) bool { return !s.Node("z").Suspect })
	}

	h.p.Suspect("a")
	h.waitFor("a's re-poll", func(s *Snapshot) bool { return api.count("models") == 3 && !s.Node("a").Suspect })

	clock.advance(500 * time.Millisecond)
	h.p.Suspect("a")
	repolled() // z's first: no gap of its own yet
	if got := api.count("models"); got != 3 {
		t.Fatalf("/models asked %d times after a Suspect within the gap, want still 3", got)
	}

	clock.advance(time.Second)
	h.p.Suspect("a")
	h.waitFor("a's second re-poll", func(s *Snapshot) bool { return api.count("models") == 5 && !s.Node("a").Suspect })
}

// Suspect never blocks and ignores what it cannot act on: unknown names,
// nodes already unhealthy, and a poller that is not running.
func TestSuspectIgnoresUnknownAndUnhealthy(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	marker := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{FailureThreshold: 1, Now: newFakeClock().Now},
		Neuron{Name: "a", Endpoint: "http://a:1", API: api}, Neuron{Name: "z", Endpoint: "http://z:1", API: marker})
	api.set(func(f *fakeAPI) { f.modelsErr = errors.New("refused") })
	if n := h.poll(1).Node("a"); n.Healthy {
		t.Fatal("a should be unhealthy after one failed poll (threshold 1)")
	}
	calls := api.count("models")
	h.p.Suspect("a")
	h.p.Suspect("nobody")
	entered, release := gateModels(marker)
	h.p.Suspect("z")
	<-entered
	release()
	h.waitFor("z answered", func(s *Snapshot) bool { return !s.Node("z").Suspect })
	if got := api.count("models"); got != calls {
		t.Errorf("an unhealthy node was re-polled (%d /models calls, want %d)", got, calls)
	}

	stopped := NewPoller(PollerConfig{}, []Neuron{{Name: "a", Endpoint: "http://a:1", API: api}}, nil)
	done := make(chan struct{})
	go func() {
		for range 10 {
			stopped.Suspect("a") // never run: must still return
		}
		close(done)
	}()
	select {
	case <-done:
	case <-h.ctx.Done():
		t.Fatal("Suspect blocked on a poller that is not running")
	}
}

// scriptedModels answers /models from a script, call by call.
type scriptedModels struct {
	*fakeAPI
	calls  atomic.Int32
	answer func(call int32, ctx context.Context) ([]neuron.Model, error)
}

func (s *scriptedModels) Models(ctx context.Context) ([]neuron.Model, error) {
	return s.answer(s.calls.Add(1), ctx)
}

// A round that asked /models before the neuron died and answers after the
// re-poll took the node out must not bring it back: its news is older.
func TestStaleRoundResultDoesNotUndoAFailedRepoll(t *testing.T) {
	base := newFakeAPI(loaded("m"))
	roundEntered, roundRelease := make(chan struct{}), make(chan struct{})
	api := &scriptedModels{fakeAPI: base}
	api.answer = func(call int32, ctx context.Context) ([]neuron.Model, error) {
		switch call {
		case 1: // first round
			return []neuron.Model{loaded("m")}, nil
		case 2: // the second round: asked while alive, answers late
			close(roundEntered)
			select {
			case <-roundRelease:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
			return []neuron.Model{loaded("m")}, nil
		default: // the re-poll's probe: dead
			return nil, errors.New("connection refused")
		}
	}
	h := start(t, PollerConfig{FailureThreshold: 3, Now: newFakeClock().Now}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	polled := make(chan error, 1)
	go func() { polled <- h.p.PollNow(h.ctx) }()
	<-roundEntered
	h.p.Suspect("a")
	h.waitFor("a unhealthy", func(s *Snapshot) bool { return !s.Node("a").Healthy })
	close(roundRelease)
	if err := <-polled; err != nil {
		t.Fatal(err)
	}
	if n := h.node("a"); n.Healthy || !strings.Contains(n.LastError, "re-poll failed") {
		t.Errorf("after the stale round: healthy=%v last_error=%q; the round started before the re-poll and must not undo it", n.Healthy, n.LastError)
	}
}
