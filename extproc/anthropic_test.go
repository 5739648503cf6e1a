package extproc_test

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
)

// Anthropic Messages through ext_proc to a neuron that speaks only OpenAI,
// message by message as Envoy sends them.

func translatingHarness(t *testing.T, translate func(string) bool) *harness {
	t.Helper()
	cat, snap := fixture()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	return start(t, r, extproc.Options{TranslateAnthropic: translate})
}

func upstreamHeaders(status int, contentType string, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{EndOfStream: eos, Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte(strconv.Itoa(status))},
			{Key: "content-type", RawValue: []byte(contentType)},
			{Key: "content-length", RawValue: []byte("123")},
		}}}}}
}

func upstreamBody(b string, eos bool) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte(b), EndOfStream: eos}}}
}

// bodyOut is what a response_body reply sends the client instead of the chunk.
func bodyOut(t *testing.T, r *extprocv3.ProcessingResponse) string {
	t.Helper()
	rb := r.GetResponseBody()
	if rb == nil {
		t.Fatalf("reply %v is not a response_body reply", r)
	}
	switch m := rb.GetResponse().GetBodyMutation().GetMutation().(type) {
	case *extprocv3.BodyMutation_Body:
		return string(m.Body)
	case *extprocv3.BodyMutation_ClearBody:
		return ""
	}
	t.Fatalf("response_body reply without a body mutation: the untranslated chunk would reach the client: %v", r)
	return ""
}

const anthropicBody = `{"model":"helexa/small","max_tokens":64,"stream":%s,"messages":[{"role":"user","content":"hi"}]}`

func TestAnthropicRequestIsSentAsAChatCompletion(t *testing.T) {
	h := translatingHarness(t, func(string) bool { return true })
	body := []byte(strings.Replace(anthropicBody, "%s", "false", 1))
	rs := h.exchange(t, post("/v1/messages?beta=true", body), bodyMsg(body))
	c := rs[1].GetRequestBody().GetResponse()
	got := setHeaders(c.GetHeaderMutation())
	checkRawOnly(t, c.GetHeaderMutation())
	newBody := c.GetBodyMutation().GetBody()
	if got[":path"] != "/v1/chat/completions" || got["content-length"] != strconv.Itoa(len(newBody)) ||
		got["x-cortex-cluster"] == "" || got["x-cortex-model"] != "Qwen/Qwen3-1.7B" || !c.GetClearRouteCache() {
		t.Fatalf("body reply headers %v (clear_route_cache %v)", got, c.GetClearRouteCache())
	}
	var chat struct {
		Model     string
		MaxTokens int `json:"max_tokens"`
		Messages  []struct{ Role, Content string }
	}
	if err := json.Unmarshal(newBody, &chat); err != nil || chat.Model != "Qwen/Qwen3-1.7B" || chat.MaxTokens != 64 ||
		len(chat.Messages) != 1 || chat.Messages[0].Role != "user" {
		t.Fatalf("translated body %s (%v)", newBody, err)
	}
}

// A neuron that serves /v1/messages itself gets it unchanged but for the id.
func TestAnthropicRequestToANativeNeuronIsForwarded(t *testing.T) {
	h := translatingHarness(t, func(node string) bool { return false })
	body := []byte(strings.Replace(anthropicBody, "%s", "false", 1))
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body), respHeaders())
	got := setHeaders(rs[1].GetRequestBody().GetResponse().GetHeaderMutation())
	if _, ok := got[":path"]; ok || !strings.Contains(string(rs[1].GetRequestBody().GetResponse().GetBodyMutation().GetBody()), `"max_tokens":64`) {
		t.Fatalf("native neuron: headers %v body %s", got, rs[1].GetRequestBody().GetResponse().GetBodyMutation().GetBody())
	}
	if rs[2].GetModeOverride() != nil {
		t.Error("a request that is not translated must not switch its response body mode")
	}
}

func TestAnthropicRequestThatCannotBeTranslatedIs400(t *testing.T) {
	h := translatingHarness(t, func(string) bool { return true })
	body := []byte(`{"model":"helexa/small","max_tokens":64,"messages":[{"role":"user","content":[{"type":"hologram"}]}]}`)
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body))
	ir := rs[1].GetImmediateResponse()
	if ir.GetStatus().GetCode() != 400 || !strings.Contains(string(ir.GetBody()), `"type":"invalid_request_error"`) ||
		!strings.Contains(string(ir.GetBody()), "hologram") {
		t.Fatalf("reply %d %s, want Anthropic's 400 naming the block", ir.GetStatus().GetCode(), ir.GetBody())
	}
}

