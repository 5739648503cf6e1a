package neuronsim

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// maxInferenceBody bounds a request body (Envoy buffers at most 32 MiB).
const maxInferenceBody = 64 << 20

// errShape selects the error envelope: OpenAI's, or Anthropic's on
// /v1/messages.
type errShape int

const (
	openAIShape errShape = iota
	anthropicShape
)

type inferRequest struct {
	Model               string `json:"model"`
	Stream              bool   `json:"stream"`
	MaxTokens           *int   `json:"max_tokens"`
	MaxCompletionTokens *int   `json:"max_completion_tokens"`
	StreamOptions       *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Input      json.RawMessage `json:"input"`
	Dimensions int             `json:"dimensions"`

	promptTokens int
}

func (q *inferRequest) maxTokens() int {
	if q.MaxCompletionTokens != nil {
		return *q.MaxCompletionTokens
	}
	if q.MaxTokens != nil {
		return *q.MaxTokens
	}
	return 0
}

// admit parses the request and waits for a serving slot on the model,
// reloading it first if it is listed as unloaded. inspect, when given,
// validates the body further and fills the request's record; its error is
// a 400. On success the caller must call release when done; on failure
// admit has answered the client.
func (s *Sim) admit(w http.ResponseWriter, r *http.Request, shape errShape, inspect func(body []byte, rec *InferenceRecord) *requestError) (*inferRequest, func(), bool) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxInferenceBody))
	req := &inferRequest{}
	if err == nil {
		err = json.Unmarshal(body, req)
	}
	if err != nil || req.Model == "" {
		writeInferenceError(w, shape, http.StatusBadRequest, "invalid_request_error", "invalid_request",
			"request body must be JSON with a string \"model\"")
		return nil, nil, false
	}
	req.promptTokens = max(1, len(body)/4)
	ctx := r.Context()

	rec := InferenceRecord{Path: r.URL.Path, Model: req.Model, Stream: req.Stream, Header: r.Header.Clone()}
	var invalid *requestError
	if inspect != nil {
		invalid = inspect(body, &rec)
	}

	s.mu.Lock()
	s.requests = append(s.requests, rec)
	if invalid != nil {
		s.mu.Unlock()
		writeRequestError(w, invalid)
		return nil, nil, false
	}
	m := s.models[req.Model]
	if m == nil || m.status == statusLoading {
		held := make([]string, 0, len(s.models))
		for _, x := range s.sortedModelsLocked() {
			held = append(held, x.id)
		}
		s.mu.Unlock()
		writeInferenceError(w, shape, http.StatusNotFound, "invalid_request_error", "model_not_found",
			fmt.Sprintf("model '%s' is not loaded on neuron %s (it has: %s)", req.Model, s.opts.Name, strings.Join(held, ", ")))
		return nil, nil, false
	}
	switch {
	case m.status == neuron.StatusRecovering:
		s.mu.Unlock()
		writeInferenceError(w, shape, http.StatusServiceUnavailable, "api_error", "service_unavailable",
			fmt.Sprintf("model '%s' is recovering on neuron %s", req.Model, s.opts.Name))
		return nil, nil, false
	case m.servable != nil && !m.servable.OK:
		s.mu.Unlock()
		writeInferenceError(w, shape, http.StatusServiceUnavailable, "api_error", "service_unavailable",
			fmt.Sprintf("model '%s' cannot serve on neuron %s: %s", req.Model, s.opts.Name, m.servable.Reason))
		return nil, nil, false
	case m.inFlight+m.queued >= s.opts.MaxInFlight+s.opts.MaxQueueDepth:
		s.mu.Unlock()
		w.Header().Set("retry-after", "1")
		writeInferenceError(w, shape, http.StatusServiceUnavailable, "api_error", "queue_full",
			fmt.Sprintf("model '%s' on neuron %s has %d requests queued (max %d)", req.Model, s.opts.Name, m.queued, s.opts.MaxQueueDepth))
		return nil, nil, false
	}
	m.queued++
	var op *loadOp
	switch m.status {
	case neuron.StatusUnloaded:
		// Lazy reload: the first request brings the weights back.
		var aerr *apiError
		if op, aerr = s.startLoadLocked(m.id, neuron.LoadSpec{}); aerr != nil {
			m.queued--
			s.mu.Unlock()
			writeInferenceError(w, shape, http.StatusServiceUnavailable, "api_error", "service_unavailable",
				fmt.Sprintf("model '%s' could not be reloaded: %s", req.Model, aerr.msg))
			return nil, nil, false
		}
	case neuron.StatusReloading:
		op = s.loads[m.id]
	}
	s.mu.Unlock()
	dequeue := func() { s.mu.Lock(); m.queued--; s.mu.Unlock() }

	if op != nil {
		select {
		case <-op.done:
		case <-ctx.Done():
			dequeue()
			return nil, nil, false
		}
		if op.err != nil {
			dequeue()
			writeInferenceError(w, shape, http.StatusServiceUnavailable, "api_error", "service_unavailable",
				fmt.Sprintf("model '%s' could not be reloaded: %s", req.Model, op.err.msg))
			return nil, nil, false
		}
	}
	select {
	case m.slots <- struct{}{}:
	case <-ctx.Done():
		dequeue()
		return nil, nil, false
	}
	s.mu.Lock()
	m.queued--
	m.inFlight++
	s.mu.Unlock()
	release := func() {
		s.mu.Lock()
		m.inFlight--
		s.mu.Unlock()
		<-m.slots
	}
	if s.waitGate(ctx, &s.inferGate) != nil {
		release()
		return nil, nil, false
	}
	return req, release, true
}

