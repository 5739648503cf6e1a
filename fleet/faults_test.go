package fleet

import (
	"testing"

	"github.com/helexa/cortex-extproc/neuron"
)

// An eviction hides its victim at once, and polls taken while the neuron is
// still unloading (they list it resident) do not bring it back: routing
// there would reach a neuron that is about to lose the model.
func TestMarkUnloadedHidesUntilTheNeuronConfirms(t *testing.T) {
	api := newFakeAPI(loaded("victim"), loaded("keep"))
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})

	if err := h.p.MarkUnloaded(h.ctx, "a", "victim"); err != nil {
		t.Fatal(err)
	}
	if h.node("a").Model("victim") != nil || h.node("a").Model("keep") == nil {
		t.Fatal("MarkUnloaded did not hide exactly the victim")
	}
	// The unload is still running: the neuron lists it resident.
	if h.poll(2).Node("a").Model("victim") != nil {
		t.Fatal("a poll taken during the unload put the victim back")
	}
	// The neuron confirms: the hide is over, and a later reload shows.
	api.set(func(f *fakeAPI) { f.models = []neuron.Model{loaded("keep")} })
	h.poll(1)
	api.set(func(f *fakeAPI) { f.models = []neuron.Model{loaded("keep"), loaded("victim")} })
	if h.poll(1).Node("a").Model("victim") == nil {
		t.Fatal("the model reloaded after a confirmed unload stays hidden")
	}
	if err := h.p.MarkUnloaded(h.ctx, "nope", "x"); err == nil {
		t.Error("MarkUnloaded on an unknown node: no error")
	}
}

// An eviction that did not happen is undone with MarkLoaded.
func TestMarkLoadedUndoesMarkUnloaded(t *testing.T) {
	api := newFakeAPI(loaded("victim"))
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if err := h.p.MarkUnloaded(h.ctx, "a", "victim"); err != nil {
		t.Fatal(err)
	}
	if err := h.p.MarkLoaded(h.ctx, "a", "victim"); err != nil {
		t.Fatal(err)
	}
	if m := h.node("a").Model("victim"); m == nil || m.Endpoint == "" {
		t.Fatalf("after MarkLoaded: %+v, want it listed with its endpoint", m)
	}
	if h.poll(2).Node("a").Model("victim") == nil {
		t.Fatal("a poll after MarkLoaded hid it again")
	}
}
