package service_test

// The fault matrix of issue 8: a real service.Service on 127.0.0.1:0,
// neuron simulators behind fault-injecting handlers, and a client that
// speaks ext_proc the way Envoy does. Each test asserts what the client
// gets, that the service keeps answering, and that nothing leaks.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
	"github.com/helexa/cortex-extproc/internal/service"
)

// fxCatalogue has a model every test neuron holds, one only in the
// catalogue, and aliases to both.
const fxCatalogue = `
[[models]]
id = "Org/Warm"
harness = "candle"
vram_mb = 4000

[[models]]
id = "Org/Cold"
harness = "candle"
vram_mb = 4000

[aliases]
"fx/warm" = "Org/Warm"
"fx/cold" = "Org/Cold"
`

// fxNeuron is a neuron simulator behind a handler that can inject faults.
type fxNeuron struct {
	name string
	sim  *neuronsim.Sim
	srv  *httptest.Server
	// closing ends every hanging handler, so the server can close.
	closing chan struct{}

	mu       sync.Mutex
	hook     func(w http.ResponseWriter, r *http.Request) bool // true: answered
	uris     []string
	noRecord bool // the soak does not keep every request URI
}

func fxStartNeuron(t *testing.T, name string, models ...string) *fxNeuron {
	t.Helper()
	var specs []neuronsim.ModelSpec
	for _, m := range models {
		specs = append(specs, neuronsim.ModelSpec{ID: m, VRAMMB: 2000})
	}
	return fxStartSim(t, neuronsim.Options{Name: name, Devices: []int64{24000}, Models: specs,
		Sizes: map[string]int64{"Org/Warm": 4000, "Org/Cold": 4000}, MaxInFlight: 64, MaxQueueDepth: 10000})
}

func fxStartSim(t testing.TB, opts neuronsim.Options) *fxNeuron {
	t.Helper()
	name := opts.Name
	sim, err := neuronsim.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	n := &fxNeuron{name: name, sim: sim, closing: make(chan struct{})}
	n.srv = httptest.NewServer(n)
	t.Cleanup(func() {
		close(n.closing)
		n.srv.Close()
		sim.Close()
	})
	return n
}

func (n *fxNeuron) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n.mu.Lock()
	if !n.noRecord {
		n.uris = append(n.uris, r.RequestURI)
	}
	hook := n.hook
	n.mu.Unlock()
	if hook != nil && hook(w, r) {
		return
	}
	n.sim.ServeHTTP(w, r)
}

func (n *fxNeuron) setHook(h func(w http.ResponseWriter, r *http.Request) bool) {
	n.mu.Lock()
	n.hook = h
	n.mu.Unlock()
}

func (n *fxNeuron) requestURIs() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.uris...)
}

// hang blocks until the caller gives up or the neuron is closed: a neuron
// that accepted the connection and stopped answering.
func (n *fxNeuron) hang(_ http.ResponseWriter, r *http.Request) bool {
	select {
	case <-r.Context().Done():
	case <-n.closing:
	}
	return true
}

// poll reports whether r is one of the poller's calls.
func fxIsPoll(r *http.Request) bool {
	return r.Method == http.MethodGet && (r.URL.Path == "/models" || r.URL.Path == "/health" || r.URL.Path == "/discovery")
}

