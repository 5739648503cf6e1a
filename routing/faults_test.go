package routing

import (
	"context"
	"reflect"
	"sync/atomic"
	"testing"

	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// An eviction claims its victim when the load is planned: from then on no
// request is routed to it and no other plan counts it, while the fleet view
// keeps it intact (devices, VRAM, servability) until the neuron says it is
// gone.
func TestEvictionClaimsTheVictim(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}))
	r := newRig(t, ColdLoadConfig{}, snap)
	defer r.close(t)
	gate, started := make(chan struct{}), make(chan string, 1)
	r.neurons["beast"].gate, r.neurons["beast"].started = gate, started
	r.usage.Touch("beast", "r/a") // r/b and r/c were never used: r/b goes first, by name

	done := r.join(t, context.Background(), "org/big")
	receive(t, "the load", started)
	view := r.l.Commitments()
	n := r.snap().Node("beast")
	if !view.Blocked(n, "r/b") || view.Blocked(n, "r/c") {
		t.Fatalf("claims: r/b %v r/c %v; want only r/b claimed", view.Blocked(n, "r/b"), view.Blocked(n, "r/c"))
	}
	if m := n.Model("r/b"); m == nil || m.VRAMUsedMB == nil || len(m.Devices) == 0 {
		t.Fatalf("the fleet view lost the victim's entry: %+v", m)
	}
	if d, _ := Decide(ft.TieredCatalogue(), r.snap(), view, "r/b"); d.Step == StepLoaded && d.Node == "beast" {
		t.Fatal("a request was routed to a model being evicted")
	}
	close(gate)
	if res := receive(t, "the waiter", done); res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	want := []string{"beast unload r/b", "beast load org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
}

// A victim with a request in flight through us is never evicted: the plan
// takes the next least recently used model instead.
func TestEvictionSparesAModelInFlight(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}))
	r := newRig(t, ColdLoadConfig{}, snap)
	defer r.close(t)
	r.usage.Touch("beast", "r/a")
	var lease Lease
	r.usage.Use("beast", "r/b", &lease) // a request is being answered by r/b
	defer lease.Release()

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	want := []string{"beast unload r/c", "beast load org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
}

// An unload that fails gives the claim back: the model is routable again,
// exactly as the neuron listed it, with nothing to restore.
func TestFailedUnloadGivesTheClaimBack(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)), ft.Res{ID: "r/b", VRAM: 20000}))
	r := newRig(t, ColdLoadConfig{}, snap)
	defer r.close(t)
	r.neurons["beast"].unloadErr = errUnload

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err == nil || res.err.Status != 503 {
		t.Fatalf("waiter got (%q, %v), want a 503", res.node, res.err)
	}
	view := r.l.Commitments()
	if view.Blocked(r.snap().Node("beast"), "r/b") || len(view.Entries()) != 0 {
		t.Fatalf("ledger after a failed unload: %+v; want empty", view.Entries())
	}
}

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
	ledger := NewLedger(nil)
	before := ledger.View()
	ledger.add(commitment{kind: commitClaimed, node: "a", model: "m"})
	after := ledger.View()
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
