package service_test

// Cold loads as an operator's fleet produces them (issue 12): back-to-back
// and concurrent loads, multi-GPU devices, pre-warming, reloading and
// unservable residents, models that can never fit. A real service.Service,
// neuron simulators, and a client speaking ext_proc as Envoy does. The
// sequences that depended on timing before the VRAM ledger run 50 times.

import (
	"context"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

// ledgerCatalogue: a 10 GB model, a 20 GB tensor-parallel one, and two
// 16 GB models of equal rank (each may displace the other), so that two of
// them never share a 24 GB card.
const ledgerCatalogue = `
[[models]]
id = "M/Ten"
harness = "candle"
vram_mb = 10000

[[models]]
id = "M/TP"
harness = "candle"
vram_mb = 20000
min_devices = 2

[[models]]
id = "M/X"
harness = "candle"
vram_mb = 16000

[[models]]
id = "M/Y"
harness = "candle"
vram_mb = 16000
`

var ledgerSizes = map[string]int64{"M/Ten": 10000, "M/TP": 20000, "M/X": 16000, "M/Y": 16000}

// ledgerRepeats is how often the sequences that used to depend on timing
// are played.
const ledgerRepeats = 50

func ledgerSim(t *testing.T, name string, devices []int64, resident ...neuronsim.ModelSpec) *fxNeuron {
	t.Helper()
	return fxStartSim(t, neuronsim.Options{Name: name, Devices: devices, Models: resident, Sizes: ledgerSizes,
		LoadLatency: time.Millisecond, MaxInFlight: 64, MaxQueueDepth: 1000})
}

// simModel is model as the simulator lists it now, or nil.
func simModel(n *fxNeuron, id string) *neuron.Model {
	for _, m := range n.sim.Models() {
		if m.ID == id {
			return &m
		}
	}
	return nil
}

// A load goes to the devices that have room, not to the first eligible
// ones: gpu0 holds 20 GB of another model, so a 10 GB model goes to gpu1
// and a 2-device model to gpu1 and gpu2, with nothing evicted.
func TestColdLoadGoesToTheDevicesWithRoom(t *testing.T) {
	fxLeakCheck(t)
	for _, c := range []struct {
		name, alias string
		devices     []int64
		want        []int
	}{
		{"one device", "M/Ten", []int64{24576, 24576}, []int{1}},
		{"tensor parallel", "M/TP", []int64{24576, 24576, 24576}, []int{1, 2}},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := ledgerSim(t, "a", c.devices, neuronsim.ModelSpec{ID: "Other/Fill", VRAMMB: 20000, Devices: []int{0}})
			h := fxStart(t, fxConfig(t, ledgerCatalogue, a))
			r := h.route(t, c.alias)
			fxWantRouted(t, r, "a", c.alias)
			m := simModel(a, c.alias)
			if m == nil || !slices.Equal(m.Devices, c.want) {
				t.Fatalf("%s on the neuron: %+v, want devices %v", c.alias, m, c.want)
			}
			if n := a.sim.UnloadCalls(); n != 0 {
				t.Errorf("%d unloads, want none: the model fits beside Other/Fill", n)
			}
		})
	}
}

// Load X, then Y as soon as X answers, with a second node empty: Y goes to
// the empty node. The fleet view is not polled in between (a one-hour poll
// interval): only the ledger knows that X took node a's VRAM.
func TestColdLoadsBackToBackUseTheEmptyNode(t *testing.T) {
	fxLeakCheck(t)
	for i := range 10 {
		a := ledgerSim(t, "a", []int64{24000})
		b := ledgerSim(t, "b", []int64{24000})
		cfg := fxConfig(t, ledgerCatalogue, a, b)
		cfg.Poll.Interval = time.Hour
		h := fxStart(t, cfg)
		fxWantRouted(t, h.route(t, "M/X"), "a", "M/X")
		fxWantRouted(t, h.route(t, "M/Y"), "b", "M/Y")
		if a.sim.UnloadCalls()+b.sim.UnloadCalls() != 0 || simModel(a, "M/X") == nil {
			t.Fatalf("round %d: Y evicted X (unloads a=%d b=%d)", i, a.sim.UnloadCalls(), b.sim.UnloadCalls())
		}
		h.stop(t)
	}
}