// writeRequestError answers 400 invalid_request_error naming the param.
func writeRequestError(w http.ResponseWriter, e *requestError) {
	var param any
	if e.param != "" {
		param = e.param
	}
	writeJSON(w, http.StatusBadRequest, map[string]any{"error": map[string]any{
		"message": e.msg, "type": "invalid_request_error", "code": "invalid_request", "param": param}})
}

func writeInferenceError(w http.ResponseWriter, shape errShape, status int, typ, code, msg string) {
	if shape == anthropicShape {
		at := map[int]string{400: "invalid_request_error", 404: "not_found_error", 503: "overloaded_error"}[status]
		if at == "" {
			at = "api_error"
		}
		writeJSON(w, status, map[string]any{"type": "error", "error": map[string]string{"type": at, "message": msg}})
		return
	}
	writeJSON(w, status, map[string]any{"error": map[string]any{"message": msg, "type": typ, "code": code, "param": nil}})
}

// greeting is the generated answer: "Hello from <name> serving <model>".
func (s *Sim) greeting(model string) string {
	return fmt.Sprintf("Hello from %s serving %s", s.opts.Name, model)
}

// reply is the greeting in tokens.
func (s *Sim) reply(model string, maxTokens int) (toks []string, finish string) {
	return tokens(s.greeting(model), maxTokens)
}

// tokens splits text into word tokens, cut at maxTokens (> 0) with finish
// reason "length".
func tokens(text string, maxTokens int) (toks []string, finish string) {
	words := strings.Fields(text)
	for i, w := range words {
		if i > 0 {
			w = " " + w
		}
		toks = append(toks, w)
	}
	if maxTokens > 0 && maxTokens < len(toks) {
		return toks[:maxTokens], "length"
	}
	return toks, "stop"
}

// pause waits one token interval; false when the client went away.
func (s *Sim) pause(ctx context.Context) bool {
	if s.opts.TokenInterval <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(s.opts.TokenInterval)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// generate waits out the generation time of n tokens (non-streaming).
func (s *Sim) generate(ctx context.Context, n int) bool {
	for range n {
		if !s.pause(ctx) {
			return false
		}
	}
	return true
}

func (s *Sim) nextID(prefix string) string {
	return fmt.Sprintf("%s-%s-%d", prefix, s.opts.Name, s.next())
}

// next is the sim's next sequence number (ids of answers and tool calls).
func (s *Sim) next() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	return s.seq
}

// sseWriter writes Server-Sent Events and flushes each one.
type sseWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func newSSE(w http.ResponseWriter) *sseWriter {
	w.Header().Set("content-type", "text/event-stream")
	w.Header().Set("cache-control", "no-cache")
	w.WriteHeader(http.StatusOK)
	return &sseWriter{w: w, rc: http.NewResponseController(w)}
}

func (e *sseWriter) send(event string, v any) bool {
	b, err := json.Marshal(v)
	if err != nil {
		return false
	}
	return e.raw(event, string(b))
}

func (e *sseWriter) raw(event, data string) bool {
	var sb strings.Builder
	if event != "" {
		sb.WriteString("event: " + event + "\n")
	}
	sb.WriteString("data: " + data + "\n\n")
	if _, err := io.WriteString(e.w, sb.String()); err != nil {
		return false
	}
	return e.rc.Flush() == nil
}

