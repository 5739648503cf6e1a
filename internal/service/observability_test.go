package service_test

// Issue 6, the operator's view: a real service.Service on 127.0.0.1:0 in
// front of fake neurons, driven over gRPC the way Envoy drives ext_proc
// (request headers, then the buffered body), then read back through what
// an operator has: /metrics, /debug/fleet, the log, the traces, and
// /v1/models through the official OpenAI SDK.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
	"github.com/helexa/cortex-extproc/internal/tracing"
)

const obCatalogue = `
[[models]]
id = "Org/Warm"
harness = "candle"
vram_mb = 4000
capabilities = ["text"]
limit = { context = 8192, output = 1024 }
cost = { input = 0.0, output = 0.0 }

[[models]]
id = "Org/Cold"
harness = "candle"
vram_mb = 4000

[aliases]
"ob/warm" = "Org/Warm"
"ob/cold" = "Org/Cold"

[hidden_aliases]
"ob/secret" = "Org/Warm"
`

// obNeuron is a minimal neuron: a 24 GB device, the models it holds, live
// queue numbers, and a load that waits for the test's go-ahead.
type obNeuron struct {
	name string
	srv  *httptest.Server

	mu       sync.Mutex
	models   map[string]string // id → status; each takes 4000 MB
	failPoll bool              // /models answers 500
	loadGate chan struct{}     // a load waits for it to close
	deviceMB int64
	// releaseOnce closes loadGate.
	releaseOnce sync.Once
	busy        int // in_flight reported for every model
}

func obStartNeuron(t *testing.T, name string, failPoll bool, models ...string) *obNeuron {
	t.Helper()
	n := &obNeuron{name: name, models: map[string]string{}, failPoll: failPoll, loadGate: make(chan struct{}), deviceMB: 24000, busy: 2}
	for _, m := range models {
		n.models[m] = "loaded"
	}
	n.srv = httptest.NewServer(n)
	t.Cleanup(func() {
		n.release()
		n.srv.Close()
	})
	return n
}

// release lets loads finish.
func (n *obNeuron) release() { n.releaseOnce.Do(func() { close(n.loadGate) }) }

func (n *obNeuron) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/discovery":
		json.NewEncoder(w).Encode(map[string]any{"hostname": n.name, "harnesses": []string{"candle"}, "max_prompt_tokens": 32768,
			"devices": []map[string]any{{"index": 0, "name": "Test GPU", "vram_total_mb": n.deviceMB}}})
	case r.Method == http.MethodGet && r.URL.Path == "/models":
		if n.failPoll {
			http.Error(w, `{"error":"gpu on fire"}`, http.StatusInternalServerError)
			return
		}
		list := []map[string]any{}
		for id, st := range n.models {
			list = append(list, map[string]any{"id": id, "harness": "candle", "status": st, "devices": []int{0}, "vram_used_mb": 4000})
		}
		json.NewEncoder(w).Encode(list)
	case r.Method == http.MethodGet && r.URL.Path == "/health":
		ms := []map[string]any{}
		for id := range n.models {
			ms = append(ms, map[string]any{"id": id, "in_flight": n.busy, "queue_depth": n.busy / 2})
		}
		used := int64(4000 * len(n.models))
		json.NewEncoder(w).Encode(map[string]any{"uptime_secs": 100, "models": ms,
			"devices":    []map[string]any{{"index": 0, "vram_used_mb": used, "vram_free_mb": n.deviceMB - used}},
			"activation": map[string]any{"state": "ready", "pending": []string{}, "in_progress": nil}})
	case r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/endpoint"):
		id := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/models/"), "/endpoint")
		if _, ok := n.models[id]; !ok {
			http.Error(w, `{"error":"unknown model"}`, http.StatusNotFound)
			return
		}
		w.Write([]byte(`{"url":"http://localhost:13131"}`))
	case r.Method == http.MethodPost && r.URL.Path == "/models/load":
		var spec struct {
			ModelID string `json:"model_id"`
		}
		json.NewDecoder(r.Body).Decode(&spec)
		n.mu.Unlock()
		select {
		case <-n.loadGate:
		case <-r.Context().Done():
		}
		n.mu.Lock()
		n.models[spec.ModelID] = "loaded"
		w.Write([]byte(`{"status":"loaded"}`))
	case r.Method == http.MethodPost && r.URL.Path == "/models/unload":
		var spec struct {
			ModelID string `json:"model_id"`
		}
		json.NewDecoder(r.Body).Decode(&spec)
		delete(n.models, spec.ModelID)
		w.Write([]byte(`{"status":"unloaded"}`))
	default:
		http.NotFound(w, r)
	}
}