// fxService is a running service.Service and an ext_proc client to it.
type fxService struct {
	svc    *service.Service
	conn   *grpc.ClientConn
	ep     extprocv3.ExternalProcessorClient
	cancel context.CancelFunc
	done   chan error // Run's result
	logs   *lockedBuffer

	once   sync.Once
	runErr error
	exited bool
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// fxConfig is the embedded defaults made fast and local: loopback
// listeners on free ports, 50 ms polls, a 2-failure threshold.
func fxConfig(t testing.TB, catalogue string, neurons ...*fxNeuron) config.Config {
	t.Helper()
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	cfg := res.Config
	if catalogue != "" {
		cfg.ModelsConfig = filepath.Join(t.TempDir(), "models.toml")
		if err := os.WriteFile(cfg.ModelsConfig, []byte(catalogue), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg.ExtProc.Listen = "127.0.0.1:0"
	cfg.Admin.Listen = "127.0.0.1:0"
	cfg.ExtProc.ShutdownDelay = 0 // no Envoy health-checks these; the shutdown tests set their own
	cfg.ExtProc.DrainTimeout = 5 * time.Second
	cfg.Poll.Interval = 50 * time.Millisecond
	cfg.Poll.Timeout = 300 * time.Millisecond
	cfg.Poll.FailureThreshold = 2
	cfg.ColdLoad.Timeout = 10 * time.Second
	cfg.Catalogue.PollInterval = 50 * time.Millisecond
	for _, n := range neurons {
		cfg.Neurons = append(cfg.Neurons, config.Neuron{Name: n.name, Endpoint: n.srv.URL})
	}
	return cfg
}

// fxLeakCheck registers, first so it runs last, a goroutine leak check.
// Viper's catalogue file watch cannot be stopped (catalogue.Watch says so)
// and is not ours to check.
func fxLeakCheck(t *testing.T) {
	t.Helper()
	before := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		goleak.VerifyNone(t,
			before,
			goleak.IgnoreAnyFunction("github.com/spf13/viper.(*Viper).WatchConfig.func1"),
			goleak.IgnoreAnyFunction("github.com/spf13/viper.(*Viper).WatchConfig.func1.1"),
			goleak.IgnoreAnyFunction("github.com/fsnotify/fsnotify.(*inotify).readEvents"),
			goleak.IgnoreAnyFunction("github.com/fsnotify/fsnotify.(*Watcher).readEvents"),
		)
	})
}

// fxStart runs the service until the test ends and waits until it is ready.
func fxStart(t testing.TB, cfg config.Config) *fxService {
	t.Helper()
	return fxStartLogging(t, cfg, slog.LevelInfo)
}

// fxStartLogging is fxStart keeping the service's log lines from level up
// (shown when the test fails).
func fxStartLogging(t testing.TB, cfg config.Config, level slog.Level) *fxService {
	t.Helper()
	logs := &lockedBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: level}))
	svc, err := service.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h := &fxService{svc: svc, cancel: cancel, done: make(chan error, 1), logs: logs}
	go func() { h.done <- svc.Run(ctx) }()
	conn, err := grpc.NewClient(svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	h.conn, h.ep = conn, extprocv3.NewExternalProcessorClient(conn)
	t.Cleanup(func() {
		conn.Close()
		h.stop(t)
		if t.Failed() {
			lines := strings.Split(logs.String(), "\n")
			t.Logf("service log (last 40 lines):\n%s", strings.Join(lines[max(0, len(lines)-40):], "\n"))
		}
	})
	select {
	case <-svc.Ready():
	case err := <-h.done:
		t.Fatalf("service stopped before it was ready: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("service not ready after 10s")
	}
	return h
}

// stop cancels Run and waits for it.
func (h *fxService) stop(t testing.TB) {
	t.Helper()
	h.cancel()
	if err := h.wait(30 * time.Second); err != nil {
		t.Error(err)
	}
}

// wait waits up to d for Run to return and reports an error if it did not
// or if it returned one.
func (h *fxService) wait(d time.Duration) error {
	h.once.Do(func() {
		select {
		case h.runErr = <-h.done:
			h.exited = true
		case <-time.After(d):
		}
	})
	if !h.exited {
		return fmt.Errorf("Run did not return %s after its context was cancelled", d)
	}
	if h.runErr != nil {
		return fmt.Errorf("Run returned %v", h.runErr)
	}
	return nil
}

// fxReply is what Envoy would do with the request: route it (Status 200)
// or answer it locally.
type fxReply struct {
	Status     int
	Node       string
	Cluster    string
	Model      string
	ColdStart  bool
	Overridden bool // a standalone override_message_timeout came first
	Code       string
	Message    string
	RetryAfter string
	Body       []byte // the rewritten body, or the error body
}

func (r fxReply) String() string {
	if r.Status == 200 {
		return fmt.Sprintf("routed to %s (%s) as %s cold=%v", r.Node, r.Cluster, r.Model, r.ColdStart)
	}
	return fmt.Sprintf("%d %s retry-after=%q: %s", r.Status, r.Code, r.RetryAfter, r.Message)
}

func fxChat(model string) []byte {
	b, _ := json.Marshal(map[string]any{"model": model, "messages": []map[string]string{{"role": "user", "content": "hi"}}})
	return b
}

func fxHeaders(path string, body []byte) *extprocv3.ProcessingRequest {
	kv := []string{":method", "POST", ":path", path, ":authority", "gw", "content-type", "application/json",
		"content-length", strconv.Itoa(len(body)), "x-request-id", "fx", "x-cortex-cluster", "neuron-evil"}
	hs := &corev3.HeaderMap{}
	for i := 0; i < len(kv); i += 2 {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{
		Request:        &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hs}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED},
	}
}

func fxBody(body []byte) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}}
}

func fxResponseHeaders() *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte("200")}}}}}}
}

// route sends one chat request for model and fails the test on a protocol
// error.
func (h *fxService) route(t testing.TB, model string) fxReply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := fxExchange(ctx, h.ep, "/v1/chat/completions", fxChat(model), nil)
	if err != nil {
		t.Fatalf("request for %q: %v", model, err)
	}
	return r
}

// fxExchange plays Envoy for one request: headers, body, and on a route the
// response headers, reading one reply per message; then it half-closes and
// expects the server to end the stream with OK. overridden, when set, is
// called when the standalone override_message_timeout arrives (the request
// is held for a cold load).
func fxExchange(ctx context.Context, ep extprocv3.ExternalProcessorClient, path string, body []byte, overridden func()) (fxReply, error) {
	st, err := ep.Process(ctx)
	if err != nil {
		return fxReply{}, err
	}
	recv := func() (*extprocv3.ProcessingResponse, error) {
		r, err := st.Recv()
		if errors.Is(err, io.EOF) {
			return nil, errors.New("stream ended with OK before the reply (Envoy would pass the request through)")
		}
		return r, err
	}
	if err := st.Send(fxHeaders(path, body)); err != nil {
		return fxReply{}, err
	}
	r, err := recv()
	if err != nil {
		return fxReply{}, fmt.Errorf("headers reply: %w", err)
	}
	var out fxReply
	if ir := r.GetImmediateResponse(); ir != nil {
		return fxImmediate(ir)
	}
	if err := st.Send(fxBody(body)); err != nil {
		return fxReply{}, err
	}
	for {
		if r, err = recv(); err != nil {
			return fxReply{}, fmt.Errorf("body reply: %w", err)
		}
		if r.GetOverrideMessageTimeout() != nil && r.Response == nil && !out.Overridden {
			out.Overridden = true
			if overridden != nil {
				overridden()
			}
			continue
		}
		break
	}
	if ir := r.GetImmediateResponse(); ir != nil {
		rep, err := fxImmediate(ir)
		rep.Overridden = out.Overridden
		return rep, err
	}
	common := r.GetRequestBody().GetResponse()
	if common == nil || !common.GetClearRouteCache() {
		return fxReply{}, fmt.Errorf("body reply %v neither routes nor answers", r)
	}
	out.Status = 200
	for _, h := range common.GetHeaderMutation().GetSetHeaders() {
		v := string(h.GetHeader().GetRawValue())
		switch h.GetHeader().GetKey() {
		case "x-cortex-cluster":
			out.Cluster = v
		case "x-cortex-node":
			out.Node = v
		case "x-cortex-model":
			out.Model = v
		case "x-cortex-cold-start":
			out.ColdStart = v == "true"
		}
	}
	out.Body = body
	if b := common.GetBodyMutation().GetBody(); b != nil {
		out.Body = b
	}
	if err := st.Send(fxResponseHeaders()); err != nil {
		return fxReply{}, err
	}
	if _, err := recv(); err != nil {
		return fxReply{}, fmt.Errorf("response headers reply: %w", err)
	}
	if err := st.CloseSend(); err != nil {
		return fxReply{}, err
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		return fxReply{}, fmt.Errorf("after half-close: %v, want the stream to end with OK", err)
	}
	return out, nil
}

