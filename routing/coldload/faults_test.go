package coldload

import (
	"context"
	"fmt"
	"reflect"
	"testing"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/internal/neuron"
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

// An unload the neuron refuses (a 4xx: it is loading, a bad request) gives
// the claim back: the model is routable again, exactly as the neuron listed
// it. One whose outcome is unknown (a 5xx, a timeout, a 2xx that does not
// confirm it) keeps the model unroutable there until a /models listing
// requested after the failure; if that listing still shows it, it is
// routable again. The load's reservation goes either way.
func TestFailedUnloadGivesTheClaimBack(t *testing.T) {
	for _, tc := range []struct {
		name    string
		err     error
		unknown bool
	}{
		{"refused (409 loading)", &neuron.StatusError{Node: "beast", Op: "POST /models/unload", Status: 409, Body: "loading"}, false},
		{"refused (400)", &neuron.StatusError{Node: "beast", Op: "POST /models/unload", Status: 400}, false},
		{"500", &neuron.StatusError{Node: "beast", Op: "POST /models/unload", Status: 500}, true},
		{"garbage 200", fmt.Errorf("neuron: POST /models/unload: %w", neuron.ErrUnconfirmed), true},
		{"timeout", fmt.Errorf("neuron: POST /models/unload: %w", context.DeadlineExceeded), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer goleak.VerifyNone(t)
			snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)), ft.Res{ID: "r/b", VRAM: 20000}))
			r := newRig(t, Config{}, snap)
			defer r.close(t)
			r.neurons["beast"].unloadErr = tc.err

			res := receive(t, "the waiter", r.join(t, context.Background(), "org/big"))
			if res.err == nil || res.err.Status != 503 {
				t.Fatalf("waiter got (%q, %v), want a 503", res.node, res.err)
			}
			view := r.l.Commitments()
			entries := view.Entries()
			if !tc.unknown {
				if view.Blocked(r.snap().Node("beast"), "r/b") || len(entries) != 0 {
					t.Fatalf("ledger after a refused unload: %+v; want empty", entries)
				}
				return
			}
			if !view.Blocked(r.snap().Node("beast"), "r/b") || len(entries) != 1 || entries[0].State != "unload_unconfirmed" {
				t.Fatalf("ledger after an unload of unknown outcome: %+v; want r/b blocked, unconfirmed, and nothing else", entries)
			}
			if free := view.Free(r.snap().Node("beast")); free[0] != 21920 {
				t.Errorf("free VRAM %v; an unconfirmed unload frees nothing", free)
			}
			r.poll() // the neuron still lists it: the unload did not happen
			view = r.l.Commitments()
			if view.Blocked(r.snap().Node("beast"), "r/b") {
				t.Fatal("r/b still blocked after a listing requested after the failed unload shows it")
			}
			if d, err := routing.Decide(ft.TieredCatalogue(), r.snap(), view, "r/b"); err != nil || d.Node != "beast" {
				t.Fatalf("after the listing: %+v %v; want r/b routed to beast again", d, err)
			}
		})
	}
}