// obService is a running service with a JSON debug log and an ext_proc client.
type obService struct {
	svc  *service.Service
	ep   extprocv3.ExternalProcessorClient
	logs *lockedBuffer
	file string // the catalogue
}

func obStart(t *testing.T, neurons ...*obNeuron) *obService {
	t.Helper()
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	cfg := res.Config
	cfg.ModelsConfig = filepath.Join(t.TempDir(), "models.toml")
	if err := os.WriteFile(cfg.ModelsConfig, []byte(obCatalogue), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg.ExtProc.Listen, cfg.Admin.Listen = "127.0.0.1:0", "127.0.0.1:0"
	cfg.ExtProc.ShutdownDelay = 0 // no Envoy health-checks it
	cfg.ExtProc.DrainTimeout = 5 * time.Second
	cfg.Poll.Interval, cfg.Poll.Timeout, cfg.Poll.FailureThreshold = 50*time.Millisecond, 2*time.Second, 2
	cfg.ColdLoad.Timeout = 20 * time.Second
	cfg.Catalogue.PollInterval = time.Minute
	for _, n := range neurons {
		cfg.Neurons = append(cfg.Neurons, config.Neuron{Name: n.name, Endpoint: n.srv.URL})
	}
	logs := &lockedBuffer{}
	svc, err := service.New(cfg, slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	conn, err := grpc.NewClient(svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("Run did not return after cancel")
		}
		if t.Failed() {
			t.Logf("service log:\n%s", logs.String())
		}
	})
	select {
	case <-svc.Ready():
	case err := <-done:
		t.Fatalf("service stopped before ready: %v", err)
	case <-time.After(15 * time.Second):
		t.Fatal("service not ready after 15s")
	}
	return &obService{svc: svc, ep: extprocv3.NewExternalProcessorClient(conn), logs: logs, file: cfg.ModelsConfig}
}

// obReply is the end of one exchange: routed (status 200, node) or answered
// locally (status, body).
type obReply struct {
	status int
	node   string
	model  string
	cold   bool
	body   []byte
}

// exchange plays Envoy for one request: request headers, then (if any) the
// buffered body, one reply per message, skipping the standalone
// override_message_timeout of a cold-load wait; a routed request also gets
// its response headers through. extra headers are added to the request's.
func (o *obService) exchange(t *testing.T, method, path string, body []byte, extra ...string) obReply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := o.ep.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kv := append([]string{":method", method, ":path", path, ":authority", "gw", ":scheme", "http"}, extra...)
	if body != nil {
		kv = append(kv, "content-type", "application/json", "content-length", strconv.Itoa(len(body)))
	}
	hm := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	if err := st.Send(&extprocv3.ProcessingRequest{
		Request:        &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hm, EndOfStream: body == nil}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED},
	}); err != nil {
		t.Fatal(err)
	}
	r, err := st.Recv()
	if err != nil {
		t.Fatalf("headers reply: %v", err)
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		st.CloseSend()
		return obReply{status: int(ir.GetStatus().GetCode()), body: ir.GetBody()}
	}
	if body == nil {
		t.Fatalf("bodiless %s %s was neither answered nor rejected: %v", method, path, r)
	}
	if err := st.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}}); err != nil {
		t.Fatal(err)
	}
	for {
		if r, err = st.Recv(); err != nil {
			t.Fatalf("body reply: %v", err)
		}
		if r.Response == nil && r.GetOverrideMessageTimeout() != nil {
			continue // the cold-load wait's timer extension
		}
		break
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		st.CloseSend()
		return obReply{status: int(ir.GetStatus().GetCode()), body: ir.GetBody()}
	}
	out := obReply{status: 200}
	for _, h := range r.GetRequestBody().GetResponse().GetHeaderMutation().GetSetHeaders() {
		switch v := string(h.GetHeader().GetRawValue()); h.GetHeader().GetKey() {
		case "x-cortex-node":
			out.node = v
		case "x-cortex-model":
			out.model = v
		case "x-cortex-cold-start":
			out.cold = v == "true"
		}
	}
	if err := st.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: ":status", RawValue: []byte("200")}}}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); err != nil {
		t.Fatalf("response headers reply: %v", err)
	}
	st.CloseSend()
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v, want OK", err)
	}
	return out
}