func fxImmediate(ir *extprocv3.ImmediateResponse) (fxReply, error) {
	out := fxReply{Status: int(ir.GetStatus().GetCode()), Body: ir.GetBody()}
	ct := ""
	for _, h := range ir.GetHeaders().GetSetHeaders() {
		switch h.GetHeader().GetKey() {
		case "retry-after":
			out.RetryAfter = string(h.GetHeader().GetRawValue())
		case "content-type":
			ct = string(h.GetHeader().GetRawValue())
		}
	}
	if ct != "application/json" {
		return out, fmt.Errorf("immediate response content-type %q, want application/json", ct)
	}
	var env struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(ir.GetBody(), &env); err != nil {
		return out, fmt.Errorf("immediate response body %q is not JSON: %v", ir.GetBody(), err)
	}
	out.Code, out.Message = env.Error.Code, env.Error.Message
	return out, nil
}

// get fetches an admin path.
func (h *fxService) get(t testing.TB, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + h.svc.AdminAddr() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric sums the samples of name whose labels include every k="v" given.
func (h *fxService) metric(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	_, text := h.get(t, "/metrics")
	return fxMetricIn(text, name, labels...)
}

func fxMetricIn(text, name string, labels ...string) float64 {
	sum := 0.0
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for i := 0; i+1 < len(labels); i += 2 {
			if !strings.Contains(line, labels[i]+`="`+labels[i+1]+`"`) {
				ok = false
			}
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// nodeHealthy reads a node's health from /debug/fleet.
func (h *fxService) nodeHealthy(t testing.TB, node string) bool {
	t.Helper()
	_, text := h.get(t, "/debug/fleet")
	var v struct {
		Nodes []struct {
			Name    string
			Healthy bool
		}
	}
	if err := json.Unmarshal([]byte(text), &v); err != nil {
		t.Fatalf("/debug/fleet: %v", err)
	}
	for _, n := range v.Nodes {
		if n.Name == node {
			return n.Healthy
		}
	}
	t.Fatalf("/debug/fleet has no node %s", node)
	return false
}

// pollRound is the fleet poll round /debug/fleet shows.
func (h *fxService) pollRound(t testing.TB) uint64 {
	t.Helper()
	_, text := h.get(t, "/debug/fleet")
	var v struct {
		PollRound uint64 `json:"poll_round"`
	}
	if err := json.Unmarshal([]byte(text), &v); err != nil {
		t.Fatalf("/debug/fleet: %v", err)
	}
	return v.PollRound
}

// eventually polls cond for up to 15 s: faults take a few poll rounds to
// show, and the machine may be busy.
func fxEventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func fxWantRouted(t testing.TB, r fxReply, node, model string) {
	t.Helper()
	if r.Status != 200 || r.Node != node || r.Model != model || r.Cluster != "neuron-"+node {
		t.Fatalf("got %s, want routed to %s as %s", r, node, model)
	}
}

func fxWantError(t testing.TB, r fxReply, status int, code, retryAfter, contains string) {
	t.Helper()
	if r.Status != status || r.Code != code || r.RetryAfter != retryAfter || !strings.Contains(r.Message, contains) {
		t.Fatalf("got %s, want %d %s retry-after=%q containing %q", r, status, code, retryAfter, contains)
	}
}

// --- neurons misbehaving during polls -------------------------------------

func TestFaultNeuronStopsAnsweringMidPollThenComesBack(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

	a.setHook(func(w http.ResponseWriter, r *http.Request) bool { return fxIsPoll(r) && a.hang(w, r) })
	fxEventually(t, "a marked unhealthy", func() bool { return !h.nodeHealthy(t, "a") })
	// Decisions never wait on the hung neuron: the client gets a prompt,
	// retryable 503 while it is out.
	fxWantError(t, h.route(t, "fx/warm"), 503, "service_unavailable", "5", "no healthy neuron")
	if c, _ := h.get(t, "/healthz"); c != 200 {
		t.Errorf("/healthz %d while a neuron hangs", c)
	}

	a.setHook(nil)
	fxEventually(t, "a healthy again", func() bool { return h.nodeHealthy(t, "a") })
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
	if h.metric(t, "cortex_extproc_neuron_poll_failures_total", "node", "a") < 2 {
		t.Error("poll failures of a not counted")
	}
}

func TestFaultNeuronFlapsEveryPoll(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	var calls atomic.Int64
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/models" || calls.Add(1)%2 == 0 {
			return false
		}
		http.Error(w, `{"error":"flap"}`, http.StatusInternalServerError)
		return true
	})
	// One failure then one success, forever: below the threshold of 2, so
	// the neuron stays in the fleet and every request is served.
	start := calls.Load()
	for calls.Load() < start+10 {
		fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
	}
	if !h.nodeHealthy(t, "a") {
		t.Error("a flapping below the failure threshold was marked unhealthy")
	}
	if h.metric(t, "cortex_extproc_neuron_poll_failures_total", "node", "a") < 4 {
		t.Error("flapping polls not counted as failures")
	}
	if h.metric(t, "cortex_extproc_neuron_healthy", "node", "a") != 1 {
		t.Error("neuron_healthy{node=a} is not 1")
	}
}

