// Package neuronsim simulates a neuron, the node agent on a GPU host: the
// whole management API of neuron-api.md (discovery, models, health, load,
// unload, endpoint, capabilities) and OpenAI-shaped inference that streams
// a few tokens, with tool calls and image inputs in chat completions.
// Like a real neuron it does not speak Anthropic's Messages API: POST
// /v1/messages is a 404 unless Options.AnthropicNative is set. It keeps
// VRAM and queue accounting so that placement and least-busy choices can
// be tested against it, and it is strict where a real neuron is strict:
// inference for a model it does not hold is rejected with 404, which is
// why cortex-extproc must rewrite aliases, and malformed chat requests
// (a tool result answering no tool call, …) are rejected with 400.
//
// A *Sim is an http.Handler, usable in-process from tests; the knobs
// (SetFailing, HoldLoads, …) change its behaviour at run time.
// cmd/neuron-sim serves one over TCP.
package neuronsim

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// statusLoading marks a model being cold-loaded that the neuron does not
// list yet; its VRAM is already taken.
const statusLoading neuron.Status = "loading"

// Sim is a simulated neuron. Create it with New, serve it as an
// http.Handler, stop it with Close.
type Sim struct {
	opts Options
	log  *slog.Logger
	mux  *http.ServeMux

	// ctx bounds background loads: they outlive the request that started
	// them (as on a real neuron) but not the Sim.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu              sync.Mutex
	start           time.Time
	models          map[string]*model
	loads           map[string]*loadOp
	failing         bool
	garbage         bool
	cudaUnavailable string
	loadLatency     time.Duration
	loadFailRate    float64
	rng             *rand.Rand
	loadGate        chan struct{}
	inferGate       chan struct{}
	loadCalls       int
	unloadCalls     int
	requests        []InferenceRecord
	activation      neuron.Activation
	seq             uint64
}

type model struct {
	id           string
	status       neuron.Status
	devices      []int
	vramMB       int64
	servable     *neuron.Servable
	capabilities []string
	inFlight     int
	queued       int
	// slots holds one token per request being served (cap MaxInFlight).
	slots chan struct{}
}

// loadOp is one load of one model; everyone interested waits on done.
type loadOp struct {
	done chan struct{}
	err  *apiError // nil on success; set before done is closed
}

// apiError is a management-API failure: HTTP status, a machine code and a
// message (the body is {"code": …, "error": …}).
type apiError struct {
	status int
	code   string
	msg    string
}

func (e *apiError) Error() string { return e.msg }

// InferenceRecord is one inference request the sim received: every POST
// under /v1/ whose body it could read, served or not (a POST /v1/messages
// it does not serve is recorded, then answered 404).
type InferenceRecord struct {
	Path   string
	Model  string
	Stream bool
	Header http.Header
	// Images counts the image_url content parts of a chat request.
	Images int
	// Tools counts the tools of a chat request.
	Tools int
}

