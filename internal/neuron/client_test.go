package neuron

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeNeuron is an httptest neuron answering canned bodies per path and
// recording what it saw.
type fakeNeuron struct {
	t   *testing.T
	srv *httptest.Server

	mu       sync.Mutex
	routes   map[string]func(w http.ResponseWriter, r *http.Request)
	seenURIs []string
	bodies   []string
}

func newFakeNeuron(t *testing.T) *fakeNeuron {
	t.Helper()
	f := &fakeNeuron{t: t, routes: map[string]func(http.ResponseWriter, *http.Request){}}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		f.mu.Lock()
		f.seenURIs = append(f.seenURIs, r.Method+" "+r.RequestURI)
		f.bodies = append(f.bodies, string(b))
		h := f.routes[r.Method+" "+r.RequestURI]
		f.mu.Unlock()
		if h == nil {
			http.Error(w, `{"error":"no such route"}`, http.StatusNotFound)
			return
		}
		h(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeNeuron) answer(route string, status int, body string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.routes[route] = func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_, _ = io.WriteString(w, body)
	}
}

func (f *fakeNeuron) client(t *testing.T) *Client {
	t.Helper()
	c, err := New("beast", f.srv.URL, f.srv.Client())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestNewValidatesEndpoint(t *testing.T) {
	for _, bad := range []string{"", "beast:13131", "ftp://beast:13131", "http://", "http:///x", "http://beast:13131?x=1", "::::"} {
		if _, err := New("beast", bad, nil); err == nil {
			t.Errorf("New(%q) accepted a bad endpoint", bad)
		} else if !strings.Contains(err.Error(), "beast") || !strings.Contains(err.Error(), "http://beast.internal:13131") {
			t.Errorf("New(%q) error %q should name the neuron and show the expected form", bad, err)
		}
	}
	for _, good := range []string{"http://beast.internal:13131", "https://10.0.0.5", "http://[fd00::1]:13131", "http://gw/neuron/beast/"} {
		if _, err := New("beast", good, nil); err != nil {
			t.Errorf("New(%q): %v", good, err)
		}
	}
}

func TestDiscoveryParses(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /discovery", 200, `{
	  "hostname": "beast", "os": "linux", "kernel": "6.8.0",
	  "cuda_version": "12.4", "driver_version": "550.54",
	  "devices": [
	    {"index": 0, "name": "RTX 4090", "vram_total_mb": 24564, "compute_capability": "8.9", "pci": "0000:01:00.0"},
	    {"index": 1, "name": "RTX 4090", "vram_total_mb": 24564, "compute_capability": "8.9"}
	  ],
	  "harnesses": ["candle"],
	  "cuda_unavailable_reason": null,
	  "max_prompt_tokens": 32768,
	  "some_future_field": {"nested": [1, 2, 3]}
	}`)
	d, err := f.client(t).Discovery(ctxT(t))
	if err != nil {
		t.Fatalf("Discovery: %v", err)
	}
	if d.Hostname != "beast" || len(d.Devices) != 2 || d.Devices[1].VRAMTotalMB != 24564 || d.MaxPromptTokens != 32768 || d.CUDAUnavailableReason != nil || d.Harnesses[0] != "candle" {
		t.Fatalf("Discovery parsed wrong: %+v", d)
	}
}

func TestModelsParses(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /models", 200, `[
	  {"id": "Qwen/Qwen3-8B", "harness": "candle", "status": "loaded",
	   "devices": [0], "vram_used_mb": 17800,
	   "capabilities": ["text"], "tool_call": true, "reasoning": true,
	   "limit": {"context": 32768, "output": 8192},
	   "servable": {"ok": true}, "new_field": 1},
	  {"id": "Qwen/Qwen3-1.7B", "harness": "candle", "status": "unloaded", "vram_used_mb": null},
	  {"id": "big", "harness": "candle", "status": "loaded", "devices": [0,1], "vram_used_mb": 40000,
	   "servable": {"ok": false, "reason": "insufficient_vram"}}
	]`)
	ms, err := f.client(t).Models(ctxT(t))
	if err != nil {
		t.Fatalf("Models: %v", err)
	}
	if len(ms) != 3 {
		t.Fatalf("got %d models, want 3", len(ms))
	}
	q := ms[0]
	if q.ID != "Qwen/Qwen3-8B" || q.Status != StatusLoaded || *q.VRAMUsedMB != 17800 || q.Limit.Context != 32768 || !*q.ToolCall || !q.IsServable() {
		t.Errorf("first model parsed wrong: %+v", q)
	}
	if ms[1].VRAMUsedMB != nil || !ms[1].IsServable() || ms[1].Status != StatusUnloaded {
		t.Errorf("null vram_used_mb / missing servable parsed wrong: %+v", ms[1])
	}
	if ms[2].IsServable() || ms[2].Servable.Reason != "insufficient_vram" {
		t.Errorf("servable ok=false parsed wrong: %+v", ms[2])
	}
}

func TestModelsEmptyArray(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /models", 200, `[]`)
	ms, err := f.client(t).Models(ctxT(t))
	if err != nil || ms == nil || len(ms) != 0 {
		t.Fatalf("Models on [] = %v, %v; want empty, nil", ms, err)
	}
}

func TestHealthParsesInProgressShapes(t *testing.T) {
	for _, tc := range []struct {
		inProgress string
		want       []string
	}{
		{`null`, nil},
		{`"Qwen/Qwen3-8B"`, []string{"Qwen/Qwen3-8B"}},
		{`["a", "b"]`, []string{"a", "b"}},
		{`[]`, []string{}},
	} {
		f := newFakeNeuron(t)
		f.answer("GET /health", 200, `{
		  "uptime_secs": 8123,
		  "devices": [{"index": 0, "vram_used_mb": 18000, "vram_free_mb": 6500, "utilization_pct": 87, "temp_c": 71}],
		  "activation": {"state": "pre_warming", "pending": ["p"], "in_progress": `+tc.inProgress+`,
		                 "completed": ["Qwen/Qwen3-8B"], "failed": [{"id": "x", "error": "boom"}]},
		  "models": [{"id": "Qwen/Qwen3-8B", "in_flight": 1, "queue_depth": 3, "max_in_flight": 8, "max_queue_depth": 32, "extra": true}]
		}`)
		h, err := f.client(t).Health(ctxT(t))
		if err != nil {
			t.Fatalf("in_progress %s: Health: %v", tc.inProgress, err)
		}
		if h.UptimeSecs != 8123 || h.Devices[0].VRAMFreeMB != 6500 || h.Models[0].QueueDepth != 3 || h.Activation.State != "pre_warming" {
			t.Errorf("in_progress %s: parsed wrong: %+v", tc.inProgress, h)
		}
		if got := []string(h.Activation.InProgress); strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("in_progress %s: got %q, want %q", tc.inProgress, got, tc.want)
		}
		if got := h.Activation.Loading(); len(got) != len(tc.want)+1 || got[len(got)-1] != "p" {
			t.Errorf("in_progress %s: Loading() = %q", tc.inProgress, got)
		}
	}
}

func TestEndpointEscapesIDAndRewritesLoopback(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /models/Qwen%2FQwen3-8B/endpoint", 200, `{"url": "http://localhost:8081/"}`)
	c := f.client(t)
	got, err := c.Endpoint(ctxT(t), "Qwen/Qwen3-8B")
	if err != nil {
		t.Fatalf("Endpoint: %v", err)
	}
	if want := "http://127.0.0.1:8081"; got != want {
		t.Errorf("Endpoint = %q, want %q (loopback host replaced by the neuron's, port kept, slash dropped)", got, want)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.seenURIs) != 1 || f.seenURIs[0] != "GET /models/Qwen%2FQwen3-8B/endpoint" {
		t.Errorf("server saw %q, want the id as one escaped segment", f.seenURIs)
	}
}

func TestEndpointWithPathPrefix(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /gw/beast/models/org%2Fm%20x/endpoint", 200, `{"url": "http://10.1.2.3:9000/v"}`)
	c, err := New("beast", f.srv.URL+"/gw/beast/", f.srv.Client())
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Endpoint(ctxT(t), "org/m x")
	if err != nil {
		t.Fatalf("Endpoint: %v (server saw %q)", err, f.seenURIs)
	}
	if got != "http://10.1.2.3:9000/v" {
		t.Errorf("non-loopback answer changed: %q", got)
	}
}

func TestEndpointNotFound(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /models/gone/endpoint", 404, `{"error": "model gone not found"}`)
	_, err := f.client(t).Endpoint(ctxT(t), "gone")
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("404 endpoint: err = %v, want ErrNotFound", err)
	}
	var se *StatusError
	if !errors.As(err, &se) || se.Status != 404 || se.Reason != "model gone not found" {
		t.Fatalf("404 endpoint: want StatusError with reason, got %#v", err)
	}
}

func TestEndpointBadAnswers(t *testing.T) {
	for _, body := range []string{`{}`, `{"url": ""}`, `{"url": "not a url"}`, `{"url": "/relative"}`, `{"url": 5}`} {
		f := newFakeNeuron(t)
		f.answer("GET /models/m/endpoint", 200, body)
		if got, err := f.client(t).Endpoint(ctxT(t), "m"); err == nil {
			t.Errorf("answer %s: Endpoint = %q, want an error", body, got)
		}
	}
}

func TestRewriteLoopback(t *testing.T) {
	const neuron = "http://beast.internal:13131"
	for _, tc := range []struct {
		answer, endpoint, want string
		wantErr                bool
	}{
		{"http://localhost:13131", neuron, "http://beast.internal:13131", false},
		{"http://localhost:8081/", neuron, "http://beast.internal:8081", false},
		{"http://LOCALHOST:8081", neuron, "http://beast.internal:8081", false},
		{"http://127.0.0.1:8081/v1", neuron, "http://beast.internal:8081/v1", false},
		{"http://127.0.1.1:8081", neuron, "http://beast.internal:8081", false},
		{"http://0.0.0.0:13131", neuron, "http://beast.internal:13131", false},
		{"http://[::1]:13131", neuron, "http://beast.internal:13131", false},
		{"http://[::]:13131", neuron, "http://beast.internal:13131", false},
		{"https://localhost", neuron, "https://beast.internal", false},
		{"http://localhost:8081", "http://10.0.0.5:13131", "http://10.0.0.5:8081", false},
		{"http://localhost:8081", "http://[fd00::5]:13131", "http://[fd00::5]:8081", false},
		{"http://localhost", "http://[fd00::5]:13131", "http://[fd00::5]", false},
		{"http://gpu7.internal:8081", neuron, "http://gpu7.internal:8081", false},
		{"http://10.0.0.9:8081/base/", neuron, "http://10.0.0.9:8081/base", false},
		{"http://localhost.example.com:8081", neuron, "http://localhost.example.com:8081", false},
		{"not a url", neuron, "", true},
		{"localhost:8081", neuron, "", true},
		{"/v1", neuron, "", true},
		{"http://", neuron, "", true},
		{"http://%zz", neuron, "", true},
		{"http://localhost:8081", "garbage", "", true},
	} {
		got, err := RewriteLoopback(tc.answer, tc.endpoint)
		if tc.wantErr {
			if err == nil {
				t.Errorf("RewriteLoopback(%q, %q) = %q, want an error", tc.answer, tc.endpoint, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("RewriteLoopback(%q, %q) = %q, %v; want %q", tc.answer, tc.endpoint, got, err, tc.want)
		}
	}
}

func TestLoad(t *testing.T) {
	spec := LoadSpec{ModelID: "helexa:Qwen/Qwen3.6-27B", Harness: "candle", TensorParallel: new(2), Devices: []int{0, 1}}
	for _, tc := range []struct {
		name       string
		status     int
		body       string
		wantErr    bool
		wantReason string
	}{
		{"loaded", 200, `{"status": "loaded"}`, false, ""},
		{"already loaded race", 400, `{"error": "model helexa:Qwen/Qwen3.6-27B is already loaded"}`, false, ""},
		{"bad request", 400, `{"error": "unknown harness candlex"}`, true, "unknown harness candlex"},
		{"preflight", 422, `{"error": {"message": "quant q9 not found in repo"}}`, true, "quant q9 not found in repo"},
		{"cuda", 503, `{"code": "cuda_unavailable", "message": "driver mismatch"}`, true, "cuda_unavailable: driver mismatch"},
		{"plain text", 500, "kaput\n", true, "kaput"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeNeuron(t)
			f.answer("POST /models/load", tc.status, tc.body)
			err := f.client(t).Load(ctxT(t), spec)
			if !tc.wantErr {
				if err != nil {
					t.Fatalf("Load: %v, want success", err)
				}
			} else {
				var se *StatusError
				if !errors.As(err, &se) {
					t.Fatalf("Load: err = %v, want *StatusError", err)
				}
				if se.Status != tc.status || se.Reason != tc.wantReason || se.Op != "POST /models/load" {
					t.Errorf("StatusError = %+v, want status %d reason %q", se, tc.status, tc.wantReason)
				}
				if !strings.Contains(err.Error(), tc.wantReason) || !strings.Contains(err.Error(), "beast") {
					t.Errorf("error text %q should carry the neuron and its reason", err)
				}
				if errors.Is(err, ErrNotFound) {
					t.Errorf("a failed load must not look like ErrNotFound")
				}
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			var sent map[string]any
			if err := json.Unmarshal([]byte(f.bodies[0]), &sent); err != nil {
				t.Fatalf("load body not JSON: %q", f.bodies[0])
			}
			if sent["model_id"] != "helexa:Qwen/Qwen3.6-27B" || sent["tensor_parallel"] != float64(2) || sent["quant"] != nil {
				t.Errorf("load body = %q", f.bodies[0])
			}
		})
	}
}

func TestUnload(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("POST /models/unload", 200, `{"status": "unloaded"}`)
	if err := f.client(t).Unload(ctxT(t), "Qwen/Qwen3-8B"); err != nil {
		t.Fatalf("Unload: %v", err)
	}
	if f.bodies[0] != `{"model_id":"Qwen/Qwen3-8B"}` {
		t.Errorf("unload body = %q", f.bodies[0])
	}

	f2 := newFakeNeuron(t)
	f2.answer("POST /models/unload", 404, `{"error": "not loaded"}`)
	if err := f2.client(t).Unload(ctxT(t), "x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Unload 404: err = %v, want ErrNotFound", err)
	}
}

// A 2xx that does not say {"status": "loaded"} / {"status": "unloaded"}
// (garbage, a proxy's page, an empty body) leaves the outcome unknown: it is
// an error wrapping ErrUnconfirmed, never a success.
func TestLoadAndUnloadNeedTheirConfirmation(t *testing.T) {
	for _, body := range []string{`{"this is": not json <html>`, ``, `{}`, `{"status": "queued"}`, `<html>ok</html>`, `{"status": "unloaded"}`} {
		f := newFakeNeuron(t)
		f.answer("POST /models/load", 200, body)
		err := f.client(t).Load(ctxT(t), LoadSpec{ModelID: "m"})
		if !errors.Is(err, ErrUnconfirmed) || !strings.Contains(err.Error(), `neuron "beast"`) || !strings.Contains(err.Error(), "POST /models/load") {
			t.Errorf("load answered 200 %q: err = %v, want ErrUnconfirmed naming the neuron and the call", body, err)
		}
	}
	for _, body := range []string{`{"this is": not json <html>`, ``, `{"status": "loaded"}`} {
		f := newFakeNeuron(t)
		f.answer("POST /models/unload", 200, body)
		if err := f.client(t).Unload(ctxT(t), "m"); !errors.Is(err, ErrUnconfirmed) {
			t.Errorf("unload answered 200 %q: err = %v, want ErrUnconfirmed", body, err)
		}
	}
}

func TestErrorBodyTruncated(t *testing.T) {
	f := newFakeNeuron(t)
	f.answer("GET /models", 500, strings.Repeat("x", 100_000))
	_, err := f.client(t).Models(ctxT(t))
	var se *StatusError
	if !errors.As(err, &se) || se.Status != 500 {
		t.Fatalf("err = %v, want StatusError 500", err)
	}
	if len(se.Body) > 600 || len(err.Error()) > 800 {
		t.Errorf("error body not truncated: %d bytes body, %d bytes message", len(se.Body), len(err.Error()))
	}
}

func TestHugeBodyRejected(t *testing.T) {
	f := newFakeNeuron(t)
	f.mu.Lock()
	f.routes["GET /models"] = func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "[")
		chunk := []byte(strings.Repeat(`{"id":"m","status":"loaded"},`, 1000))
		for written := 0; written <= MaxResponseBytes+len(chunk); written += len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}
	f.mu.Unlock()
	_, err := f.client(t).Models(ctxT(t))
	if err == nil || !strings.Contains(err.Error(), "response larger than 8 MiB") {
		t.Fatalf("huge body: err = %v, want 'response larger than 8 MiB'", err)
	}
}

func TestGarbageAnswersAreErrors(t *testing.T) {
	for _, tc := range []struct {
		route, body string
		call        func(context.Context, *Client) error
	}{
		{"GET /models", `[{"id": "a", "status": "loaded"}`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `{"models": []}`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `null`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `[{"id": 7}]`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `[{"status": "loaded"}]`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `<html>nginx</html>`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", ``, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /models", `[] trailing`, func(ctx context.Context, c *Client) error { _, err := c.Models(ctx); return err }},
		{"GET /health", `{"uptime_secs": "long"}`, func(ctx context.Context, c *Client) error { _, err := c.Health(ctx); return err }},
		{"GET /health", `{"uptime_secs": 5, "models": [{"id": "a", "in_flight": 1.5}]}`, func(ctx context.Context, c *Client) error { _, err := c.Health(ctx); return err }},
		{"GET /health", `{"uptime_secs": 5, "activation": {"in_progress": 3}}`, func(ctx context.Context, c *Client) error { _, err := c.Health(ctx); return err }},
		{"GET /health", `null`, func(ctx context.Context, c *Client) error { _, err := c.Health(ctx); return err }},
		{"GET /discovery", `{"devices": {"index": 0}}`, func(ctx context.Context, c *Client) error { _, err := c.Discovery(ctx); return err }},
		{"GET /discovery", `{"hostname": "beast", `, func(ctx context.Context, c *Client) error { _, err := c.Discovery(ctx); return err }},
	} {
		f := newFakeNeuron(t)
		f.answer(tc.route, 200, tc.body)
		err := tc.call(ctxT(t), f.client(t))
		if err == nil {
			t.Errorf("%s answering %q: no error", tc.route, tc.body)
			continue
		}
		if !strings.Contains(err.Error(), `neuron "beast"`) || !strings.Contains(err.Error(), tc.route) {
			t.Errorf("%s answering %q: error %q should name the neuron and the call", tc.route, tc.body, err)
		}
	}
}

func TestContextBoundsCall(t *testing.T) {
	release := make(chan struct{})
	f := newFakeNeuron(t)
	f.mu.Lock()
	f.routes["GET /models"] = func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}
	f.mu.Unlock()
	defer close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err := f.client(t).Models(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the ctx deadline", err)
	}
}
