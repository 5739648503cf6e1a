package coldload

import (
	"context"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"
)

// The ledger's figure is the last reading less loads in progress and loads
// finished since that reading, plus evictions finished since; a reading
// requested after an event reflects it, so the event no longer counts.
// Never below 0, never above the device's total.
func TestLedgerFree(t *testing.T) {
	l := NewLedger(nil)
	n := ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000), ft.Dev(ft.RTX4090, 24000)))
	n.HealthAt = time.Now()

	loading := l.add(routing.Commitment{Kind: routing.CommitLoading, Node: "beast", Model: "a", Devices: []int{0}, PerDeviceMB: 8000})
	if got := l.View().Free(n); got[0] != 12000 || got[1] != 24000 {
		t.Fatalf("with a load in progress: %v, want [12000 24000]", got)
	}
	finished := time.Now().Add(time.Millisecond)
	l.done(loading, finished)
	if got := l.View().Free(n); got[0] != 12000 {
		t.Fatalf("load finished after the reading: %v, want 12000 on gpu0", got)
	}
	claim := l.add(routing.Commitment{Kind: routing.CommitClaimed, Node: "beast", Model: "old", Devices: []int{1}, PerDeviceMB: 20000})
	if got := l.View().Free(n); got[1] != 24000 {
		t.Fatalf("an eviction not yet done frees nothing: %v", got)
	}
	l.done(claim, finished)
	if got := l.View().Free(n); got[1] != ft.RTX4090 {
		t.Fatalf("evicted 20000 on a card with 24000 free: %v, want the card's total %d", got, ft.RTX4090)
	}

	// A reading requested after both events reflects them.
	n2 := ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 12000), ft.Dev(ft.RTX4090, 24564)))
	n2.HealthAt, n2.ModelsAt = finished.Add(time.Millisecond), finished.Add(time.Millisecond)
	if got := l.View().Free(n2); got[0] != 12000 || got[1] != ft.RTX4090 {
		t.Fatalf("newer reading: %v, want it as is", got)
	}
	l.Reconcile(ft.Snapshot(n2))
	if e := l.View().Entries(); len(e) != 0 {
		t.Fatalf("after a reconciling poll the ledger still holds %+v", e)
	}

	// Over-commitment shows as 0, not as a negative figure.
	l.add(routing.Commitment{Kind: routing.CommitLoading, Node: "beast", Model: "b", Devices: []int{0}, PerDeviceMB: 30000})
	if got := l.View().Free(n2); got[0] != 0 {
		t.Fatalf("over-committed device: %v, want 0", got[0])
	}
}

// An evicted model is not routable until a /models listing requested after
// the unload; one loaded again after its eviction is routable at once.
func TestLedgerBlocked(t *testing.T) {
	l := NewLedger(nil)
	n := ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 0)))
	claim := l.add(routing.Commitment{Kind: routing.CommitClaimed, Node: "beast", Model: "m", Devices: []int{0}, PerDeviceMB: 1000})
	if !l.View().Blocked(n, "m") || l.View().Blocked(n, "other") {
		t.Fatal("a claimed model must be blocked, and only it")
	}
	at := time.Now()
	l.done(claim, at)
	if !l.View().Blocked(n, "m") {
		t.Fatal("evicted, listing older than the unload: must stay blocked")
	}
	n.ModelsAt = at.Add(time.Millisecond)
	if l.View().Blocked(n, "m") {
		t.Fatal("a listing requested after the unload is the truth")
	}
	n.ModelsAt = time.Time{}
	again := l.add(routing.Commitment{Kind: routing.CommitLoading, Node: "beast", Model: "m", Devices: []int{0}, PerDeviceMB: 1000})
	l.done(again, time.Now())
	if l.View().Blocked(n, "m") {
		t.Fatal("loaded again after its eviction: must be routable")
	}
}

