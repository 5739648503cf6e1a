package routing

import (
	"context"
	"reflect"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/fleet"
	"github.com/helexa/cortex-extproc/neuron"
)

// hidingRig is a rig whose loader hides eviction victims through hide and
// records MarkLoaded calls in the event log.
func hidingRig(t *testing.T, snap *fleet.Snapshot, hide func(node, model string)) *rig {
	t.Helper()
	r := newRig(t, ColdLoadConfig{}, snap)
	r.close(t) // replaced below, with MarkUnloaded
	cat := tieredCatalogue()
	r.l = NewColdLoader(ColdLoadConfig{}, ColdLoadDeps{
		Catalogue: func() *catalogue.Catalogue { return cat },
		Fleet:     func() *fleet.Snapshot { return r.snap },
		Neuron: func(node string) neuron.API {
			if f := r.neurons[node]; f != nil {
				return f
			}
			return nil
		},
		MarkLoaded: func(_ context.Context, node, model string) error {
			r.events.add("mark loaded %s %s", node, model)
			return nil
		},
		MarkUnloaded: func(_ context.Context, node, model string) error {
			r.events.add("hide %s %s", node, model)
			hide(node, model)
			return nil
		},
		Usage:    r.usage,
		Observer: r.obs,
	})
	return r
}

// An eviction hides its victim from routing before unloading it, so no
// request is sent to a neuron that is losing the model.
func TestEvictionHidesTheVictimBeforeUnloading(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := snapshot(node("beast", gpus(dev{a100, 21920}),
		res{id: "r/a", vram: 20000}, res{id: "r/b", vram: 20000}, res{id: "r/c", vram: 20000}))
	r := hidingRig(t, snap, func(string, string) {})
	defer r.close(t)
	r.usage.Touch("beast", "r/a") // r/b and r/c were never used: r/b goes first, by name

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	want := []string{"hide beast r/b", "beast unload r/b", "beast load org/big", "mark loaded beast org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
}

// A request that took the victim between the eviction's in-flight check and
// the hide keeps it: the victim is put back and another one is evicted.
func TestEvictionSparesAVictimTakenWhileHiding(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := snapshot(node("beast", gpus(dev{a100, 21920}),
		res{id: "r/a", vram: 20000}, res{id: "r/b", vram: 20000}, res{id: "r/c", vram: 20000}))
	var lease Lease
	var r *rig
	var once atomic.Bool
	r = hidingRig(t, snap, func(node, model string) {
		if once.CompareAndSwap(false, true) {
			lease = r.usage.Use(node, model) // routed on the snapshot before the hide
		}
	})
	defer r.close(t)
	r.usage.Touch("beast", "r/a")

	res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
	if res.err != nil || res.node != "beast" {
		t.Fatalf("waiter got (%q, %v), want beast", res.node, res.err)
	}
	want := []string{"hide beast r/b", "mark loaded beast r/b", "hide beast r/c", "beast unload r/c", "beast load org/big", "mark loaded beast org/big"}
	if got := r.events.all(); !reflect.DeepEqual(got, want) {
		t.Errorf("calls %v, want %v", got, want)
	}
	lease.Release()
}

// Route decided on one fleet view and, by the time it counted itself in
// flight, an eviction had hidden that replica: it decides again.
func TestRouteRedecidesWhenItsReplicaWasHidden(t *testing.T) {
	cat := catalogue.New([]*catalogue.Profile{{ID: "m", Harness: "candle", VRAMMB: 1000}}, nil, "")
	withModel := func(busy int) *fleet.Model {
		return &fleet.Model{Model: neuron.Model{ID: "m", Status: neuron.StatusLoaded}, InFlight: busy, Endpoint: "http://x:1"}
	}
	before := &fleet.Snapshot{Nodes: []*fleet.Node{
		{Name: "a", Cluster: "neuron-a", Healthy: true, Models: []*fleet.Model{withModel(0)}},
		{Name: "b", Cluster: "neuron-b", Healthy: true, Models: []*fleet.Model{withModel(5)}},
	}}
	after := &fleet.Snapshot{Nodes: []*fleet.Node{
		{Name: "a", Cluster: "neuron-a", Healthy: true},
		{Name: "b", Cluster: "neuron-b", Healthy: true, Models: []*fleet.Model{withModel(5)}},
	}}
	var reads atomic.Int64
	usage := NewUsage()
	r := NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot {
		if reads.Add(1) == 1 {
			return before
		}
		return after
	}, nil, usage)

	tg, w, err := r.Route("m")
	if err != nil || w != nil || tg.Node != "b" {
		t.Fatalf("Route = %+v, %v, %v; want b, the replica still listed", tg, w, err)
	}
	if n := usage.InFlight("a", "m"); n != 0 {
		t.Errorf("%d in flight left on the hidden replica", n)
	}
	tg.Release()
}
