package routing

import (
	"sync/atomic"
	"testing"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Route decided on one ledger view and, by the time it counted itself in
// flight, an eviction had claimed that replica: it decides again.
func TestRouteRedecidesWhenItsReplicaWasClaimed(t *testing.T) {
	cat := catalogue.New([]*catalogue.Profile{{ID: "m", Harness: "candle", VRAMMB: 1000}}, nil, "")
	withModel := func(busy int) *fleet.Model {
		return &fleet.Model{Model: neuron.Model{ID: "m", Status: neuron.StatusLoaded}, InFlight: busy, Endpoint: "http://x:1"}
	}
	snap := &fleet.Snapshot{Nodes: []*fleet.Node{
		{Name: "a", Cluster: "neuron-a", Healthy: true, Models: []*fleet.Model{withModel(0)}},
		{Name: "b", Cluster: "neuron-b", Healthy: true, Models: []*fleet.Model{withModel(5)}},
	}}
	before := NewCommitments(nil)
	after := NewCommitments([]Commitment{{Kind: CommitClaimed, Node: "a", Model: "m"}})
	var reads atomic.Int64
	usage := NewUsage()
	r := NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, usage)
	r.ledger = func() *Commitments {
		if reads.Add(1) == 1 {
			return before
		}
		return after
	}

	var lease Lease
	tg, w, err := r.Route("m", &lease)
	if err != nil || w != nil || tg.Node != "b" {
		t.Fatalf("Route = %+v, %v, %v; want b, the replica not claimed", tg, w, err)
	}
	if n := usage.InFlight("a", "m"); n != 0 {
		t.Errorf("%d in flight left on the claimed replica", n)
	}
	if n := usage.InFlight("b", "m"); n != 1 {
		t.Errorf("%d in flight on the chosen replica, want 1", n)
	}
	lease.Release()
}
