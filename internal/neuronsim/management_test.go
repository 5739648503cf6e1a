package neuronsim

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

func findModel(ms []neuron.Model, id string) *neuron.Model {
	for i := range ms {
		if ms[i].ID == id {
			return &ms[i]
		}
	}
	return nil
}

func findModelHealth(h neuron.Health, id string) *neuron.ModelHealth {
	for i := range h.Models {
		if h.Models[i].ID == id {
			return &h.Models[i]
		}
	}
	return nil
}

func TestManagementAPIDecodesIntoNeuronTypes(t *testing.T) {
	_, srv := startSim(t, Options{
		Name:     "beast",
		Devices:  []int64{24564, 24564, 24564},
		Models:   []ModelSpec{{ID: "Qwen/Qwen3-8B", VRAMMB: 17800}, {ID: "Qwen/Qwen3-32B", VRAMMB: 44000, Devices: []int{1, 2}}},
		Unloaded: []ModelSpec{{ID: "unsloth/Qwen3-0.6B-GGUF", VRAMMB: 500}},
	})

	var d neuron.Discovery
	getJSON(t, srv, "/discovery", &d)
	if d.Hostname != "beast" || len(d.Devices) != 3 || d.Devices[1].VRAMTotalMB != 24564 || d.Devices[1].Index != 1 {
		t.Errorf("discovery = %+v, want hostname beast with three 24564 MB devices", d)
	}
	if d.CUDAUnavailableReason != nil || d.MaxPromptTokens <= 0 {
		t.Errorf("discovery cuda_unavailable_reason=%v max_prompt_tokens=%d, want null and > 0", d.CUDAUnavailableReason, d.MaxPromptTokens)
	}

	var ms []neuron.Model
	getJSON(t, srv, "/models", &ms)
	m8 := findModel(ms, "Qwen/Qwen3-8B")
	if m8 == nil || m8.Status != neuron.StatusLoaded || len(m8.Devices) != 1 || m8.VRAMUsedMB == nil || *m8.VRAMUsedMB != 17800 || !m8.IsServable() {
		t.Errorf("Qwen3-8B = %+v, want loaded on one device using 17800 MB, servable", m8)
	}
	m32 := findModel(ms, "Qwen/Qwen3-32B")
	if m32 == nil || fmt.Sprint(m32.Devices) != "[1 2]" {
		t.Errorf("Qwen3-32B = %+v, want devices [1 2]", m32)
	}
	un := findModel(ms, "unsloth/Qwen3-0.6B-GGUF")
	if un == nil || un.Status != neuron.StatusUnloaded || un.VRAMUsedMB != nil || !un.Status.Known() || un.Status.Resident() {
		t.Errorf("unloaded model = %+v, want status unloaded with vram_used_mb null", un)
	}

	var h neuron.Health
	getJSON(t, srv, "/health", &h)
	if h.Activation == nil || h.Activation.State != "ready" || len(h.Activation.Loading()) != 0 {
		t.Errorf("activation = %+v, want ready with nothing loading", h.Activation)
	}
	// 8B went to the device with most free VRAM (0); 32B splits over 1 and 2.
	var used, free int64
	for _, dev := range h.Devices {
		used += dev.VRAMUsedMB
		free += dev.VRAMFreeMB
		if dev.VRAMUsedMB+dev.VRAMFreeMB != 24564 {
			t.Errorf("device %d: used %d + free %d != 24564", dev.Index, dev.VRAMUsedMB, dev.VRAMFreeMB)
		}
	}
	if used != 17800+44000 || free != 3*24564-used || h.Devices[0].VRAMUsedMB != 17800 || h.Devices[2].VRAMUsedMB != 22000 {
		t.Errorf("health VRAM used %d free %d, want used %d", used, free, 17800+44000)
	}
	if mh := findModelHealth(h, "Qwen/Qwen3-8B"); mh == nil || mh.MaxInFlight != DefaultMaxInFlight || mh.InFlight != 0 {
		t.Errorf("health model entry = %+v, want idle with max_in_flight %d", mh, DefaultMaxInFlight)
	}
}

