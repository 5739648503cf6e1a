package extproc_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/extproc"
)

// failures records Options.UpstreamFailed calls.
type failures struct {
	mu    sync.Mutex
	calls []string
}

func (f *failures) record(node, model string, status int, how string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, fmt.Sprintf("%s %s %d %s", node, model, status, how))
}

func (f *failures) get() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func failureHarness(t *testing.T, translate func(string) bool) (*harness, *failures) {
	t.Helper()
	f := &failures{}
	h, _ := warmHarness(t, extproc.Options{UpstreamFailed: f.record, TranslateAnthropic: translate})
	return h, f
}

// responseHeaders is a response_headers message as Envoy sends it.
func responseHeaders(kv ...string) *extprocv3.ProcessingRequest {
	hs := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: hs}}}
}

// envoyLocalReply is what Envoy's router sends through ext_proc when it
// cannot reach the upstream (before 1.34, or with
// skip_ext_proc_on_local_reply off): its own headers only, no Date.
func envoyLocalReply(status int, contentType string) *extprocv3.ProcessingRequest {
	return responseHeaders(":status", strconv.Itoa(status), "content-length", "91", "content-type", contentType)
}

// neuronAnswer is an upstream's answer: a real HTTP server sends Date.
func neuronAnswer(status int) *extprocv3.ProcessingRequest {
	return responseHeaders(":status", strconv.Itoa(status), "content-type", "application/json",
		"date", "Mon, 02 Mar 2026 10:00:00 GMT", "retry-after", "1", "content-length", "140")
}

// play routes one request for model, sends then (nil: none) and ends the
// stream with a half-close, returning once the server has ended it: what
// the server reports happens before that.
func play(t *testing.T, h *harness, model string, then *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := coldStream(t, ctx, h, model)
	r, err := s.Recv()
	if err != nil {
		t.Fatalf("body reply: %v", err)
	}
	var reply *extprocv3.ProcessingResponse
	if then != nil && r.GetImmediateResponse() == nil {
		if err := s.Send(then); err != nil {
			t.Fatal(err)
		}
		if reply, err = s.Recv(); err != nil {
			t.Fatalf("response headers reply: %v", err)
		}
	}
	if err := s.CloseSend(); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := s.Recv(); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("stream ended with %v, want OK", err)
			}
			return reply
		}
	}
}

// Envoy's own 503 after a connect failure, in the shape older Envoys send
// it through ext_proc: reported once, for the node and model the request
// was routed to; the client's answer is untouched (our x-cortex-* headers
// as on any response).
func TestEnvoyLocalReplyIsReported(t *testing.T) {
	h, f := failureHarness(t, nil)
	for _, status := range []int{503, 502, 504} {
		for _, ct := range []string{"text/plain", "application/json"} { // before and after local_reply_config
			reply := play(t, h, "helexa/q", envoyLocalReply(status, ct))
			if got := setHeaders(reply.GetResponseHeaders().GetResponse().GetHeaderMutation())["x-cortex-node"]; got != "rig2" {
				t.Errorf("%d: response headers reply sets x-cortex-node %q, want rig2", status, got)
			}
		}
	}
	want := []string{
		"rig2 Qwen/Q 503 envoy_local_reply", "rig2 Qwen/Q 503 envoy_local_reply",
		"rig2 Qwen/Q 502 envoy_local_reply", "rig2 Qwen/Q 502 envoy_local_reply",
		"rig2 Qwen/Q 504 envoy_local_reply", "rig2 Qwen/Q 504 envoy_local_reply",
	}
	if got := f.get(); !slices.Equal(got, want) {
		t.Errorf("UpstreamFailed calls %q, want %q", got, want)
	}
}

// A neuron's own answers, errors included, are not Envoy's: a full queue
// (503 with Retry-After) must not make the node suspect. Its 404 alone is
// reported, as model_missing: it does not hold the model it was routed for.
func TestNeuronAnswersAreNotReported(t *testing.T) {
	h, f := failureHarness(t, nil)
	for _, status := range []int{200, 400, 404, 500, 502, 503, 504} {
		play(t, h, "helexa/q", neuronAnswer(status))
	}
	// Envoy's replies that are not about the upstream's reachability.
	play(t, h, "helexa/q", envoyLocalReply(500, "text/plain"))
	play(t, h, "helexa/q", envoyLocalReply(413, "text/plain"))
	play(t, h, "helexa/q", envoyLocalReply(404, "text/plain")) // no route: Envoy's, not the neuron's
	play(t, h, "helexa/q", respHeaders())                      // 200, no date: not a failure status
	if got, want := f.get(), []string{"rig2 Qwen/Q 404 model_missing"}; !slices.Equal(got, want) {
		t.Errorf("UpstreamFailed calls %q, want %q", got, want)
	}
}

// Envoy ≥ 1.34 keeps its local replies from ext_proc: after our body reply
// the stream just ends (half-closed, or reset) without response headers.
func TestStreamEndedWithoutResponseHeadersIsReported(t *testing.T) {
	h, f := failureHarness(t, nil)
	play(t, h, "helexa/q", nil)
	if got, want := f.get(), []string{"rig2 Qwen/Q 0 no_response_headers"}; !slices.Equal(got, want) {
		t.Fatalf("after a half-close: UpstreamFailed calls %q, want %q", got, want)
	}

	// A reset (Envoy's other way to end it) is reported too.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	s := coldStream(t, ctx, h, "helexa/q")
	if r, err := s.Recv(); err != nil || r.GetRequestBody() == nil {
		t.Fatalf("body reply %v %v", r, err)
	}
	cancel()
	waitFor(t, func() bool { return len(f.get()) == 2 })
	if got := f.get()[1]; got != "rig2 Qwen/Q 0 no_response_headers" {
		t.Errorf("after a reset: %q", got)
	}
}

// Nothing is reported for a request that was not routed (an error or the
// model list), or whose upstream answered.
func TestNoReportWithoutARoutedRequestAwaitingItsAnswer(t *testing.T) {
	h, f := failureHarness(t, nil)
	play(t, h, "nobody/knows-this", nil) // 404 immediate response
	play(t, h, "helexa/q", respHeaders())
	h.exchange(t, hdrs(true, ":method", "GET", ":path", "/v1/models", "x-request-id", "r"))
	if got := f.get(); len(got) != 0 {
		t.Errorf("UpstreamFailed calls %q, want none", got)
	}
}

// A translated Anthropic request (anthropic.go answers its response
// headers) reports Envoy's failure the same way.
func TestTranslatedAnthropicRequestReportsEnvoyFailure(t *testing.T) {
	h, f := failureHarness(t, func(string) bool { return true })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"model":"helexa/q","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}`)
	for _, m := range []*extprocv3.ProcessingRequest{post("/v1/messages", body), bodyMsg(body), envoyLocalReply(503, "application/json")} {
		if err := s.Send(m); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	s.CloseSend()
	for {
		if _, err := s.Recv(); err != nil {
			break
		}
	}
	if got, want := f.get(), []string{"rig2 Qwen/Q 503 envoy_local_reply"}; !slices.Equal(got, want) {
		t.Errorf("UpstreamFailed calls %q, want %q", got, want)
	}
}