// New builds a Sim with its initial models placed on its devices.
func New(opts Options) (*Sim, error) {
	if opts.Name == "" {
		opts.Name = "sim"
	}
	if len(opts.Devices) == 0 {
		return nil, errors.New("neuronsim: no devices; give at least one VRAM size (e.g. 24564)")
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxQueueDepth <= 0 {
		opts.MaxQueueDepth = DefaultMaxQueueDepth
	}
	if opts.DefaultVRAMMB <= 0 {
		opts.DefaultVRAMMB = DefaultVRAMMB
	}
	if opts.EndpointHost == "" {
		opts.EndpointHost = DefaultEndpointHost
	}
	if opts.MaxPromptTokens == 0 {
		opts.MaxPromptTokens = DefaultMaxPromptTokens
	}
	if opts.LoadFailRate < 0 || opts.LoadFailRate > 1 {
		return nil, fmt.Errorf("neuronsim: load fail rate %v must be between 0 and 1", opts.LoadFailRate)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	seed := opts.Seed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Sim{
		opts:            opts,
		log:             opts.Logger.With("node", opts.Name),
		ctx:             ctx,
		cancel:          cancel,
		cudaUnavailable: opts.CUDAUnavailable,
		loadLatency:     opts.LoadLatency,
		loadFailRate:    opts.LoadFailRate,
		rng:             rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
	}
	if err := s.reset(); err != nil {
		cancel()
		return nil, err
	}
	s.routes()
	return s, nil
}

// reset puts the sim in its start-up state. Caller holds mu or owns s.
func (s *Sim) reset() error {
	s.start = time.Now()
	s.models = map[string]*model{}
	s.loads = map[string]*loadOp{}
	completed := neuron.IDList{}
	for _, spec := range s.opts.Models {
		if _, dup := s.models[spec.ID]; dup {
			return fmt.Errorf("neuronsim: model %q given twice", spec.ID)
		}
		m := s.newModel(spec.ID, neuron.StatusLoaded, s.sizeOf(spec))
		devs, err := s.place(m.vramMB, spec.Devices, 0)
		if err != nil {
			return fmt.Errorf("neuronsim: initial model %q: %w", spec.ID, err)
		}
		m.devices = devs
		s.models[spec.ID] = m
		completed = append(completed, spec.ID)
	}
	for _, spec := range s.opts.Unloaded {
		if _, dup := s.models[spec.ID]; dup {
			return fmt.Errorf("neuronsim: model %q given as both loaded and unloaded", spec.ID)
		}
		s.models[spec.ID] = s.newModel(spec.ID, neuron.StatusUnloaded, s.sizeOf(spec))
	}
	s.activation = neuron.Activation{State: "ready", Pending: neuron.IDList{}, Completed: completed, Failed: []byte("[]")}
	return nil
}

func (s *Sim) newModel(id string, st neuron.Status, vram int64) *model {
	caps := s.opts.Capabilities[id]
	if len(caps) == 0 {
		caps = []string{"text"}
	}
	return &model{id: id, status: st, vramMB: vram, capabilities: caps, slots: make(chan struct{}, s.opts.MaxInFlight)}
}

func (s *Sim) sizeOf(spec ModelSpec) int64 {
	if spec.VRAMMB > 0 {
		return spec.VRAMMB
	}
	if mb := s.opts.Sizes[spec.ID]; mb > 0 {
		return mb
	}
	return s.opts.DefaultVRAMMB
}

// Close stops background loads and waits for them. In-flight HTTP
// requests are the server's to drain.
func (s *Sim) Close() {
	s.cancel()
	s.wg.Wait()
}

// Name is the neuron's hostname.
func (s *Sim) Name() string { return s.opts.Name }

// ServeHTTP implements http.Handler.
func (s *Sim) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.opts.LogRequests {
		s.log.Info("request", "method", r.Method, "uri", r.RequestURI)
	}
	w.Header().Set("x-neuron-name", s.opts.Name)
	s.mu.Lock()
	failing, garbage := s.failing, s.garbage
	s.mu.Unlock()
	switch {
	case failing:
		writeJSON(w, http.StatusInternalServerError, map[string]string{
			"code": "internal", "error": "neuron " + s.opts.Name + " is failing (simulated)"})
		return
	case garbage:
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte(`{"this is": not json <html>`))
		return
	}
	s.mux.ServeHTTP(w, r)
}

func (s *Sim) routes() {
	s.mux = http.NewServeMux()
	s.mux.HandleFunc("GET /discovery", s.handleDiscovery)
	s.mux.HandleFunc("GET /models", s.handleModels)
	s.mux.HandleFunc("GET /health", s.handleHealth)
	s.mux.HandleFunc("POST /models/load", s.handleLoad)
	s.mux.HandleFunc("POST /models/unload", s.handleUnload)
	// Ids contain "/": match the rest of the path and split it ourselves,
	// so both escaped (Qwen%2FQwen3-8B) and raw ids work.
	s.mux.HandleFunc("GET /models/", s.handleModelSubresource)
	s.mux.HandleFunc("POST /v1/chat/completions", s.handleChat)
	s.mux.HandleFunc("POST /v1/completions", s.handleCompletions)
	s.mux.HandleFunc("POST /v1/embeddings", s.handleEmbeddings)
	if s.opts.AnthropicNative {
		s.mux.HandleFunc("POST /v1/messages", s.handleMessages)
	}
	s.mux.HandleFunc("/", s.handleUnknown)
}