func (o *obService) chat(t *testing.T, model, requestID string, extra ...string) obReply {
	t.Helper()
	body, _ := json.Marshal(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}})
	return o.exchange(t, "POST", "/v1/chat/completions", body, append([]string{"x-request-id", requestID}, extra...)...)
}

func (o *obService) get(t *testing.T, path string) []byte {
	t.Helper()
	resp, err := http.Get("http://" + o.svc.AdminAddr() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", path, resp.StatusCode, b)
	}
	return b
}

// scrape parses /metrics the way Prometheus does.
func (o *obService) scrape(t *testing.T) promScrape {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(o.get(t, "/metrics")))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

type promScrape map[string]*dto.MetricFamily

// value is the sample of name whose labels match every k, v pair given
// (0 when there is none); for a histogram, its count.
func (p promScrape) value(name string, labels ...string) float64 {
	f := p["cortex_extproc_"+name]
	if f == nil {
		return 0
	}
	sum := 0.0
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			sum += m.GetCounter().GetValue()
		case m.Gauge != nil:
			sum += m.GetGauge().GetValue()
		case m.Histogram != nil:
			sum += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return sum
}

// histSum is a histogram's sum of observations.
func (p promScrape) histSum(name string) float64 {
	s := 0.0
	if f := p["cortex_extproc_"+name]; f != nil {
		for _, m := range f.GetMetric() {
			s += m.GetHistogram().GetSampleSum()
		}
	}
	return s
}

func obEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fleetDebug is /debug/fleet as an operator's script reads it.
type fleetDebug struct {
	Catalogue struct {
		Generation uint64 `json:"generation"`
		Hash       string `json:"hash"`
		Models     int    `json:"models"`
		Aliases    int    `json:"aliases"`
	} `json:"catalogue"`
	PollRound uint64 `json:"poll_round"`
	Nodes     []struct {
		Name                string     `json:"name"`
		Cluster             string     `json:"cluster"`
		Healthy             bool       `json:"healthy"`
		ConsecutiveFailures int        `json:"consecutive_failures"`
		LastPoll            *time.Time `json:"last_poll"`
		LastSuccess         *time.Time `json:"last_success"`
		LastError           string     `json:"last_error"`
		UptimeSecs          int64      `json:"uptime_secs"`
		Devices             []struct {
			Index       int    `json:"index"`
			Name        string `json:"name"`
			VRAMTotalMB int64  `json:"vram_total_mb"`
			VRAMFreeMB  int64  `json:"vram_free_mb"`
		} `json:"devices"`
		Models []struct {
			ID         string     `json:"id"`
			Status     string     `json:"status"`
			Servable   bool       `json:"servable"`
			InFlight   int        `json:"in_flight"`
			QueueDepth int        `json:"queue_depth"`
			Endpoint   string     `json:"endpoint"`
			LastAccess *time.Time `json:"last_access"`
		} `json:"models"`
	} `json:"nodes"`
	Loads []struct {
		Model   string    `json:"model"`
		Node    string    `json:"node"`
		Started time.Time `json:"started"`
		Waiters int       `json:"waiters"`
	} `json:"loads_in_progress"`
}

