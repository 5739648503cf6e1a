// Package coldload is the cold-load scheduler (routing.md step 5,
// docs/cold-loads.md): single-flight loads detached from the requests that
// wait for them, placement on the ledger's view of the fleet, evictions
// claimed before they run, a fallback node and a cool-down after a failed
// load, and the VRAM ledger itself. The Router reaches it through
// routing.ColdLoads.
package coldload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/tracing"
	"github.com/helexa/cortex-extproc/routing"
)

// Cold-load defaults (contract.md [cold_load]).
const (
	DefaultTimeout         = 30 * time.Minute
	DefaultMaxEvictions    = 3
	DefaultMaxWaiters      = 10000
	DefaultFailureCooldown = 60 * time.Second
)

// maxLoadAttempts is the first node plus one fallback. A load that fails on
// two nodes is more likely the model's fault (missing repo, bad quant) than
// the nodes'; the cool-down then lets later requests try the remaining ones.
const maxLoadAttempts = 2

// healthTimeout bounds the fresh /health read taken before a load.
const healthTimeout = 10 * time.Second

// markLoadedTimeout bounds the hand-off of "model just loaded" to the fleet owner.
const markLoadedTimeout = 10 * time.Second

// Config tunes the Loader. Zero values take the defaults.
type Config struct {
	// Timeout bounds one flight, evictions and fallback included (default 30m).
	Timeout time.Duration
	// MaxEvictions bounds unloads per load attempt (default 3; negative: never evict).
	MaxEvictions int
	// MaxWaiters caps requests held for loads, across all flights (default 10000).
	MaxWaiters int
	// FailureCooldown is how long a (node, model) whose load failed is
	// skipped by placement (default 60s; negative: no cool-down).
	FailureCooldown time.Duration
}

func (c Config) withDefaults() Config {
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.MaxEvictions == 0 {
		c.MaxEvictions = DefaultMaxEvictions
	}
	if c.MaxWaiters <= 0 {
		c.MaxWaiters = DefaultMaxWaiters
	}
	if c.FailureCooldown == 0 {
		c.FailureCooldown = DefaultFailureCooldown
	}
	return c
}

// Observer receives cold-load events for metrics and tracing. Its
// methods are called from many goroutines and must not block.
type Observer interface {
	LoadStarted(model, node string)
	LoadFinished(model, node string, ok bool, d time.Duration)
	Evicted(node, model string)
	// WaitersChanged reports the number of requests now held for loads.
	WaitersChanged(n int)
}

type noopObserver struct{}

func (noopObserver) LoadStarted(string, string)                       {}
func (noopObserver) LoadFinished(string, string, bool, time.Duration) {}
func (noopObserver) Evicted(string, string)                           {}
func (noopObserver) WaitersChanged(int)                               {}

// Deps is what the Loader reads and calls.
type Deps struct {
	Catalogue func() *catalogue.Catalogue
	Fleet     func() *fleet.Snapshot
	Neuron    func(node string) neuron.API // nil if unknown
	// MarkLoaded tells the fleet owner the model is resident on node now,
	// on devices with vramMB in all, so requests released from the wait
	// find it without the next poll.
	MarkLoaded func(ctx context.Context, node, model string, devices []int, vramMB int64) error
	// FleetChanged, when set, signals each new fleet snapshot (the
	// poller's Changed): the ledger is reconciled with every poll.
	FleetChanged func() <-chan struct{}
	Usage        *routing.Usage
	Log          *slog.Logger
	Observer     Observer // may be nil
}

// FlightInfo describes a load in progress (for /debug/fleet).
type FlightInfo struct {
	Model   string    `json:"model"`
	Node    string    `json:"node"` // node of the current attempt
	Started time.Time `json:"started"`
	Waiters int       `json:"waiters"`
}

