package neuronsim

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"testing"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

const model8B = "Qwen/Qwen3-8B"

func chatBody(model string, stream bool) map[string]any {
	return map[string]any{"model": model, "stream": stream, "messages": []any{map[string]string{"role": "user", "content": "hi"}}}
}

// sseData returns the data: payloads of an SSE body, in order.
func sseData(t *testing.T, body []byte) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			out = append(out, d)
		}
	}
	return out
}

func TestChatStreamIsSSEEndingWithDone(t *testing.T) {
	_, srv := startSim(t, Options{Name: "beast", Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	body := chatBody(model8B, true)
	body["stream_options"] = map[string]bool{"include_usage": true}
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", body)
	if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("content-type"), "text/event-stream") {
		t.Fatalf("stream: %d %s %s", r.status, r.header.Get("content-type"), r.body)
	}
	if r.header.Get("x-neuron-name") != "beast" {
		t.Errorf("x-neuron-name = %q, want beast", r.header.Get("x-neuron-name"))
	}
	data := sseData(t, r.body)
	if len(data) < 3 || data[len(data)-1] != "[DONE]" {
		t.Fatalf("SSE data = %q, want chunks ending with [DONE]", data)
	}
	var text strings.Builder
	var finish string
	var sawUsage bool
	for _, d := range data[:len(data)-1] {
		var c struct {
			Object  string `json:"object"`
			Model   string `json:"model"`
			Choices []struct {
				Delta        struct{ Content string } `json:"delta"`
				FinishReason *string                  `json:"finish_reason"`
			} `json:"choices"`
			Usage *struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatalf("chunk %q: %v", d, err)
		}
		if c.Object != "chat.completion.chunk" || c.Model != model8B {
			t.Errorf("chunk object %q model %q", c.Object, c.Model)
		}
		for _, ch := range c.Choices {
			text.WriteString(ch.Delta.Content)
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
		if c.Usage != nil {
			sawUsage = c.Usage.CompletionTokens > 0
		}
	}
	if text.String() != "Hello from beast serving "+model8B || finish != "stop" || !sawUsage {
		t.Errorf("streamed %q finish %q usage %v, want the greeting, stop and a usage chunk", text.String(), finish, sawUsage)
	}
}

func TestNonStreamingShapes(t *testing.T) {
	_, srv := startSim(t, Options{Name: "rig2", Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}, AnthropicNative: true})
	greeting := "Hello from rig2 serving " + model8B

	r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false))
	var chat struct {
		Object  string
		Choices []struct {
			Message      struct{ Role, Content string }
			FinishReason string `json:"finish_reason"`
		}
		Usage struct {
			TotalTokens int `json:"total_tokens"`
		}
	}
	if r.status != http.StatusOK || json.Unmarshal(r.body, &chat) != nil || chat.Object != "chat.completion" ||
		len(chat.Choices) != 1 || chat.Choices[0].Message.Content != greeting || chat.Usage.TotalTokens == 0 {
		t.Errorf("chat completion: %d %s", r.status, r.body)
	}

	r = do(t, srv, http.MethodPost, "/v1/completions", map[string]any{"model": model8B, "prompt": "hi", "max_tokens": 2})
	var cmpl struct {
		Object  string
		Choices []struct {
			Text         string
			FinishReason string `json:"finish_reason"`
		}
	}
	if r.status != http.StatusOK || json.Unmarshal(r.body, &cmpl) != nil || cmpl.Object != "text_completion" ||
		cmpl.Choices[0].Text != "Hello from" || cmpl.Choices[0].FinishReason != "length" {
		t.Errorf("completion with max_tokens 2: %d %s", r.status, r.body)
	}

	r = do(t, srv, http.MethodPost, "/v1/embeddings", map[string]any{"model": model8B, "input": []string{"a", "b"}})
	var emb struct {
		Data []struct {
			Index     int
			Embedding []float64
		}
	}
	if r.status != http.StatusOK || json.Unmarshal(r.body, &emb) != nil || len(emb.Data) != 2 || len(emb.Data[1].Embedding) == 0 {
		t.Errorf("embeddings: %d %s", r.status, r.body)
	}

	r = do(t, srv, http.MethodPost, "/v1/messages", map[string]any{"model": model8B, "max_tokens": 64, "messages": []any{}})
	var msg struct {
		Type    string
		Content []struct{ Type, Text string }
		Stop    string `json:"stop_reason"`
	}
	if r.status != http.StatusOK || json.Unmarshal(r.body, &msg) != nil || msg.Type != "message" ||
		len(msg.Content) != 1 || msg.Content[0].Text != greeting || msg.Stop != "end_turn" {
		t.Errorf("messages: %d %s", r.status, r.body)
	}
}

