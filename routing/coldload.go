package routing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/apierr"
	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/fleet"
	"github.com/helexa/cortex-extproc/neuron"
	"github.com/helexa/cortex-extproc/tracing"
)

// Cold-load defaults (contract.md [cold_load]).
const (
	DefaultColdLoadTimeout = 30 * time.Minute
	DefaultMaxEvictions    = 3
	DefaultMaxWaiters      = 10000
	DefaultFailureCooldown = 60 * time.Second
)

// maxLoadAttempts is the first node plus one fallback. A load that fails on
// two nodes is more likely the model's fault (missing repo, bad quant) than
// the nodes'; the cool-down then lets later requests try the remaining ones.
const maxLoadAttempts = 2

// healthTimeout bounds the fresh /health read taken before deciding
// evictions and after each one; without an answer we fall back to the
// snapshot and to adding up what the evictions freed.
const healthTimeout = 10 * time.Second

// markLoadedTimeout bounds the hand-off of "model just loaded" to the fleet owner.
const markLoadedTimeout = 10 * time.Second

// ColdLoadConfig tunes the ColdLoader. Zero values take the defaults.
type ColdLoadConfig struct {
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

func (c ColdLoadConfig) withDefaults() ColdLoadConfig {
	if c.Timeout <= 0 {
		c.Timeout = DefaultColdLoadTimeout
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

// ColdLoadObserver receives cold-load events for metrics and tracing. Its
// methods are called from many goroutines and must not block.
type ColdLoadObserver interface {
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

// ColdLoadDeps is what the ColdLoader reads and calls.
type ColdLoadDeps struct {
	Catalogue func() *catalogue.Catalogue
	Fleet     func() *fleet.Snapshot
	Neuron    func(node string) neuron.API // nil if unknown
	// MarkLoaded tells the fleet owner the model is resident on node now,
	// so requests released from the wait find it without the next poll.
	MarkLoaded func(ctx context.Context, node, model string) error
	// MarkUnloaded hides a model the loader is about to evict from the
	// fleet view, so requests stop going there before the next poll; may
	// be nil.
	MarkUnloaded func(ctx context.Context, node, model string) error
	Usage        *Usage
	Log          *slog.Logger
	Observer     ColdLoadObserver // may be nil
}

// FlightInfo describes a load in progress (for /debug/fleet).
type FlightInfo struct {
	Model   string    `json:"model"`
	Node    string    `json:"node"` // node of the current attempt
	Started time.Time `json:"started"`
	Waiters int       `json:"waiters"`
}

// ColdLoader runs cold loads single-flight: one POST /models/load per model
// at a time however many requests wait for it. A load runs detached from
// the requests that started or joined it, bounded by its own timeout, so a
// client that hangs up stops only its own wait.
type ColdLoader struct {
	cfg   ColdLoadConfig
	deps  ColdLoadDeps
	log   *slog.Logger
	obs   ColdLoadObserver
	usage *Usage
	now   func() time.Time // the clock for cool-downs; tests replace it

	// ctx parents every load; Close cancels it once its grace is over.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	waiters atomic.Int64 // across all flights

	mu        sync.Mutex
	closed    bool
	flights   map[string]*flight       // by model
	nodeLocks map[string]chan struct{} // one evict-and-load sequence per node

	// failMu is separate from mu because placement, which Join runs under
	// mu, reads the cool-downs.
	failMu   sync.Mutex
	failures map[usageKey]loadFailure
}

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
}

// Flight is one request's place in a flight. Wait must be called exactly
// once for each Flight that Join returns, to give the waiter slot back.
type Flight struct {
	l        *ColdLoader
	f        *flight
	released atomic.Bool
}

// NewColdLoader builds a ColdLoader. Catalogue, Fleet and Neuron are required.
func NewColdLoader(cfg ColdLoadConfig, deps ColdLoadDeps) *ColdLoader {
	ctx, cancel := context.WithCancel(context.Background())
	l := &ColdLoader{
		cfg:       cfg.withDefaults(),
		deps:      deps,
		log:       deps.Log,
		obs:       deps.Observer,
		usage:     deps.Usage,
		now:       time.Now,
		ctx:       ctx,
		cancel:    cancel,
		flights:   map[string]*flight{},
		failures:  map[usageKey]loadFailure{},
		nodeLocks: map[string]chan struct{}{},
	}
	if l.log == nil {
		l.log = slog.New(slog.DiscardHandler)
	}
	if l.obs == nil {
		l.obs = noopObserver{}
	}
	if l.usage == nil {
		l.usage = NewUsage()
	}
	return l
}

// Join starts a load for model (a concrete id in the catalogue) or joins the
// one in progress. A new flight is placed synchronously, so an infeasible
// model, a full waiter cap or a model in cool-down is answered at once,
// before the caller tells Envoy to wait.
func (l *ColdLoader) Join(model string) (*Flight, *apierr.Error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil, apierr.Unavailable(5, "cortex-extproc is shutting down; retry")
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
		plan, err := Place(cat, l.deps.Fleet(), p, l.placementState(nil))
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

// Wait blocks until the load finished, answering the node it is loaded on,
// or until ctx is done (the caller's own deadline or hang-up), answering a
// retryable 503; the load goes on for the other waiters. It always gives
// the waiter slot back.
func (w *Flight) Wait(ctx context.Context) (node string, err *apierr.Error) {
	defer w.release()
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
			w.f.model, *w.f.node.Load(), time.Since(w.f.started).Round(time.Second))
	}
}

func (w *Flight) release() {
	if w.released.CompareAndSwap(false, true) {
		w.f.waiters.Add(-1)
		w.l.dropWaiter()
	}
}

func (l *ColdLoader) addWaiter() *apierr.Error {
	n := l.waiters.Add(1)
	if n > int64(l.cfg.MaxWaiters) {
		l.waiters.Add(-1)
		return apierr.Unavailable(5, "%d requests are already waiting for cold loads (cold_load.max_waiters); retry shortly", l.cfg.MaxWaiters)
	}
	l.obs.WaitersChanged(int(n))
	return nil
}

func (l *ColdLoader) dropWaiter() {
	l.obs.WaitersChanged(int(l.waiters.Add(-1)))
}

// InProgress lists the loads in progress, by model.
func (l *ColdLoader) InProgress() []FlightInfo {
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
func (l *ColdLoader) Close(ctx context.Context) {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
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

func (l *ColdLoader) catalogue() *catalogue.Catalogue {
	if c := l.deps.Catalogue(); c != nil {
		return c
	}
	return catalogue.Empty()
}

// placementState is the live state placement reads; exclude adds nodes
// this flight already tried (the cool-down may be disabled).
func (l *ColdLoader) placementState(exclude map[string]bool) PlacementState {
	return PlacementState{
		Failed: func(node, model string) bool {
			return exclude[node] || l.inCooldown(node, model)
		},
		LastAccess:   l.usage.LastAccess,
		InFlight:     l.usage.InFlight,
		MaxEvictions: l.cfg.MaxEvictions,
	}
}

func (l *ColdLoader) inCooldown(node, model string) bool {
	l.failMu.Lock()
	defer l.failMu.Unlock()
	k := usageKey{node, model}
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
func (l *ColdLoader) markFailed(node, model, reason string) {
	if l.cfg.FailureCooldown < 0 {
		return
	}
	l.failMu.Lock()
	l.failures[usageKey{node, model}] = loadFailure{until: l.now().Add(l.cfg.FailureCooldown), reason: reason}
	l.failMu.Unlock()
}

// withRecentFailures adds the reasons of the failed loads that put model's
// nodes in cool-down to a placement error, so the client and the operator
// see why instead of only "cool-down".
func (l *ColdLoader) withRecentFailures(model string, err *apierr.Error) *apierr.Error {
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

// run is one flight: try the planned node, on failure the next candidate
// once, then release every waiter with the outcome.
func (l *ColdLoader) run(f *flight, p *catalogue.Profile, plan Plan) {
	defer l.wg.Done()
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.Timeout)
	defer cancel()

	var failures []string
	loadFailed := false // some POST /models/load failed (not just "no room")
	tried := map[string]bool{}
	for attempt := 1; ; attempt++ {
		node := plan.Node
		tried[node] = true
		f.node.Store(&node)
		err := l.attempt(ctx, p, plan)
		if err == nil {
			l.finish(f, node, nil)
			return
		}
		reason := l.describe(ctx, err)
		failures = append(failures, node+": "+reason)
		// Only a failed load says something about this model on this node;
		// a node that was full or busy may take it a moment later.
		if !errors.As(err, new(*prepError)) {
			loadFailed = true
			l.markFailed(node, p.ID, reason)
		}

		next, perr := l.nextPlan(ctx, p, tried, attempt)
		if perr != "" {
			l.log.Warn("cold load failed; giving up", "model", p.ID, "node", node, "error", reason, "why", perr)
			l.finish(f, "", apierr.Unavailable(5, "cold load of %q failed on %s%s", p.ID, strings.Join(failures, "; "), l.nextStep(loadFailed)))
			return
		}
		l.log.Warn("cold load failed; trying the next node", "model", p.ID, "node", node, "error", reason, "next", next.Node)
		plan = next
	}
}

// nextStep is what the final failure message tells the operator to do.
func (l *ColdLoader) nextStep(loadFailed bool) string {
	switch {
	case !loadFailed:
		return "; retry shortly"
	case l.cfg.FailureCooldown > 0:
		return fmt.Sprintf(". Check the neuron's logs; cortex-extproc skips a node where the load failed for %s", l.cfg.FailureCooldown)
	}
	return ". Check the neuron's logs"
}

// nextPlan re-places p without the nodes already tried, or says why not.
func (l *ColdLoader) nextPlan(ctx context.Context, p *catalogue.Profile, tried map[string]bool, attempt int) (Plan, string) {
	if ctx.Err() != nil {
		return Plan{}, "the load's time is up"
	}
	if attempt >= maxLoadAttempts {
		return Plan{}, fmt.Sprintf("tried %d nodes", attempt)
	}
	cat := l.catalogue()
	if cur := cat.Profile(p.ID); cur != nil {
		p = cur
	}
	next, err := Place(cat, l.deps.Fleet(), p, l.placementState(tried))
	if err != nil {
		return Plan{}, "no other node: " + err.Message
	}
	return next, ""
}

// describe turns an attempt's error into the reason shown to clients and logs.
func (l *ColdLoader) describe(ctx context.Context, err error) string {
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Sprintf("timed out after %s (cold_load.timeout): %v", l.cfg.Timeout, err)
	case l.ctx.Err() != nil:
		return "cortex-extproc is shutting down"
	}
	return err.Error()
}

// finish publishes the outcome and releases the waiters. On success the
// fleet owner learns of the load first, so released requests find it.
func (l *ColdLoader) finish(f *flight, node string, err *apierr.Error) {
	if err == nil {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), markLoadedTimeout)
		if l.deps.MarkLoaded != nil {
			if merr := l.deps.MarkLoaded(ctx, node, f.model); merr != nil {
				l.log.Warn("could not mark the model loaded; requests may wait for the next poll", "model", f.model, "node", node, "error", merr)
			}
		}
		cancel()
		l.usage.Touch(node, f.model)
	}
	f.resNode, f.resErr = node, err
	l.mu.Lock()
	delete(l.flights, f.model)
	l.mu.Unlock()
	close(f.done)
}

// attempt makes room on plan.Node and loads p there.
func (l *ColdLoader) attempt(ctx context.Context, p *catalogue.Profile, plan Plan) error {
	node := plan.Node
	api := l.deps.Neuron(node)
	if api == nil {
		return fmt.Errorf("neuron %s is not configured", node)
	}
	start := time.Now()
	l.log.Info("cold load started", "model", p.ID, "node", node, "devices", plan.Spec.Devices, "evicting", plan.Evict)
	l.obs.LoadStarted(p.ID, node)
	ctx, span := tracing.StartColdLoad(ctx, p.ID, node)
	err := l.evictAndLoad(ctx, api, p, plan)
	tracing.End(span, err)
	d := time.Since(start)
	l.obs.LoadFinished(p.ID, node, err == nil, d)
	if err == nil {
		l.log.Info("cold load finished", "model", p.ID, "node", node, "duration", d.Round(time.Millisecond))
	}
	return err
}

func (l *ColdLoader) evictAndLoad(ctx context.Context, api neuron.API, p *catalogue.Profile, plan Plan) error {
	// Two loads on one node at once would both count the same free VRAM:
	// serialise them, and decide evictions only once the node is ours.
	unlock, err := l.lockNode(ctx, p.ID, plan.Node)
	if err != nil {
		return &prepError{fmt.Errorf("waiting for another load on %s: %w", plan.Node, err)}
	}
	defer unlock()
	if err := l.makeRoom(ctx, api, p, plan.Node); err != nil {
		return &prepError{err}
	}
	return api.Load(ctx, plan.Spec)
}

// prepError is a failure before POST /models/load: no room could be made,
// an unload failed, or the node stayed busy. It does not put the (node,
// model) in cool-down.
type prepError struct{ err error }

func (e *prepError) Error() string { return e.err.Error() }
func (e *prepError) Unwrap() error { return e.err }

func (l *ColdLoader) lockNode(ctx context.Context, model, node string) (func(), error) {
	l.mu.Lock()
	sem := l.nodeLocks[node]
	if sem == nil {
		sem = make(chan struct{}, 1)
		l.nodeLocks[node] = sem
	}
	l.mu.Unlock()
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	default:
		l.log.Info("cold load queued behind another load on the same node", "model", model, "node", node)
	}
	select {
	case sem <- struct{}{}:
		return func() { <-sem }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// makeRoom evicts least-recently-used displaceable residents on node until
// p fits, up to cold_load.max_evictions.
//
// Fit is re-checked against the neuron's own /health after every unload,
// not against the snapshot: the snapshot may be a poll old, and the neuron
// knows what an unload really freed (vram_used_mb is an estimate or absent).
// When /health does not answer we fall back to adding the evicted model's
// VRAM to what we had, which is what the plan assumed.
func (l *ColdLoader) makeRoom(ctx context.Context, api neuron.API, p *catalogue.Profile, nodeName string) error {
	n := l.deps.Fleet().Node(nodeName)
	if n == nil {
		return fmt.Errorf("neuron %s left the fleet", nodeName)
	}
	cat := l.catalogue()
	st := l.placementState(nil)
	n = l.refresh(ctx, api, n)
	free := n.FreeVRAM()
	skip := map[string]bool{}
	var evicted []string
	for {
		budget := 0 // negative max_evictions: never evict
		if l.cfg.MaxEvictions > 0 {
			budget = max(l.cfg.MaxEvictions-len(evicted), 0)
		}
		fit := evaluateNode(cat, p, n, free, st, skip, budget)
		if fit.fitsNow {
			return nil
		}
		// Unloading residents that cannot make enough room only destroys
		// warm models: refuse before the first unload, not after the last.
		if !fit.fitsAfter {
			return errors.New(noRoom(p, &fit, evicted, l.cfg.MaxEvictions))
		}
		victim := fit.evict[0]
		var gained resident
		for _, m := range n.Models {
			if m.ID == victim {
				gained = resident{id: m.ID, vram: residentVRAM(cat, &m.Model), devices: m.Devices}
			}
		}
		// Hide the victim from routing, then check that no request took it
		// meanwhile (Router.Route re-checks the other side): a request sent
		// to it during or after the unload would reach a neuron without it.
		if l.hide(nodeName, victim) && l.usage.InFlight(nodeName, victim) > 0 {
			l.unhide(nodeName, victim)
			skip[victim] = true
			continue
		}
		uctx, span := tracing.StartEviction(ctx, nodeName, victim, p.ID)
		err := api.Unload(uctx, victim)
		tracing.End(span, err)
		if err != nil {
			if !errors.Is(err, neuron.ErrNotFound) { // 404: it is gone anyway
				l.unhide(nodeName, victim)
			}
			return fmt.Errorf("could not unload %s to make room: %w", victim, err)
		}
		evicted = append(evicted, victim)
		skip[victim] = true
		l.log.Info("evicted to make room for a cold load", "model", victim, "node", nodeName, "incoming", p.ID)
		l.obs.Evicted(nodeName, victim)
		if fresh := l.refresh(ctx, api, n); fresh != n {
			n = fresh
			free = n.FreeVRAM()
		} else {
			reclaim(free, gained, n)
		}
	}
}

// hide takes model on node out of the fleet view before an eviction; false
// when it could not (no MarkUnloaded, or the fleet owner did not answer).
func (l *ColdLoader) hide(node, model string) bool {
	if l.deps.MarkUnloaded == nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), markLoadedTimeout)
	defer cancel()
	if err := l.deps.MarkUnloaded(ctx, node, model); err != nil {
		l.log.Warn("could not hide a model before evicting it; requests may reach it until the next poll", "model", model, "node", node, "error", err)
		return false
	}
	return true
}

// unhide puts back a model whose eviction did not happen.
func (l *ColdLoader) unhide(node, model string) {
	if l.deps.MarkUnloaded == nil || l.deps.MarkLoaded == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(l.ctx), markLoadedTimeout)
	defer cancel()
	if err := l.deps.MarkLoaded(ctx, node, model); err != nil {
		l.log.Warn("could not put back a model that was not evicted; it is routed again after the next poll", "model", model, "node", node, "error", err)
	}
}

// refresh returns a copy of n with the neuron's current /health (free VRAM
// and in-flight counts), or n itself when /health does not answer.
func (l *ColdLoader) refresh(ctx context.Context, api neuron.API, n *fleet.Node) *fleet.Node {
	hctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	h, err := api.Health(hctx)
	if err != nil || h == nil {
		l.log.Debug("fresh /health unavailable; using the last poll", "node", n.Name, "error", err)
		return n
	}
	load := make(map[string]neuron.ModelHealth, len(h.Models))
	for _, m := range h.Models {
		load[m.ID] = m
	}
	c := *n
	c.Health = h
	c.Models = make([]*fleet.Model, len(n.Models))
	for i, m := range n.Models {
		mc := *m
		mc.InFlight, mc.QueueDepth = load[m.ID].InFlight, load[m.ID].QueueDepth
		c.Models[i] = &mc
	}
	return &c
}