// Loader runs cold loads single-flight: one POST /models/load per model
// at a time however many requests wait for it. A load runs detached from
// the requests that started or joined it, bounded by its own timeout, so a
// client that hangs up stops only its own wait.
type Loader struct {
	cfg   Config
	deps  Deps
	log   *slog.Logger
	obs   Observer
	usage *routing.Usage
	now   func() time.Time // the clock for cool-downs; tests replace it

	// ctx parents every load; Close cancels it once its grace is over.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // loads in progress
	// stopReconcile ends reconcileLoop (at Close, not after the loads'
	// grace); reconciled is closed when it has returned.
	stopReconcile chan struct{}
	reconciled    chan struct{}

	waiters atomic.Int64 // across all flights

	// ledger is what loads and evictions have committed on each device
	// beyond the last poll; placement reads only its view.
	ledger *Ledger

	// mu serialises planning: a plan and the commitments it takes are one
	// step, so the next plan sees them.
	mu      sync.Mutex
	closed  bool
	flights map[string]*flight // by model

	// failMu is separate from mu because placement, which Join runs under
	// mu, reads the cool-downs.
	failMu   sync.Mutex
	failures map[nodeModel]loadFailure
}

// nodeModel keys the cool-downs.
type nodeModel struct{ node, model string }

type loadFailure struct {
	until  time.Time
	reason string
}

// flight is one single-flight load, shared by its waiters.
type flight struct {
	model   string
	started time.Time
	node    atomic.Pointer[string] // node of the current attempt
	waiters atomic.Int64
	done    chan struct{}
	// Set before done is closed.
	resNode string
	resErr  *apierr.Error
	// pin counts the fresh model in flight on its node from the moment it
	// is marked loaded until every waiter holds its own lease (or left):
	// nothing evicts it before the requests that waited for it are routed.
	pin routing.Lease
}

// Flight is one request's place in a flight. Wait must be called exactly
// once for each Flight that Join returns, to give the waiter slot back.
type Flight struct {
	l        *Loader
	f        *flight
	released atomic.Bool
}

// New builds a Loader. Catalogue, Fleet and Neuron are required.
func New(cfg Config, deps Deps) *Loader {
	ctx, cancel := context.WithCancel(context.Background())
	l := &Loader{
		cfg:      cfg.withDefaults(),
		deps:     deps,
		log:      deps.Log,
		obs:      deps.Observer,
		usage:    deps.Usage,
		now:      time.Now,
		ctx:      ctx,
		cancel:   cancel,
		flights:  map[string]*flight{},
		failures: map[nodeModel]loadFailure{},
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.obs == nil {
		l.obs = noopObserver{}
	}
	if l.usage == nil {
		l.usage = routing.NewUsage()
	}
	l.ledger = NewLedger(l.log)
	l.stopReconcile, l.reconciled = make(chan struct{}), make(chan struct{})
	if deps.FleetChanged != nil {
		go l.reconcileLoop()
	} else {
		close(l.reconciled)
	}
	return l
}

// Commitments is the ledger's current view (for /debug/fleet and route).
func (l *Loader) Commitments() *routing.Commitments { return l.ledger.View() }

// reconcileLoop reconciles the ledger with every fleet snapshot until Close.
func (l *Loader) reconcileLoop() {
	defer close(l.reconciled)
	for {
		changed := l.deps.FleetChanged()
		l.ledger.Reconcile(l.deps.Fleet())
		select {
		case <-changed:
		case <-l.stopReconcile:
			return
		}
	}
}

// Join starts a load for model (a concrete id in the catalogue) or joins the
// one in progress. A new flight is placed synchronously, so an infeasible
// model, a full waiter cap or a model in cool-down is answered at once,
// before the caller tells Envoy to wait.
func (l *Loader) Join(model string) (routing.Flight, *apierr.Error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, apierr.Unavailable(5, "cortex-extproc is shutting down; retry").WithReason(apierr.ReasonShuttingDown)
	}
	f := l.flights[model]
	if f == nil {
		cat := l.catalogue()
		p := cat.Profile(model)
		if p == nil {
			return nil, apierr.ModelNotFound("model %q is not in the catalogue, so it cannot be cold-loaded", model)
		}
		if err := l.addWaiter(); err != nil {
			return nil, err
		}
		plan, err := l.plan(p, nil)
		if err != nil {
			l.dropWaiter()
			return nil, l.withRecentFailures(model, err)
		}
		f = &flight{model: model, started: time.Now(), done: make(chan struct{})}
		f.node.Store(&plan.Node)
		l.flights[model] = f
		l.wg.Add(1)
		go l.run(f, p, plan)
	} else if err := l.addWaiter(); err != nil {
		return nil, err
	}
	f.waiters.Add(1)
	return &Flight{l: l, f: f}, nil
}

