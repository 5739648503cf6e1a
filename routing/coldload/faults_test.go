package coldload

import (
	"context"
	"reflect"
	"testing"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/routing"
	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"
)

// An eviction claims its victim when the load is planned: from then on no
// request is routed to it and no other plan counts it, while the fleet view
// keeps it intact (devices, VRAM, servability) until the neuron says it is
// gone.
func TestEvictionClaimsTheVictim(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)),
		ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}))
	r := newRig(t, Config{}, snap)
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
	if d, _ := routing.Decide(ft.TieredCatalogue(), r.snap(), view, "r/b"); d.Step == routing.StepLoaded && d.Node == "beast" {
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
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	r.usage.Touch("beast", "r/a")
	var lease routing.Lease
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
	r := newRig(t, Config{}, snap)
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
