package fleet

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Poller defaults (contract.md [poll]).
const (
	DefaultInterval         = 10 * time.Second
	DefaultTimeout          = 5 * time.Second
	DefaultFailureThreshold = 3
	DefaultSuspectGap       = time.Second
)

// ErrStopped is returned by calls that need the poller's owner goroutine
// after Run has returned.
var ErrStopped = errors.New("fleet poller stopped")

// Neuron is one configured neuron.
type Neuron struct {
	Name     string
	Cluster  string // Envoy cluster; "" means "neuron-<name>"
	Endpoint string // management endpoint, e.g. http://beast.internal:13131
	API      neuron.API
}

// PollerConfig tunes the poller. Zero values take the defaults.
type PollerConfig struct {
	Interval         time.Duration // between round starts; default 10s
	Timeout          time.Duration // per neuron HTTP call; default 5s
	FailureThreshold int           // consecutive failed /models polls -> unhealthy; default 3

	// Hooks for metrics, called from the owner goroutine: keep them fast.
	// OnPoll reports each /models poll's outcome
	// (neuron_poll_failures_total{node}).
	OnPoll func(node string, ok bool)
	// OnHealth reports a node's health when it is first known (false, at
	// Run start or when added) and on every change (neuron_healthy{node}).
	OnHealth func(node string, healthy bool)
	// OnRemove reports a node removed by SetNeurons, so its metric label
	// values can be deleted.
	OnRemove func(node string)
	// OnSuspectUnhealthy reports a node marked unhealthy at once because
	// the re-poll a Suspect call started failed
	// (neuron_fast_unhealthy_total{node}).
	OnSuspectUnhealthy func(node string)

	// SuspectGap is the least time between the starts of two re-polls of
	// one node that Suspect asks for (default 1s); Suspect calls in
	// between are dropped.
	SuspectGap time.Duration
	// Now is the clock SuspectGap is counted with; nil is time.Now.
	Now func() time.Time
}