// Preview is Join without its effects: the load in progress that a
// request would join, or the plan a new one would follow.
func (l *Loader) Preview(model string) (*routing.Plan, string, *apierr.Error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.flights[model]; f != nil {
		return nil, *f.node.Load(), nil
	}
	cat := l.catalogue()
	p := cat.Profile(model)
	if p == nil {
		return nil, "", apierr.ModelNotFound("model %q is not in the catalogue, so it cannot be cold-loaded", model)
	}
	view := l.ledger.View()
	plan, err := routing.Place(cat, l.deps.Fleet(), view, p, l.placementState(nil))
	if err != nil {
		return nil, "", l.withRecentFailures(model, err)
	}
	return &plan, "", nil
}

// Wait blocks until the load finished, answering the node it is loaded on,
// or until ctx is done (the caller's own deadline or hang-up), answering a
// retryable 503; the load goes on for the other waiters. The caller gives
// the waiter slot back with Release once it holds its own lease.
func (w *Flight) Wait(ctx context.Context) (node string, err *apierr.Error) {
	select {
	case <-w.f.done:
		return w.f.resNode, w.f.resErr
	default:
	}
	select {
	case <-w.f.done:
		return w.f.resNode, w.f.resErr
	case <-ctx.Done():
		return "", apierr.Unavailable(5, "model %q is still loading on %s (started %s ago); retry",
			w.f.model, *w.f.node.Load(), time.Since(w.f.started).Round(time.Second)).WithReason(apierr.ReasonLoadTimeout)
	}
}

// Release gives the waiter slot back; the last waiter of a finished flight
// also ends the flight's pin on the fresh model.
func (w *Flight) Release() {
	if w.released.CompareAndSwap(false, true) {
		if w.f.waiters.Add(-1) == 0 && w.f.finished() {
			w.f.pin.Release()
		}
		w.l.dropWaiter()
	}
}

func (f *flight) finished() bool {
	select {
	case <-f.done:
		return true
	default:
		return false
	}
}

func (l *Loader) addWaiter() *apierr.Error {
	n := l.waiters.Add(1)
	if n > int64(l.cfg.MaxWaiters) {
		l.waiters.Add(-1)
		return apierr.Unavailable(5, "%d requests are already waiting for cold loads (cold_load.max_waiters); retry shortly", l.cfg.MaxWaiters).WithReason(apierr.ReasonWaitersFull)
	}
	l.obs.WaitersChanged(int(n))
	return nil
}

func (l *Loader) dropWaiter() {
	l.obs.WaitersChanged(int(l.waiters.Add(-1)))
}

// InProgress lists the loads in progress, by model.
func (l *Loader) InProgress() []FlightInfo {
	l.mu.Lock()
	out := make([]FlightInfo, 0, len(l.flights))
	for _, f := range l.flights {
		out = append(out, FlightInfo{Model: f.model, Node: *f.node.Load(), Started: f.started, Waiters: int(f.waiters.Load())})
	}
	l.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Model < out[j].Model })
	return out
}

// Close refuses new loads and waits for those in progress until ctx is done;
// then it cancels them (their waiters get a 503) and waits for them to stop.
func (l *Loader) Close(ctx context.Context) {
	l.mu.Lock()
	if !l.closed {
		close(l.stopReconcile)
	}
	l.closed = true
	l.mu.Unlock()
	<-l.reconciled
	done := make(chan struct{})
	go func() {
		l.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		l.cancel()
		<-done
	}
	l.cancel()
}

func (l *Loader) catalogue() *catalogue.Catalogue {
	if c := l.deps.Catalogue(); c != nil {
		return c
	}
	return catalogue.Empty()
}

