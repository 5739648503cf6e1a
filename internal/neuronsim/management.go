package neuronsim

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

func (s *Sim) handleDiscovery(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	reason := s.cudaUnavailable
	s.mu.Unlock()
	d := neuron.Discovery{
		Hostname:        s.opts.Name,
		OS:              "linux",
		Kernel:          "6.8.0-neuronsim",
		CUDAVersion:     "12.4",
		DriverVersion:   "550.54",
		Harnesses:       []string{"candle"},
		MaxPromptTokens: s.opts.MaxPromptTokens,
	}
	if reason != "" {
		d.CUDAUnavailableReason = &reason
	}
	for i, mb := range s.opts.Devices {
		d.Devices = append(d.Devices, neuron.Device{Index: i, Name: gpuName(mb), VRAMTotalMB: mb, ComputeCapability: "8.9"})
	}
	writeJSON(w, http.StatusOK, d)
}

// gpuName gives a plausible card name for a VRAM size.
func gpuName(mb int64) string {
	switch mb {
	case 24564:
		return "NVIDIA GeForce RTX 4090"
	case 16384, 16376:
		return "NVIDIA GeForce RTX 4080"
	case 81920, 81559:
		return "NVIDIA H100 80GB HBM3"
	}
	return fmt.Sprintf("Simulated GPU (%d MB)", mb)
}

func (s *Sim) handleModels(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, s.Models())
}

func (s *Sim) modelsLocked() []neuron.Model {
	out := []neuron.Model{}
	for _, m := range s.sortedModelsLocked() {
		tool, reasoning := true, true
		e := neuron.Model{
			ID:           m.id,
			Harness:      "candle",
			Status:       m.status,
			Devices:      append([]int{}, m.devices...),
			Capabilities: append([]string{}, m.capabilities...),
			ToolCall:     &tool,
			Reasoning:    &reasoning,
			Limit:        &neuron.Limit{Context: s.opts.MaxPromptTokens, Output: 8192},
			Servable:     m.servable,
		}
		if m.status != neuron.StatusUnloaded {
			v := m.vramMB
			e.VRAMUsedMB = &v
		}
		if e.Servable == nil {
			e.Servable = &neuron.Servable{OK: true}
		}
		out = append(out, e)
	}
	return out
}

// sortedModelsLocked lists the models a neuron reports: all but those
// still being cold-loaded.
func (s *Sim) sortedModelsLocked() []*model {
	var ms []*model
	for _, m := range s.models {
		if m.status != statusLoading {
			ms = append(ms, m)
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].id < ms[j].id })
	return ms
}

func (s *Sim) handleHealth(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := neuron.Health{
		UptimeSecs: int64(time.Since(s.start) / time.Second),
		Activation: &neuron.Activation{
			State:      s.activation.State,
			Pending:    append(neuron.IDList{}, s.activation.Pending...),
			InProgress: s.activation.InProgress,
			Completed:  append(neuron.IDList{}, s.activation.Completed...),
			Failed:     s.activation.Failed,
		},
		Models: []neuron.ModelHealth{},
	}
	used := s.usedLocked()
	busy := make([]int, len(s.opts.Devices))
	for _, m := range s.sortedModelsLocked() {
		h.Models = append(h.Models, neuron.ModelHealth{
			ID: m.id, InFlight: m.inFlight, QueueDepth: m.queued,
			MaxInFlight: s.opts.MaxInFlight, MaxQueueDepth: s.opts.MaxQueueDepth,
		})
		for _, d := range m.devices {
			busy[d] += m.inFlight
		}
	}
	for i, total := range s.opts.Devices {
		util := min(100, 25*busy[i])
		h.Devices = append(h.Devices, neuron.DeviceHealth{
			Index: i, VRAMUsedMB: used[i], VRAMFreeMB: total - used[i],
			UtilizationPct: float64(util), TempC: 35 + 0.4*float64(util),
		})
	}
	writeJSON(w, http.StatusOK, h)
}

