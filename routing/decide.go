// Package routing decides which neuron serves a request (routing.md): a pure
// decision over immutable catalogue and fleet snapshots, placement and
// eviction for cold loads, the cold-load ledger's view, and leases. The
// Router ties them together and hands cold loads to the scheduler
// (routing/coldload) through ColdLoads. It knows GPUs and nothing about
// Envoy's protocol.
package routing

import (
	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Step names the routing.md step that produced a decision.
type Step int

// The decision steps of routing.md, in priority order.
const (
	StepLoaded    Step = 2 // a loaded replica
	StepUnloaded  Step = 4 // known to a neuron, not resident: it reloads lazily
	StepColdLoad  Step = 5 // catalogue only: place and load
	stepNotRouted Step = 0
)

// Decision is where a request goes, before any cold load.
type Decision struct {
	Requested string // the model the client named
	Model     string // concrete id after alias resolution
	Step      Step
	// Node, Cluster and Endpoint are empty for StepColdLoad until the load
	// has picked a node.
	Node      string
	Cluster   string
	Endpoint  string
	ColdStart bool
}

// Decide applies routing.md steps 0–6 to one request. It is pure: the same
// snapshots and model give the same answer. Step 5 is returned as
// StepColdLoad for the caller to hand to the cold-load scheduler. A location the
// ledger's view says is being evicted (or was, after the listing) is not
// routed to; view may be nil.
func Decide(cat *catalogue.Catalogue, snap *fleet.Snapshot, view *Commitments, requested string) (Decision, *apierr.Error) {
	// 0. Resolve the alias; everything after uses the concrete id.
	d := Decision{Requested: requested, Model: cat.ResolveAlias(requested)}

	// 1. No healthy node at all.
	if !snap.AnyHealthy() {
		if len(snap.Nodes) == 0 {
			return d, apierr.Unavailable(5, "no neurons are configured: add [[neurons]] entries to the cortex-extproc config").WithReason(apierr.ReasonNoNeurons)
		}
		return d, apierr.Unavailable(5, "no healthy neuron: all %d configured neurons are failing their polls (see /debug/fleet)", len(snap.Nodes)).WithReason(apierr.ReasonNoHealthy)
	}

	// 2. Loaded (or reloading) on healthy nodes and servable: least busy,
	// ties by node name (nodes are sorted by name, so the first minimum wins).
	var best *fleet.Node
	var bestModel *fleet.Model
	residentNoEndpoint := ""
	recovering := ""
	unservable, unservableWhy := "", ""
	var unloadedOn *fleet.Node
	var unloadedModel *fleet.Model
	for _, loc := range snap.Locations(d.Model) {
		n, m := loc.Node, loc.Model
		if !n.Healthy || view.Blocked(n, m.ID) {
			continue
		}
		switch {
		case m.Status.Resident():
			if !m.IsServable() {
				if unservable == "" {
					unservable, unservableWhy = n.Name, residentUnservable(n, m.ID)
				}
				continue
			}
			if m.Endpoint == "" {
				residentNoEndpoint = n.Name
				continue
			}
			if bestModel == nil || preferred(n, m, best, bestModel) {
				best, bestModel = n, m
			}
		case m.Status == neuron.StatusRecovering:
			if recovering == "" {
				recovering = n.Name
			}
		case m.Status == neuron.StatusUnloaded:
			if m.Endpoint != "" && (unloadedModel == nil || preferred(n, m, unloadedOn, unloadedModel)) {
				unloadedOn, unloadedModel = n, m
			} else if m.Endpoint == "" && residentNoEndpoint == "" {
				residentNoEndpoint = n.Name
			}
		}
	}
	if best != nil {
		d.Step, d.Node, d.Cluster, d.Endpoint = StepLoaded, best.Name, best.Cluster, bestModel.Endpoint
		return d, nil
	}

	// 3. Recovering somewhere: wait for it rather than race a second copy.
	if recovering != "" {
		return d, apierr.Unavailable(2, "model %q is recovering on %s; retry shortly", d.Model, recovering).WithReason(apierr.ReasonRecovering)
	}

	// A neuron pre-warming it at start-up is loading it: a second copy
	// elsewhere (or a lazy reload of another) would race that load.
	if node := prewarming(snap, d.Model); node != "" {
		return d, apierr.Unavailable(2, "model %q is being loaded by %s at start-up (pre-warming); retry shortly", d.Model, node).WithReason(apierr.ReasonPreWarming)
	}

	// 4. Known to a neuron but not resident: the neuron reloads it lazily.
	if unloadedOn != nil {
		d.Step, d.Node, d.Cluster, d.Endpoint, d.ColdStart = StepUnloaded, unloadedOn.Name, unloadedOn.Cluster, unloadedModel.Endpoint, true
		return d, nil
	}
	if residentNoEndpoint != "" {
		return d, apierr.Unavailable(2, "model %q is on %s but its inference endpoint could not be resolved (GET /models/{id}/endpoint failed); retry shortly, and check the neuron if it persists", d.Model, residentNoEndpoint).WithReason(apierr.ReasonEndpointUnresolved)
	}

	// 5. In the catalogue: cold-load it.
	if cat.Profile(d.Model) != nil {
		d.Step, d.ColdStart = StepColdLoad, true
		return d, nil
	}

	// It exists, it just cannot serve now: not a 404.
	if unservable != "" {
		return d, apierr.Unavailable(5, "model %q is resident on %s, but the neuron reports it cannot serve now (%s); retry shortly", d.Model, unservable, unservableWhy).WithReason(apierr.ReasonUnservable)
	}

	// 6. Unknown.
	if d.Model != requested {
		return d, apierr.ModelNotFound("model %q (alias %q) not found on any node and not in the catalogue", d.Model, requested)
	}
	return d, apierr.ModelNotFound("model %q not found on any node and not in the catalogue; GET /v1/models lists the models available", d.Model)
}

// preferred reports whether replica m on n is a better target than cur on
// curNode: a node no request has just failed on (not Suspect) first, then
// the least busy. A suspect node is still used when it holds the only
// replica: its re-poll, already running, decides within seconds whether it
// is gone.
func preferred(n *fleet.Node, m *fleet.Model, curNode *fleet.Node, cur *fleet.Model) bool {
	if n.Suspect != curNode.Suspect {
		return !n.Suspect
	}
	return m.Busyness() < cur.Busyness()
}

// prewarming is the healthy node whose /health activation lists model as
// pending or in progress, or "".
func prewarming(snap *fleet.Snapshot, model string) string {
	for _, n := range snap.Nodes {
		if !n.Healthy || n.Health == nil || n.Health.Activation == nil {
			continue
		}
		for _, id := range n.Health.Activation.Loading() {
			if id == model {
				return n.Name
			}
		}
	}
	return ""
}