func TestEndpointAnswersLoopbackURLWithServingPort(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: "Qwen/Qwen3-8B", VRAMMB: 17800}}})
	port := srv.URL[strings.LastIndex(srv.URL, ":")+1:]
	for _, path := range []string{"/models/" + url.PathEscape("Qwen/Qwen3-8B") + "/endpoint", "/models/Qwen/Qwen3-8B/endpoint"} {
		var e struct{ URL string }
		getJSON(t, srv, path, &e)
		if e.URL != "http://localhost:"+port {
			t.Errorf("GET %s: url %q, want http://localhost:%s (loopback, as a real neuron answers)", path, e.URL, port)
		}
	}
	if r := do(t, srv, http.MethodGet, "/models/"+url.PathEscape("nope/nope")+"/endpoint", nil); r.status != http.StatusNotFound {
		t.Errorf("endpoint of unknown model: status %d, want 404", r.status)
	}

	_, srv2 := startSim(t, Options{Models: []ModelSpec{{ID: "m", VRAMMB: 1}}, EndpointHost: "10.1.2.3", EndpointPort: 8000})
	var e struct{ URL string }
	getJSON(t, srv2, "/models/m/endpoint", &e)
	if e.URL != "http://10.1.2.3:8000" {
		t.Errorf("configured endpoint = %q, want http://10.1.2.3:8000", e.URL)
	}
}

func TestCapabilitiesNeedLocalEvidence(t *testing.T) {
	_, srv := startSim(t, Options{
		Models:       []ModelSpec{{ID: "Qwen/Qwen3-8B", VRAMMB: 17800}},
		Capabilities: map[string][]string{"Qwen/Qwen3-VL-8B": {"text", "vision"}},
	})
	var c struct{ Capabilities []string }
	getJSON(t, srv, "/models/"+url.PathEscape("Qwen/Qwen3-VL-8B")+"/capabilities", &c)
	if fmt.Sprint(c.Capabilities) != "[text vision]" {
		t.Errorf("capabilities = %v, want [text vision]", c.Capabilities)
	}
	if r := do(t, srv, http.MethodGet, "/models/unknown%2Fmodel/capabilities", nil); r.status != http.StatusNotFound {
		t.Errorf("capabilities of unknown model: status %d, want 404", r.status)
	}
}

func TestLoadMakesModelResidentAndTakesVRAM(t *testing.T) {
	sim, srv := startSim(t, Options{Devices: []int64{24564, 16384}, Sizes: map[string]int64{"Qwen/Qwen3-8B": 17800}})
	r := do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "Qwen/Qwen3-8B", Harness: "candle"})
	if r.status != http.StatusOK || !strings.Contains(string(r.body), `"loaded"`) {
		t.Fatalf("load: %d %s, want 200 {status: loaded}", r.status, r.body)
	}
	m := findModel(sim.Models(), "Qwen/Qwen3-8B")
	if m == nil || m.Status != neuron.StatusLoaded || fmt.Sprint(m.Devices) != "[0]" {
		t.Fatalf("after load: %+v, want loaded on device 0 (the only one with room)", m)
	}
	var h neuron.Health
	getJSON(t, srv, "/health", &h)
	if h.Devices[0].VRAMFreeMB != 24564-17800 {
		t.Errorf("device 0 free = %d, want %d", h.Devices[0].VRAMFreeMB, 24564-17800)
	}

	r = do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "Qwen/Qwen3-8B"})
	if r.status != http.StatusBadRequest || !strings.Contains(string(r.body), "already loaded") {
		t.Errorf("second load: %d %s, want 400 containing \"already loaded\"", r.status, r.body)
	}
	if sim.LoadCalls() != 2 {
		t.Errorf("LoadCalls = %d, want 2", sim.LoadCalls())
	}
}