func usage(prompt, completion int) map[string]int {
	return map[string]int{"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
}

func (s *Sim) handleChat(w http.ResponseWriter, r *http.Request) {
	var turn *chatTurn
	req, release, ok := s.admit(w, r, openAIShape, func(body []byte, rec *InferenceRecord) *requestError {
		t, err := parseChat(body)
		turn, rec.Images, rec.Tools = t, t.images, len(t.tools)
		return err
	})
	if !ok {
		return
	}
	defer release()
	ctx := r.Context()
	n := s.next()
	id, created := fmt.Sprintf("chatcmpl-%s-%d", s.opts.Name, n), time.Now().Unix()
	if tool := turn.call(); tool != nil {
		s.answerToolCall(w, r, req, tool, id, fmt.Sprintf("call_%d", n), created)
		return
	}
	toks, finish := tokens(turn.answerText(s.greeting(req.Model)), req.maxTokens())
	if !req.Stream {
		if !s.generate(ctx, len(toks)) {
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "object": "chat.completion", "created": created, "model": req.Model,
			"choices": []any{map[string]any{
				"index":         0,
				"message":       map[string]any{"role": "assistant", "content": strings.Join(toks, "")},
				"finish_reason": finish,
			}},
			"usage": usage(req.promptTokens, len(toks)),
		})
		return
	}
	ev := newSSE(w)
	chunk := func(delta map[string]any, finish any) map[string]any {
		return map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}},
		}
	}
	if !ev.send("", chunk(map[string]any{"role": "assistant", "content": ""}, nil)) {
		return
	}
	for _, t := range toks {
		if !s.pause(ctx) || !ev.send("", chunk(map[string]any{"content": t}, nil)) {
			return
		}
	}
	if !ev.send("", chunk(map[string]any{}, finish)) {
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !ev.send("", map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{}, "usage": usage(req.promptTokens, len(toks)),
		}) {
			return
		}
	}
	ev.raw("", "[DONE]")
}

// answerToolCall answers a chat request with one call of tool, as an
// OpenAI-compatible server does: content null, finish_reason "tool_calls";
// streamed, a first chunk with the call's id, type and name (arguments
// ""), then the arguments in fragments, then the finish chunk.
func (s *Sim) answerToolCall(w http.ResponseWriter, r *http.Request, req *inferRequest, tool *chatTool, id, callID string, created int64) {
	ctx := r.Context()
	args := toolArguments(tool)
	frags := fragments(args)
	completion := len(frags) + 1 // the name, then the fragments
	if !req.Stream {
		if !s.generate(ctx, completion) {
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "object": "chat.completion", "created": created, "model": req.Model,
			"choices": []any{map[string]any{
				"index": 0,
				"message": map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{
					"id": callID, "type": "function", "function": map[string]any{"name": tool.name, "arguments": args},
				}}},
				"finish_reason": "tool_calls",
			}},
			"usage": usage(req.promptTokens, completion),
		})
		return
	}
	ev := newSSE(w)
	chunk := func(delta map[string]any, finish any) map[string]any {
		return map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "delta": delta, "finish_reason": finish}},
		}
	}
	head := map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{map[string]any{
		"index": 0, "id": callID, "type": "function", "function": map[string]any{"name": tool.name, "arguments": ""},
	}}}
	if !s.pause(ctx) || !ev.send("", chunk(head, nil)) {
		return
	}
	for _, f := range frags {
		delta := map[string]any{"tool_calls": []any{map[string]any{"index": 0, "function": map[string]any{"arguments": f}}}}
		if !s.pause(ctx) || !ev.send("", chunk(delta, nil)) {
			return
		}
	}
	if !ev.send("", chunk(map[string]any{}, "tool_calls")) {
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		if !ev.send("", map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": req.Model,
			"choices": []any{}, "usage": usage(req.promptTokens, completion),
		}) {
			return
		}
	}
	ev.raw("", "[DONE]")
}

func (s *Sim) handleCompletions(w http.ResponseWriter, r *http.Request) {
	req, release, ok := s.admit(w, r, openAIShape, nil)
	if !ok {
		return
	}
	defer release()
	ctx := r.Context()
	toks, finish := s.reply(req.Model, req.maxTokens())
	id, created := s.nextID("cmpl"), time.Now().Unix()
	body := func(text string, finish any) map[string]any {
		return map[string]any{
			"id": id, "object": "text_completion", "created": created, "model": req.Model,
			"choices": []any{map[string]any{"index": 0, "text": text, "logprobs": nil, "finish_reason": finish}},
		}
	}
	if !req.Stream {
		if !s.generate(ctx, len(toks)) {
			return
		}
		b := body(strings.Join(toks, ""), finish)
		b["usage"] = usage(req.promptTokens, len(toks))
		writeJSON(w, http.StatusOK, b)
		return
	}
	ev := newSSE(w)
	for _, t := range toks {
		if !s.pause(ctx) || !ev.send("", body(t, nil)) {
			return
		}
	}
	if !ev.send("", body("", finish)) {
		return
	}
	if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
		u := body("", nil)
		u["choices"], u["usage"] = []any{}, usage(req.promptTokens, len(toks))
		if !ev.send("", u) {
			return
		}
	}
	ev.raw("", "[DONE]")
}