// handleLoad is the blocking POST /models/load. Concurrent loads of the
// same model share one load: later callers wait for it to finish and then
// get 400 "already loaded" (the race a real neuron reports), or start
// their own attempt if it failed. A caller that hangs up does not stop the
// load.
func (s *Sim) handleLoad(w http.ResponseWriter, r *http.Request) {
	var spec neuron.LoadSpec
	if err := json.NewDecoder(r.Body).Decode(&spec); err != nil || spec.ModelID == "" {
		writeAPIError(w, &apiError{http.StatusBadRequest, "invalid_request", "body must be a model spec with a model_id"})
		return
	}
	s.mu.Lock()
	s.loadCalls++
	s.mu.Unlock()
	id := stripSource(spec.ModelID)
	for {
		s.mu.Lock()
		if op := s.loads[id]; op != nil {
			s.mu.Unlock()
			select {
			case <-op.done:
				continue
			case <-r.Context().Done():
				return
			}
		}
		if m := s.models[id]; m != nil && m.status != neuron.StatusUnloaded {
			s.mu.Unlock()
			writeAPIError(w, &apiError{http.StatusBadRequest, "already_loaded",
				fmt.Sprintf("model %s already loaded on %s", id, s.opts.Name)})
			return
		}
		op, aerr := s.startLoadLocked(id, spec)
		s.mu.Unlock()
		if aerr != nil {
			writeAPIError(w, aerr)
			return
		}
		select {
		case <-op.done:
		case <-r.Context().Done():
			return
		}
		if op.err != nil {
			writeAPIError(w, op.err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "loaded"})
		return
	}
}

// stripSource drops a "scheme:" source prefix (helexa:Org/Model): the
// neuron registers the model under its bare id.
func stripSource(id string) string {
	if i := strings.Index(id, ":"); i > 0 && !strings.Contains(id[:i], "/") {
		return id[i+1:]
	}
	return id
}

// startLoadLocked reserves VRAM for id and starts loading it in the
// background. Caller holds mu.
func (s *Sim) startLoadLocked(id string, spec neuron.LoadSpec) (*loadOp, *apiError) {
	if s.cudaUnavailable != "" {
		return nil, &apiError{http.StatusServiceUnavailable, "cuda_unavailable", s.cudaUnavailable}
	}
	m := s.models[id]
	vram := s.sizeOf(ModelSpec{ID: id})
	if m != nil {
		vram = m.vramMB
	}
	tp := 0
	if spec.TensorParallel != nil {
		tp = *spec.TensorParallel
	}
	devs, err := s.place(vram, spec.Devices, tp)
	if err != nil {
		aerr := err.(*apiError)
		aerr.msg = fmt.Sprintf("cannot load %s on %s: %s", id, s.opts.Name, aerr.msg)
		return nil, aerr
	}
	fail := s.loadFailRate > 0 && s.rng.Float64() < s.loadFailRate
	if m == nil {
		m = s.newModel(id, statusLoading, vram)
		s.models[id] = m
	} else {
		m.status = neuron.StatusReloading
	}
	m.devices = devs
	op := &loadOp{done: make(chan struct{})}
	s.loads[id] = op
	latency, failRate := s.loadLatency, s.loadFailRate
	s.log.Info("loading model", "model", id, "devices", devs, "vram_mb", vram)
	s.wg.Add(1)
	go s.runLoad(id, m, op, latency, fail, failRate)
	return op, nil
}

func (s *Sim) runLoad(id string, m *model, op *loadOp, latency time.Duration, fail bool, failRate float64) {
	defer s.wg.Done()
	t := time.NewTimer(latency)
	select {
	case <-t.C:
	case <-s.ctx.Done():
		t.Stop()
		fail = true
	}
	if s.waitGate(s.ctx, &s.loadGate) != nil {
		fail = true
	}
	s.mu.Lock()
	if fail {
		if s.ctx.Err() != nil {
			op.err = &apiError{http.StatusServiceUnavailable, "shutting_down", fmt.Sprintf("neuron %s is shutting down; load of %s abandoned", s.opts.Name, id)}
		} else {
			op.err = &apiError{http.StatusInternalServerError, "load_failed",
				fmt.Sprintf("simulated load failure of %s on %s (load-fail-rate %.2f)", id, s.opts.Name, failRate)}
		}
		if m.status == statusLoading {
			if s.models[id] == m {
				delete(s.models, id)
			}
		} else {
			m.status = neuron.StatusUnloaded
			m.devices = nil
		}
		s.log.Warn("model load failed", "model", id, "error", op.err.msg)
	} else {
		m.status = neuron.StatusLoaded
		s.log.Info("model loaded", "model", id)
	}
	if s.loads[id] == op {
		delete(s.loads, id)
	}
	s.mu.Unlock()
	close(op.done)
}