// placementState is the live state placement reads; exclude adds nodes
// this flight already tried (the cool-down may be disabled).
func (l *Loader) placementState(exclude map[string]bool) routing.PlacementState {
	return routing.PlacementState{
		Failed: func(node, model string) bool {
			return exclude[node] || l.inCooldown(node, model)
		},
		LastAccess:   l.usage.LastAccess,
		InFlight:     l.usage.InFlight,
		MaxEvictions: l.cfg.MaxEvictions,
	}
}

func (l *Loader) inCooldown(node, model string) bool {
	l.failMu.Lock()
	defer l.failMu.Unlock()
	k := nodeModel{node, model}
	fl, ok := l.failures[k]
	if !ok {
		return false
	}
	if !l.now().Before(fl.until) {
		delete(l.failures, k)
		return false
	}
	return true
}

// markFailed puts (node, model) in cool-down.
func (l *Loader) markFailed(node, model, reason string) {
	if l.cfg.FailureCooldown < 0 {
		return
	}
	l.failMu.Lock()
	l.failures[nodeModel{node, model}] = loadFailure{until: l.now().Add(l.cfg.FailureCooldown), reason: reason}
	l.failMu.Unlock()
}

// withRecentFailures adds the reasons of the failed loads that put model's
// nodes in cool-down to a placement error, so the client and the operator
// see why instead of only "cool-down".
func (l *Loader) withRecentFailures(model string, err *apierr.Error) *apierr.Error {
	now := l.now()
	var parts []string
	l.failMu.Lock()
	for k, fl := range l.failures {
		if k.model == model && now.Before(fl.until) {
			parts = append(parts, fmt.Sprintf("%s: %s (skipped until %s)", k.node, fl.reason, fl.until.Format(time.TimeOnly)))
		}
	}
	l.failMu.Unlock()
	if len(parts) == 0 {
		return err
	}
	sort.Strings(parts)
	e := *err
	e.Message = fmt.Sprintf("%s. Recent cold load failures: %s", err.Message, strings.Join(parts, "; "))
	return &e
}

// committed is a plan with the ledger commitments it took: its devices
// reserved, its victims claimed (one claim per Evict entry, in order).
type committed struct {
	routing.Plan
	reservation uint64
	claims      []uint64
}

// maxPlanTries bounds re-planning when a victim turns out to be in use the
// moment it is claimed.
const maxPlanTries = 3

// plan places p (without the nodes in exclude) and takes the plan's
// commitments in the ledger. l.mu must be held, so that the next plan sees
// them. A victim found in flight once claimed (a request was routed to it
// between the view and the claim) calls the plan off, and placement runs
// again without it.
func (l *Loader) plan(p *catalogue.Profile, exclude map[string]bool) (committed, *apierr.Error) {
	cat := l.catalogue()
	for try := 1; ; try++ {
		l.ledger.Reconcile(l.deps.Fleet())
		view := l.ledger.View() // before the snapshot: see Place
		snap := l.deps.Fleet()
		plan, err := routing.Place(cat, snap, view, p, l.placementState(exclude))
		if err != nil {
			return committed{}, err
		}
		c := committed{Plan: plan}
		c.reservation = l.ledger.add(routing.Commitment{Kind: routing.CommitLoading, Node: plan.Node, Model: p.ID,
			Devices: plan.Spec.Devices, PerDeviceMB: plan.PerDeviceMB})
		var busy []string
		for _, v := range plan.Victims {
			c.claims = append(c.claims, l.claim(plan.Node, v))
			// Claimed, then checked: Router.Route counts itself in flight,
			// then checks for a claim, so one of the two sees the other.
			if l.usage.InFlight(plan.Node, v.Model) > 0 {
				busy = append(busy, v.Model)
			}
		}
		if len(busy) == 0 {
			return c, nil
		}
		l.ledger.drop(append(c.claims, c.reservation)...)
		if try == maxPlanTries {
			return committed{}, apierr.Unavailable(5, "model %q: the models that would make room on %s are in use (%s); retry shortly", p.ID, plan.Node, strings.Join(busy, ", ")).WithReason(apierr.ReasonNoRoom)
		}
	}
}