func TestStreamingCompletionsAndMessagesEnd(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}, AnthropicNative: true})
	r := do(t, srv, http.MethodPost, "/v1/completions", map[string]any{"model": model8B, "prompt": "hi", "stream": true,
		"stream_options": map[string]bool{"include_usage": true}})
	d := sseData(t, r.body)
	if len(d) < 2 || d[len(d)-1] != "[DONE]" {
		t.Fatalf("completions stream = %q, want it to end with [DONE]", d)
	}
	var last struct {
		Choices []any
		Usage   *struct {
			CompletionTokens int `json:"completion_tokens"`
		}
	}
	if err := json.Unmarshal([]byte(d[len(d)-2]), &last); err != nil || last.Usage == nil || last.Usage.CompletionTokens == 0 || len(last.Choices) != 0 {
		t.Errorf("completions stream with include_usage: last chunk %s, want usage with empty choices", d[len(d)-2])
	}
	r = do(t, srv, http.MethodPost, "/v1/messages", map[string]any{"model": model8B, "stream": true, "max_tokens": 64})
	if !strings.Contains(string(r.body), "event: message_stop") || !strings.Contains(string(r.body), `"text_delta"`) {
		t.Errorf("messages stream lacks text deltas or message_stop:\n%s", r.body)
	}
}

func TestRejectsModelItDoesNotHold(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}, AnthropicNative: true})
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody("helexa/balanced", false))
	var oe struct {
		Error struct{ Code, Type, Message string }
	}
	if r.status != http.StatusNotFound || json.Unmarshal(r.body, &oe) != nil || oe.Error.Code != "model_not_found" ||
		!strings.Contains(oe.Error.Message, "helexa/balanced") {
		t.Errorf("alias sent as is: %d %s, want 404 model_not_found naming it", r.status, r.body)
	}
	r = do(t, srv, http.MethodPost, "/v1/messages", map[string]any{"model": "claude-x", "max_tokens": 1})
	var ae struct {
		Type  string
		Error struct{ Type string }
	}
	if r.status != http.StatusNotFound || json.Unmarshal(r.body, &ae) != nil || ae.Type != "error" || ae.Error.Type != "not_found_error" {
		t.Errorf("/v1/messages unknown model: %d %s, want Anthropic not_found_error", r.status, r.body)
	}
	r = do(t, srv, http.MethodPost, "/v1/chat/completions", map[string]any{"model": 7})
	if r.status != http.StatusBadRequest {
		t.Errorf("non-string model: %d, want 400", r.status)
	}
	recs := sim.InferenceRequests()
	if len(recs) != 2 || recs[0].Model != "helexa/balanced" || recs[0].Path != "/v1/chat/completions" {
		t.Errorf("recorded requests = %+v", recs)
	}
}