func (c PollerConfig) withDefaults() PollerConfig {
	if c.Interval <= 0 {
		c.Interval = DefaultInterval
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.FailureThreshold <= 0 {
		c.FailureThreshold = DefaultFailureThreshold
	}
	if c.SuspectGap <= 0 {
		c.SuspectGap = DefaultSuspectGap
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// Poller polls every neuron and publishes the fleet as an immutable
// Snapshot. It is the only writer of fleet state: all mutation happens in
// the goroutine running Run, and other goroutines (MarkLoaded, SetNeurons,
// PollNow, Suspect) hand it requests over channels. Neuron calls run in
// their own goroutines so the owner never blocks on the network.
type Poller struct {
	cfg PollerConfig
	log *slog.Logger

	snap    atomic.Pointer[Snapshot]
	changed atomic.Pointer[chan struct{}]

	ready     chan struct{}
	stopped   chan struct{}
	running   atomic.Bool
	reqs      chan request
	results   chan pollResult
	resolved  chan resolveResult
	wake      chan struct{} // SetNeurons has left a list in pending
	pendingMu sync.Mutex
	pending   []Neuron
	hasPend   bool
	// Suspect leaves node names in suspects and wakes the owner through
	// suspectWake; re-poll results come back on repolled.
	suspectWake chan struct{}
	suspectMu   sync.Mutex
	suspects    map[string]struct{}
	repolled    chan pollResult

	// Owner-only state below: touched by NewPoller before Run starts, then
	// only by the Run goroutine.
	nodes      map[string]*nodeState
	order      []*nodeState // nodes sorted by name; nil after the set changed
	published  *Snapshot    // the last snapshot published, whose layout the next one derives from
	round      uint64
	seq        uint64 // orders round starts and MarkLoaded calls
	readyDone  bool
	inRound    *roundState
	nextRound  []chan error
	wg         sync.WaitGroup
	runCtx     context.Context
	hooksFired bool
}

// nodeState is the owner's mutable view of one neuron.
type nodeState struct {
	cfg Neuron

	healthy     bool
	everHealthy bool
	failures    int
	lastPoll    time.Time
	lastSuccess time.Time
	lastErr     string

	disc      *neuron.Discovery
	discErr   string
	health    *neuron.Health
	healthAt  time.Time // when the request for health was sent
	healthErr string
	models    []neuron.Model // sorted by ID, unique IDs
	modelsAt  time.Time      // when the request for models was sent

	endpoints   map[string]string // model -> resolved inference URL
	endpointErr map[string]string // model -> last resolution error, for log-once
	unknown     map[string]neuron.Status
	// marks are MarkLoaded calls (model -> seq) not yet confirmed by a poll
	// that started after them.
	marks map[string]mark

	// appliedSeq is the seq of the newest poll applied: a result of a
	// poll started earlier (a round's, racing a re-poll) is stale.
	appliedSeq uint64
	// suspect: a Suspect call started a re-poll that has not answered
	// yet (repolling); lastRepoll is when the last one started.
	suspect    bool
	lastRepoll time.Time

	// view is the *Node last published for this state. Every change to
	// what node() reads sets dirty, and only a dirty node is rebuilt at
	// publish: the others keep their *Node, so that publishing one
	// neuron's answer does not rebuild the whole fleet.
	view  *Node
	dirty bool
}

// mark is a MarkLoaded call: what the load put where.
// mark is a model MarkLoaded listed as resident on a node until a /models
// listing requested after the load finished takes over.
type mark struct {
	at      time.Time // when the load was reported finished
	devices []int
	vramMB  int64
}

type request struct {
	kind    int // reqPoll | reqMark
	node    string
	model   string
	devices []int
	vramMB  int64
	reply   chan error
}

const (
	reqPoll = iota
	reqMark
)

type roundState struct {
	pending int
	waiters []chan error
}

type pollInput struct {
	key        *nodeState // identity only: the poll goroutine never reads it
	api        neuron.API
	disc       *neuron.Discovery
	prevUptime int64 // -1 when no /health reading yet
	endpoints  map[string]string
	seq        uint64
}

type endpointAnswer struct {
	url string
	err error
}

type pollResult struct {
	key       *nodeState
	seq       uint64
	health    *neuron.Health
	healthAt  time.Time
	healthErr error
	restarted bool
	disc      *neuron.Discovery // non-nil when fetched this round
	discErr   error
	models    []neuron.Model
	modelsAt  time.Time
	modelsErr error
	endpoints map[string]endpointAnswer
	// probeFailed: a re-poll's first /models call failed; nothing else
	// was asked (repollNode).
	probeFailed bool
}

type resolveResult struct {
	key    *nodeState
	model  string
	answer endpointAnswer
	reply  chan error
	// mark is the MarkLoaded this lookup was for: applied only now, so
	// that the model is never listed resident without its endpoint.
	mark mark
}

// NewPoller returns a poller for neurons. Nothing is polled until Run.
func NewPoller(cfg PollerConfig, neurons []Neuron, log *slog.Logger) *Poller {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Poller{
		cfg:      cfg.withDefaults(),
		log:      log,
		ready:    make(chan struct{}),
		stopped:  make(chan struct{}),
		reqs:     make(chan request),
		results:  make(chan pollResult),
		resolved: make(chan resolveResult),
		wake:     make(chan struct{}, 1),
		nodes:    map[string]*nodeState{},

		suspectWake: make(chan struct{}, 1),
		suspects:    map[string]struct{}{},
		repolled:    make(chan pollResult),
	}
	ch := make(chan struct{})
	p.changed.Store(&ch)
	p.applyNeurons(neurons, false)
	p.publish()
	return p
}

// Snapshot returns the latest published fleet view; never nil. Before the
// first round it lists the configured neurons, all unhealthy, with Round 0.
func (p *Poller) Snapshot() *Snapshot { return p.snap.Load() }

// Ready is closed once the first poll round has completed.
func (p *Poller) Ready() <-chan struct{} { return p.ready }

// Changed returns a channel closed at the next publish after this call.
func (p *Poller) Changed() <-chan struct{} { return *p.changed.Load() }

// Run polls every Interval, starting at once, until ctx is done. It returns
// nil then, after every neuron call it started has returned. Run may be
// called only once.
func (p *Poller) Run(ctx context.Context) error {
	if !p.running.CompareAndSwap(false, true) {
		return errors.New("fleet poller: Run called twice")
	}
	p.runCtx = ctx
	defer func() {
		for _, w := range p.allWaiters() {
			w <- ErrStopped
		}
		p.wg.Wait()
		close(p.stopped)
	}()

	p.takePending()
	for name, ns := range p.nodes {
		p.fireHealth(name, ns.healthy)
	}
	p.hooksFired = true
	p.startRound(nil)

	tick := time.NewTicker(p.cfg.Interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if p.inRound == nil {
				p.startRound(nil)
			}
		case <-p.wake:
			p.takePending()
		case r := <-p.reqs:
			p.takePending()
			p.handle(r)
		case res := <-p.results:
			p.finishPoll(res)
		case res := <-p.resolved:
			p.finishResolve(res)
		case <-p.suspectWake:
			p.takeSuspects()
		case res := <-p.repolled:
			p.finishRepoll(res)
		}
	}
}

// PollNow runs one full poll round that starts after the call and returns
// once its snapshot is published. Used by the `route` command and tests.
func (p *Poller) PollNow(ctx context.Context) error {
	return p.call(ctx, request{kind: reqPoll})
}

// MarkLoaded records that modelID just finished loading on node, without
// waiting for the next poll: status loaded, servable, on devices with
// vramMB in all (when known: 0 keeps what the neuron reported), and its
// endpoint resolved if not already known. It returns once the snapshot
// showing it is published. A poll that started before the mark and still
// shows the model not resident does not undo it.
func (p *Poller) MarkLoaded(ctx context.Context, node, modelID string, devices []int, vramMB int64) error {
	return p.call(ctx, request{kind: reqMark, node: node, model: modelID, devices: slices.Clone(devices), vramMB: vramMB})
}

// SetNeurons replaces the configured neurons (config reload). A removed
// neuron disappears from the next snapshot; a new one is unhealthy until its
// first successful poll; one whose endpoint changed starts over as new.
// It does not wait: the owner applies the latest list promptly.
func (p *Poller) SetNeurons(neurons []Neuron) {
	p.pendingMu.Lock()
	p.pending = slices.Clone(neurons)
	p.hasPend = true
	p.pendingMu.Unlock()
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

func (p *Poller) call(ctx context.Context, r request) error {
	r.reply = make(chan error, 1)
	select {
	case p.reqs <- r:
	case <-ctx.Done():
		return ctx.Err()
	case <-p.stopped:
		return ErrStopped
	}
	select {
	case err := <-r.reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-p.stopped:
		select {
		case err := <-r.reply:
			return err
		default:
			return ErrStopped
		}
	}
}

func (p *Poller) allWaiters() []chan error {
	var ws []chan error
	if p.inRound != nil {
		ws = append(ws, p.inRound.waiters...)
	}
	return append(ws, p.nextRound...)
}

func (p *Poller) handle(r request) {
	switch r.kind {
	case reqPoll:
		if p.inRound == nil {
			p.startRound([]chan error{r.reply})
		} else {
			// The running round started before this call; the caller
			// wants one that reflects the fleet from now on.
			p.nextRound = append(p.nextRound, r.reply)
		}
	case reqMark:
		p.mark(r)
	}
}

func (p *Poller) takePending() {
	p.pendingMu.Lock()
	ns, ok := p.pending, p.hasPend
	p.pending, p.hasPend = nil, false
	p.pendingMu.Unlock()
	if ok {
		p.applyNeurons(ns, true)
		p.publish()
	}
}

// applyNeurons makes the configured set exactly neurons.
func (p *Poller) applyNeurons(neurons []Neuron, reload bool) {
	want := map[string]Neuron{}
	for _, n := range neurons {
		if n.Cluster == "" {
			n.Cluster = "neuron-" + n.Name
		}
		if _, dup := want[n.Name]; dup {
			p.log.Warn("duplicate neuron name in config; keeping the first", "node", n.Name)
			continue
		}
		want[n.Name] = n
	}
	for name, ns := range p.nodes {
		if n, ok := want[name]; !ok || n.Endpoint != ns.cfg.Endpoint {
			delete(p.nodes, name)
			p.order = nil
			if reload {
				p.log.Info("neuron removed from config", "node", name, "endpoint", ns.cfg.Endpoint)
				if p.cfg.OnRemove != nil && !ok {
					p.cfg.OnRemove(name)
				}
			}
		}
	}
	for name, n := range want {
		if ns, ok := p.nodes[name]; ok {
			if n.Cluster != ns.cfg.Cluster {
				ns.dirty = true
			}
			ns.cfg = n // same endpoint: keep what we know, take the new client and cluster
			continue
		}
		p.order = nil
		p.nodes[name] = &nodeState{
			cfg:         n,
			endpoints:   map[string]string{},
			endpointErr: map[string]string{},
			unknown:     map[string]neuron.Status{},
			marks:       map[string]mark{},
		}
		if reload {
			p.log.Info("neuron added to config; unhealthy until its first successful poll", "node", name, "endpoint", n.Endpoint)
		}
		if p.hooksFired {
			p.fireHealth(name, false)
		}
	}
}

// pollInput is what a poll of ns, started as number seq, reads: a copy, so
// the poll goroutine never touches owner state.
func (ns *nodeState) pollInput(seq uint64) pollInput {
	in := pollInput{
		key:        ns,
		api:        ns.cfg.API,
		disc:       ns.disc,
		prevUptime: -1,
		endpoints:  maps.Clone(ns.endpoints),
		seq:        seq,
	}
	if ns.health != nil {
		in.prevUptime = ns.health.UptimeSecs
	}
	return in
}

func (p *Poller) startRound(waiters []chan error) {
	p.seq++
	rs := &roundState{waiters: waiters}
	p.inRound = rs
	for _, ns := range p.nodes {
		in := ns.pollInput(p.seq)
		rs.pending++
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			res := pollNode(p.runCtx, in, p.cfg.Timeout)
			select {
			case p.results <- res:
			case <-p.runCtx.Done():
			}
		}()
	}
	if rs.pending == 0 {
		p.completeRound()
	}
}

func (p *Poller) finishPoll(res pollResult) {
	if ns, ok := p.nodes[res.key.cfg.Name]; ok && ns == res.key && res.seq >= ns.appliedSeq {
		p.apply(ns, res)
	}
	p.inRound.pending--
	if p.inRound.pending == 0 {
		p.completeRound()
		return
	}
	// Publish each neuron's answer as it arrives: one neuron timing out
	// must not hold back what the others just said.
	p.publish()
}

func (p *Poller) completeRound() {
	p.round++
	p.publish()
	if !p.readyDone {
		p.readyDone = true
		close(p.ready)
	}
	for _, w := range p.inRound.waiters {
		w <- nil
	}
	p.inRound = nil
	if len(p.nextRound) > 0 {
		ws := p.nextRound
		p.nextRound = nil
		p.startRound(ws)
	}
}

// pollNode is one neuron's poll: /health first (its uptime tells whether
// the neuron restarted, which invalidates the discovery and endpoint
// caches), /discovery when needed, /models, then endpoints not yet known.
// It runs outside the owner and reads only in.
func pollNode(ctx context.Context, in pollInput, timeout time.Duration) pollResult {
	r := pollResult{key: in.key, seq: in.seq}
	call := func(f func(context.Context) error) error {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		return f(cctx)
	}

	r.healthAt = time.Now()
	r.healthErr = call(func(ctx context.Context) error {
		h, err := in.api.Health(ctx)
		if err == nil && h == nil {
			err = errors.New("empty /health answer")
		}
		r.health = h
		return err
	})
	if r.healthErr != nil {
		r.health = nil
	} else if in.prevUptime >= 0 && r.health.UptimeSecs < in.prevUptime {
		r.restarted = true
	}

	// Discovery is invariant for a neuron process; older neurons answer
	// max_prompt_tokens 0 until fully up, so keep asking until it is set.
	if in.disc == nil || in.disc.MaxPromptTokens == 0 || r.restarted {
		r.discErr = call(func(ctx context.Context) error {
			d, err := in.api.Discovery(ctx)
			if err == nil && d == nil {
				err = errors.New("empty /discovery answer")
			}
			r.disc = d
			return err
		})
		if r.discErr != nil {
			r.disc = nil
		}
	}

	r.modelsAt = time.Now()
	r.modelsErr = call(func(ctx context.Context) error {
		ms, err := in.api.Models(ctx)
		r.models = ms
		return err
	})
	if r.modelsErr != nil {
		r.models = nil
		return r
	}
	r.models = normalizeModels(r.models)

	r.endpoints = map[string]endpointAnswer{}
	// The lookups share one poll timeout: a round waits for every neuron,
	// so one whose endpoint calls hang must not hold the whole fleet's
	// polls for (models × timeout). What is left is retried next round.
	epCtx, epCancel := context.WithTimeout(ctx, timeout)
	defer epCancel()
	for _, m := range r.models {
		if _, ok := in.endpoints[m.ID]; ok && !r.restarted {
			continue
		}
		if epCtx.Err() != nil {
			break
		}
		var a endpointAnswer
		a.url, a.err = in.api.Endpoint(epCtx, m.ID)
		if a.err == nil && a.url == "" {
			a.err = errors.New("empty endpoint answer")
		}
		r.endpoints[m.ID] = a
	}
	return r
}

// normalizeModels sorts by id and keeps the first of duplicate ids, so the
// snapshot's Model(id) is unambiguous.
func normalizeModels(ms []neuron.Model) []neuron.Model {
	out := make([]neuron.Model, 0, len(ms))
	seen := map[string]bool{}
	for _, m := range ms {
		if m.ID == "" || seen[m.ID] {
			continue
		}
		seen[m.ID] = true
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b neuron.Model) int { return cmp.Compare(a.ID, b.ID) })
	return out
}

// apply folds one poll result into the node's state, logging only state
// changes so a neuron failing every 10 s does not flood the log.
func (p *Poller) apply(ns *nodeState, r pollResult) {
	name := ns.cfg.Name
	ns.dirty = true // lastPoll at least
	ns.lastPoll = time.Now()
	ns.appliedSeq = r.seq

	if r.healthErr != nil {
		if msg := r.healthErr.Error(); msg != ns.healthErr {
			p.log.Warn("neuron /health failing; keeping its last reading", "node", name, "error", msg)
			ns.healthErr = msg
		}
	} else {
		if ns.healthErr != "" {
			p.log.Info("neuron /health answering again", "node", name)
			ns.healthErr = ""
		}
		if r.restarted {
			p.log.Info("neuron restarted (uptime went down); refreshing discovery and endpoints",
				"node", name, "uptime_secs", r.health.UptimeSecs, "previous_uptime_secs", ns.health.UptimeSecs)
			clear(ns.endpoints)
		}
		ns.health, ns.healthAt = r.health, r.healthAt
	}

	if r.discErr != nil {
		if msg := r.discErr.Error(); msg != ns.discErr {
			p.log.Warn("neuron /discovery failing; keeping the cached topology, if any (without one, no cold load is placed there)", "node", name, "error", msg)
			ns.discErr = msg
		}
	} else if r.disc != nil {
		if ns.discErr != "" {
			p.log.Info("neuron /discovery answering again", "node", name)
			ns.discErr = ""
		}
		ns.disc = r.disc
	}

	if r.modelsErr != nil {
		ns.failures++
		msg := r.modelsErr.Error()
		if msg != ns.lastErr {
			p.log.Warn("neuron poll failing", "node", name, "error", msg, "consecutive_failures", ns.failures)
		}
		ns.lastErr = msg
		if ns.healthy && ns.failures >= p.cfg.FailureThreshold {
			ns.healthy = false
			p.log.Warn("neuron unhealthy; no longer routing to it", "node", name, "consecutive_failures", ns.failures, "error", msg)
			p.fireHealth(name, false)
		}
		if p.cfg.OnPoll != nil {
			p.cfg.OnPoll(name, false)
		}
		return
	}

	wasFailing := ns.lastErr != ""
	ns.failures = 0
	ns.lastErr = ""
	ns.lastSuccess = ns.lastPoll
	switch {
	case !ns.healthy && ns.everHealthy:
		p.log.Info("neuron healthy again", "node", name, "models", len(r.models))
	case !ns.healthy:
		p.log.Info("neuron healthy", "node", name, "models", len(r.models))
	case wasFailing:
		p.log.Info("neuron poll recovered before reaching the failure threshold", "node", name)
	}
	if !ns.healthy {
		ns.healthy, ns.everHealthy = true, true
		p.fireHealth(name, true)
	}
	if p.cfg.OnPoll != nil {
		p.cfg.OnPoll(name, true)
	}

	if !r.modelsAt.After(ns.modelsAt) {
		// A listing requested before the one the node shows (a re-poll
		// and a round poll overlapped, and the older request answered
		// last) never replaces it: a model unloaded in between would
		// come back, after the ledger had stopped blocking it.
		return
	}
	ns.modelsAt = r.modelsAt
	models := r.models
	for id, mk := range ns.marks {
		if r.modelsAt.After(mk.at) {
			// Listed after the load finished: the listing is the truth now
			// (a model the neuron no longer lists was unloaded since; it
			// must not come back from the mark). What counts is when
			// /models was requested, not when the poll started: a poll
			// whose /health hung for seconds asks for /models long after.
			delete(ns.marks, id)
			continue
		}
		// Listed before the load finished; keep the mark unless the
		// neuron already shows the model resident.
		i, found := slices.BinarySearchFunc(models, id, func(m neuron.Model, id string) int { return cmp.Compare(m.ID, id) })
		if found && models[i].Status.Resident() {
			delete(ns.marks, id)
			continue
		}
		models = upsertLoaded(models, id, mk)
	}
	p.setModels(ns, models)

	for id, a := range r.endpoints {
		p.setEndpoint(ns, id, a)
	}
}

// fireHealth reports health to the metrics hook.
func (p *Poller) fireHealth(node string, healthy bool) {
	if p.cfg.OnHealth != nil {
		p.cfg.OnHealth(node, healthy)
	}
}

// setModels replaces a node's model list and drops per-model state of
// models no longer listed: an endpoint is re-resolved if the model comes
// back.
func (p *Poller) setModels(ns *nodeState, models []neuron.Model) {
	listed := make(map[string]bool, len(models))
	for _, m := range models {
		listed[m.ID] = true
		if !m.Status.Known() {
			if ns.unknown[m.ID] != m.Status {
				p.log.Warn("neuron reports an unknown model status; not routing to it there",
					"node", ns.cfg.Name, "model", m.ID, "status", string(m.Status))
				ns.unknown[m.ID] = m.Status
			}
		} else {
			delete(ns.unknown, m.ID)
		}
	}
	for _, st := range []map[string]string{ns.endpoints, ns.endpointErr} {
		for id := range st {
			if !listed[id] {
				delete(st, id)
			}
		}
	}
	for id := range ns.unknown {
		if !listed[id] {
			delete(ns.unknown, id)
		}
	}
	ns.models = models
	ns.dirty = true
}

// setEndpoint records an endpoint lookup, logging when its state changes.
// A failed lookup leaves the endpoint unknown ("" in the snapshot) and is
// retried next round.
func (p *Poller) setEndpoint(ns *nodeState, model string, a endpointAnswer) {
	if !slices.ContainsFunc(ns.models, func(m neuron.Model) bool { return m.ID == model }) {
		return
	}
	ns.dirty = true
	if a.err != nil {
		delete(ns.endpoints, model)
		if msg := a.err.Error(); ns.endpointErr[model] != msg {
			p.log.Warn("model endpoint not resolvable; requests routed there will get 503 until it is",
				"node", ns.cfg.Name, "model", model, "error", msg)
			ns.endpointErr[model] = msg
		}
		return
	}
	if _, failed := ns.endpointErr[model]; failed {
		p.log.Info("model endpoint resolved", "node", ns.cfg.Name, "model", model, "endpoint", a.url)
		delete(ns.endpointErr, model)
	}
	ns.endpoints[model] = a.url
}

// upsertLoaded returns models (sorted by id) with id marked loaded,
// servable and on the devices the load used, adding an entry if the neuron
// did not list it. The input slice may belong to a published snapshot, so
// it is copied, never written.
func upsertLoaded(models []neuron.Model, id string, mk mark) []neuron.Model {
	out := slices.Clone(models)
	i, found := slices.BinarySearchFunc(out, id, func(m neuron.Model, id string) int { return cmp.Compare(m.ID, id) })
	if !found {
		out = slices.Insert(out, i, neuron.Model{ID: id})
	}
	out[i].Status = neuron.StatusLoaded
	out[i].Servable = nil
	if len(mk.devices) > 0 {
		out[i].Devices = mk.devices
	}
	if mk.vramMB > 0 {
		v := mk.vramMB
		out[i].VRAMUsedMB = &v
	}
	return out
}

func (p *Poller) mark(r request) {
	ns := p.nodes[r.node]
	if ns == nil {
		r.reply <- fmt.Errorf("mark %q loaded: no neuron named %q is configured", r.model, r.node)
		return
	}
	mk := mark{at: time.Now(), devices: r.devices, vramMB: r.vramMB}
	if _, ok := ns.endpoints[r.model]; ok {
		p.applyMark(ns, r.model, mk)
		p.publish()
		r.reply <- nil
		return
	}
	// Resolve off the owner goroutine first: listed resident without an
	// endpoint, the model would answer requests with a 503 in between.
	// Until then requests for it join the load's flight, which waits for
	// this call. The caller waits too, so the snapshot it reads next has
	// the model and its endpoint.
	api, model, timeout, ctx := ns.cfg.API, r.model, p.cfg.Timeout, p.runCtx
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		cctx, cancel := context.WithTimeout(ctx, timeout)
		u, err := api.Endpoint(cctx, model)
		cancel()
		if err == nil && u == "" {
			err = errors.New("empty endpoint answer")
		}
		select {
		case p.resolved <- resolveResult{key: ns, model: model, answer: endpointAnswer{url: u, err: err}, reply: r.reply, mark: mk}:
		case <-ctx.Done():
		}
	}()
}

