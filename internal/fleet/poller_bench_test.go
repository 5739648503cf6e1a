package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// benchNeuron answers like a real neuron client would: every call returns
// freshly decoded values (new slices and pointers), and its /health queue
// figures move between rounds as they do under traffic.
type benchNeuron struct {
	name   string
	models []neuron.Model
	polls  atomic.Int64
}

// benchCatalogueSize is how many model ids the fleet shares: each neuron
// lists 16 of them (a sliding window) and 4 of its own, 20 in all, so the
// model index has both long shared location lists and many short ones.
const benchCatalogueSize = 32

func newBenchNeuron(i int) *benchNeuron {
	n := &benchNeuron{name: fmt.Sprintf("n%03d", i)}
	for k := range 16 {
		id := fmt.Sprintf("org/shared-%02d", (i+k)%benchCatalogueSize)
		st := neuron.StatusUnloaded
		if k < 4 {
			st = neuron.StatusLoaded
		}
		n.models = append(n.models, benchModel(id, st, k%2))
	}
	for k := range 4 {
		n.models = append(n.models, benchModel(fmt.Sprintf("%s/own-%d", n.name, k), neuron.StatusUnloaded, 0))
	}
	return n
}

func benchModel(id string, st neuron.Status, dev int) neuron.Model {
	vram := int64(4000 + 100*dev)
	yes := true
	return neuron.Model{ID: id, Harness: "candle", Status: st, Devices: []int{dev}, VRAMUsedMB: &vram,
		Capabilities: []string{"chat", "tools"}, ToolCall: &yes, Limit: &neuron.Limit{Context: 32768, Output: 8192}}
}

// clone deep-copies m, as decoding a fresh /models answer would.
func cloneModel(m neuron.Model) neuron.Model {
	c := m
	c.Devices = slices.Clone(m.Devices)
	c.Capabilities = slices.Clone(m.Capabilities)
	if m.VRAMUsedMB != nil {
		v := *m.VRAMUsedMB
		c.VRAMUsedMB = &v
	}
	if m.ToolCall != nil {
		v := *m.ToolCall
		c.ToolCall = &v
	}
	if m.Reasoning != nil {
		v := *m.Reasoning
		c.Reasoning = &v
	}
	if m.Limit != nil {
		v := *m.Limit
		c.Limit = &v
	}
	if m.Servable != nil {
		v := *m.Servable
		c.Servable = &v
	}
	return c
}

func (n *benchNeuron) Discovery(context.Context) (*neuron.Discovery, error) {
	return &neuron.Discovery{Hostname: n.name, MaxPromptTokens: 32768, Devices: []neuron.Device{
		{Index: 0, Name: "RTX 4090", VRAMTotalMB: 24564}, {Index: 1, Name: "RTX 4090", VRAMTotalMB: 24564}}}, nil
}

func (n *benchNeuron) Models(context.Context) ([]neuron.Model, error) {
	out := make([]neuron.Model, len(n.models))
	for i, m := range n.models {
		out[i] = cloneModel(m)
	}
	return out, nil
}

// Health reports the loaded models' queues; one of them changes every
// round, the others stay put.
func (n *benchNeuron) Health(context.Context) (*neuron.Health, error) {
	round := int(n.polls.Add(1))
	h := &neuron.Health{UptimeSecs: 1000 + int64(round), Devices: []neuron.DeviceHealth{
		{Index: 0, VRAMUsedMB: 8000, VRAMFreeMB: 16564}, {Index: 1, VRAMUsedMB: 8100, VRAMFreeMB: 16464}}}
	for k, m := range n.models[:4] {
		mh := neuron.ModelHealth{ID: m.ID, MaxInFlight: 4, MaxQueueDepth: 64}
		if k == round%4 {
			mh.InFlight = round % 3
		}
		h.Models = append(h.Models, mh)
	}
	return h, nil
}

func (n *benchNeuron) Endpoint(_ context.Context, id string) (string, error) {
	return "http://" + n.name + ":8000/" + id, nil
}

func (n *benchNeuron) Load(context.Context, neuron.LoadSpec) error { return errors.New("not used") }
func (n *benchNeuron) Unload(context.Context, string) error        { return errors.New("not used") }

// cpuTime is the process's user + system CPU time so far: every goroutine
// and the garbage collector included.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var benchFleetSizes = []int{25, 50, 100, 200, 400}

// BenchmarkPollRound is one full poll round (PollNow) over a fleet of
// in-process neurons, 20 models each: per-neuron polls, folding each answer
// in and publishing a snapshot after each. cpu-ms/round is the process's CPU
// time per round (garbage collection included); allocs/op and B/op are per
// round.
func BenchmarkPollRound(b *testing.B) {
	for _, n := range benchFleetSizes {
		b.Run(fmt.Sprintf("neurons=%d", n), func(b *testing.B) { benchPollRound(b, n, false) })
	}
}

// BenchmarkPollRoundWithRequests is BenchmarkPollRound with a request
// looking a model up in every snapshot it sees (a steady request stream
// reads each snapshot the poller publishes), so the model index's cost
// counts however it is built.
func BenchmarkPollRoundWithRequests(b *testing.B) {
	for _, n := range benchFleetSizes {
		b.Run(fmt.Sprintf("neurons=%d", n), func(b *testing.B) { benchPollRound(b, n, true) })
	}
}

func benchPollRound(b *testing.B, size int, requests bool) {
	neurons := make([]Neuron, size)
	for i := range neurons {
		bn := newBenchNeuron(i)
		neurons[i] = Neuron{Name: bn.name, Endpoint: "http://" + bn.name + ":13131", API: bn}
	}
	p := NewPoller(PollerConfig{Interval: time.Hour, Timeout: time.Minute}, neurons, nil)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = p.Run(ctx) })
	defer func() {
		cancel()
		wg.Wait()
	}()
	<-p.Ready()

	var lookups atomic.Int64
	if requests {
		wg.Go(func() {
			for {
				ch := p.Changed()
				if len(p.Snapshot().Locations("org/shared-00")) > 0 {
					lookups.Add(1)
				}
				select {
				case <-ch:
				case <-ctx.Done():
					return
				}
			}
		})
	}
	// One more round so that every endpoint is resolved and cached, as in
	// a fleet that has been up for a while.
	if err := p.PollNow(ctx); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	start := cpuTime(b)
	for b.Loop() {
		if err := p.PollNow(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime(b)-start)/float64(time.Millisecond)/float64(b.N), "cpu-ms/round")
	if requests && lookups.Load() == 0 {
		b.Fatal("no snapshot was read")
	}
}