// Two different cold models requested together, two empty nodes: each
// load reserves its node at once, so the second goes to the other node and
// both loads run at the same time: neither queues behind the other, and
// neither evicts the other.
func TestTwoColdModelsAtOnceLoadInParallel(t *testing.T) {
	fxLeakCheck(t)
	for i := range ledgerRepeats {
		a := ledgerSim(t, "a", []int64{24000})
		b := ledgerSim(t, "b", []int64{24000})
		h := fxStart(t, fxConfig(t, ledgerCatalogue, a, b))
		releaseA, releaseB := a.sim.HoldLoads(), b.sim.HoldLoads()

		replies := make([]fxReply, 2)
		var wg sync.WaitGroup
		for j, model := range []string{"M/X", "M/Y"} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				replies[j] = h.route(t, model)
			}()
		}
		// Both loads are running while both are held: they run in parallel.
		fxEventually(t, "a load on each node", func() bool { return a.sim.LoadCalls() == 1 && b.sim.LoadCalls() == 1 })
		releaseA()
		releaseB()
		wg.Wait()
		if replies[0].Status != 200 || replies[1].Status != 200 || replies[0].Node == replies[1].Node {
			t.Fatalf("round %d: %s / %s; want both routed, to different nodes", i, replies[0], replies[1])
		}
		if n := a.sim.UnloadCalls() + b.sim.UnloadCalls(); n != 0 {
			t.Fatalf("round %d: %d evictions, want none", i, n)
		}
		h.stop(t)
	}
}

// One node with room for one of X and Y at a time. Requests for X arrive
// together; clients of Y retry at once on every "no room" until they get
// in. A load planned while X is loading, or while X's waiters are being
// routed, never evicts it: every request held for a load gets its model,
// and a request that does not fit is told so at once, before any wait.
func TestAQueuedLoadNeverEvictsAFreshModelBeforeItsWaitersAreRouted(t *testing.T) {
	fxLeakCheck(t)
	for i := range ledgerRepeats {
		a := ledgerSim(t, "a", []int64{24000})
		h := fxStart(t, fxConfig(t, ledgerCatalogue, a))
		var wg sync.WaitGroup
		replies := make(chan fxReply, 1000)
		for j := range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if j%2 == 0 {
					replies <- h.route(t, "M/X")
					return
				}
				for range 100 { // a client of Y retrying on "no room"
					r := h.route(t, "M/Y")
					replies <- r
					if r.Status == 200 || r.Overridden {
						return
					}
				}
			}()
		}
		wg.Wait()
		close(replies)
		for r := range replies {
			switch {
			case r.Status == 200:
			case r.Status == 503 && r.RetryAfter == "5" && strings.Contains(r.Message, "retry later") && !r.Overridden:
				// Told at once, before any wait: the node is taken.
			default:
				t.Fatalf("round %d: %s (held for a load: %v); want routed, or an immediate 503 for lack of room", i, r, r.Overridden)
			}
		}
		h.stop(t)
	}
}

// A model a neuron pre-warms at start-up is being loaded there: no second
// copy elsewhere, and the client is told to retry shortly.
func TestPrewarmingModelIsNotLoadedASecondTime(t *testing.T) {
	fxLeakCheck(t)
	a := ledgerSim(t, "a", []int64{24000})
	b := ledgerSim(t, "b", []int64{24000})
	a.sim.SetActivation("pre_warming", "M/X", []string{"M/Y"})
	h := fxStart(t, fxConfig(t, ledgerCatalogue, a, b))
	for _, model := range []string{"M/X", "M/Y"} {
		fxWantError(t, h.route(t, model), 503, "service_unavailable", "2", "pre-warming")
	}
	if n := a.sim.LoadCalls() + b.sim.LoadCalls(); n != 0 {
		t.Errorf("%d loads, want none while a pre-warms", n)
	}
	// Once a reports it ready with X resident, X is routed there.
	a.sim.SetActivation("ready", "", nil)
	fxEventually(t, "the pre-warm to end", func() bool { return h.route(t, "M/Y").Status == 200 })
}

// A model the neuron is reloading is never an eviction victim.
func TestReloadingModelIsNeverEvicted(t *testing.T) {
	fxLeakCheck(t)
	a := ledgerSim(t, "a", []int64{24000}, neuronsim.ModelSpec{ID: "Other/R", VRAMMB: 16000})
	if err := a.sim.SetModelStatus("Other/R", neuron.StatusReloading); err != nil {
		t.Fatal(err)
	}
	h := fxStart(t, fxConfig(t, ledgerCatalogue, a))
	fxWantError(t, h.route(t, "M/X"), 503, "service_unavailable", "5", "Other/R (reloading)")
	if n := a.sim.UnloadCalls(); n != 0 {
		t.Errorf("%d unloads of a reloading model", n)
	}
}

