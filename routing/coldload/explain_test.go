package coldload

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/routing"
	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"
)

// Explain answers what Route would, from the same code, and leaves no
// trace: no load, no reservation, no claim, nothing counted in flight.
func TestExplainIsRouteWithoutEffects(t *testing.T) {
	defer goleak.VerifyNone(t)
	snap := ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 21920)), ft.Res{ID: "r/old", VRAM: 60000}), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 24564))))
	r := newRig(t, Config{}, snap)
	defer r.close(t)
	r.poll() // endpoints resolved
	cat := ft.TieredCatalogue()
	router := routing.NewRouter(func() *catalogue.Catalogue { return cat }, r.snap, r.l, r.usage)

	x := router.Explain("org/big") // 40000 MB: only beast, evicting r/old
	if x.Err != nil || x.Plan == nil || x.Plan.Node != "beast" || len(x.Plan.Evict) != 1 || x.Plan.Evict[0] != "r/old" {
		t.Fatalf("explain: %+v plan %+v", x, x.Plan)
	}
	if len(r.l.InProgress()) != 0 || len(r.l.Commitments().Entries()) != 0 || len(r.events.all()) != 0 {
		t.Fatalf("explain left effects: loads %v ledger %v calls %v", r.l.InProgress(), r.l.Commitments().Entries(), r.events.all())
	}
	if x := router.Explain("r/old"); x.Err != nil || x.Decision.Step != routing.StepLoaded || r.usage.InFlight("beast", "r/old") != 0 {
		t.Fatalf("explain of a loaded model: %+v, in flight %d", x, r.usage.InFlight("beast", "r/old"))
	}

	// The real thing goes where Explain said. The load is held until the
	// end, so that it is still in progress when it is looked at.
	gate := make(chan struct{})
	r.neurons["beast"].gate = gate
	defer close(gate)
	var lease routing.Lease
	_, w, err := router.Route("org/big", &lease)
	if err != nil || w == nil {
		t.Fatalf("route: %v %v", w, err)
	}
	if in := r.l.InProgress(); len(in) != 1 || in[0].Node != "beast" {
		t.Fatalf("load in progress %+v, want on beast", in)
	}
	if x := router.Explain("org/big"); x.Joins != "beast" || x.Plan != nil {
		t.Errorf("explain during the load: %+v, want it to join the load on beast", x)
	}
	w.Leave()
}
