package service_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

// soakCatalogue: ten models, 132 GB in all, for four neurons with one
// 24 GB device each, so cold loads evict; plus aliases.
const soakCatalogue = `
[[models]]
id = "Soak/A"
harness = "candle"
vram_mb = 8000
[[models]]
id = "Soak/B"
harness = "candle"
vram_mb = 8000
[[models]]
id = "Soak/C"
harness = "candle"
vram_mb = 12000
[[models]]
id = "Soak/D"
harness = "candle"
vram_mb = 12000
[[models]]
id = "Soak/E"
harness = "candle"
vram_mb = 16000
[[models]]
id = "Soak/F"
harness = "candle"
vram_mb = 16000
[[models]]
id = "Soak/G"
harness = "candle"
vram_mb = 20000
[[models]]
id = "Soak/H"
harness = "candle"
vram_mb = 4000
residency_priority = 300
[[models]]
id = "Soak/I"
harness = "candle"
vram_mb = 20000
[[models]]
id = "Soak/J"
harness = "candle"
vram_mb = 16000

[aliases]
"soak/small" = "Soak/H"
"soak/a" = "Soak/A"
"soak/g" = "Soak/G"
`

var soakSizes = map[string]int64{"Soak/A": 8000, "Soak/B": 8000, "Soak/C": 12000, "Soak/D": 12000,
	"Soak/E": 16000, "Soak/F": 16000, "Soak/G": 20000, "Soak/H": 4000, "Soak/I": 20000, "Soak/J": 16000}

// soakFault is one fault a neuron can be put in for a while.
type soakFault struct {
	name  string
	apply func(n *fxNeuron) (undo func())
}

var soakFaults = []soakFault{
	{"failing", func(n *fxNeuron) func() { n.sim.SetFailing(true); return func() { n.sim.SetFailing(false) } }},
	{"garbage", func(n *fxNeuron) func() { n.sim.SetGarbage(true); return func() { n.sim.SetGarbage(false) } }},
	{"polls hang", func(n *fxNeuron) func() {
		n.setHook(func(w http.ResponseWriter, r *http.Request) bool { return fxIsPoll(r) && n.hang(w, r) })
		return func() { n.setHook(nil) }
	}},
	{"endpoint 404", func(n *fxNeuron) func() {
		n.setHook(func(w http.ResponseWriter, r *http.Request) bool {
			if !strings.HasSuffix(r.URL.Path, "/endpoint") {
				return false
			}
			http.Error(w, `{"code":"not_found","error":"gone"}`, 404)
			return true
		})
		return func() { n.setHook(nil) }
	}},
	{"loads fail", func(n *fxNeuron) func() { n.sim.SetLoadFailRate(0.7); return func() { n.sim.SetLoadFailRate(0) } }},
	{"slow loads", func(n *fxNeuron) func() {
		n.sim.SetLoadLatency(3 * time.Second)
		return func() { n.sim.SetLoadLatency(100 * time.Millisecond) }
	}},
}

// soakStats are the counts the soak reports.
type soakStats struct {
	mu        sync.Mutex
	requests  int
	routed    int
	coldStart int
	served    int
	misroutes []string
	errors    map[string]int // client-visible errors and upstream answers by kind
	faults    map[string]int
}