func TestLoadRefusals(t *testing.T) {
	tp := 2
	cases := []struct {
		name       string
		opts       Options
		spec       neuron.LoadSpec
		wantStatus int
		wantBody   string
	}{
		{"insufficient VRAM", Options{Devices: []int64{16384}, Sizes: map[string]int64{"big": 18000}},
			neuron.LoadSpec{ModelID: "big"}, http.StatusBadRequest, "insufficient VRAM"},
		{"tensor parallel needs more devices", Options{Devices: []int64{24564}},
			neuron.LoadSpec{ModelID: "tp", TensorParallel: &tp}, http.StatusBadRequest, "needs 2 devices"},
		{"unknown device", Options{Devices: []int64{24564}},
			neuron.LoadSpec{ModelID: "m", Devices: []int{3}}, http.StatusBadRequest, "device 3 does not exist"},
		{"CUDA broken", Options{Devices: []int64{24564}, CUDAUnavailable: "driver/library version mismatch"},
			neuron.LoadSpec{ModelID: "m"}, http.StatusServiceUnavailable, "cuda_unavailable"},
		{"simulated failure", Options{Devices: []int64{24564}, LoadFailRate: 1},
			neuron.LoadSpec{ModelID: "m"}, http.StatusInternalServerError, "simulated load failure"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			sim, srv := startSim(t, tc.opts)
			r := do(t, srv, http.MethodPost, "/models/load", tc.spec)
			if r.status != tc.wantStatus || !strings.Contains(string(r.body), tc.wantBody) {
				t.Errorf("load: %d %s, want %d containing %q", r.status, r.body, tc.wantStatus, tc.wantBody)
			}
			if m := findModel(sim.Models(), tc.spec.ModelID); m != nil {
				t.Errorf("failed load left %+v listed", m)
			}
			var h neuron.Health
			getJSON(t, srv, "/health", &h)
			for _, d := range h.Devices {
				if d.VRAMUsedMB != 0 {
					t.Errorf("failed load left %d MB used on device %d", d.VRAMUsedMB, d.Index)
				}
			}
		})
	}
}

func TestLoadPlacesTensorParallelAndStripsSource(t *testing.T) {
	sim, srv := startSim(t, Options{Devices: []int64{24564, 24564, 16384}, Sizes: map[string]int64{"Helexa/Qwen3.6-27B": 44000}})
	tp := 2
	r := do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "helexa:Helexa/Qwen3.6-27B", TensorParallel: &tp, Devices: []int{0, 1}})
	if r.status != http.StatusOK {
		t.Fatalf("load: %d %s", r.status, r.body)
	}
	m := findModel(sim.Models(), "Helexa/Qwen3.6-27B")
	if m == nil || fmt.Sprint(m.Devices) != "[0 1]" {
		t.Fatalf("model = %+v, want Helexa/Qwen3.6-27B (source prefix dropped) on devices [0 1]", m)
	}
}

func TestConcurrentLoadsOfSameModelShareOneLoad(t *testing.T) {
	sim, srv := startSim(t, Options{Devices: []int64{24564}})
	release := sim.HoldLoads()
	var wg sync.WaitGroup
	results := make(chan response, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results <- do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "m"})
		}()
	}
	eventually(t, "both load calls to arrive", func() bool { return sim.LoadCalls() == 2 })
	if m := findModel(sim.Models(), "m"); m != nil {
		t.Errorf("model listed as %q while its load is held", m.Status)
	}
	release()
	wg.Wait()
	close(results)
	var ok, already int
	for r := range results {
		switch {
		case r.status == http.StatusOK:
			ok++
		case r.status == http.StatusBadRequest && strings.Contains(string(r.body), "already loaded"):
			already++
		default:
			t.Errorf("unexpected answer %d %s", r.status, r.body)
		}
	}
	if ok != 1 || already != 1 {
		t.Errorf("got %d loaded and %d already-loaded answers, want 1 and 1", ok, already)
	}
	var h neuron.Health
	getJSON(t, srv, "/health", &h)
	if h.Devices[0].VRAMUsedMB != DefaultVRAMMB {
		t.Errorf("VRAM used %d, want one copy (%d MB)", h.Devices[0].VRAMUsedMB, DefaultVRAMMB)
	}
}

func TestLoadContinuesWhenCallerHangsUp(t *testing.T) {
	sim, srv := startSim(t, Options{Devices: []int64{24564}})
	release := sim.HoldLoads()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		doCtx(ctx, t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "m"})
	}()
	eventually(t, "the load call", func() bool { return sim.LoadCalls() == 1 })
	cancel()
	<-done
	release()
	eventually(t, "the abandoned load to complete", func() bool {
		m := findModel(sim.Models(), "m")
		return m != nil && m.Status == neuron.StatusLoaded
	})
}

func TestLoadTakesLoadLatency(t *testing.T) {
	// Only a lower bound: the load must not answer before its latency.
	sim, srv := startSim(t, Options{Devices: []int64{24564}, LoadLatency: 150 * time.Millisecond})
	start := time.Now()
	if r := do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "m"}); r.status != http.StatusOK {
		t.Fatalf("load: %d %s", r.status, r.body)
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Errorf("load answered after %v, before its 150ms latency", el)
	}
	if sim.LoadCalls() != 1 {
		t.Errorf("LoadCalls = %d", sim.LoadCalls())
	}
}

