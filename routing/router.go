package routing

import (
	"context"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
)

// Target is the neuron a request goes to. It is a plain value: the
// request's in-flight count is the Lease its holder passed to Route.
type Target struct {
	Requested string // model the client named
	Model     string // concrete id
	Node      string
	Cluster   string // Envoy cluster
	Endpoint  string // inference base URL
	ColdStart bool   // the request triggered or waited on a load
	Step      Step
}

// Router is the routing entry point for the ext_proc server: it reads the
// current catalogue, ledger and fleet snapshots, decides, and hands step 5
// to the cold-load scheduler.
type Router struct {
	catalogue func() *catalogue.Catalogue
	fleet     func() *fleet.Snapshot
	loader    ColdLoads
	usage     *Usage
	ledger    func() *Commitments
}

// ColdLoads is the cold-load scheduler as the Router uses it
// (routing/coldload.Loader): single-flight loads and their ledger.
type ColdLoads interface {
	// Commitments is the ledger's current view; never nil.
	Commitments() *Commitments
	// Join starts a load of model (a concrete id in the catalogue) or
	// joins the one in progress. An error is answered at once, before the
	// caller tells Envoy to wait.
	Join(model string) (Flight, *apierr.Error)
	// Preview is Join without its effects: the node of a load in
	// progress that a request would join, or the plan a new one would
	// follow.
	Preview(model string) (plan *Plan, joins string, err *apierr.Error)
}

// Flight is one request's place in a cold load.
type Flight interface {
	// Wait blocks until the load finished, answering the node it is on,
	// or until ctx is done (a retryable 503; the load goes on).
	Wait(ctx context.Context) (node string, err *apierr.Error)
	// Release gives the waiter slot back, once the request holds its own
	// lease or is gone; calls after the first do nothing.
	Release()
}

// NewRouter builds a Router. loader may be nil, in which case a model that
// is only in the catalogue answers 503.
func NewRouter(cat func() *catalogue.Catalogue, fl func() *fleet.Snapshot, loader ColdLoads, usage *Usage) *Router {
	if usage == nil {
		usage = NewUsage()
	}
	r := &Router{catalogue: cat, fleet: fl, loader: loader, usage: usage, ledger: func() *Commitments { return nil }}
	if loader != nil {
		r.ledger = loader.Commitments
	}
	return r
}

// Waiter is a request held for a cold load.
type Waiter interface {
	// Model is the concrete id being loaded.
	Model() string
	// Wait blocks until the load finished or ctx is done, then routes to the
	// node the model was loaded on, counting the request in flight there
	// into lease. It always gives up its waiter slot.
	Wait(ctx context.Context, lease *Lease) (Target, *apierr.Error)
	// Leave gives up the waiter slot without waiting (the stream is gone).
	Leave()
}

// Pending is the Waiter for a cold-load flight.
type Pending struct {
	r      *Router
	d      Decision
	flight Flight
}

// Route decides for one request. A routed request is counted in flight on
// its target into lease, which the caller owns and releases once the
// upstream answered. When the model must be cold-loaded it returns a
// Waiter (nil otherwise); the caller first tells Envoy to wait longer,
// then calls Wait.
func (r *Router) Route(requested string, lease *Lease) (Target, Waiter, *apierr.Error) {
	for attempt := 1; ; attempt++ {
		view := r.ledger()
		snap := r.fleet()
		t, w, err := r.route(snap, view, requested, lease)
		// An eviction claims its victim, then checks that nothing is in
		// flight on it; we count as in flight now, so if the ledger changed
		// since we decided, make sure our replica is not claimed.
		if err != nil || w != nil || attempt == 3 || !r.claimedSince(view, snap, t.Node, t.Model) {
			return t, w, err
		}
		lease.Release()
	}
}

// claimedSince reports whether an eviction claimed model on node after view.
func (r *Router) claimedSince(view *Commitments, snap *fleet.Snapshot, node, model string) bool {
	cur := r.ledger()
	if cur == view {
		return false
	}
	n := snap.Node(node)
	return n != nil && cur.Blocked(n, model)
}