// A load goes to the devices that have room and sends exactly those; the
// residents evicted for it are on those devices.
func TestPlaceChoosesDevicesWithRoom(t *testing.T) {
	cat := ft.TieredCatalogue()
	cases := []struct {
		name      string
		model     string
		node      *fleetNode
		devices   []int
		evict     []string
		perDevice int64
	}{
		{"one device: the empty card, not the first", "org/small",
			&fleetNode{ft.GPUs(ft.Dev(ft.RTX4090, 4576), ft.Dev(ft.RTX4090, 24564)), nil}, []int{1}, nil, 8000},
		{"tensor parallel: the two cards with room", "org/tp2",
			&fleetNode{ft.GPUs(ft.Dev(ft.RTX4090, 1000), ft.Dev(ft.RTX4090, 24564), ft.Dev(ft.RTX4090, 24564)), nil}, []int{1, 2}, nil, 22500},
		{"eviction frees the chosen card", "org/big",
			&fleetNode{ft.GPUs(ft.Dev(ft.A100, 30000), ft.Dev(ft.A100, 20000)),
				[]ft.Res{{ID: "r/on0", VRAM: 50000, Devs: []int{0}}, {ID: "r/on1", VRAM: 5000, Devs: []int{1}}}},
			[]int{0}, []string{"r/on0"}, 40000},
		{"only residents on the chosen cards are evicted", "org/tp2",
			&fleetNode{ft.GPUs(ft.Dev(ft.RTX4090, 2000), ft.Dev(ft.RTX4090, 2000), ft.Dev(ft.RTX4090, 24564)),
				[]ft.Res{{ID: "r/a0", VRAM: 22000, Devs: []int{0}}, {ID: "r/b1", VRAM: 22000, Devs: []int{1}}}},
			[]int{2, 0}, []string{"r/a0"}, 22500},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := ft.Node("beast", c.node.devs, c.node.models...)
			plan, err := routing.Place(cat, ft.Snapshot(n), nil, cat.Profile(c.model), routing.PlacementState{})
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(plan.Spec.Devices, c.devices) || !slices.Equal(plan.Evict, c.evict) || plan.PerDeviceMB != c.perDevice {
				t.Fatalf("plan devices %v evict %v %d MB each; want %v evict %v %d MB", plan.Spec.Devices, plan.Evict, plan.PerDeviceMB, c.devices, c.evict, c.perDevice)
			}
		})
	}
}

type fleetNode struct {
	devs   []ft.Device
	models []ft.Res
}

// A model the neuron reloads is never a victim, and says why.
func TestPlaceNeverEvictsAReloadingModel(t *testing.T) {
	cat := ft.TieredCatalogue()
	n := ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 4000)), ft.Res{ID: "r/reload", VRAM: 20000, Status: neuron.StatusReloading})
	_, err := routing.Place(cat, ft.Snapshot(n), nil, cat.Profile("org/small"), routing.PlacementState{})
	if err == nil || err.RetryAfter != 5 || !strings.Contains(err.Message, "r/reload (reloading)") {
		t.Fatalf("got %v, want 503 naming the reloading model", err)
	}
}

// A model that can never fit (the k largest eligible cards' totals are too
// small) is not feasible there, with the numbers; with no other node it is
// no_feasible_neuron, without Retry-After.
func TestNeverFitsIsNotFeasible(t *testing.T) {
	cat := ft.TieredCatalogue()
	small := ft.Node("rig", ft.GPUs(ft.Dev(16384, 16384)))
	ok, why := routing.Feasible(cat.Profile("org/big"), small)
	if ok || !strings.Contains(why, "needs 40000 MB on one device, its largest holds 16384 MB") {
		t.Fatalf("Feasible = %v %q", ok, why)
	}
	_, err := routing.Place(cat, ft.Snapshot(small), nil, cat.Profile("org/big"), routing.PlacementState{})
	if err == nil || err.Code != "no_feasible_neuron" || err.RetryAfter != 0 || !strings.Contains(err.Message, "can never fit") {
		t.Fatalf("got %v, want no_feasible_neuron without Retry-After", err)
	}
	// Fits in total, just not now: that is "retry later".
	full := ft.Node("rig", ft.GPUs(ft.Dev(ft.A100, 1000)), ft.Res{ID: "r/busy", VRAM: 80000, InFlight: 1})
	_, err = routing.Place(cat, ft.Snapshot(full), nil, cat.Profile("org/big"), routing.PlacementState{})
	if err == nil || err.RetryAfter != 5 {
		t.Fatalf("got %v, want 503 Retry-After 5", err)
	}
}