// The streamed answer: the response headers switch this request's body to
// STREAMED (exactly the mode the shipped Envoy configs allow), and every
// chunk comes back translated, whatever its boundaries.
func TestAnthropicStreamedAnswerIsTranslatedChunkByChunk(t *testing.T) {
	h := translatingHarness(t, func(string) bool { return true })
	body := []byte(strings.Replace(anthropicBody, "%s", "true", 1))
	sse := `data: {"id":"c1","object":"chat.completion.chunk","model":"Qwen/Qwen3-1.7B","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"}}]}` + "\n\n" +
		`data: {"id":"c1","object":"chat.completion.chunk","model":"Qwen/Qwen3-1.7B","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}` + "\n\n" +
		"data: [DONE]\n\n"
	cut := strings.Index(sse, `"Hel"`) + 3 // mid-event
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body), upstreamHeaders(200, "text/event-stream", false),
		upstreamBody(sse[:cut], false), upstreamBody(sse[cut:], false), upstreamBody("", true))
	hr := rs[2]
	if !proto.Equal(hr.GetModeOverride(), extproc.TranslatedMode()) ||
		hr.GetModeOverride().GetResponseBodyMode() != filterv3.ProcessingMode_STREAMED {
		t.Fatalf("response headers reply mode_override %v, want %v", hr.GetModeOverride(), extproc.TranslatedMode())
	}
	hm := hr.GetResponseHeaders().GetResponse().GetHeaderMutation()
	if got := setHeaders(hm); got["content-type"] != "text/event-stream" || got["x-cortex-node"] == "" {
		t.Errorf("response headers %v", got)
	}
	if len(hm.GetRemoveHeaders()) != 1 || hm.GetRemoveHeaders()[0] != "content-length" {
		t.Errorf("remove %v, want content-length (the length changes)", hm.GetRemoveHeaders())
	}
	var out strings.Builder
	for _, r := range rs[3:] {
		out.WriteString(bodyOut(t, r))
	}
	got := out.String()
	for _, want := range []string{"event: message_start", `"model":"helexa/small"`, `"text":"Hel"`, `"text":"lo"`,
		`"stop_reason":"end_turn"`, "event: message_stop"} {
		if !strings.Contains(got, want) {
			t.Errorf("translated stream lacks %s:\n%s", want, got)
		}
	}
	if strings.Contains(got, "chat.completion.chunk") {
		t.Errorf("OpenAI chunks reached the client:\n%s", got)
	}
}

func TestAnthropicWholeAnswerAndErrorsAreTranslated(t *testing.T) {
	h := translatingHarness(t, func(string) bool { return true })
	body := []byte(strings.Replace(anthropicBody, "%s", "false", 1))
	completion := `{"id":"c2","object":"chat.completion","model":"Qwen/Qwen3-1.7B","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}`
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body), upstreamHeaders(200, "application/json", false),
		upstreamBody(completion[:20], false), upstreamBody(completion[20:], true))
	if got := setHeaders(rs[2].GetResponseHeaders().GetResponse().GetHeaderMutation()); got["content-type"] != "application/json" {
		t.Errorf("content-type %q", got["content-type"])
	}
	if first := bodyOut(t, rs[3]); first != "" {
		t.Errorf("a whole answer is held until its end; got %q early", first)
	}
	var msg struct {
		Type, Model string
		StopReason  string `json:"stop_reason"`
		Content     []struct{ Type, Text string }
	}
	out := bodyOut(t, rs[4])
	if err := json.Unmarshal([]byte(out), &msg); err != nil || msg.Content[0].Text != "Hello" || msg.StopReason != "max_tokens" {
		t.Fatalf("translated answer %s (%v)", out, err)
	}

	// An upstream error becomes Anthropic's error object, same status.
	rs = h.exchange(t, post("/v1/messages", body), bodyMsg(body), upstreamHeaders(503, "application/json", false),
		upstreamBody(`{"error":{"message":"model is loading","type":"server_error"}}`, true))
	out = bodyOut(t, rs[3])
	if !strings.Contains(out, `"type":"overloaded_error"`) || !strings.Contains(out, "model is loading") {
		t.Errorf("translated error %s", out)
	}
	// Without a body, the error is answered at the headers.
	rs = h.exchange(t, post("/v1/messages", body), bodyMsg(body), upstreamHeaders(502, "text/plain", true))
	if ir := rs[2].GetImmediateResponse(); ir.GetStatus().GetCode() != 502 || !strings.Contains(string(ir.GetBody()), `"type":"error"`) {
		t.Errorf("bodiless upstream error: %v", rs[2])
	}
}

// OpenAI requests never pay for the translation: no response body mode
// switch, and their answer is not processed.
func TestOpenAIRequestsKeepTheResponseBodyUntouched(t *testing.T) {
	h := translatingHarness(t, func(string) bool { return true })
	body := []byte(`{"model":"helexa/small","messages":[]}`)
	rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body), respHeaders())
	if rs[2].GetModeOverride() != nil || rs[2].GetResponseHeaders() == nil {
		t.Fatalf("response headers reply %v", rs[2])
	}
}