func (r *Router) route(snap *fleet.Snapshot, view *Commitments, requested string, lease *Lease) (Target, Waiter, *apierr.Error) {
	d, err := Decide(r.catalogue(), snap, view, requested)
	if err != nil {
		return Target{Requested: requested, Model: d.Model}, nil, err
	}
	if d.Step == StepColdLoad {
		if r.loader == nil {
			return Target{Requested: requested, Model: d.Model}, nil,
				apierr.Unavailable(5, "model %q is in the catalogue but loaded nowhere, and cold loads are disabled", d.Model).WithReason(apierr.ReasonColdLoadsDisabled)
		}
		f, err := r.loader.Join(d.Model)
		if err != nil {
			return Target{Requested: requested, Model: d.Model}, nil, err
		}
		return Target{}, &Pending{r: r, d: d, flight: f}, nil
	}
	r.usage.Use(d.Node, d.Model, lease)
	return target(d), nil, nil
}

// Model reports the concrete id a pending request waits for.
func (p *Pending) Model() string { return p.d.Model }

// Leave implements Waiter.
func (p *Pending) Leave() { p.flight.Release() }

// Wait implements Waiter. The waiter slot is given back only once the
// request holds its own lease: until then the flight's own lease keeps the
// fresh model from being evicted (docs/cold-loads.md).
func (p *Pending) Wait(ctx context.Context, lease *Lease) (Target, *apierr.Error) {
	defer p.flight.Release()
	d := p.d
	failed := Target{Requested: d.Requested, Model: d.Model, ColdStart: true}
	node, err := p.flight.Wait(ctx)
	if err != nil {
		return failed, err
	}
	view := p.r.ledger()
	snap := p.r.fleet()
	n := snap.Node(node)
	if n == nil {
		return failed, apierr.Unavailable(5, "model %q was loaded on %s, which has since left the fleet; retry", d.Model, node).WithReason(apierr.ReasonNodeGone)
	}
	m := n.Model(d.Model)
	if m == nil || m.Endpoint == "" {
		return failed, apierr.Unavailable(2, "model %q was loaded on %s but its inference endpoint could not be resolved; retry shortly", d.Model, node).WithReason(apierr.ReasonEndpointUnresolved)
	}
	d.Node, d.Cluster, d.Endpoint = n.Name, n.Cluster, m.Endpoint
	p.r.usage.Use(d.Node, d.Model, lease)
	if view.Blocked(n, d.Model) || p.r.claimedSince(view, snap, d.Node, d.Model) { // see Route
		lease.Release()
		return failed, apierr.Unavailable(2, "model %q was evicted from %s right after loading; retry", d.Model, node).WithReason(apierr.ReasonEvictedAfterLoad)
	}
	return target(d), nil
}

func target(d Decision) Target {
	return Target{
		Requested: d.Requested,
		Model:     d.Model,
		Node:      d.Node,
		Cluster:   d.Cluster,
		Endpoint:  d.Endpoint,
		ColdStart: d.ColdStart,
		Step:      d.Step,
	}
}

// LastAccess is when a request was last routed to model on node (zero if never).
func (r *Router) LastAccess(node, model string) time.Time { return r.usage.LastAccess(node, model) }

// Explanation is what a request for a model would get, decided by the
// same code as Route, without loading, evicting or counting anything.
type Explanation struct {
	Decision Decision
	// Plan is where a cold load would go and what it would evict (nil
	// unless Decision.Step is StepColdLoad and it can be placed).
	Plan *Plan
	// Joins names the node of a load of this model already in progress,
	// which the request would wait for instead of placing its own.
	Joins string
	Err   *apierr.Error
}

// Explain is a dry run of Route for `cortex-extproc route`.
func (r *Router) Explain(requested string) Explanation {
	view := r.ledger() // before the snapshot: see Place
	snap := r.fleet()
	d, err := Decide(r.catalogue(), snap, view, requested)
	x := Explanation{Decision: d, Err: err}
	if err != nil || d.Step != StepColdLoad {
		return x
	}
	if r.loader == nil {
		x.Err = apierr.Unavailable(5, "model %q is in the catalogue but loaded nowhere, and cold loads are disabled", d.Model).WithReason(apierr.ReasonColdLoadsDisabled)
		return x
	}
	x.Plan, x.Joins, x.Err = r.loader.Preview(d.Model)
	return x
}