// handleUnknown answers what the routes above do not serve as an
// OpenAI-compatible server does: 405 for a known path with another
// method, else 404, in OpenAI's error shape. A neuron that speaks only
// OpenAI treats POST /v1/messages like this; such inference-shaped
// requests are recorded, so a test can tell one reached the neuron.
func (s *Sim) handleUnknown(w http.ResponseWriter, r *http.Request) {
	var allowed []string
	for _, m := range []string{http.MethodGet, http.MethodPost} {
		probe := *r
		probe.Method = m
		if _, pattern := s.mux.Handler(&probe); pattern != "/" && pattern != "" {
			allowed = append(allowed, m)
		}
	}
	if len(allowed) > 0 {
		w.Header().Set("allow", strings.Join(allowed, ", "))
		writeInferenceError(w, openAIShape, http.StatusMethodNotAllowed, "invalid_request_error", "method_not_allowed",
			fmt.Sprintf("%s %s is not supported by neuron %s; use %s", r.Method, r.URL.Path, s.opts.Name, strings.Join(allowed, " or ")))
		return
	}
	if r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/v1/") {
		var body struct {
			Model  string `json:"model"`
			Stream bool   `json:"stream"`
		}
		b, _ := io.ReadAll(io.LimitReader(r.Body, maxInferenceBody))
		_ = json.Unmarshal(b, &body)
		s.mu.Lock()
		s.requests = append(s.requests, InferenceRecord{Path: r.URL.Path, Model: body.Model, Stream: body.Stream, Header: r.Header.Clone()})
		s.mu.Unlock()
	}
	writeInferenceError(w, openAIShape, http.StatusNotFound, "invalid_request_error", "not_found",
		fmt.Sprintf("%s %s is not served by neuron %s (inference: POST %s)", r.Method, r.URL.Path, s.opts.Name, strings.Join(s.inferencePaths(), ", ")))
}

// inferencePaths are the inference paths this sim serves.
func (s *Sim) inferencePaths() []string {
	paths := []string{"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
	if s.opts.AnthropicNative {
		paths = append(paths, "/v1/messages")
	}
	return paths
}

// --- knobs -----------------------------------------------------------------

// SetFailing makes every endpoint answer 500.
func (s *Sim) SetFailing(v bool) { s.mu.Lock(); s.failing = v; s.mu.Unlock() }

// SetGarbage makes every endpoint answer 200 with a body that is not JSON.
func (s *Sim) SetGarbage(v bool) { s.mu.Lock(); s.garbage = v; s.mu.Unlock() }

// SetCUDAUnavailable reports a broken GPU stack ("" repairs it).
func (s *Sim) SetCUDAUnavailable(reason string) {
	s.mu.Lock()
	s.cudaUnavailable = reason
	s.mu.Unlock()
}

// SetLoadLatency changes how long loads take from now on.
func (s *Sim) SetLoadLatency(d time.Duration) { s.mu.Lock(); s.loadLatency = d; s.mu.Unlock() }

// SetLoadFailRate changes the load failure probability from now on.
func (s *Sim) SetLoadFailRate(p float64) { s.mu.Lock(); s.loadFailRate = p; s.mu.Unlock() }

// HoldLoads makes loads that finish their latency wait until release is
// called; /models meanwhile shows them in progress. Use it to observe
// concurrent loads deterministically.
func (s *Sim) HoldLoads() (release func()) { return s.hold(&s.loadGate) }

// HoldInference makes inference requests that got a slot wait before
// generating until release is called, so in_flight and queue_depth can be
// observed in /health.
func (s *Sim) HoldInference() (release func()) { return s.hold(&s.inferGate) }

func (s *Sim) hold(gate *chan struct{}) func() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if *gate == nil {
		*gate = make(chan struct{})
	}
	ch := *gate
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			if *gate == ch {
				*gate = nil
			}
			s.mu.Unlock()
			close(ch)
		})
	}
}

// waitGate blocks while gate is held, or until ctx ends.
func (s *Sim) waitGate(ctx context.Context, gate *chan struct{}) error {
	s.mu.Lock()
	ch := *gate
	s.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// SetModelStatus forces the status of a listed model (e.g. "recovering").
func (s *Sim) SetModelStatus(id string, st neuron.Status) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.models[id]
	if m == nil || m.status == statusLoading {
		return fmt.Errorf("neuronsim: model %q is not listed on %s", id, s.opts.Name)
	}
	m.status = st
	return nil
}