func (o *obService) fleet(t *testing.T) fleetDebug {
	t.Helper()
	var f fleetDebug
	if err := json.Unmarshal(o.get(t, "/debug/fleet"), &f); err != nil {
		t.Fatalf("/debug/fleet is not JSON: %v", err)
	}
	return f
}

// TestOperatorView runs one scripted sequence and checks every operator
// surface against it.
func TestOperatorView(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tracing.Use(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)))
	defer tracing.Use(nil)

	beast := obStartNeuron(t, "beast", false, "Org/Warm")
	rig := obStartNeuron(t, "rig", true) // fails every /models poll
	o := obStart(t, beast, rig)
	obEventually(t, "rig to turn unhealthy", func() bool {
		return o.scrape(t).value("neuron_healthy", "node", "rig") == 0 && o.scrape(t).value("neuron_poll_failures_total", "node", "rig") >= 2
	})

	// 1. Two routed requests, by alias and by id; the first carries a trace.
	const traceID, parentID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
	if r := o.chat(t, "ob/warm", "req-alias", "traceparent", "00-"+traceID+"-"+parentID+"-01"); r.status != 200 || r.node != "beast" || r.model != "Org/Warm" {
		t.Fatalf("ob/warm: %+v", r)
	}
	if r := o.chat(t, "Org/Warm", "req-id"); r.status != 200 {
		t.Fatalf("Org/Warm: %+v", r)
	}
	// 2. A client error and an unknown model: counted, model label bounded.
	if r := o.exchange(t, "POST", "/v1/chat/completions", []byte(`{"model": 42}`), "x-request-id", "req-bad"); r.status != 400 {
		t.Fatalf("bad body: %+v", r)
	}
	if r := o.chat(t, "Made/Up-Model", "req-404"); r.status != 404 {
		t.Fatalf("unknown model: %+v", r)
	}
	before := o.scrape(t)

	// 3. A cold load, held until the operator has seen it in flight.
	coldDone := make(chan obReply, 1)
	go func() { coldDone <- o.chat(t, "ob/cold", "req-cold", "traceparent", "00-"+traceID+"-"+parentID+"-01") }()
	obEventually(t, "the cold-start request to be held", func() bool { return o.scrape(t).value("cold_load_waiters") == 1 })
	f := o.fleet(t)
	if len(f.Loads) != 1 || f.Loads[0].Model != "Org/Cold" || f.Loads[0].Node != "beast" || f.Loads[0].Waiters != 1 || f.Loads[0].Started.IsZero() {
		t.Errorf("/debug/fleet loads_in_progress = %+v, want Org/Cold on beast with 1 waiter", f.Loads)
	}
	if v := o.scrape(t).value("inflight_streams"); v != 1 {
		t.Errorf("inflight_streams = %v while one request is held, want 1", v)
	}
	// The wait must be visibly longer than any decision for the histogram
	// comparison below to mean something.
	time.Sleep(300 * time.Millisecond)
	beast.release()
	if r := <-coldDone; r.status != 200 || !r.cold || r.model != "Org/Cold" {
		t.Fatalf("ob/cold: %+v", r)
	}

	// /metrics after the script.
	m := o.scrape(t)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"requests_total", []string{"model", "Org/Warm", "node", "beast", "outcome", "routed"}, 2},
		{"requests_total", []string{"model", "Org/Cold", "node", "beast", "outcome", "cold_start"}, 1},
		{"requests_total", []string{"model", "other", "outcome", "invalid_request"}, 1},
		{"requests_total", []string{"model", "other", "outcome", "model_not_found"}, 1},
		{"requests_total", nil, 5},
		{"request_decision_seconds", nil, 5},
		{"cold_loads_total", []string{"model", "Org/Cold", "node", "beast", "result", "success"}, 1},
		{"cold_load_seconds", []string{"model", "Org/Cold"}, 1},
		{"cold_load_wait_seconds", []string{"model", "Org/Cold"}, 1},
		{"cold_load_waiters", nil, 0},
		{"neuron_healthy", []string{"node", "beast"}, 1},
		{"neuron_healthy", []string{"node", "rig"}, 0},
		{"neuron_poll_failures_total", []string{"node", "beast"}, 0},
		{"catalogue_models", nil, 2},
		{"catalogue_info", []string{"generation", "1"}, 1},
		{"catalogue_reloads_total", []string{"result", "error"}, 0},
	} {
		if got := m.value(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if got := m.value("neuron_poll_failures_total", "node", "rig"); got < 2 {
		t.Errorf("neuron_poll_failures_total{rig} = %v, want at least the threshold (2)", got)
	}
	// The cold-start request's decision excludes its wait.
	decision := m.histSum("request_decision_seconds") - before.histSum("request_decision_seconds")
	if wait := m.histSum("cold_load_wait_seconds"); decision >= wait {
		t.Errorf("the cold-start request's decision took %.3fs, not less than its %.3fs wait: the wait is counted as decision time", decision, wait)
	}
	for _, series := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if m[series] == nil {
			t.Errorf("%s missing from /metrics", series)
		}
	}
	obEventually(t, "inflight_streams back to 0", func() bool { return o.scrape(t).value("inflight_streams") == 0 })

	t.Run("debug fleet", func(t *testing.T) { checkFleet(t, o) })
	t.Run("logs", func(t *testing.T) { checkLogs(t, o) })
	t.Run("traces", func(t *testing.T) { checkTraces(t, rec, traceID, parentID) })
	t.Run("model list", func(t *testing.T) { checkModelList(t, o) })
}