// A model whose declared size can never fit on any neuron that meets its
// profile is not "retry later": 503 no_feasible_neuron without Retry-After,
// with the numbers. The operator's own catalogue, one 16 GB neuron.
func TestModelThatCanNeverFitIsNotRetryLater(t *testing.T) {
	fxLeakCheck(t)
	data, err := os.ReadFile("../../../shared/testdata/cortex-models.example.toml")
	if err != nil {
		t.Skipf("the operator catalogue is not beside the project: %v", err)
	}
	a := ledgerSim(t, "a", []int64{16384})
	h := fxStart(t, fxConfig(t, string(data), a))
	r := h.route(t, "Qwen/Qwen3-8B") // vram_mb 18000
	fxWantError(t, r, 503, "no_feasible_neuron", "", "can never fit")
	for _, s := range []string{"18000 MB", "16384 MB"} {
		if !strings.Contains(r.Message, s) {
			t.Errorf("message %q does not say %q", r.Message, s)
		}
	}
	if n := a.sim.LoadCalls(); n != 0 {
		t.Errorf("%d loads of a model that cannot fit", n)
	}
	// A model that fits is still loaded there.
	fxWantRouted(t, h.route(t, "unsloth/Qwen3-0.6B-GGUF"), "a", "unsloth/Qwen3-0.6B-GGUF")
}

// A model resident only as servable: false, and not in the catalogue,
// exists: 503 with the neuron's reason, not 404.
func TestUnservableOnlyModelAnswers503WithTheReason(t *testing.T) {
	fxLeakCheck(t)
	a := ledgerSim(t, "a", []int64{24000}, neuronsim.ModelSpec{ID: "Other/U", VRAMMB: 4000})
	if err := a.sim.SetServable("Other/U", false, "insufficient_vram"); err != nil {
		t.Fatal(err)
	}
	h := fxStart(t, fxConfig(t, ledgerCatalogue, a))
	fxWantError(t, h.route(t, "Other/U"), 503, "service_unavailable", "5", "insufficient_vram")
}

// BenchmarkColdLoadsSpread requests K different cold models at once on M
// empty nodes (K = M = 8, 2 s loads) through ext_proc and reports the wall
// time in load times, how many nodes took a load and how many requests
// failed, averaged over the iterations: with reservations the loads spread
// one per node and run in parallel.
func BenchmarkColdLoadsSpread(b *testing.B) {
	const k, loadTime = 8, 2 * time.Second
	var cat strings.Builder
	sizes := map[string]int64{}
	for i := range k {
		id := "Spread/M" + string(rune('0'+i))
		cat.WriteString("[[models]]\nid = \"" + id + "\"\nharness = \"candle\"\nvram_mb = 16000\n\n")
		sizes[id] = 16000
	}
	var ratio, nodesUsed, failed float64
	for b.Loop() {
		b.StopTimer()
		var ns []*fxNeuron
		for i := range k {
			ns = append(ns, fxStartSim(b, neuronsim.Options{Name: "n" + string(rune('0'+i)), Devices: []int64{24000}, Sizes: sizes,
				LoadLatency: loadTime, MaxInFlight: 64, MaxQueueDepth: 1000}))
		}
		h := fxStart(b, fxConfig(b, cat.String(), ns...))
		b.StartTimer()
		start := time.Now()
		var wg sync.WaitGroup
		var errs atomic.Int32
		for i := range k {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				if r, err := fxExchange(ctx, h.ep, "/v1/chat/completions", fxChat("Spread/M"+string(rune('0'+i))), nil); err != nil || r.Status != 200 {
					errs.Add(1)
				}
			}()
		}
		wg.Wait()
		ratio += float64(time.Since(start)) / float64(loadTime)
		b.StopTimer()
		used := 0
		for _, n := range ns {
			if n.sim.LoadCalls() > 0 {
				used++
			}
		}
		nodesUsed += float64(used)
		failed += float64(errs.Load())
		h.stop(b)
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(ratio/n, "load-times/op")
	b.ReportMetric(nodesUsed/n, "nodes-loading/op")
	b.ReportMetric(failed/n, "failed-requests/op")
}