// applyMark lists model on ns as MarkLoaded says.
func (p *Poller) applyMark(ns *nodeState, model string, mk mark) {
	ns.marks[model] = mk
	p.setModels(ns, upsertLoaded(ns.models, model, mk))
}

func (p *Poller) finishResolve(res resolveResult) {
	if ns, ok := p.nodes[res.key.cfg.Name]; ok && ns == res.key {
		p.applyMark(ns, res.model, res.mark)
		p.setEndpoint(ns, res.model, res.answer)
		p.publish()
	}
	// The load itself succeeded; an unresolvable endpoint is logged and
	// shows as "" in the snapshot, which routing answers with a 503.
	res.reply <- nil
}

// publish builds a fresh immutable Snapshot from the owner's state. Nodes
// whose state did not change since the last publish keep their *Node, and
// the model layout is derived from the last snapshot's: both cost what
// changed, not the fleet's size.
func (p *Poller) publish() {
	if p.order == nil {
		p.order = slices.SortedFunc(maps.Values(p.nodes), func(a, b *nodeState) int { return cmp.Compare(a.cfg.Name, b.cfg.Name) })
	}
	s := &Snapshot{Round: p.round, Taken: time.Now(), Nodes: make([]*Node, len(p.order))}
	for i, ns := range p.order {
		if ns.view == nil || ns.dirty {
			ns.view = ns.node(ns.view)
			ns.dirty = false
		}
		s.Nodes[i] = ns.view
	}
	var prevLayout *layout
	var prevNodes []*Node
	if p.published != nil {
		prevLayout, prevNodes = p.published.layout.Load(), p.published.Nodes
	}
	s.layout.Store(nextLayout(prevLayout, prevNodes, s.Nodes))
	p.published = s
	p.snap.Store(s)
	next := make(chan struct{})
	old := p.changed.Swap(&next)
	close(*old)
}