func TestUnloadedModelReloadsOnFirstInference(t *testing.T) {
	sim, srv := startSim(t, Options{Unloaded: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	release := sim.HoldLoads()
	done := make(chan response, 1)
	go func() { done <- do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false)) }()
	eventually(t, "the model to show reloading with one queued request", func() bool {
		var h neuron.Health
		getJSON(t, srv, "/health", &h)
		m := findModel(sim.Models(), model8B)
		mh := findModelHealth(h, model8B)
		return m != nil && m.Status == neuron.StatusReloading && mh != nil && mh.QueueDepth == 1
	})
	release()
	if r := <-done; r.status != http.StatusOK || !strings.Contains(string(r.body), "serving "+model8B) {
		t.Fatalf("request during reload: %d %s", r.status, r.body)
	}
	if m := findModel(sim.Models(), model8B); m == nil || m.Status != neuron.StatusLoaded || m.VRAMUsedMB == nil {
		t.Errorf("after reload: %+v, want loaded with VRAM", m)
	}
	if sim.LoadCalls() != 0 {
		t.Errorf("LoadCalls = %d: a lazy reload is not a /models/load call", sim.LoadCalls())
	}
}

func TestFailedReloadAnswers503(t *testing.T) {
	_, srv := startSim(t, Options{Unloaded: []ModelSpec{{ID: model8B, VRAMMB: 17800}}, LoadFailRate: 1})
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false))
	if r.status != http.StatusServiceUnavailable || !strings.Contains(string(r.body), "could not be reloaded") {
		t.Errorf("failed reload: %d %s, want 503", r.status, r.body)
	}
}

func TestHealthCountsInFlightAndQueued(t *testing.T) {
	sim, srv := startSim(t, Options{MaxInFlight: 2, Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	release := sim.HoldInference()
	var wg sync.WaitGroup
	for range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false)); r.status != http.StatusOK {
				t.Errorf("held request: %d %s", r.status, r.body)
			}
		}()
	}
	var h neuron.Health
	eventually(t, "in_flight 2 and queue_depth 1", func() bool {
		getJSON(t, srv, "/health", &h)
		mh := findModelHealth(h, model8B)
		return mh.InFlight == 2 && mh.QueueDepth == 1
	})
	var busy bool
	for _, d := range h.Devices {
		busy = busy || d.UtilizationPct > 0
	}
	if !busy {
		t.Errorf("devices %+v show no utilisation with 2 requests in flight", h.Devices)
	}
	release()
	wg.Wait()
	getJSON(t, srv, "/health", &h)
	if mh := findModelHealth(h, model8B); mh.InFlight != 0 || mh.QueueDepth != 0 {
		t.Errorf("after completion: %+v, want 0 in flight and 0 queued", mh)
	}
}

func TestQueueFullAnswers503(t *testing.T) {
	sim, srv := startSim(t, Options{MaxInFlight: 1, MaxQueueDepth: 1, Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	release := sim.HoldInference()
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() { defer wg.Done(); do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false)) }()
	}
	eventually(t, "one in flight and one queued", func() bool {
		var h neuron.Health
		getJSON(t, srv, "/health", &h)
		mh := findModelHealth(h, model8B)
		return mh.InFlight == 1 && mh.QueueDepth == 1
	})
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(model8B, false))
	if r.status != http.StatusServiceUnavailable || !strings.Contains(string(r.body), "queue_full") || r.header.Get("retry-after") == "" {
		t.Errorf("third request: %d %s, want 503 queue_full with Retry-After", r.status, r.body)
	}
	release()
	wg.Wait()
}

func TestRecoveringOrUnservableModelAnswers503(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: "a", VRAMMB: 100}, {ID: "b", VRAMMB: 100}}})
	if err := sim.SetModelStatus("a", neuron.StatusRecovering); err != nil {
		t.Fatal(err)
	}
	if err := sim.SetServable("b", false, "insufficient_vram"); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		if r := do(t, srv, http.MethodPost, "/v1/chat/completions", chatBody(id, false)); r.status != http.StatusServiceUnavailable {
			t.Errorf("model %s: %d %s, want 503", id, r.status, r.body)
		}
	}
	m := findModel(sim.Models(), "b")
	if m.IsServable() || m.Servable.Reason != "insufficient_vram" {
		t.Errorf("/models servable = %+v", m.Servable)
	}
	if err := sim.SetModelStatus("nope", neuron.StatusLoaded); err == nil {
		t.Error("SetModelStatus on an unknown model succeeded")
	}
}