// TestFaultNeuronBadAnswers: a neuron whose management API answers
// nonsense leaves the fleet after the failure threshold; requests go to the
// healthy replica, and it comes back once it answers properly.
func TestFaultNeuronBadAnswers(t *testing.T) {
	huge := func(w http.ResponseWriter, r *http.Request) bool {
		w.Header().Set("content-type", "application/json")
		w.Write([]byte("["))
		chunk := bytes.Repeat([]byte(" "), 64<<10)
		for i := 0; i < (neuron.MaxResponseBytes>>16)+64; i++ { // past the client's cap
			if _, err := w.Write(chunk); err != nil {
				break
			}
		}
		return true
	}
	cases := []struct {
		name  string
		fault func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool
	}{
		{"500", func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				http.Error(w, `{"code":"internal","error":"boom"}`, 500)
				return true
			}
		}},
		{"invalid JSON", func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				w.Write([]byte(`[{"id": "Org/Warm", status: loaded}`))
				return true
			}
		}},
		{"truncated JSON", func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				rec := httptest.NewRecorder()
				n.sim.ServeHTTP(rec, r)
				b := rec.Body.Bytes()
				w.Write(b[:len(b)/2])
				return true
			}
		}},
		{"huge body", func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool { return huge }},
		{"wrong types", func(n *fxNeuron) func(http.ResponseWriter, *http.Request) bool {
			return func(w http.ResponseWriter, r *http.Request) bool {
				switch r.URL.Path {
				case "/models":
					w.Write([]byte(`[{"id": 7, "status": true, "devices": "0"}]`))
				case "/health":
					w.Write([]byte(`{"uptime_secs": "long", "devices": {}}`))
				default:
					w.Write([]byte(`{"devices": "none", "max_prompt_tokens": "many"}`))
				}
				return true
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			fxLeakCheck(t)
			a := fxStartNeuron(t, "a", "Org/Warm")
			b := fxStartNeuron(t, "b", "Org/Warm")
			h := fxStart(t, fxConfig(t, fxCatalogue, a, b))
			fault := c.fault(a)
			a.setHook(func(w http.ResponseWriter, r *http.Request) bool { return fxIsPoll(r) && fault(w, r) })
			fxEventually(t, "a marked unhealthy", func() bool { return !h.nodeHealthy(t, "a") })
			for i := 0; i < 20; i++ {
				fxWantRouted(t, h.route(t, "fx/warm"), "b", "Org/Warm")
			}
			if c, _ := h.get(t, "/readyz"); c != 200 {
				t.Errorf("/readyz %d with one bad neuron", c)
			}
			a.setHook(nil)
			fxEventually(t, "a healthy again", func() bool { return h.nodeHealthy(t, "a") })
		})
	}
}

// --- cold loads misbehaving ------------------------------------------------

func TestFaultLoadHangsPastTheTimeout(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	cfg := fxConfig(t, fxCatalogue, a)
	cfg.ColdLoad.Timeout = time.Second
	h := fxStart(t, cfg)
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		return r.URL.Path == "/models/load" && a.hang(w, r)
	})
	r := h.route(t, "fx/cold")
	if !r.Overridden {
		t.Error("no override_message_timeout before holding the request")
	}
	fxWantError(t, r, 503, "service_unavailable", "5", "Org/Cold")
	// The load is bounded by cold_load.timeout and given up; the service
	// keeps routing what is loaded.
	fxEventually(t, "the hung load to be abandoned", func() bool {
		_, text := h.get(t, "/debug/fleet")
		return strings.Contains(text, `"loads_in_progress": []`)
	})
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
	if h.metric(t, "cortex_extproc_cold_loads_total", "model", "Org/Cold", "result", "failure") != 1 {
		t.Error("the timed-out load is not counted as a failure")
	}
}

func TestFaultLoadFails(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	a.sim.SetLoadFailRate(1)
	fxWantError(t, h.route(t, "fx/cold"), 503, "service_unavailable", "5", "cold load of \"Org/Cold\" failed")
	// The failed (node, model) cools down: the next request is answered at
	// once with the reason, without hammering the neuron.
	r := h.route(t, "fx/cold")
	if r.Status != 503 || !strings.Contains(r.Message, "simulated load failure") || r.Overridden {
		t.Errorf("second request: %s (overridden=%v), want an immediate 503 with the recent failure", r, r.Overridden)
	}
	if n := a.sim.LoadCalls(); n != 1 {
		t.Errorf("%d load calls, want 1 (cool-down)", n)
	}
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
}