// node builds the published view of ns. prev is the view published before
// (nil if none): its Model entries, and its Models slice, are reused where
// they are identical to what would be built, so that an unchanged listing
// costs no allocation and the snapshot shares it.
func (ns *nodeState) node(prev *Node) *Node {
	n := &Node{
		Name:                ns.cfg.Name,
		Cluster:             ns.cfg.Cluster,
		Endpoint:            ns.cfg.Endpoint,
		Healthy:             ns.healthy,
		Suspect:             ns.suspect,
		ConsecutiveFailures: ns.failures,
		LastPoll:            ns.lastPoll,
		LastSuccess:         ns.lastSuccess,
		LastError:           ns.lastErr,
		Discovery:           ns.disc,
		Health:              ns.health,
		HealthAt:            ns.healthAt,
		ModelsAt:            ns.modelsAt,
	}
	var was []*Model
	if prev != nil {
		was = prev.Models
	}
	q := newQueues(ns.health)
	// reuse returns prev's entry for m when it is what would be built.
	reuse := func(i int, m *neuron.Model) *Model {
		if i >= len(was) || was[i].ID != m.ID {
			return nil
		}
		w := was[i]
		mh := q.of(m.ID)
		if w.InFlight != mh.InFlight || w.QueueDepth != mh.QueueDepth || w.Endpoint != ns.endpoints[m.ID] || !sameModel(&w.Model, m) {
			return nil
		}
		return w
	}
	// Models are sorted by ID on both sides, so an unchanged listing
	// matches position for position.
	same := prev != nil && len(was) == len(ns.models)
	for i := 0; same && i < len(ns.models); i++ {
		same = reuse(i, &ns.models[i]) != nil
	}
	if same {
		n.Models = was
		return n
	}
	n.Models = make([]*Model, len(ns.models))
	j := 0
	for i := range ns.models {
		m := &ns.models[i]
		for j < len(was) && was[j].ID < m.ID {
			j++
		}
		if w := reuse(j, m); w != nil {
			n.Models[i] = w
			continue
		}
		mh := q.of(m.ID)
		n.Models[i] = &Model{Model: *m, InFlight: mh.InFlight, QueueDepth: mh.QueueDepth, Endpoint: ns.endpoints[m.ID]}
	}
	return n
}