// claim records an eviction planned on node: from now on v is neither
// routed to nor counted or evicted by another plan.
func (l *Loader) claim(node string, v routing.Victim) uint64 {
	return l.ledger.add(routing.Commitment{Kind: routing.CommitClaimed, Node: node, Model: v.Model, Devices: v.Devices, PerDeviceMB: v.PerDeviceMB})
}

// callOff drops what c committed and did not do: its reservation and the
// claims from index i on (the evictions not yet made).
func (l *Loader) callOff(c committed, i int) {
	l.ledger.drop(append(slices.Clone(c.claims[i:]), c.reservation)...)
}

// run is one flight: try the planned node, on failure the next candidate
// once, then release every waiter with the outcome.
func (l *Loader) run(f *flight, p *catalogue.Profile, c committed) {
	defer l.wg.Done()
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.Timeout)
	defer cancel()

	var failures []string
	loadFailed := false // some POST /models/load failed (not just "no room")
	tried := map[string]bool{}
	for attempt := 1; ; attempt++ {
		node := c.Node
		tried[node] = true
		f.node.Store(&node)
		err := l.attempt(ctx, f, p, c)
		if err == nil {
			l.finish(f, node, nil)
			return
		}
		reason := l.describe(ctx, err)
		failures = append(failures, node+": "+reason)
		// Only a failed load says something about this model on this node;
		// a node where room could not be made may take it a moment later.
		if !errors.As(err, new(*prepError)) {
			loadFailed = true
			l.markFailed(node, p.ID, reason)
		}

		next, perr := l.nextPlan(ctx, p, tried, attempt)
		if perr != "" {
			l.log.Warn("cold load failed; giving up", "model", p.ID, "node", node, "error", reason, "why", perr)
			l.finish(f, "", apierr.Unavailable(5, "cold load of %q failed on %s%s", p.ID, strings.Join(failures, "; "), l.nextStep(loadFailed)).WithReason(l.failureReason(ctx, loadFailed)))
			return
		}
		l.log.Warn("cold load failed; trying the next node", "model", p.ID, "node", node, "error", reason, "next", next.Node)
		c = next
	}
}

// failureReason classifies a flight that gave up: stopped by Close, out of
// time, a load that failed, or only room that could not be made.
func (l *Loader) failureReason(ctx context.Context, loadFailed bool) apierr.Reason {
	switch {
	case l.ctx.Err() != nil:
		return apierr.ReasonShuttingDown
	case ctx.Err() != nil:
		return apierr.ReasonLoadTimeout
	case loadFailed:
		return apierr.ReasonLoadFailed
	}
	return apierr.ReasonNoRoom
}

// nextStep is what the final failure message tells the operator to do.
func (l *Loader) nextStep(loadFailed bool) string {
	switch {
	case l.ctx.Err() != nil:
		return "; retry against another cortex-extproc instance"
	case !loadFailed:
		return "; retry shortly"
	case l.cfg.FailureCooldown > 0:
		return fmt.Sprintf(". Check the neuron's logs; cortex-extproc skips a node where the load failed for %s", l.cfg.FailureCooldown)
	}
	return ". Check the neuron's logs"
}

// nextPlan re-places p without the nodes already tried, or says why not.
func (l *Loader) nextPlan(ctx context.Context, p *catalogue.Profile, tried map[string]bool, attempt int) (committed, string) {
	if ctx.Err() != nil {
		return committed{}, "the load's time is up"
	}
	if attempt >= maxLoadAttempts {
		return committed{}, fmt.Sprintf("tried %d nodes", attempt)
	}
	if cur := l.catalogue().Profile(p.ID); cur != nil {
		p = cur
	}
	l.mu.Lock()
	next, err := l.plan(p, tried)
	l.mu.Unlock()
	if err != nil {
		return committed{}, "no other node: " + err.Message
	}
	return next, ""
}