// TestSoak drives the service at high concurrency for a minute while
// random faults hit the simulated neurons. Every routed request is then
// sent to the chosen neuron, as Envoy would: a misroute is a neuron that
// does not hold the model (404) or serves a different model than the one
// routed. It must be 0. Run it with
//
//	CORTEX_SOAK=1 go test -run TestSoak -v ./internal/service/
//
// (CORTEX_SOAK_DURATION and CORTEX_SOAK_WORKERS override 60s and 200.)
func TestSoak(t *testing.T) {
	if testing.Short() || os.Getenv("CORTEX_SOAK") != "1" {
		t.Skip("soak test: set CORTEX_SOAK=1 (without -short) to run it")
	}
	duration, workers := time.Minute, 200
	if d, err := time.ParseDuration(os.Getenv("CORTEX_SOAK_DURATION")); err == nil {
		duration = d
	}
	if n, err := strconv.Atoi(os.Getenv("CORTEX_SOAK_WORKERS")); err == nil && n > 0 {
		workers = n
	}

	var neurons []*fxNeuron
	byName := map[string]*fxNeuron{}
	for i, warm := range [][]string{{"Soak/A", "Soak/H"}, {"Soak/B", "Soak/H"}, {"Soak/C"}, {}} {
		name := fmt.Sprintf("n%d", i)
		var specs []neuronsim.ModelSpec
		for _, m := range warm {
			specs = append(specs, neuronsim.ModelSpec{ID: m, VRAMMB: soakSizes[m]})
		}
		sim, err := neuronsim.New(neuronsim.Options{Name: name, Devices: []int64{24000}, Models: specs,
			Sizes: soakSizes, MaxInFlight: 32, MaxQueueDepth: 100000, LoadLatency: 100 * time.Millisecond,
			Seed: uint64(i + 1)})
		if err != nil {
			t.Fatal(err)
		}
		n := &fxNeuron{name: name, sim: sim, closing: make(chan struct{}), noRecord: true}
		n.srv = httptest.NewServer(n)
		t.Cleanup(func() { close(n.closing); n.srv.Close(); sim.Close() })
		neurons = append(neurons, n)
		byName[name] = n
	}
	cfg := fxConfig(t, soakCatalogue, neurons...)
	cfg.Poll.Interval, cfg.Poll.Timeout, cfg.Poll.FailureThreshold = 500*time.Millisecond, 2*time.Second, 2
	cfg.ColdLoad.Timeout = 10 * time.Second
	cfg.ColdLoad.FailureCooldown = 2 * time.Second
	h := fxStartLogging(t, cfg, slog.LevelWarn) // info logs every rejected request

	heapStart, goroutinesStart := soakHeapInUse(), runtime.NumGoroutine()
	st := &soakStats{errors: map[string]int{}, faults: map[string]int{}}
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()

	// The fault injector: every 300 ms a random neuron gets a random fault
	// for 0.2–3 s.
	var injector sync.WaitGroup
	injector.Add(1)
	go func() {
		defer injector.Done()
		rng := rand.New(rand.NewPCG(1, 2))
		var undos sync.WaitGroup
		defer undos.Wait()
		tick := time.NewTicker(300 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			n, f := neurons[rng.IntN(len(neurons))], soakFaults[rng.IntN(len(soakFaults))]
			hold := time.Duration(200+rng.IntN(2800)) * time.Millisecond
			st.mu.Lock()
			st.faults[f.name]++
			st.mu.Unlock()
			undo := f.apply(n)
			undos.Add(1)
			go func() {
				defer undos.Done()
				select {
				case <-time.After(hold):
				case <-ctx.Done():
				}
				undo()
			}()
		}
	}()

	upstream := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers, MaxIdleConns: 4 * workers}}
	defer upstream.CloseIdleConnections()
	models := []string{"Soak/A", "Soak/B", "Soak/C", "Soak/D", "Soak/E", "Soak/F", "Soak/G", "Soak/H",
		"Soak/I", "Soak/J", "soak/small", "soak/a", "soak/g"}
	hostile := []string{
		`{"model":"soak/small","MODEL":"Soak/G"}`,
		`{"model":"Soak/A","model":"Soak/B"}`,
		`{"model":"a\r\nx-cortex-cluster: neuron-n1"}`,
		`{"model":` + strconv.Quote(strings.Repeat("x", 300)) + `}`,
		`{"model": 7}`,
		`not json`,
	}

	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, seed*7+3))
			for ctx.Err() == nil {
				var body []byte
				switch p := rng.IntN(100); {
				case p < 85:
					body = fxChat(models[rng.IntN(len(models))])
				case p < 92:
					body = fxChat(fmt.Sprintf("Unknown/model-%d", rng.IntN(1000)))
				default:
					body = []byte(hostile[rng.IntN(len(hostile))])
				}
				soakOne(t, h, upstream, byName, body, st)
			}
		}(uint64(w + 10))
	}
	wg.Wait()
	injector.Wait()

	// Faults are undone: the fleet recovers and routes again.
	for _, n := range neurons {
		fxEventually(t, n.name+" healthy after the faults", func() bool { return h.nodeHealthy(t, n.name) })
	}
	r := h.route(t, "soak/small")
	if r.Status != 200 {
		t.Errorf("after the soak: %s, want routed", r)
	}
	// Idle keep-alive connections are not leaks: close ours and let the
	// servers' connection goroutines exit before counting.
	upstream.CloseIdleConnections()
	settle := time.Now().Add(10 * time.Second)
	for n := runtime.NumGoroutine(); time.Now().Before(settle); {
		time.Sleep(200 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m >= n && m < goroutinesStart+100 {
			break
		}
		n = m
	}
	heapEnd, goroutinesEnd := soakHeapInUse(), runtime.NumGoroutine()

	kinds := make([]string, 0, len(st.errors))
	for k := range st.errors {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	var rep strings.Builder
	fmt.Fprintf(&rep, "soak: %s, %d workers, %d neurons\n", duration, workers, len(neurons))
	fmt.Fprintf(&rep, "requests %d, routed %d (cold start %d), served by the neuron %d, misroutes %d\n",
		st.requests, st.routed, st.coldStart, st.served, len(st.misroutes))
	for _, k := range kinds {
		fmt.Fprintf(&rep, "  %-60s %d\n", k, st.errors[k])
	}
	fmt.Fprintf(&rep, "faults injected: %v\n", st.faults)
	fmt.Fprintf(&rep, "cold loads: success %v, failure %v; evictions %v\n",
		h.metric(t, "cortex_extproc_cold_loads_total", "result", "success"),
		h.metric(t, "cortex_extproc_cold_loads_total", "result", "failure"),
		h.metric(t, "cortex_extproc_evictions_total"))
	fmt.Fprintf(&rep, "heap in use (whole test process, simulators included): start %.1f MiB, end %.1f MiB; goroutines: start %d, end %d\n",
		float64(heapStart)/(1<<20), float64(heapEnd)/(1<<20), goroutinesStart, goroutinesEnd)
	records := 0
	for _, n := range neurons {
		records += len(n.sim.InferenceRequests())
	}
	fmt.Fprintf(&rep, "(the simulators keep every inference request they admit, with its headers: %d records)\n", records)
	fmt.Fprintf(&rep, "throughput %.0f decisions/s\n", float64(st.requests)/duration.Seconds())
	t.Log("\n" + rep.String())
	if p := os.Getenv("CORTEX_SOAK_REPORT"); p != "" {
		os.WriteFile(p, []byte(rep.String()), 0o644)
	}
	if len(st.misroutes) > 0 {
		t.Errorf("%d misroutes, e.g.:\n%s", len(st.misroutes), strings.Join(st.misroutes[:min(10, len(st.misroutes))], "\n"))
	}
	if st.errors["protocol error"] > 0 {
		t.Errorf("%d ext_proc protocol errors", st.errors["protocol error"])
	}
}

// soakOne is one request: the ext_proc decision, then, when routed, the
// inference call Envoy would make to the chosen neuron, then the response
// headers message.
func soakOne(t *testing.T, h *fxService, upstream *http.Client, byName map[string]*fxNeuron, body []byte, st *soakStats) {
	rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var (
		mu       sync.Mutex
		inferred string
	)
	r, err := fxExchangeWith(rctx, h, body, func(rep fxReply) {
		n := byName[rep.Node]
		if n == nil {
			mu.Lock()
			inferred = "routed to unknown node " + rep.Node
			mu.Unlock()
			return
		}
		req, _ := http.NewRequestWithContext(rctx, http.MethodPost, n.srv.URL+"/v1/chat/completions", bytes.NewReader(rep.Body))
		req.Header.Set("content-type", "application/json")
		resp, err := upstream.Do(req)
		if err != nil {
			mu.Lock()
			inferred = "upstream error: " + err.Error()
			mu.Unlock()
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var out struct {
			Model string
			Error struct{ Code string }
		}
		json.Unmarshal(b, &out)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case resp.StatusCode == 200 && out.Model == rep.Model:
			inferred = "ok"
		case resp.StatusCode == 200 && out.Model != "":
			inferred = fmt.Sprintf("MISROUTE: %s served %q for a request routed as %q", rep.Node, out.Model, rep.Model)
		case resp.StatusCode == 404 && out.Error.Code == "model_not_found":
			inferred = fmt.Sprintf("MISROUTE: %s does not hold %q (cold start %v); the neuron said: %s", rep.Node, rep.Model, rep.ColdStart, bytes.TrimSpace(b))
		case resp.StatusCode == 200:
			inferred = "neuron answered garbage (injected fault)"
		default:
			inferred = fmt.Sprintf("neuron %d %s", resp.StatusCode, out.Error.Code)
		}
	})
	st.mu.Lock()
	defer st.mu.Unlock()
	st.requests++
	switch {
	case err != nil && status.Code(err).String() != "Unknown":
		st.errors["grpc "+status.Code(err).String()]++
	case err != nil:
		st.errors["protocol error"]++
		t.Logf("protocol error: %v", err)
	case r.Status != 200:
		st.errors[fmt.Sprintf("%d %s", r.Status, r.Code)]++
	default:
		st.routed++
		if r.ColdStart {
			st.coldStart++
		}
		switch {
		case inferred == "ok":
			st.served++
		case strings.HasPrefix(inferred, "MISROUTE"):
			st.misroutes = append(st.misroutes, inferred)
		default:
			st.errors["upstream: "+inferred]++
		}
	}
}

// fxExchangeWith runs one exchange, calling upstream with the routed
// request before the response headers message, as Envoy does.
func fxExchangeWith(ctx context.Context, h *fxService, body []byte, upstream func(fxReply)) (fxReply, error) {
	st, err := h.ep.Process(ctx)
	if err != nil {
		return fxReply{}, err
	}
	defer st.CloseSend()
	if err := st.Send(fxHeaders("/v1/chat/completions", body)); err != nil {
		return fxReply{}, err
	}
	r, err := st.Recv()
	if err != nil {
		return fxReply{}, err
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		return fxImmediate(ir)
	}
	if err := st.Send(fxBody(body)); err != nil {
		return fxReply{}, err
	}
	if r, err = st.Recv(); err == nil && r.GetOverrideMessageTimeout() != nil && r.Response == nil {
		r, err = st.Recv()
	}
	if err != nil {
		return fxReply{}, err
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		return fxImmediate(ir)
	}
	out := fxReply{Status: 200, Body: body}
	common := r.GetRequestBody().GetResponse()
	if common == nil {
		return fxReply{}, status.Errorf(2, "body reply %v neither routes nor answers", r)
	}
	for _, hv := range common.GetHeaderMutation().GetSetHeaders() {
		v := string(hv.GetHeader().GetRawValue())
		switch hv.GetHeader().GetKey() {
		case "x-cortex-node":
			out.Node = v
		case "x-cortex-model":
			out.Model = v
		case "x-cortex-cold-start":
			out.ColdStart = v == "true"
		}
	}
	if b := common.GetBodyMutation().GetBody(); b != nil {
		out.Body = b
	}
	upstream(out)
	if err := st.Send(fxResponseHeaders()); err != nil {
		return fxReply{}, err
	}
	if _, err := st.Recv(); err != nil {
		return fxReply{}, err
	}
	return out, nil
}

func soakHeapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}