func checkFleet(t *testing.T, o *obService) {
	// A model just cold-loaded is marked loaded at once with no live queue;
	// the next poll (every 50 ms here) brings the neuron's in_flight and
	// queue_depth. Wait for that poll rather than race it.
	f := o.fleet(t)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); f = o.fleet(t) {
		polled := len(f.Nodes) > 0
		for i := 0; polled && i < len(f.Nodes[0].Models); i++ {
			polled = f.Nodes[0].Models[i].InFlight == 2
		}
		if polled {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	data, _ := os.ReadFile(o.file)
	sum := sha256.Sum256(data)
	if f.Catalogue.Generation != 1 || f.Catalogue.Hash != hex.EncodeToString(sum[:]) || f.Catalogue.Models != 2 || f.Catalogue.Aliases != 3 {
		t.Errorf("catalogue = %+v, want generation 1, the file's sha256, 2 models, 3 aliases", f.Catalogue)
	}
	if f.PollRound == 0 || len(f.Loads) != 0 || len(f.Nodes) != 2 {
		t.Fatalf("poll_round %d, loads %v, %d nodes", f.PollRound, f.Loads, len(f.Nodes))
	}
	b, r := f.Nodes[0], f.Nodes[1]
	if b.Name != "beast" || !b.Healthy || b.ConsecutiveFailures != 0 || b.LastPoll == nil || b.LastSuccess == nil || b.LastError != "" || b.Cluster != "neuron-beast" {
		t.Errorf("beast = %+v", b)
	}
	if b.UptimeSecs != 100 {
		t.Errorf("beast uptime_secs = %d, want the neuron's 100", b.UptimeSecs)
	}
	if len(b.Devices) != 1 || b.Devices[0].VRAMTotalMB != 24000 || b.Devices[0].VRAMFreeMB <= 0 || b.Devices[0].VRAMFreeMB >= 24000 || b.Devices[0].Name != "Test GPU" {
		t.Errorf("beast devices = %+v, want one 24000 MB device with the neuron's free VRAM", b.Devices)
	}
	got := map[string]bool{}
	for _, m := range b.Models {
		got[m.ID] = true
		if m.Status != "loaded" || !m.Servable || m.InFlight != 2 || m.QueueDepth != 1 || !strings.HasPrefix(m.Endpoint, "http://127.0.0.1:") {
			t.Errorf("beast model %+v, want loaded, servable, in_flight 2, queue 1, loopback rewritten to the neuron's host", m)
		}
		if m.LastAccess == nil {
			t.Errorf("beast model %s has no last_access after requests were routed to it", m.ID)
		}
	}
	if !got["Org/Warm"] || !got["Org/Cold"] {
		t.Errorf("beast models %v, want Org/Warm and the cold-loaded Org/Cold", got)
	}
	if r.Name != "rig" || r.Healthy || r.ConsecutiveFailures < 2 || r.LastError == "" || r.LastPoll == nil || r.LastSuccess != nil {
		t.Errorf("rig = %+v, want unhealthy with its failures and error, never a success", r)
	}
}

func checkLogs(t *testing.T, o *obService) {
	lines := map[string]map[string]any{}
	for _, l := range strings.Split(o.logs.String(), "\n") {
		var e map[string]any
		if json.Unmarshal([]byte(l), &e) != nil {
			continue
		}
		if id, ok := e["request_id"].(string); ok && e["decision_ms"] != nil {
			lines[id] = e
		}
	}
	for id, want := range map[string]map[string]any{
		"req-alias": {"level": "DEBUG", "msg": "routed", "model": "ob/warm", "resolved": "Org/Warm", "node": "beast", "cold_start": false},
		"req-cold":  {"level": "INFO", "model": "ob/cold", "resolved": "Org/Cold", "node": "beast", "cold_start": true},
		"req-404":   {"level": "INFO", "model": "Made/Up-Model", "code": "model_not_found", "status": 404.0},
		"req-bad":   {"level": "INFO", "code": "invalid_request", "status": 400.0},
	} {
		e := lines[id]
		if e == nil {
			t.Errorf("no decision log line for %s", id)
			continue
		}
		for k, v := range want {
			if e[k] != v {
				t.Errorf("%s: %s = %v, want %v (%v)", id, k, e[k], v, e)
			}
		}
		if _, ok := e["decision_ms"].(float64); !ok {
			t.Errorf("%s: decision_ms = %v, want a number", id, e["decision_ms"])
		}
	}
}

func checkTraces(t *testing.T, rec *tracetest.SpanRecorder, traceID, parentID string) {
	var decisions, waits, loads []sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch {
		case s.Name() == tracing.SpanColdLoad:
			loads = append(loads, s) // a trace of its own: shared by all its waiters
		case s.SpanContext().TraceID().String() != traceID:
		case s.Name() == tracing.SpanDecision:
			decisions = append(decisions, s)
		case s.Name() == tracing.SpanWait:
			waits = append(waits, s)
		}
	}
	if len(decisions) != 2 || len(waits) != 1 || len(loads) != 1 {
		t.Fatalf("%d decisions and %d waits in the request trace, %d cold loads; want 2, 1, 1", len(decisions), len(waits), len(loads))
	}
	for _, d := range decisions {
		if d.Parent().SpanID().String() != parentID || !d.Parent().IsRemote() {
			t.Errorf("decision span parent %s, want the traceparent's %s", d.Parent().SpanID(), parentID)
		}
	}
	// The second decision is the cold start; its wait hangs under it.
	if waits[0].Parent().SpanID() != decisions[1].SpanContext().SpanID() {
		t.Error("the cold-load wait span is not a child of its request's decision span")
	}
	attrs := map[string]any{}
	for _, kv := range loads[0].Attributes() {
		attrs[string(kv.Key)] = kv.Value.AsInterface()
	}
	if attrs["cortex.resolved"] != "Org/Cold" || attrs["cortex.node"] != "beast" {
		t.Errorf("cold load span attributes %v", attrs)
	}
}

