package extproc

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/fleet"
	"github.com/helexa/cortex-extproc/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

// bigFleet is 100 neurons × 50 models, the size the performance issue asks
// decisions to stay fast at. Model "org/model-7" is loaded on every 10th node.
func bigFleet() (*catalogue.Catalogue, *fleet.Snapshot) {
	var profiles []*catalogue.Profile
	for i := 0; i < 50; i++ {
		profiles = append(profiles, &catalogue.Profile{ID: fmt.Sprintf("org/model-%d", i), Harness: "candle", VRAMMB: 4000})
	}
	cat := catalogue.New(profiles, map[string]string{"fleet/small": "org/model-7", "fleet/s": "org/model-8"}, "h")
	snap := &fleet.Snapshot{Round: 1}
	for n := 0; n < 100; n++ {
		node := &fleet.Node{Name: fmt.Sprintf("node-%03d", n), Cluster: fmt.Sprintf("neuron-node-%03d", n), Healthy: true,
			Discovery: &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}}}}
		for m := 0; m < 50; m++ {
			st := neuron.StatusUnloaded
			if m == (n%10)+5 || m == 8 {
				st = neuron.StatusLoaded
			}
			node.Models = append(node.Models, &fleet.Model{Model: neuron.Model{ID: fmt.Sprintf("org/model-%d", m), Status: st},
				InFlight: n % 7, QueueDepth: n % 3, Endpoint: "http://" + node.Name + ":13131"})
		}
		snap.Nodes = append(snap.Nodes, node)
	}
	return cat, snap
}

// chatBody is a chat-completions body of about size bytes with "model" near
// the start, as clients send it.
func chatBody(model string, size int) []byte {
	head := `{"model":"` + model + `","stream":true,"messages":[{"role":"system","content":"You are helpful."},{"role":"user","content":"`
	tail := `"}],"max_tokens":512}`
	fill := size - len(head) - len(tail)
	if fill < 0 {
		fill = 0
	}
	return []byte(head + strings.Repeat("lorem ipsum ", fill/12+1)[:fill] + tail)
}

func benchServer() *Server {
	cat, snap := bigFleet()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	return New(r, Options{})
}

func headersMsg(size int) *extprocv3.HttpHeaders {
	return &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte("POST")},
		{Key: ":path", RawValue: []byte("/v1/chat/completions")},
		{Key: "content-type", RawValue: []byte("application/json")},
		{Key: "content-length", RawValue: []byte(strconv.Itoa(size))},
		{Key: "x-request-id", RawValue: []byte("0b7d3c1e-9c1f-4f57-8a53-7f3f7f0e2a11")},
	}}}
}

// BenchmarkBodyPath measures the per-request work between Envoy's body
// message and our reply (no gRPC): find model, decide, build the reply.
func BenchmarkBodyPath(b *testing.B) {
	s := benchServer()
	for _, size := range []int{2 << 10, 64 << 10, 1 << 20} {
		for _, model := range []string{"org/model-8", "fleet/s", "fleet/small"} {
			kind := map[string]string{"org/model-8": "concrete", "fleet/s": "alias", "fleet/small": "alias-samelen"}[model]
			b.Run(fmt.Sprintf("%s/%dKB", kind, size>>10), func(b *testing.B) {
				body := chatBody(model, size)
				hm := headersMsg(len(body))
				work := make([]byte, len(body))
				b.SetBytes(int64(len(body)))
				b.ReportAllocs()
				var took []time.Duration
				for b.Loop() {
					copy(work, body) // Envoy's body arrives fresh each time; in-place rewrites must not leak across runs
					st := &stream{srv: s}
					st.requestHeaders(hm)
					start := time.Now()
					resp, err := st.requestBody(context.Background(), &extprocv3.HttpBody{Body: work, EndOfStream: true}, &received{})
					took = append(took, time.Since(start))
					if _, ok := resp.(*encoded); err != nil || !ok {
						b.Fatalf("%v %v", resp, err)
					}
					st.target.Release()
				}
				reportPercentiles(b, took)
			})
		}
	}
}

// BenchmarkDecide is the routing decision alone over 100 nodes × 50 models.
func BenchmarkDecide(b *testing.B) {
	cat, snap := bigFleet()
	b.ReportAllocs()
	var took []time.Duration
	for b.Loop() {
		start := time.Now()
		if _, err := routing.Decide(cat, snap, "fleet/small"); err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(start))
	}
	reportPercentiles(b, took)
}

// reportPercentiles adds p50 and p99 of the per-request times (body
// received → reply ready) to the benchmark's output.
func reportPercentiles(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(took[len(took)*99/100].Nanoseconds())/1e3, "p99-µs")
}

// TestBodyPathCostDoesNotGrowWithBody pins a design property: the body is
// never copied, for a concrete model (not sent back) nor for an alias (sent
// back as slices of the request body around the new model value), so the
// work per request is the same at 2 KB and 1 MB.
func TestBodyPathCostDoesNotGrowWithBody(t *testing.T) {
	s := benchServer()
	for _, c := range []struct{ kind, model string }{{"concrete", "org/model-8"}, {"alias", "fleet/s"}} {
		cost := func(size int) (allocs float64, bytes uint64) {
			body := chatBody(c.model, size)
			hm := headersMsg(len(body))
			run := func() {
				st := &stream{srv: s}
				st.requestHeaders(hm)
				resp, _ := st.requestBody(context.Background(), &extprocv3.HttpBody{Body: body, EndOfStream: true}, &received{})
				e, ok := resp.(*encoded)
				if !ok {
					t.Fatalf("%s: reply %v is not a routing reply", c.kind, resp)
				}
				if sent := e.pieces.Len(); (c.kind == "concrete") != (sent < 1024) {
					t.Fatalf("%s model at %d bytes: reply is %d bytes; the body must be sent back only for an alias", c.kind, size, sent)
				}
				st.target.Release()
			}
			allocs = testing.AllocsPerRun(50, run)
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			for range 20 {
				run()
			}
			runtime.ReadMemStats(&after)
			return allocs, (after.TotalAlloc - before.TotalAlloc) / 20
		}
		smallAllocs, smallBytes := cost(2 << 10)
		largeAllocs, largeBytes := cost(1 << 20)
		if smallAllocs != largeAllocs {
			t.Errorf("%s: allocations per request: %v at 2 KB, %v at 1 MB; they must not depend on body size", c.kind, smallAllocs, largeAllocs)
		}
		if largeBytes > 16<<10 {
			t.Errorf("%s: %d bytes allocated per 1 MB request (%d at 2 KB): the body is being copied", c.kind, largeBytes, smallBytes)
		}
		t.Logf("%s: %v allocations, %d B (2 KB) / %d B (1 MB) per request", c.kind, smallAllocs, smallBytes, largeBytes)
	}
}