func (s *Sim) handleUnload(w http.ResponseWriter, r *http.Request) {
	var req struct {
		ModelID string `json:"model_id"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.ModelID == "" {
		writeAPIError(w, &apiError{http.StatusBadRequest, "invalid_request", `body must be {"model_id": "..."}`})
		return
	}
	id := stripSource(req.ModelID)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.unloadCalls++
	if s.loads[id] != nil {
		writeAPIError(w, &apiError{http.StatusConflict, "loading",
			fmt.Sprintf("model %s is being loaded on %s; unload it after the load completes", id, s.opts.Name)})
		return
	}
	if s.models[id] == nil {
		writeAPIError(w, &apiError{http.StatusNotFound, "not_found", fmt.Sprintf("model %s is not on %s", id, s.opts.Name)})
		return
	}
	// Requests in flight keep their slots on the detached model and finish.
	delete(s.models, id)
	s.log.Info("model unloaded", "model", id)
	writeJSON(w, http.StatusOK, map[string]string{"status": "unloaded"})
}

// handleModelSubresource serves /models/{id}/endpoint and
// /models/{id}/capabilities with a path-escaped (or raw) id.
func (s *Sim) handleModelSubresource(w http.ResponseWriter, r *http.Request) {
	rest := strings.TrimPrefix(r.URL.EscapedPath(), "/models/")
	var kind string
	for _, k := range []string{"endpoint", "capabilities"} {
		if strings.HasSuffix(rest, "/"+k) {
			kind, rest = k, strings.TrimSuffix(rest, "/"+k)
		}
	}
	id, err := url.PathUnescape(rest)
	if kind == "" || err != nil || id == "" {
		http.NotFound(w, r)
		return
	}
	s.mu.Lock()
	m := s.models[id]
	if m != nil && m.status == statusLoading {
		m = nil
	}
	var caps []string
	if m != nil {
		caps = append(caps, m.capabilities...)
	} else if c, ok := s.opts.Capabilities[id]; ok {
		caps = append(caps, c...)
	} else if _, ok := s.opts.Sizes[id]; ok {
		caps = []string{"text"}
	}
	s.mu.Unlock()

	switch kind {
	case "endpoint":
		if m == nil {
			writeAPIError(w, &apiError{http.StatusNotFound, "not_found", fmt.Sprintf("model %s is not on %s", id, s.opts.Name)})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"url": "http://" + net.JoinHostPort(s.opts.EndpointHost, strconv.Itoa(s.endpointPort(r)))})
	case "capabilities":
		if caps == nil {
			writeAPIError(w, &apiError{http.StatusNotFound, "not_found", fmt.Sprintf("%s has no local evidence about %s", s.opts.Name, id)})
			return
		}
		writeJSON(w, http.StatusOK, map[string][]string{"capabilities": caps})
	}
}

// endpointPort is the configured port, else the port this request came in
// on (the sim serves inference on its management port, like a neuron).
func (s *Sim) endpointPort(r *http.Request) int {
	if s.opts.EndpointPort > 0 {
		return s.opts.EndpointPort
	}
	if a, ok := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr); ok && a.Port > 0 {
		return a.Port
	}
	if _, p, err := net.SplitHostPort(r.Host); err == nil {
		if n, err := strconv.Atoi(p); err == nil {
			return n
		}
	}
	return neuron.DefaultPort
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("content-type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeAPIError(w http.ResponseWriter, e *apiError) {
	writeJSON(w, e.status, map[string]string{"code": e.code, "error": e.msg})
}