// describe turns an attempt's error into the reason shown to clients and logs.
func (l *Loader) describe(ctx context.Context, err error) string {
	switch {
	case l.ctx.Err() != nil:
		return "cortex-extproc is shutting down"
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Sprintf("timed out after %s (cold_load.timeout): %v", l.cfg.Timeout, err)
	}
	return err.Error()
}

// finish publishes the outcome and releases the waiters. On success the
// model is already recorded (commitLoaded), so released requests find it.
func (l *Loader) finish(f *flight, node string, err *apierr.Error) {
	f.resNode, f.resErr = node, err
	l.mu.Lock()
	delete(l.flights, f.model)
	l.mu.Unlock()
	close(f.done)
	// No waiter left (all hung up): nobody will route to it through this
	// flight. Otherwise the last waiter's release ends the pin.
	if f.waiters.Load() == 0 {
		f.pin.Release()
	}
}

// attempt makes room on c.Node and loads p there.
func (l *Loader) attempt(ctx context.Context, f *flight, p *catalogue.Profile, c committed) error {
	node := c.Node
	api := l.deps.Neuron(node)
	if api == nil {
		l.callOff(c, 0)
		return &prepError{fmt.Errorf("neuron %s is not configured", node)}
	}
	start := time.Now()
	l.log.Info("cold load started", "model", p.ID, "node", node, "devices", c.Spec.Devices, "per_device_mb", c.PerDeviceMB, "evicting", c.Evict)
	l.obs.LoadStarted(p.ID, node)
	ctx, span := tracing.StartColdLoad(ctx, p.ID, node)
	err := l.evictAndLoad(ctx, api, p, &c)
	tracing.End(span, err)
	d := time.Since(start)
	l.obs.LoadFinished(p.ID, node, err == nil, d)
	if err != nil {
		return err
	}
	l.commitLoaded(f, p, c)
	l.log.Info("cold load finished", "model", p.ID, "node", node, "duration", d.Round(time.Millisecond))
	return nil
}

// evictAndLoad unloads the plan's victims, confirms the room with the
// neuron, then loads. The victims were claimed when the plan was made: no
// request is routed to them and no other plan counts them. An unload that
// fails gives the rest back untouched.
func (l *Loader) evictAndLoad(ctx context.Context, api neuron.API, p *catalogue.Profile, c *committed) error {
	evicted := 0
	for {
		for ; evicted < len(c.Evict); evicted++ {
			victim := c.Evict[evicted]
			uctx, span := tracing.StartEviction(ctx, c.Node, victim, p.ID)
			err := api.Unload(uctx, victim)
			tracing.End(span, err)
			if err != nil && !errors.Is(err, neuron.ErrNotFound) { // 404: it is gone anyway
				if unloadOutcomeUnknown(err) {
					// It may be gone: not routable until listed again.
					l.ledger.unconfirmed(c.claims[evicted], time.Now())
					l.log.Warn("unload failed without saying whether the model is gone; not routing to it there until the neuron lists it again",
						"model", victim, "node", c.Node, "error", err)
					evicted++
				}
				l.callOff(*c, evicted)
				return &prepError{fmt.Errorf("could not unload %s to make room: %w", victim, err)}
			}
			l.ledger.done(c.claims[evicted], time.Now())
			l.log.Info("evicted to make room for a cold load", "model", victim, "node", c.Node, "incoming", p.ID)
			l.obs.Evicted(c.Node, victim)
		}
		more, err := l.confirmRoom(ctx, api, p, c)
		if err != nil {
			l.callOff(*c, evicted)
			return &prepError{err}
		}
		if !more {
			break
		}
	}
	if err := api.Load(ctx, c.Spec); err != nil {
		l.callOff(*c, len(c.claims))
		return err
	}
	return nil
}