// checkModelList asks for /v1/models the way a client does, through the
// official OpenAI SDK, with a stand-in for Envoy that turns the HTTP
// request into ext_proc request headers and the immediate response back.
func checkModelList(t *testing.T, o *obService) {
	envoy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rep := o.exchange(t, r.Method, r.URL.RequestURI(), nil)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(rep.status)
		w.Write(rep.body)
	}))
	defer envoy.Close()
	client := openai.NewClient(option.WithBaseURL(envoy.URL+"/v1/"), option.WithAPIKey("k"), option.WithMaxRetries(0))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	page, err := client.Models.List(ctx)
	if err != nil {
		t.Fatalf("Models.List: %v", err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	if want := "Org/Cold Org/Warm ob/cold ob/warm"; strings.Join(ids, " ") != want {
		t.Errorf("listed %v, want %s (sorted, hidden alias left out)", ids, want)
	}
	m, err := client.Models.Get(ctx, "ob/cold") // the SDK escapes the slash
	if err != nil {
		t.Fatalf("Models.Get(ob/cold): %v", err)
	}
	if raw := m.RawJSON(); !strings.Contains(raw, `"loaded":true`) || !strings.Contains(raw, `{"node":"beast","status":"loaded"}`) {
		t.Errorf("ob/cold after its cold load: %s", raw)
	}
	w, err := client.Models.Get(ctx, "Org/Warm")
	if err != nil {
		t.Fatal(err)
	}
	if raw := w.RawJSON(); !strings.Contains(raw, `"cost":{"input":0,"output":0}`) || !strings.Contains(raw, `"max_model_len":8192`) {
		t.Errorf("Org/Warm lacks its zero cost or max_model_len: %s", raw)
	}
	var apiErr *openai.Error
	if _, err := client.Models.Get(ctx, "ob/secret"); !errors.As(err, &apiErr) || apiErr.StatusCode != 404 {
		t.Errorf("hidden alias: %v, want 404", err)
	}
}

// TestEvictionIsObserved: a cold load that must unload a resident model
// shows in evictions_total and as an eviction span under the cold load.
func TestEvictionIsObserved(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tracing.Use(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)))
	defer tracing.Use(nil)

	small := obStartNeuron(t, "small", false, "Org/Warm")
	small.mu.Lock()
	small.deviceMB, small.busy = 6000, 0 // room for one 4000 MB model, nothing in flight
	small.mu.Unlock()
	small.release()
	o := obStart(t, small)
	if r := o.chat(t, "Org/Cold", "req-evict"); r.status != 200 || !r.cold || r.node != "small" {
		t.Fatalf("Org/Cold: %+v", r)
	}
	m := o.scrape(t)
	if v := m.value("evictions_total", "node", "small", "model", "Org/Warm"); v != 1 {
		t.Errorf("evictions_total{small,Org/Warm} = %v, want 1", v)
	}
	if v := m.value("cold_loads_total", "model", "Org/Cold", "node", "small", "result", "success"); v != 1 {
		t.Errorf("cold_loads_total{Org/Cold,small,success} = %v, want 1", v)
	}
	var load, evict sdktrace.ReadOnlySpan
	for _, s := range rec.Ended() {
		switch s.Name() {
		case tracing.SpanColdLoad:
			load = s
		case tracing.SpanEvict:
			evict = s
		}
	}
	if load == nil || evict == nil {
		t.Fatalf("cold load span %v, eviction span %v; want both", load, evict)
	}
	if evict.Parent().SpanID() != load.SpanContext().SpanID() {
		t.Error("the eviction span is not a child of its cold load's span")
	}
	attrs := map[string]any{}
	for _, kv := range evict.Attributes() {
		attrs[string(kv.Key)] = kv.Value.AsInterface()
	}
	if attrs["cortex.node"] != "small" || attrs["cortex.resolved"] != "Org/Warm" || attrs["cortex.incoming"] != "Org/Cold" {
		t.Errorf("eviction span attributes %v", attrs)
	}
}
