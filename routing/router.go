package routing

import (
	"context"
	"time"

	"github.com/helexa/cortex-extproc/apierr"
	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/fleet"
)

// Target is the neuron a request goes to.
type Target struct {
	Requested string // model the client named
	Model     string // concrete id
	Node      string
	Cluster   string // Envoy cluster
	Endpoint  string // inference base URL
	ColdStart bool   // the request triggered or waited on a load
	Step      Step

	lease Lease
}

// Release ends this request's "in flight through us" count on the chosen
// (node, model); eviction never picks a model with requests in flight.
// Safe to call more than once and on a zero Target; a copy of a Target
// shares nothing with it, so release only the copy you keep.
func (t *Target) Release() { t.lease.Release() }

// Router is the routing entry point for the ext_proc server: it reads the
// current catalogue and fleet snapshots, decides, and hands step 5 to the
// ColdLoader.
type Router struct {
	catalogue func() *catalogue.Catalogue
	fleet     func() *fleet.Snapshot
	loader    *ColdLoader
	usage     *Usage
}

// NewRouter builds a Router. loader may be nil, in which case a model that
// is only in the catalogue answers 503.
func NewRouter(cat func() *catalogue.Catalogue, fl func() *fleet.Snapshot, loader *ColdLoader, usage *Usage) *Router {
	if usage == nil {
		usage = NewUsage()
	}
	return &Router{catalogue: cat, fleet: fl, loader: loader, usage: usage}
}

// Waiter is a request held for a cold load.
type Waiter interface {
	// Model is the concrete id being loaded.
	Model() string
	// Wait blocks until the load finished or ctx is done, then routes to the
	// node the model was loaded on. It always gives up its waiter slot.
	Wait(ctx context.Context) (Target, *apierr.Error)
}

// Pending is the Waiter for a ColdLoader flight.
type Pending struct {
	r      *Router
	d      Decision
	flight *Flight
}

// Route decides for one request. When the model must be cold-loaded it
// returns a Waiter (nil otherwise); the caller first tells Envoy to wait
// longer, then calls Wait.
func (r *Router) Route(requested string) (Target, Waiter, *apierr.Error) {
	for attempt := 1; ; attempt++ {
		snap := r.fleet()
		t, w, err := r.route(snap, requested)
		// An eviction hides its victim, then checks that nothing is in
		// flight on it; we count as in flight now, so if the fleet view
		// changed since we decided, make sure our replica is still listed.
		if err != nil || w != nil || attempt == 3 || r.fleet() == snap || listed(r.fleet(), t.Node, t.Model) {
			return t, w, err
		}
		t.Release()
	}
}

// listed reports whether snap lists model on node.
func listed(snap *fleet.Snapshot, node, model string) bool {
	n := snap.Node(node)
	return n != nil && n.Model(model) != nil
}

func (r *Router) route(snap *fleet.Snapshot, requested string) (Target, Waiter, *apierr.Error) {
	d, err := Decide(r.catalogue(), snap, requested)
	if err != nil {
		return Target{Requested: requested, Model: d.Model}, nil, err
	}
	if d.Step == StepColdLoad {
		if r.loader == nil {
			return Target{Requested: requested, Model: d.Model}, nil,
				apierr.Unavailable(5, "model %q is in the catalogue but loaded nowhere, and cold loads are disabled", d.Model)
		}
		f, err := r.loader.Join(d.Model)
		if err != nil {
			return Target{Requested: requested, Model: d.Model}, nil, err
		}
		return Target{}, &Pending{r: r, d: d, flight: f}, nil
	}
	return r.target(d), nil, nil
}

// Model reports the concrete id a pending request waits for.
func (p *Pending) Model() string { return p.d.Model }

// Wait implements Waiter.
func (p *Pending) Wait(ctx context.Context) (Target, *apierr.Error) {
	node, err := p.flight.Wait(ctx)
	if err != nil {
		return Target{Requested: p.d.Requested, Model: p.d.Model, ColdStart: true}, err
	}
	d := p.d
	snap := p.r.fleet()
	n := snap.Node(node)
	if n == nil {
		return Target{Requested: d.Requested, Model: d.Model, ColdStart: true},
			apierr.Unavailable(5, "model %q was loaded on %s, which has since left the fleet; retry", d.Model, node)
	}
	m := n.Model(d.Model)
	if m == nil || m.Endpoint == "" {
		return Target{Requested: d.Requested, Model: d.Model, ColdStart: true},
			apierr.Unavailable(2, "model %q was loaded on %s but its inference endpoint could not be resolved; retry shortly", d.Model, node)
	}
	d.Node, d.Cluster, d.Endpoint = n.Name, n.Cluster, m.Endpoint
	t := p.r.target(d)
	if cur := p.r.fleet(); cur != snap && !listed(cur, d.Node, d.Model) { // see Route
		t.Release()
		return Target{Requested: d.Requested, Model: d.Model, ColdStart: true},
			apierr.Unavailable(2, "model %q was evicted from %s right after loading; retry", d.Model, node)
	}
	return t, nil
}

func (r *Router) target(d Decision) Target {
	return Target{
		Requested: d.Requested,
		Model:     d.Model,
		Node:      d.Node,
		Cluster:   d.Cluster,
		Endpoint:  d.Endpoint,
		ColdStart: d.ColdStart,
		Step:      d.Step,
		lease:     r.usage.Use(d.Node, d.Model),
	}
}

// LastAccess is when a request was last routed to model on node (zero if never).
func (r *Router) LastAccess(node, model string) time.Time { return r.usage.LastAccess(node, model) }
