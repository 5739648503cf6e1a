package extproc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
)

// openStream is one ext_proc stream on which the test sends messages one
// by one and reads the reply to each.
func openStream(t *testing.T, h *harness) func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.CloseSend() })
	return func(m *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		t.Helper()
		if err := s.Send(m); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("no reply to %T: %v", m.Request, err)
		}
		return r
	}
}

// Envoy configured without request headers (request_header_mode: SKIP)
// sends the body first: that is a configuration error, answered as one,
// never a pass-through.
func TestBodyBeforeHeadersIsAConfigError(t *testing.T) {
	send := openStream(t, startFixture(t))
	body := []byte(`{"model":"helexa/small"}`)
	r := send(bodyMsg(body))
	ir := r.GetImmediateResponse()
	if ir.GetStatus().GetCode() != 500 || !bytes.Contains(ir.GetBody(), []byte("request_header_mode")) {
		t.Fatalf("body before headers: %v, want a 500 naming request_header_mode", r)
	}
}

// Response-phase and trailer messages before any request message are
// answered with their own reply type and carry no routing headers.
func TestResponseMessagesBeforeTheRequestAreAnswered(t *testing.T) {
	send := openStream(t, startFixture(t))
	r := send(respHeaders())
	if kind(r) != "response_headers" || len(r.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()) != 0 {
		t.Fatalf("response headers first: %v, want an empty response_headers reply", r)
	}
	if r := send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{
		RequestTrailers: &extprocv3.HttpTrailers{}}}); kind(r) != "request_trailers" {
		t.Fatalf("trailers first: %v", r)
	}
}

// A second body after end_of_stream (never sent in BUFFERED mode) is
// answered "continue" and cannot re-route or rewrite the request.
func TestSecondBodyAfterEndOfStreamChangesNothing(t *testing.T) {
	send := openStream(t, startFixture(t))
	first := []byte(`{"model":"helexa/small"}`)
	send(post("/v1/chat/completions", first))
	routed := setHeaders(send(bodyMsg(first)).GetRequestBody().GetResponse().GetHeaderMutation())
	if routed["x-cortex-model"] != "Qwen/Qwen3-1.7B" {
		t.Fatalf("first body not routed: %v", routed)
	}
	r := send(bodyMsg([]byte(`{"model":"Qwen/Q"}`)))
	br := r.GetRequestBody()
	if br == nil {
		t.Fatalf("second body: %v, want a request_body reply", r)
	}
	if c := br.GetResponse(); c.GetHeaderMutation() != nil || c.GetBodyMutation() != nil || c.GetClearRouteCache() {
		t.Fatalf("second body re-routed or rewrote the request: %v", c)
	}
	got := setHeaders(send(respHeaders()).GetResponseHeaders().GetResponse().GetHeaderMutation())
	if got["x-cortex-node"] != routed["x-cortex-node"] || got["x-cortex-model"] != "Qwen/Qwen3-1.7B" {
		t.Errorf("response headers %v do not report the first decision %v", got, routed)
	}
}

// Model ids are bounded and plain text: anything else is a 400 before it
// can reach a header, a log line, a metric or a neuron URL, and no error
// body carries a raw CR or LF.
func TestHostileModelIDs(t *testing.T) {
	h := startFixture(t)
	cases := []struct {
		id     string
		status int
	}{
		{strings.Repeat("m", reqbody.MaxModelLen), 404},
		{strings.Repeat("m", reqbody.MaxModelLen+1), 400},
		{strings.Repeat("é", reqbody.MaxModelLen/2+1), 400}, // the bound is bytes
		{"a\r\nx-cortex-cluster: neuron-evil", 400},
		{"a\nb", 400},
		{"a\rb", 400},
		{"tab\there", 400},
		{"nul\x00", 400},
		{"esc\x1b[31m", 400},
		{"del\x7f", 400},
		{"\u2028line-separator", 404},
		{"../../models/load", 404},
		{"Qwen%2FQwen3-8B", 404},
		{"模型/ü", 404},
	}
	for _, c := range cases {
		body, _ := json.Marshal(map[string]string{"model": c.id})
		rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
		ir := rs[len(rs)-1].GetImmediateResponse()
		if ir == nil || int(ir.GetStatus().GetCode()) != c.status {
			t.Errorf("model %q: %v, want immediate %d", c.id, rs[len(rs)-1], c.status)
			continue
		}
		for k := range setHeaders(ir.GetHeaders()) {
			if strings.HasPrefix(k, "x-cortex-") {
				t.Errorf("model %q: refused reply sets %s", c.id, k)
			}
		}
		var env struct{ Error struct{ Message string } }
		if err := json.Unmarshal(ir.GetBody(), &env); err != nil {
			t.Fatalf("model %q: error body %q: %v", c.id, ir.GetBody(), err)
		}
		if strings.ContainsAny(env.Error.Message, "\r\n\x00\x1b") {
			t.Errorf("model %q: error message carries a control character: %q", c.id, env.Error.Message)
		}
	}
}

// A custom cluster header name is stripped from client requests like the
// built-in routing headers: a client cannot pick its own upstream.
func TestCustomClusterHeaderIsStripped(t *testing.T) {
	cat, snap := fixture()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	h := start(t, r, extproc.Options{Upstream: extproc.ClusterHeader{Name: "X-Route-To"}})
	body := []byte(`{"model":"helexa/small"}`)
	rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
	removed := rs[0].GetRequestHeaders().GetResponse().GetHeaderMutation().GetRemoveHeaders()
	if !strings.Contains(strings.Join(removed, ","), "x-route-to") {
		t.Errorf("removes %v; the configured cluster header x-route-to is missing", removed)
	}
	if got := setHeaders(rs[1].GetRequestBody().GetResponse().GetHeaderMutation()); got["X-Route-To"] != "neuron-beast" && got["X-Route-To"] != "neuron-rig2" {
		t.Errorf("routing headers %v", got)
	}
}
