package fleet

import (
	"errors"
	"slices"
	"testing"
	"time"
)

// A finished cold load is listed with the devices and VRAM it took, so that
// placement and eviction see the node as it now is, not as the last poll
// saw it before the load.
func TestMarkLoadedRecordsDevicesAndVRAM(t *testing.T) {
	api := newFakeAPI(loaded("old"))
	api.endpoints["fresh"] = "http://10.0.0.1:8002"
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	if err := h.p.MarkLoaded(h.ctx, "a", "fresh", []int{1, 2}, 20000); err != nil {
		t.Fatal(err)
	}
	m := h.node("a").Model("fresh")
	if m == nil || !slices.Equal(m.Devices, []int{1, 2}) || m.VRAMUsedMB == nil || *m.VRAMUsedMB != 20000 {
		t.Fatalf("after MarkLoaded: %+v; want devices [1 2], 20000 MB", m)
	}
	// A model the neuron already listed keeps what it reported when the
	// load does not say.
	if err := h.p.MarkLoaded(h.ctx, "a", "old", nil, 0); err != nil {
		t.Fatal(err)
	}
	if m := h.node("a").Model("old"); m.VRAMUsedMB != nil {
		t.Fatalf("MarkLoaded without figures invented VRAM: %+v", m)
	}
}

// The snapshot says when its readings were requested: the ledger keeps a
// load or unload the neuron confirmed after that instant.
func TestReadingsCarryTheirRequestTime(t *testing.T) {
	api := newFakeAPI(loaded("m"))
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	before := time.Now()
	n := h.poll(1).Node("a")
	if n.HealthAt.Before(before) || n.ModelsAt.Before(n.HealthAt) {
		t.Fatalf("HealthAt %v ModelsAt %v, poll started after %v", n.HealthAt, n.ModelsAt, before)
	}
	// A failed /health keeps the older reading and its time.
	api.set(func(f *fakeAPI) { f.healthErr = errors.New("timeout") })
	n2 := h.poll(1).Node("a")
	if !n2.HealthAt.Equal(n.HealthAt) || !n2.ModelsAt.After(n.ModelsAt) {
		t.Fatalf("after a failed /health: HealthAt %v (was %v), ModelsAt %v (was %v)", n2.HealthAt, n.HealthAt, n2.ModelsAt, n.ModelsAt)
	}
}

// A model MarkLoaded reports is listed only with its endpoint: listed
// without one, requests for it would get a 503 meanwhile (they join the
// load's flight instead, which waits for MarkLoaded).
func TestMarkLoadedListsTheModelWithItsEndpoint(t *testing.T) {
	api := newFakeAPI()
	api.endpoints["fresh"] = "http://10.0.0.1:8002"
	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	api.set(func(f *fakeAPI) { f.endpointGate, f.endpointEntered = gate, entered })
	h := start(t, PollerConfig{}, Neuron{Name: "a", Endpoint: "http://a:1", API: api})
	done := make(chan error, 1)
	go func() { done <- h.p.MarkLoaded(h.ctx, "a", "fresh", []int{0}, 8000) }()
	<-entered
	if m := h.node("a").Model("fresh"); m != nil {
		t.Fatalf("listed before its endpoint is known: %+v", m)
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if m := h.node("a").Model("fresh"); m == nil || m.Endpoint != "http://10.0.0.1:8002" {
		t.Fatalf("after MarkLoaded: %+v, want listed with its endpoint", m)
	}
}