// SetServable sets a listed model's servable report (ok=false with a
// reason such as "insufficient_vram").
func (s *Sim) SetServable(id string, ok bool, reason string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.models[id]
	if m == nil || m.status == statusLoading {
		return fmt.Errorf("neuronsim: model %q is not listed on %s", id, s.opts.Name)
	}
	if ok {
		m.servable = &neuron.Servable{OK: true}
	} else {
		m.servable = &neuron.Servable{OK: false, Reason: reason}
	}
	return nil
}

// SetActivation reports start-up pre-warming: state "pre_warming" with the
// model being loaded and those pending, or "ready".
func (s *Sim) SetActivation(state, inProgress string, pending []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.activation.State = state
	s.activation.InProgress = nil
	if inProgress != "" {
		s.activation.InProgress = neuron.IDList{inProgress}
	}
	s.activation.Pending = append(neuron.IDList{}, pending...)
}

// Restart simulates a neuron process restart: uptime starts again from
// zero and the models are back to their start-up state. Loads still
// running complete into the discarded state.
func (s *Sim) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reset()
}

// LoadCalls counts POST /models/load requests received.
func (s *Sim) LoadCalls() int { s.mu.Lock(); defer s.mu.Unlock(); return s.loadCalls }

// UnloadCalls counts POST /models/unload requests received.
func (s *Sim) UnloadCalls() int { s.mu.Lock(); defer s.mu.Unlock(); return s.unloadCalls }

// InferenceRequests returns the inference requests received so far.
func (s *Sim) InferenceRequests() []InferenceRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// Models returns what GET /models answers now.
func (s *Sim) Models() []neuron.Model {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.modelsLocked()
}

// --- VRAM accounting ---------------------------------------------------------

// usedLocked is the VRAM in use per device: resident models (and models
// being loaded) split evenly over their devices.
func (s *Sim) usedLocked() []int64 {
	used := make([]int64, len(s.opts.Devices))
	for _, m := range s.models {
		if m.status == neuron.StatusUnloaded || len(m.devices) == 0 {
			continue
		}
		share := m.vramMB / int64(len(m.devices))
		for _, d := range m.devices {
			used[d] += share
		}
	}
	return used
}

// place chooses devices for a model of vram MB: the requested ones when
// given (each must hold an even share), else the n devices with the most
// free VRAM (n = tensorParallel, at least 1).
func (s *Sim) place(vram int64, requested []int, tensorParallel int) ([]int, error) {
	used := s.usedLocked()
	free := func(d int) int64 { return s.opts.Devices[d] - used[d] }
	devs := slices.Clone(requested)
	if len(devs) == 0 {
		n := max(tensorParallel, 1)
		if n > len(s.opts.Devices) {
			return nil, &apiError{http.StatusBadRequest, "insufficient_devices",
				fmt.Sprintf("tensor_parallel %d needs %d devices; %s has %d", n, n, s.opts.Name, len(s.opts.Devices))}
		}
		order := make([]int, len(s.opts.Devices))
		for i := range order {
			order[i] = i
		}
		sort.SliceStable(order, func(a, b int) bool { return free(order[a]) > free(order[b]) })
		devs = order[:n]
		sort.Ints(devs)
	}
	seen := map[int]bool{}
	for _, d := range devs {
		if d < 0 || d >= len(s.opts.Devices) {
			return nil, &apiError{http.StatusBadRequest, "invalid_device",
				fmt.Sprintf("device %d does not exist on %s (devices 0..%d)", d, s.opts.Name, len(s.opts.Devices)-1)}
		}
		if seen[d] {
			return nil, &apiError{http.StatusBadRequest, "invalid_device", fmt.Sprintf("device %d listed twice", d)}
		}
		seen[d] = true
	}
	share := vram / int64(len(devs))
	for _, d := range devs {
		if free(d) < share {
			return nil, &apiError{http.StatusBadRequest, "insufficient_vram",
				fmt.Sprintf("insufficient VRAM: needs %d MB on each of %d device(s), device %d has %d MB free of %d MB",
					share, len(devs), d, free(d), s.opts.Devices[d])}
		}
	}
	return devs, nil
}