// confirmRoom asks the neuron for its free VRAM right before the load. The
// plan was made on the ledger's figures, which rest on estimates
// (vram_used_mb may be absent or off; the neuron may hold something it has
// not listed yet). When the chosen devices lack room it claims further
// victims there (more is true: evict them, then ask again), within
// cold_load.max_evictions; when nothing more may go it fails, and the
// attempt moves on without a cool-down. Without an answer it trusts the
// plan.
func (l *Loader) confirmRoom(ctx context.Context, api neuron.API, p *catalogue.Profile, c *committed) (more bool, err error) {
	hctx, cancel := context.WithTimeout(ctx, healthTimeout)
	h, herr := api.Health(hctx)
	cancel()
	if herr != nil || h == nil || len(h.Devices) == 0 {
		l.log.Debug("fresh /health unavailable before the load; trusting the plan", "node", c.Node, "error", herr)
		return false, nil
	}
	free := map[int]int64{}
	for _, d := range h.Devices {
		free[d.Index] = d.VRAMFreeMB
	}
	// Other loads in progress on this node have their VRAM to come.
	for _, cm := range l.ledger.View().On(c.Node) {
		if cm.Kind == routing.CommitLoading && cm.Model != p.ID {
			for _, d := range cm.Devices {
				free[d] -= cm.PerDeviceMB
			}
		}
	}
	short := false
	for _, d := range c.Spec.Devices {
		if free[d] < c.PerDeviceMB {
			short = true
		}
	}
	if !short {
		return false, nil
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.deps.Fleet().Node(c.Node)
	if n == nil {
		return false, fmt.Errorf("neuron %s left the fleet", c.Node)
	}
	budget := -1
	switch {
	case l.cfg.MaxEvictions < 0:
		budget = 0
	case l.cfg.MaxEvictions > 0:
		budget = max(l.cfg.MaxEvictions-len(c.Evict), 0)
	}
	evict, err := routing.MakeRoom(l.catalogue(), p, n, c.Spec.Devices, free, l.ledger.View(), l.placementState(nil), budget)
	if err != nil {
		return false, fmt.Errorf("no room after all: %v (the neuron's own /health, after %d eviction(s))", err, len(c.Evict))
	}
	names := make([]string, 0, len(evict))
	for _, v := range evict {
		id := l.claim(c.Node, v)
		if l.usage.InFlight(c.Node, v.Model) > 0 { // see plan
			l.ledger.drop(id)
			return false, fmt.Errorf("no room after all: %s is in use", v.Model)
		}
		c.Evict = append(c.Evict, v.Model)
		c.claims = append(c.claims, id)
		names = append(names, v.Model)
	}
	l.log.Info("the neuron reports less free VRAM than planned; evicting more", "node", c.Node, "incoming", p.ID, "evicting", names)
	return len(evict) > 0, nil
}

// commitLoaded records a finished load, in this order: its VRAM stays taken
// in the ledger; the flight's pin makes it in use, touched now; then the
// fleet lists it, on its devices. Whatever plans on that node next sees
// the model's VRAM gone and cannot evict it before its waiters are routed.
func (l *Loader) commitLoaded(f *flight, p *catalogue.Profile, c committed) {
	l.ledger.done(c.reservation, time.Now())
	l.usage.Use(c.Node, p.ID, &f.pin)
	if l.deps.MarkLoaded == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), markLoadedTimeout)
	defer cancel()
	vram := c.PerDeviceMB * int64(len(c.Spec.Devices))
	if err := l.deps.MarkLoaded(ctx, c.Node, p.ID, c.Spec.Devices, vram); err != nil {
		l.log.Warn("could not mark the model loaded; requests may wait for the next poll", "model", p.ID, "node", c.Node, "error", err)
	}
}

// unloadOutcomeUnknown reports whether a failed unload leaves it unknown
// whether the model is still there: anything but a 4xx refusal (a timeout,
// a broken connection, a 5xx, a 2xx that does not confirm it).
func unloadOutcomeUnknown(err error) bool {
	var se *neuron.StatusError
	if errors.As(err, &se) {
		return se.Status >= 500
	}
	return true
}

// prepError is a failure before POST /models/load: no room could be made
// or an unload failed. It does not put the (node, model) in cool-down.
type prepError struct{ err error }

func (e *prepError) Error() string { return e.err.Error() }
func (e *prepError) Unwrap() error { return e.err }