// A fresh load is pinned (in flight) from the moment it is listed until its
// last waiter holds its own lease: a load planned in that window on the same
// node does not evict it, whatever the clock says about its last use.
func TestFreshLoadIsPinnedUntilItsWaitersAreRouted(t *testing.T) {
	defer goleak.VerifyNone(t)
	// Room for one of org/big and org/rival (equal rank: each may displace
	// the other) beside r/fill.
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 41920)), ft.Res{ID: "r/fill", VRAM: 40000}))
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	f, err := r.l.Join("org/big")
	if err != nil {
		t.Fatal(err)
	}
	// The load finishes; the waiter has not been routed yet.
	if got := receive(t, "MarkLoaded", r.marked); got != "beast org/big" {
		t.Fatalf("marked %q", got)
	}
	<-f.(*Flight).f.done
	if n := r.usage.InFlight("beast", "org/big"); n != 1 {
		t.Fatalf("fresh model in flight %d before its waiter is routed, want 1 (the pin)", n)
	}
	r.poll() // the fleet lists it now, with last access "now"
	if r.usage.LastAccess("beast", "org/big").IsZero() {
		t.Fatal("a fresh load must count as used now")
	}
	r.usage.Touch("beast", "r/fill") // used more recently than the fresh model
	st := routing.PlacementState{InFlight: r.usage.InFlight, LastAccess: r.usage.LastAccess}
	cat := ft.TieredCatalogue()
	plan, perr := routing.Place(cat, r.snap(), r.l.Commitments(), cat.Profile("org/rival"), st)
	if perr != nil || !slices.Equal(plan.Evict, []string{"r/fill"}) {
		t.Fatalf("plan for a rival: %+v %v; want r/fill evicted, the fresh model spared", plan, perr)
	}
	// The waiter takes its own lease and gives its slot back: the pin ends.
	var lease routing.Lease
	r.usage.Use("beast", "org/big", &lease)
	f.Release()
	if n := r.usage.InFlight("beast", "org/big"); n != 1 {
		t.Fatalf("in flight %d after the waiter was routed, want 1 (its own lease)", n)
	}
	lease.Release()
	if n := r.usage.InFlight("beast", "org/big"); n != 0 {
		t.Fatalf("in flight %d at the end, want 0", n)
	}
	// Now it is an ordinary idle model, and the least recently used.
	r.usage.Touch("beast", "r/fill")
	plan, perr = routing.Place(cat, r.snap(), r.l.Commitments(), cat.Profile("org/rival"), st)
	if perr != nil || !slices.Equal(plan.Evict, []string{"org/big"}) {
		t.Fatalf("plan once the waiter is routed: %+v %v; want org/big evicted", plan, perr)
	}
}

// A flight whose every waiter left before it finished pins nothing.
func TestFreshLoadWithoutWaitersIsNotPinned(t *testing.T) {
	defer goleak.VerifyNone(t)
	r := newRig(t, Config{}, ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 81920)))))
	defer r.close(t)
	gate := make(chan struct{})
	r.neurons["beast"].gate = gate
	f, err := r.l.Join("org/big")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := waitFlight(f, ctx); err == nil {
		t.Fatal("a cancelled wait returned no error")
	}
	close(gate)
	<-f.(*Flight).f.done
	// The flight drops its pin right after it finishes (finish closes done
	// first, so that a waiter leaving at that moment and the flight never
	// both leave the pin to the other).
	eventually(t, "the pin of a load nobody waits for released", func() bool {
		return r.usage.InFlight("beast", "org/big") == 0
	})
}