func (s *Sim) handleEmbeddings(w http.ResponseWriter, r *http.Request) {
	req, release, ok := s.admit(w, r, openAIShape, nil)
	if !ok {
		return
	}
	defer release()
	inputs, err := embeddingInputs(req.Input)
	if err != nil {
		writeInferenceError(w, openAIShape, http.StatusBadRequest, "invalid_request_error", "invalid_request", err.Error())
		return
	}
	dims := req.Dimensions
	if dims <= 0 || dims > 4096 {
		dims = 8
	}
	data := make([]any, 0, len(inputs))
	for i, in := range inputs {
		data = append(data, map[string]any{"object": "embedding", "index": i, "embedding": embed(req.Model+"\x00"+in, dims)})
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"object": "list", "data": data, "model": req.Model,
		"usage": map[string]int{"prompt_tokens": req.promptTokens, "total_tokens": req.promptTokens},
	})
}

// embeddingInputs accepts OpenAI's input shapes: a string, strings, token
// ids, or lists of token ids.
func embeddingInputs(raw json.RawMessage) ([]string, error) {
	var one string
	if json.Unmarshal(raw, &one) == nil {
		return []string{one}, nil
	}
	var many []string
	if json.Unmarshal(raw, &many) == nil && len(many) > 0 {
		return many, nil
	}
	var ids []int
	if json.Unmarshal(raw, &ids) == nil && len(ids) > 0 {
		return []string{fmt.Sprint(ids)}, nil
	}
	var idLists [][]int
	if json.Unmarshal(raw, &idLists) == nil && len(idLists) > 0 {
		out := make([]string, len(idLists))
		for i, l := range idLists {
			out[i] = fmt.Sprint(l)
		}
		return out, nil
	}
	return nil, fmt.Errorf(`"input" must be a non-empty string, list of strings or token ids`)
}

// embed is a deterministic unit vector for text.
func embed(text string, dims int) []float64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(text))
	seed := h.Sum64()
	rng := rand.New(rand.NewPCG(seed, ^seed))
	v := make([]float64, dims)
	var norm float64
	for i := range v {
		v[i] = rng.NormFloat64()
		norm += v[i] * v[i]
	}
	norm = math.Sqrt(norm)
	for i := range v {
		v[i] /= norm
	}
	return v
}

func (s *Sim) handleMessages(w http.ResponseWriter, r *http.Request) {
	req, release, ok := s.admit(w, r, anthropicShape, nil)
	if !ok {
		return
	}
	defer release()
	ctx := r.Context()
	toks, finish := s.reply(req.Model, req.maxTokens())
	stop := "end_turn"
	if finish == "length" {
		stop = "max_tokens"
	}
	id := s.nextID("msg")
	if !req.Stream {
		if !s.generate(ctx, len(toks)) {
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"id": id, "type": "message", "role": "assistant", "model": req.Model,
			"content":     []any{map[string]any{"type": "text", "text": strings.Join(toks, "")}},
			"stop_reason": stop, "stop_sequence": nil,
			"usage": map[string]int{"input_tokens": req.promptTokens, "output_tokens": len(toks)},
		})
		return
	}
	ev := newSSE(w)
	steps := []struct {
		event string
		data  any
	}{
		{"message_start", map[string]any{"type": "message_start", "message": map[string]any{
			"id": id, "type": "message", "role": "assistant", "model": req.Model, "content": []any{},
			"stop_reason": nil, "stop_sequence": nil,
			"usage": map[string]int{"input_tokens": req.promptTokens, "output_tokens": 0},
		}}},
		{"content_block_start", map[string]any{"type": "content_block_start", "index": 0,
			"content_block": map[string]any{"type": "text", "text": ""}}},
	}
	for _, st := range steps {
		if !ev.send(st.event, st.data) {
			return
		}
	}
	for _, t := range toks {
		if !s.pause(ctx) || !ev.send("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
			"delta": map[string]any{"type": "text_delta", "text": t}}) {
			return
		}
	}
	_ = ev.send("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0}) &&
		ev.send("message_delta", map[string]any{"type": "message_delta",
			"delta": map[string]any{"stop_reason": stop, "stop_sequence": nil},
			"usage": map[string]int{"output_tokens": len(toks)}}) &&
		ev.send("message_stop", map[string]any{"type": "message_stop"})
}