func TestUnloadFreesVRAM(t *testing.T) {
	sim, srv := startSim(t, Options{Devices: []int64{24564}, Models: []ModelSpec{{ID: "Qwen/Qwen3-8B", VRAMMB: 17800}}})
	r := do(t, srv, http.MethodPost, "/models/unload", map[string]string{"model_id": "Qwen/Qwen3-8B"})
	if r.status != http.StatusOK || !strings.Contains(string(r.body), "unloaded") {
		t.Fatalf("unload: %d %s", r.status, r.body)
	}
	if findModel(sim.Models(), "Qwen/Qwen3-8B") != nil {
		t.Error("model still listed after unload")
	}
	var h neuron.Health
	getJSON(t, srv, "/health", &h)
	if h.Devices[0].VRAMFreeMB != 24564 {
		t.Errorf("free VRAM %d after unload, want 24564", h.Devices[0].VRAMFreeMB)
	}
	if r := do(t, srv, http.MethodPost, "/models/unload", map[string]string{"model_id": "Qwen/Qwen3-8B"}); r.status != http.StatusNotFound {
		t.Errorf("second unload: %d, want 404", r.status)
	}
	if sim.UnloadCalls() != 2 {
		t.Errorf("UnloadCalls = %d, want 2", sim.UnloadCalls())
	}
}

func TestFailureKnobs(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: "m", VRAMMB: 100}}})
	sim.SetFailing(true)
	if r := do(t, srv, http.MethodGet, "/models", nil); r.status != http.StatusInternalServerError {
		t.Errorf("failing: /models status %d, want 500", r.status)
	}
	sim.SetFailing(false)
	sim.SetGarbage(true)
	r := do(t, srv, http.MethodGet, "/health", nil)
	var h neuron.Health
	if r.status != http.StatusOK || json.Unmarshal(r.body, &h) == nil {
		t.Errorf("garbage: /health %d %q, want 200 with an undecodable body", r.status, r.body)
	}
	sim.SetGarbage(false)
	sim.SetCUDAUnavailable("no CUDA-capable device is detected")
	var d neuron.Discovery
	getJSON(t, srv, "/discovery", &d)
	if d.CUDAUnavailableReason == nil || *d.CUDAUnavailableReason != "no CUDA-capable device is detected" {
		t.Errorf("cuda_unavailable_reason = %v", d.CUDAUnavailableReason)
	}
}

func TestRestartRestoresStartupState(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: "a", VRAMMB: 100}}})
	if r := do(t, srv, http.MethodPost, "/models/load", neuron.LoadSpec{ModelID: "b"}); r.status != http.StatusOK {
		t.Fatalf("load: %d %s", r.status, r.body)
	}
	if err := sim.Restart(); err != nil {
		t.Fatal(err)
	}
	ms := sim.Models()
	if findModel(ms, "b") != nil || findModel(ms, "a") == nil {
		t.Errorf("after restart models = %+v, want only the start-up model a", ms)
	}
}

func TestActivationKnobReportsPreWarming(t *testing.T) {
	sim, srv := startSim(t, Options{})
	sim.SetActivation("pre_warming", "Qwen/Qwen3-8B", []string{"Qwen/Qwen3-1.7B"})
	var h neuron.Health
	getJSON(t, srv, "/health", &h)
	if h.Activation.State != "pre_warming" || fmt.Sprint(h.Activation.Loading()) != "[Qwen/Qwen3-8B Qwen/Qwen3-1.7B]" {
		t.Errorf("activation = %+v, want pre_warming loading 8B then 1.7B", h.Activation)
	}
}

func TestNewRejectsModelsThatDoNotFit(t *testing.T) {
	_, err := New(Options{Devices: []int64{16384}, Models: []ModelSpec{{ID: "big", VRAMMB: 18000}}})
	if err == nil || !strings.Contains(err.Error(), "big") || !strings.Contains(err.Error(), "insufficient VRAM") {
		t.Errorf("New = %v, want an insufficient-VRAM error naming the model", err)
	}
	if _, err := New(Options{}); err == nil {
		t.Error("New without devices succeeded")
	}
}