// queues looks up a model's live queue in a /health reading. A neuron
// reports a few models, so a linear scan beats building a map for each
// reading; a long list gets the map.
type queues struct {
	list []neuron.ModelHealth
	byID map[string]neuron.ModelHealth
}

func newQueues(h *neuron.Health) queues {
	if h == nil {
		return queues{}
	}
	if len(h.Models) <= 16 {
		return queues{list: h.Models}
	}
	q := queues{byID: make(map[string]neuron.ModelHealth, len(h.Models))}
	for _, mh := range h.Models {
		q.byID[mh.ID] = mh
	}
	return q
}

// of returns id's queue; of duplicate ids, the last listed counts.
func (q queues) of(id string) neuron.ModelHealth {
	if q.byID != nil {
		return q.byID[id]
	}
	for i := len(q.list) - 1; i >= 0; i-- {
		if q.list[i].ID == id {
			return q.list[i]
		}
	}
	return neuron.ModelHealth{}
}

// sameModel reports whether two /models entries are identical, pointed-to
// values compared, nil and empty slices told apart (they marshal
// differently in /debug/fleet). TestSameModelSeesEveryField fails when
// neuron.Model gains a field this does not compare.
func sameModel(a, b *neuron.Model) bool {
	return a.ID == b.ID && a.Harness == b.Harness && a.Status == b.Status &&
		sameSlice(a.Devices, b.Devices) && samePtr(a.VRAMUsedMB, b.VRAMUsedMB) &&
		sameSlice(a.Capabilities, b.Capabilities) && samePtr(a.ToolCall, b.ToolCall) &&
		samePtr(a.Reasoning, b.Reasoning) && samePtr(a.Limit, b.Limit) && samePtr(a.Servable, b.Servable)
}

func sameSlice[E comparable](a, b []E) bool {
	return (a == nil) == (b == nil) && slices.Equal(a, b)
}

func samePtr[T comparable](a, b *T) bool {
	if a == nil || b == nil {
		return a == b
	}
	return *a == *b
}