// TestFaultLoadAnswersAlreadyLoaded: another gateway loaded the model in
// the meantime; the neuron's 400 "already loaded" means it is resident.
func TestFaultLoadAnswersAlreadyLoaded(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.URL.Path != "/models/load" {
			return false
		}
		a.sim.ServeHTTP(httptest.NewRecorder(), r) // the other gateway's load
		w.Header().Set("content-type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		w.Write([]byte(`{"code":"already_loaded","error":"model Org/Cold already loaded on a"}`))
		return true
	})
	r := h.route(t, "fx/cold")
	fxWantRouted(t, r, "a", "Org/Cold")
	if !r.ColdStart {
		t.Error("x-cortex-cold-start is not true after a cold load")
	}
}

// TestFaultLoadedModelNeverAppearsInModels: the load succeeds but the
// neuron's /models never lists the model. The first request is routed
// (MarkLoaded put it in the fleet view at once). The neuron's /models is
// the truth, so once a poll that started after the load does not list it,
// cortex-extproc forgets it; the next request cold-loads again, the neuron
// answers "already loaded", and that request is routed too. Every request
// is served by the neuron holding the model; the cost is one load call per
// request after each poll, single-flighted.
func TestFaultLoadedModelNeverAppearsInModels(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if r.Method != http.MethodGet || r.URL.Path != "/models" {
			return false
		}
		var ms []map[string]any
		rec := httptest.NewRecorder()
		a.sim.ServeHTTP(rec, r)
		json.Unmarshal(rec.Body.Bytes(), &ms)
		kept := ms[:0]
		for _, m := range ms {
			if m["id"] != "Org/Cold" {
				kept = append(kept, m)
			}
		}
		json.NewEncoder(w).Encode(kept)
		return true
	})
	const requests = 8
	for i := 0; i < requests; i++ {
		fxWantRouted(t, h.route(t, "fx/cold"), "a", "Org/Cold")
		// Two rounds later, a poll that started after the load has
		// published what the neuron lists.
		r0 := h.pollRound(t)
		fxEventually(t, "two poll rounds", func() bool { return h.pollRound(t) >= r0+2 })
	}
	n := a.sim.LoadCalls()
	if n < 2 || n > requests {
		t.Errorf("%d load calls for %d requests spread over polls, want between 2 and %d", n, requests, requests)
	}
}

// TestFaultEvictedModelIsNotRoutedBeforeTheNextPoll: a cold load that
// evicts a model hides it from routing at once. Before, the fleet view kept
// listing it until the next poll (10 s by default), and every request for
// it in between went to a neuron that had just unloaded it (404).
func TestFaultEvictedModelIsNotRoutedBeforeTheNextPoll(t *testing.T) {
	fxLeakCheck(t)
	// Room for one of the two 4000 MB models at a time.
	a := fxStartSim(t, neuronsim.Options{Name: "a", Devices: []int64{6000},
		Models: []neuronsim.ModelSpec{{ID: "Org/Warm", VRAMMB: 4000}},
		Sizes:  map[string]int64{"Org/Warm": 4000, "Org/Cold": 4000}})
	cfg := fxConfig(t, fxCatalogue, a)
	cfg.Poll.Interval = time.Hour // only the first round: nothing but the eviction updates the view
	h := fxStart(t, cfg)
	holds := func(model string) bool {
		for _, m := range a.sim.Models() {
			if m.ID == model && m.Status.Resident() {
				return true
			}
		}
		return false
	}

	for i, model := range []string{"fx/cold", "fx/warm", "fx/cold", "fx/warm", "fx/warm"} {
		r := h.route(t, model)
		if r.Status != 200 || r.Node != "a" {
			t.Fatalf("request %d for %s: %s, want routed to a", i, model, r)
		}
		if !holds(r.Model) {
			t.Fatalf("request %d for %s routed to a (cold start %v), which does not hold %s: misrouted", i, model, r.ColdStart, r.Model)
		}
	}
	if n := h.metric(t, "cortex_extproc_evictions_total", "node", "a"); n != 4 {
		t.Errorf("%v evictions, want 4", n)
	}
}

// --- endpoint resolution misbehaving --------------------------------------

func TestFaultEndpointUnresolvable(t *testing.T) {
	for _, c := range []struct{ name, status, body string }{
		{"404", "404", `{"code":"not_found","error":"no such model"}`},
		{"not a URL", "200", `{"url":"not a url"}`},
		{"no host", "200", `{"url":"http://"}`},
		{"scheme only", "200", `{"url":"javascript:alert(1)"}`},
		{"no url", "200", `{}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			fxLeakCheck(t)
			a := fxStartNeuron(t, "a", "Org/Warm")
			a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
				if !strings.HasSuffix(r.URL.Path, "/endpoint") {
					return false
				}
				code, _ := strconv.Atoi(c.status)
				w.WriteHeader(code)
				w.Write([]byte(c.body))
				return true
			})
			h := fxStart(t, fxConfig(t, fxCatalogue, a))
			fxWantError(t, h.route(t, "fx/warm"), 503, "service_unavailable", "2", "endpoint could not be resolved")
			// It is retried every round: fixed, it routes.
			a.setHook(nil)
			fxEventually(t, "the endpoint resolved", func() bool { return h.route(t, "fx/warm").Status == 200 })
			fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
		})
	}
}

// TestFaultHangingEndpointLookupsDoNotStallTheFleet: a neuron whose
// /models/{id}/endpoint calls hang must not hold back the polling of the
// other neurons (poll rounds wait for every neuron, so one neuron's round
// must stay bounded however many models it lists).
func TestFaultHangingEndpointLookupsDoNotStallTheFleet(t *testing.T) {
	fxLeakCheck(t)
	junk := []string{"Org/Warm"}
	for i := 0; i < 10; i++ {
		junk = append(junk, fmt.Sprintf("Junk/%d", i))
	}
	a := fxStartNeuron(t, "a", junk...)
	b := fxStartNeuron(t, "b", "Org/Warm")
	var hung atomic.Int64
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !strings.HasPrefix(r.URL.Path, "/models/Junk") {
			return false
		}
		hung.Add(1)
		return a.hang(w, r)
	})
	h := fxStart(t, fxConfig(t, fxCatalogue, a, b))
	bPolls := func() int {
		n := 0
		for _, u := range b.requestURIs() {
			if u == "/models" {
				n++
			}
		}
		return n
	}
	fxEventually(t, "a's lookups to start hanging", func() bool { return hung.Load() > 0 })
	start := bPolls()
	fxEventually(t, "b to be polled 6 more times", func() bool { return bPolls() >= start+6 })
	// Ten hanging lookups in a row would hold every round for 10 × the
	// poll timeout; b would be polled once per 10 of them.
	if n := hung.Load(); n >= 30 {
		t.Errorf("%d hanging endpoint lookups on a while b was polled 6 times: one neuron's lookups stall the fleet's polls", n)
	}
	if r := h.route(t, "fx/warm"); r.Status != 200 || r.Model != "Org/Warm" {
		t.Errorf("got %s, want routed", r)
	}
}

// --- the catalogue misbehaving during reloads -----------------------------

func TestFaultCatalogueReloads(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	cfg := fxConfig(t, fxCatalogue, a)
	h := fxStart(t, cfg)
	path := cfg.ModelsConfig
	errorsSoFar := func() float64 {
		return h.metric(t, "cortex_extproc_catalogue_reloads_total", "result", "error")
	}
	stillServing := func(step string) {
		t.Helper()
		fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
		if c, _ := h.get(t, "/readyz"); c != 200 {
			t.Errorf("%s: /readyz %d", step, c)
		}
	}

	before := errorsSoFar()
	if err := os.WriteFile(path, []byte("[[models]]\nid = \"Org/Warm\"\nharness = \n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fxEventually(t, "the invalid catalogue to be refused", func() bool { return errorsSoFar() > before })
	stillServing("invalid")

	before = errorsSoFar()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	fxEventually(t, "the deleted catalogue to be noticed", func() bool { return errorsSoFar() > before })
	stillServing("deleted")

	before = errorsSoFar()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	fxEventually(t, "the directory to be refused", func() bool { return errorsSoFar() > before })
	stillServing("directory")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(fxCatalogue+"\"fx/new\" = \"Org/Warm\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fxEventually(t, "the fixed catalogue to be taken", func() bool { return h.route(t, "fx/new").Status == 200 })
	fxWantRouted(t, h.route(t, "fx/new"), "a", "Org/Warm")
	stillServing("fixed")
}

// --- Envoy misbehaving -----------------------------------------------------

// TestFaultClientHangsUpDuringColdLoad: Envoy cancels the stream while the
// request is held. The wait ends, the waiter slot is given back, the load
// goes on and later requests find the model without loading it again.
func TestFaultClientHangsUpDuringColdLoad(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, fxConfig(t, fxCatalogue, a))
	release := a.sim.HoldLoads()
	defer release()

	const clients = 10
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			_, err := fxExchange(ctx, h.ep, "/v1/chat/completions", fxChat("fx/cold"), cancel)
			if err == nil {
				t.Error("a request whose client hung up was answered")
			}
		}()
	}
	wg.Wait()
	fxEventually(t, "waiters and streams to be released", func() bool {
		return h.metric(t, "cortex_extproc_cold_load_waiters") == 0 && h.metric(t, "cortex_extproc_inflight_streams") == 0
	})
	release()
	fxEventually(t, "the load to finish with nobody waiting", func() bool {
		_, text := h.get(t, "/debug/fleet")
		return strings.Contains(text, `"loads_in_progress": []`) && strings.Contains(text, `"id": "Org/Cold"`)
	})
	r := h.route(t, "fx/cold")
	fxWantRouted(t, r, "a", "Org/Cold")
	if r.Overridden {
		t.Error("the model loaded for hung-up clients was loaded again")
	}
	if n := a.sim.LoadCalls(); n != 1 {
		t.Errorf("%d load calls, want 1", n)
	}
}

// TestFault5000ConcurrentStreams opens 5,000 ext_proc streams at once over
// a few connections (Envoy multiplexes on HTTP/2), holds them all open at
// the same time, then routes every one.
func TestFault5000ConcurrentStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("5,000 streams: skipped with -short")
	}
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	b := fxStartNeuron(t, "b", "Org/Warm")
	cfg := fxConfig(t, fxCatalogue, a, b)
	// The burst saturates this machine: polls with the fault tests' 300 ms
	// timeout would fail and take both neurons out of the fleet.
	cfg.Poll.Interval, cfg.Poll.Timeout, cfg.Poll.FailureThreshold = time.Second, 20*time.Second, 3
	h := fxStart(t, cfg)

	const streams, conns = 5000, 8
	var clients []extprocv3.ExternalProcessorClient
	for i := 0; i < conns; i++ {
		c, err := grpc.NewClient(h.svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients = append(clients, extprocv3.NewExternalProcessorClient(c))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	body := fxChat("fx/warm")
	var opened, routed, failed atomic.Int64
	allOpen, proceed := make(chan struct{}), make(chan struct{})
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func(ep extprocv3.ExternalProcessorClient) {
			defer wg.Done()
			fail := func(err error) {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				if opened.Add(1) == streams {
					close(allOpen)
				}
			}
			st, err := ep.Process(ctx)
			if err != nil {
				fail(err)
				return
			}
			if err := st.Send(fxHeaders("/v1/chat/completions", body)); err != nil {
				fail(err)
				return
			}
			if r, err := st.Recv(); err != nil || r.GetRequestHeaders() == nil {
				fail(fmt.Errorf("headers reply %v: %v", r, err))
				return
			}
			if opened.Add(1) == streams {
				close(allOpen)
			}
			select {
			case <-proceed:
			case <-ctx.Done():
				failed.Add(1)
				return
			}
			if err := st.Send(fxBody(body)); err != nil {
				failed.Add(1)
				return
			}
			r, err := st.Recv()
			hs := map[string]string{}
			for _, h := range r.GetRequestBody().GetResponse().GetHeaderMutation().GetSetHeaders() {
				hs[h.GetHeader().GetKey()] = string(h.GetHeader().GetRawValue())
			}
			if err != nil || (hs["x-cortex-node"] != "a" && hs["x-cortex-node"] != "b") || hs["x-cortex-model"] != "Org/Warm" {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, fmt.Sprintf("body reply %v: %v", r, err))
				return
			}
			st.CloseSend()
			if _, err := st.Recv(); !errors.Is(err, io.EOF) {
				failed.Add(1)
				return
			}
			routed.Add(1)
		}(clients[i%conns])
	}
	select {
	case <-allOpen:
	case <-ctx.Done():
		t.Fatalf("only %d of %d streams opened", opened.Load(), streams)
	}
	if failed.Load() == 0 {
		if n := h.metric(t, "cortex_extproc_inflight_streams"); n != streams {
			t.Errorf("inflight_streams = %v with every stream open, want %d", n, streams)
		}
	}
	close(proceed)
	wg.Wait()
	if routed.Load() != streams {
		t.Fatalf("%d of %d streams routed, %d failed (first: %v)", routed.Load(), streams, failed.Load(), firstErr.Load())
	}
	if c, _ := h.get(t, "/readyz"); c != 200 {
		t.Errorf("/readyz %d after the burst", c)
	}
}

// TestFaultShutdownDuring500HeldRequests is SIGTERM (Run's context
// cancelled) while 500 requests are held for a cold load: readiness goes
// NOT_SERVING before anything else, every held request is answered within
// the drain timeout (routed if the load finishes, else a 503 with
// Retry-After saying the service is shutting down rather than a cut stream,
// which Envoy would turn into a bare 500; the streams are closed only once
// every one has its answer), and Run returns nil.
func TestFaultShutdownDuring500HeldRequests(t *testing.T) {
	for _, loadFinishes := range []bool{true, false} {
		name := map[bool]string{true: "load finishes during the drain", false: "load outlasts the drain"}[loadFinishes]
		t.Run(name, func(t *testing.T) {
			fxLeakCheck(t)
			a := fxStartNeuron(t, "a", "Org/Warm")
			cfg := fxConfig(t, fxCatalogue, a)
			cfg.ExtProc.DrainTimeout = 2 * time.Second
			if loadFinishes {
				// Ended by the last stream, never by the timeout (checked below).
				cfg.ExtProc.DrainTimeout = 10 * time.Minute
			}
			cfg.ColdLoad.Timeout = time.Minute
			h := fxStart(t, cfg)
			release := a.sim.HoldLoads()
			defer release()

			hc := healthpb.NewHealthClient(h.conn)
			wctx, wcancel := context.WithCancel(context.Background())
			defer wcancel()
			watch, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{Service: service.HealthReadiness})
			if err != nil {
				t.Fatal(err)
			}
			if m, err := watch.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("readiness before the drain: %v %v", m, err)
			}

			const held = 500
			var waiting, answered atomic.Int64
			replies := make(chan fxReply, held)
			errs := make(chan error, held)
			for i := 0; i < held; i++ {
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
					defer cancel()
					r, err := fxExchange(ctx, h.ep, "/v1/chat/completions", fxChat("fx/cold"), func() { waiting.Add(1) })
					answered.Add(1)
					if err != nil {
						errs <- err
						return
					}
					replies <- r
				}()
			}
			// 500 streams under -race on a busy machine can take a while to
			// be held; that is setup, not what this test measures.
			for deadline := time.Now().Add(2 * time.Minute); waiting.Load() != held; time.Sleep(10 * time.Millisecond) {
				if time.Now().After(deadline) || len(errs) > 0 {
					t.Fatalf("%d of %d requests held (errors: %d)", waiting.Load(), held, len(errs))
				}
			}

			h.cancel() // SIGTERM
			m, err := watch.Recv()
			if err != nil || m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
				t.Fatalf("readiness after SIGTERM: %v %v", m, err)
			}
			if n := answered.Load(); n != 0 {
				t.Errorf("%d held requests were answered before readiness went NOT_SERVING", n)
			}
			if c, _ := h.get(t, "/readyz"); c != 503 {
				t.Errorf("/readyz %d while draining, want 503", c)
			}
			wcancel() // a health watch must not hold the drain

			if loadFinishes {
				release()
			}
			for i := 0; i < held; i++ {
				select {
				case r := <-replies:
					if loadFinishes {
						fxWantRouted(t, r, "a", "Org/Cold")
					} else if r.Status != 503 || r.RetryAfter == "" || !strings.Contains(r.Message, "shutting down") {
						t.Fatalf("held request: %s, want 503 with Retry-After saying cortex-extproc is shutting down", r)
					}
				case err := <-errs:
					t.Fatalf("held request cut off instead of answered: %v", err)
				case <-time.After(time.Minute):
					t.Fatalf("%d of %d held requests unanswered", held-i, held)
				}
			}
			if err := h.wait(30 * time.Second); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(h.logs.String(), "still unanswered") {
				t.Error("the drain closed streams before every held request had its answer")
			}
			if loadFinishes && strings.Contains(h.logs.String(), "drain timeout") {
				t.Errorf("the drain waited out drain_timeout (%s) although every stream finished", cfg.ExtProc.DrainTimeout)
			}
		})
	}
}

// --- hostile input ---------------------------------------------------------

// TestHostileModelIDs: ids a client could use to reach a header, a URL or
// a metric label are refused or contained.
func TestHostileModelIDs(t *testing.T) {
	fxLeakCheck(t)
	// The neuron itself lists hostile ids: they are escaped into one path
	// segment when the poller resolves their endpoints.
	hostile := []string{"../../admin", "a/b?c=d#e", "x\r\nx-cortex-cluster: evil", "%2e%2e/%2F", "sp ace", "ü/ñ"}
	a := fxStartNeuron(t, "a", append([]string{"Org/Warm"}, hostile...)...)
	cfg := fxConfig(t, fxCatalogue, a)
	cfg.ExtProc.MaxRequestBytes = 4096
	h := fxStart(t, cfg)

	cases := []struct {
		model  string
		status int
		code   string
	}{
		{strings.Repeat("m", 257), 400, "invalid_request"},
		{"a\r\nx-cortex-cluster: neuron-evil", 400, "invalid_request"},
		{"a\nb", 400, "invalid_request"},
		{"nul\x00", 400, "invalid_request"},
		{"del\x7f", 400, "invalid_request"},
		{"x\r\nx-cortex-cluster: evil", 400, "invalid_request"}, // even though a neuron lists it
		{"../../admin", 200, ""},                                // a plain id the neuron has
		{"evil/unknown-1", 404, "model_not_found"},
	}
	for _, c := range cases {
		r := h.route(t, c.model)
		if r.Status != c.status || r.Code != c.code {
			t.Errorf("model %q: %s, want %d %s", c.model, r, c.status, c.code)
		}
		if r.Status != 200 && r.Node != "" {
			t.Errorf("model %q: refused but routing headers set", c.model)
		}
	}

	// Body over the cap: 413 JSON, in each API's shape.
	big := fxChat("fx/warm")
	big = append(big[:len(big)-1], []byte(`,"pad":"`+strings.Repeat("x", 5000)+`"}`)...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, path := range []string{"/v1/chat/completions", "/v1/messages"} {
		st, err := h.ep.Process(ctx)
		if err != nil {
			t.Fatal(err)
		}
		st.Send(fxHeaders(path, big))
		st.Recv()
		st.Send(fxBody(big))
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		ir := r.GetImmediateResponse()
		if ir.GetStatus().GetCode() != 413 || !json.Valid(ir.GetBody()) || !bytes.Contains(ir.GetBody(), []byte("max_request_bytes")) {
			t.Errorf("%s over the cap: %d %s, want 413 JSON", path, ir.GetStatus().GetCode(), ir.GetBody())
		}
		st.CloseSend()
		st.Recv()
	}

	// Metric labels never carry a client-supplied model.
	for i := 0; i < 20; i++ {
		if r := h.route(t, fmt.Sprintf("evil/random-%d", i)); r.Status != 404 {
			t.Fatalf("unknown model: %s", r)
		}
	}
	_, text := h.get(t, "/metrics")
	if strings.Contains(text, "evil/") {
		t.Error("a client-supplied model id reached a metric label")
	}
	if fxMetricIn(text, "cortex_extproc_requests_total", "model", "other", "outcome", "model_not_found") < 21 {
		t.Error("unknown models are not counted under model=\"other\"")
	}

	// Every endpoint lookup was one escaped path segment.
	seg := regexp.MustCompile(`^/models/([^/?#]+)/endpoint$`)
	found := map[string]bool{}
	for _, uri := range a.requestURIs() {
		if !strings.HasPrefix(uri, "/models/") || !strings.HasSuffix(strings.SplitN(uri, "?", 2)[0], "/endpoint") {
			continue
		}
		m := seg.FindStringSubmatch(uri)
		if m == nil {
			t.Errorf("endpoint lookup %q is not one escaped path segment", uri)
			continue
		}
		id, err := url.PathUnescape(m[1])
		if err != nil {
			t.Errorf("endpoint lookup %q: %v", uri, err)
		}
		found[id] = true
	}
	for _, id := range hostile {
		if !found[id] {
			t.Errorf("no endpoint lookup for the hostile id %q (saw %v)", id, found)
		}
	}
}
