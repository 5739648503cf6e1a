package neuronsim

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

// weatherSchema exercises every kind of property the argument builder
// must satisfy, plus one optional property it must leave out.
const weatherSchema = `{
  "type": "object",
  "properties": {
    "city":      {"type": "string"},
    "lat":       {"type": "number"},
    "days":      {"type": "integer"},
    "metric":    {"type": "boolean"},
    "tags":      {"type": "array", "items": {"type": "string"}},
    "extra":     {"type": "object"},
    "unit":      {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "note":      {"type": ["null", "string"]},
    "range":     {"type": "integer", "minimum": 3, "maximum": 14},
    "threshold": {"type": "number", "exclusiveMinimum": 5},
    "points":    {"type": "array", "minItems": 2, "items": {"type": "integer"}},
    "code":      {"type": "string", "minLength": 5},
    "opts":      {"type": "object", "properties": {"lang": {"type": "string", "enum": ["en", "fr"]}},
                  "required": ["lang"], "additionalProperties": false},
    "optional":  {"type": "string"}
  },
  "required": ["city", "lat", "days", "metric", "tags", "extra", "unit", "note", "range", "threshold", "points", "code", "opts"],
  "additionalProperties": false
}`

// validate checks v against the JSON Schema keywords weatherSchema uses
// and returns what does not hold.
func validate(schema map[string]any, v any, path string) []string {
	var out []string
	bad := func(f string, a ...any) { out = append(out, path+": "+fmt.Sprintf(f, a...)) }
	if c, ok := schema["const"]; ok && !reflect.DeepEqual(c, v) {
		bad("want const %v", c)
	}
	if e, ok := schema["enum"].([]any); ok && !slices.ContainsFunc(e, func(x any) bool { return reflect.DeepEqual(x, v) }) {
		bad("%v not in enum %v", v, e)
	}
	var types []string
	switch t := schema["type"].(type) {
	case string:
		types = []string{t}
	case []any:
		for _, x := range t {
			types = append(types, x.(string))
		}
	}
	kind := "null"
	switch x := v.(type) {
	case string:
		kind = "string"
	case bool:
		kind = "boolean"
	case float64:
		kind = "number"
		if x == math.Trunc(x) && slices.Contains(types, "integer") {
			kind = "integer"
		}
	case []any:
		kind = "array"
	case map[string]any:
		kind = "object"
	}
	if len(types) > 0 && !slices.Contains(types, kind) {
		bad("%v is %s, want %v", v, kind, types)
		return out
	}
	num := func(k string) (float64, bool) { f, ok := schema[k].(float64); return f, ok }
	switch x := v.(type) {
	case string:
		if n, ok := num("minLength"); ok && float64(len(x)) < n {
			bad("shorter than %v", n)
		}
	case float64:
		if n, ok := num("minimum"); ok && x < n {
			bad("%v < minimum %v", x, n)
		}
		if n, ok := num("maximum"); ok && x > n {
			bad("%v > maximum %v", x, n)
		}
		if n, ok := num("exclusiveMinimum"); ok && x <= n {
			bad("%v <= exclusiveMinimum %v", x, n)
		}
	case []any:
		if n, ok := num("minItems"); ok && float64(len(x)) < n {
			bad("%d items < minItems %v", len(x), n)
		}
		if items, ok := schema["items"].(map[string]any); ok {
			for i, el := range x {
				out = append(out, validate(items, el, fmt.Sprintf("%s[%d]", path, i))...)
			}
		}
	case map[string]any:
		props, _ := schema["properties"].(map[string]any)
		req, _ := schema["required"].([]any)
		for _, r := range req {
			if _, ok := x[r.(string)]; !ok {
				bad("required %q missing", r)
			}
		}
		for k, el := range x {
			p, ok := props[k].(map[string]any)
			if !ok {
				if schema["additionalProperties"] == false {
					bad("property %q not allowed", k)
				}
				continue
			}
			out = append(out, validate(p, el, path+"."+k)...)
		}
	}
	return out
}

func mustSchema(t *testing.T, s string) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func tool(name, schema string) map[string]any {
	return map[string]any{"type": "function", "function": map[string]any{
		"name": name, "description": "a tool", "parameters": json.RawMessage(schema)}}
}

func userMsg(text string) map[string]any { return map[string]any{"role": "user", "content": text} }

// chatCompletion is the non-streaming answer, as far as the tests read it.
type chatCompletion struct {
	ID      string `json:"id"`
	Choices []struct {
		Message struct {
			Role      string          `json:"role"`
			Content   json.RawMessage `json:"content"`
			ToolCalls []struct {
				ID       string `json:"id"`
				Type     string `json:"type"`
				Function struct {
					Name      string `json:"name"`
					Arguments string `json:"arguments"`
				} `json:"function"`
			} `json:"tool_calls"`
		} `json:"message"`
		FinishReason string `json:"finish_reason"`
	} `json:"choices"`
	Usage struct {
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
}

func postChat(t *testing.T, srv *httptest.Server, body map[string]any) (response, chatCompletion) {
	t.Helper()
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", body)
	var c chatCompletion
	if r.status == http.StatusOK {
		if err := json.Unmarshal(r.body, &c); err != nil || len(c.Choices) != 1 {
			t.Fatalf("chat completion %s: %v", r.body, err)
		}
	}
	return r, c
}

func textOf(t *testing.T, c chatCompletion) string {
	t.Helper()
	var s string
	if err := json.Unmarshal(c.Choices[0].Message.Content, &s); err != nil {
		t.Fatalf("content %s is not a string", c.Choices[0].Message.Content)
	}
	return s
}

func TestToolCallArgumentsValidateAgainstTheSchema(t *testing.T) {
	schema := mustSchema(t, weatherSchema)
	if p := validate(schema, map[string]any{"city": 1.0}, "args"); len(p) == 0 {
		t.Fatal("the validator accepts an object missing required properties")
	}
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	body := chatBody(model8B, false)
	body["tools"] = []any{tool("get_weather", weatherSchema), tool("other", `{"type":"object"}`)}
	r, c := postChat(t, srv, body)
	if r.status != http.StatusOK {
		t.Fatalf("chat with tools: %d %s", r.status, r.body)
	}
	ch := c.Choices[0]
	if ch.FinishReason != "tool_calls" || string(ch.Message.Content) != "null" || ch.Message.Role != "assistant" || len(ch.Message.ToolCalls) != 1 {
		t.Fatalf("answer %s, want one tool call, content null, finish_reason tool_calls", r.body)
	}
	call := ch.Message.ToolCalls[0]
	if call.Type != "function" || call.Function.Name != "get_weather" || !strings.HasPrefix(call.ID, "call_") {
		t.Errorf("tool call %+v, want a function call to the first tool with id call_<n>", call)
	}
	var args map[string]any
	if err := json.Unmarshal([]byte(call.Function.Arguments), &args); err != nil {
		t.Fatalf("arguments %q are not a JSON object: %v", call.Function.Arguments, err)
	}
	if p := validate(schema, args, "arguments"); len(p) > 0 {
		t.Errorf("arguments %s do not validate: %v", call.Function.Arguments, p)
	}
	// The plain types take the documented values; the optional property
	// is left out.
	for k, want := range map[string]any{"city": "sim", "lat": 1.0, "days": 1.0, "metric": true, "tags": []any{}, "extra": map[string]any{}} {
		if !reflect.DeepEqual(args[k], want) {
			t.Errorf("%s = %#v, want %#v", k, args[k], want)
		}
	}
	if _, ok := args["optional"]; ok {
		t.Errorf("optional property sent: %s", call.Function.Arguments)
	}
	if recs := sim.InferenceRequests(); len(recs) != 1 || recs[0].Tools != 2 {
		t.Errorf("records %+v, want one with 2 tools", recs)
	}

	// Deterministic: the same request gets the same arguments.
	_, again := postChat(t, srv, body)
	if got := again.Choices[0].Message.ToolCalls[0]; got.Function.Arguments != call.Function.Arguments || got.ID == call.ID {
		t.Errorf("second call %+v, want the same arguments under a new id (first %+v)", got, call)
	}
}

func TestToolChoice(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	tools := []any{tool("first", `{"type":"object"}`), tool("second", `{"type":"object","properties":{"q":{"type":"string"}},"required":["q"]}`)}
	cases := []struct {
		name   string
		choice any
		want   string // the tool called; "" for a text answer
		args   string
	}{
		{"absent: auto", nil, "first", "{}"},
		{"auto", "auto", "first", "{}"},
		{"none", "none", "", ""},
		{"required", "required", "first", "{}"},
		{"named", map[string]any{"type": "function", "function": map[string]any{"name": "second"}}, "second", `{"q":"sim"}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			body := chatBody(model8B, false)
			body["tools"] = tools
			if c.choice != nil {
				body["tool_choice"] = c.choice
			}
			r, cc := postChat(t, srv, body)
			if r.status != http.StatusOK {
				t.Fatalf("%d %s", r.status, r.body)
			}
			calls := cc.Choices[0].Message.ToolCalls
			if c.want == "" {
				if len(calls) != 0 || cc.Choices[0].FinishReason != "stop" || textOf(t, cc) != "Hello from beast serving "+model8B {
					t.Errorf("answer %s, want the greeting and no tool call", r.body)
				}
				return
			}
			if len(calls) != 1 || calls[0].Function.Name != c.want || calls[0].Function.Arguments != c.args {
				t.Errorf("answer %s, want a call to %s with %s", r.body, c.want, c.args)
			}
		})
	}
}

// The tool result round trip through the official OpenAI Go SDK: the call,
// the SDK's own assistant message and a tool message back, then text
// quoting the result.
func TestToolResultRoundTripWithTheOpenAISDK(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	client := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("test"),
		option.WithMaxRetries(0), option.WithHTTPClient(srv.Client()))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	params := openai.ChatCompletionNewParams{
		Model:    model8B,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("What is the weather in Paris?")},
		Tools: []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(openai.FunctionDefinitionParam{
			Name:       "get_weather",
			Parameters: openai.FunctionParameters(mustSchema(t, weatherSchema)),
		})},
	}
	first, err := client.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatalf("first turn: %v", err)
	}
	msg := first.Choices[0].Message
	if first.Choices[0].FinishReason != "tool_calls" || len(msg.ToolCalls) != 1 || msg.ToolCalls[0].Function.Name != "get_weather" {
		t.Fatalf("first turn %s, want a get_weather call", first.RawJSON())
	}
	result := "Sunny and 21 degrees in Paris today, with a light wind from the west."
	params.Messages = append(params.Messages, msg.ToParam(), openai.ToolMessage(result, msg.ToolCalls[0].ID))
	second, err := client.Chat.Completions.New(ctx, params)
	if err != nil {
		t.Fatalf("second turn: %v", err)
	}
	want := "Tool get_weather returned: " + result[:40]
	if second.Choices[0].FinishReason != "stop" || second.Choices[0].Message.Content != want || len(second.Choices[0].Message.ToolCalls) != 0 {
		t.Errorf("second turn %s, want text %q", second.RawJSON(), want)
	}

	// Anthropic's tool_result turn translated: the tool message, then a
	// user message with the rest of the turn. Still the result's answer.
	params.Messages = append(params.Messages[:2:2], openai.ToolMessage(result, msg.ToolCalls[0].ID), openai.UserMessage("Thanks."))
	third, err := client.Chat.Completions.New(ctx, params)
	if err != nil || third.Choices[0].Message.Content != want {
		t.Errorf("tool result followed by a user message: %v %s, want text %q", err, third.RawJSON(), want)
	}

	// tool_choice "required" calls again, even after a result.
	params.Messages = params.Messages[:3]
	params.ToolChoice = openai.ChatCompletionToolChoiceOptionUnionParam{OfAuto: openai.String("required")}
	fourth, err := client.Chat.Completions.New(ctx, params)
	if err != nil || len(fourth.Choices[0].Message.ToolCalls) != 1 {
		t.Errorf("required after a result: %v %s, want a tool call", err, fourth.RawJSON())
	}
}

// A streamed tool call: the head (id, type, name, empty arguments), then
// at least two argument fragments that concatenate to the non-streamed
// arguments, the finish chunk, the usage chunk, [DONE].
func TestStreamedToolCallFragmentsConcatenate(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	body := chatBody(model8B, false)
	body["tools"] = []any{tool("get_weather", weatherSchema)}
	_, whole := postChat(t, srv, body)
	wantArgs := whole.Choices[0].Message.ToolCalls[0].Function.Arguments

	body["stream"] = true
	body["stream_options"] = map[string]bool{"include_usage": true}
	r := do(t, srv, http.MethodPost, "/v1/chat/completions", body)
	data := sseData(t, r.body)
	if r.status != http.StatusOK || len(data) < 6 || data[len(data)-1] != "[DONE]" {
		t.Fatalf("stream %d: %q", r.status, data)
	}
	type delta struct {
		Role      string          `json:"role"`
		Content   json.RawMessage `json:"content"`
		ToolCalls []struct {
			Index    *int   `json:"index"`
			ID       string `json:"id"`
			Type     string `json:"type"`
			Function struct {
				Name      *string `json:"name"`
				Arguments *string `json:"arguments"`
			} `json:"function"`
		} `json:"tool_calls"`
	}
	type chunk struct {
		Object  string `json:"object"`
		Choices []struct {
			Delta        delta   `json:"delta"`
			FinishReason *string `json:"finish_reason"`
		} `json:"choices"`
		Usage *struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	var chunks []chunk
	for _, d := range data[:len(data)-1] {
		var c chunk
		if err := json.Unmarshal([]byte(d), &c); err != nil {
			t.Fatalf("chunk %s: %v", d, err)
		}
		chunks = append(chunks, c)
	}

	head := chunks[0].Choices[0].Delta
	if head.Role != "assistant" || len(head.ToolCalls) != 1 {
		t.Fatalf("first chunk %s, want the assistant role and the call's head", data[0])
	}
	hc := head.ToolCalls[0]
	if hc.Index == nil || *hc.Index != 0 || !strings.HasPrefix(hc.ID, "call_") || hc.Type != "function" ||
		hc.Function.Name == nil || *hc.Function.Name != "get_weather" || hc.Function.Arguments == nil || *hc.Function.Arguments != "" {
		t.Errorf("first chunk %s, want index 0, id, type function, name and empty arguments", data[0])
	}

	var args strings.Builder
	pieces, finish, usageAt := 0, -1, -1
	for i, c := range chunks[1:] {
		i++
		if c.Usage != nil {
			if len(c.Choices) != 0 || c.Usage.CompletionTokens == 0 {
				t.Errorf("usage chunk %s, want empty choices and usage", data[i])
			}
			usageAt = i
			continue
		}
		if c.Object != "chat.completion.chunk" || len(c.Choices) != 1 {
			t.Fatalf("chunk %s", data[i])
		}
		ch := c.Choices[0]
		if ch.FinishReason != nil {
			if *ch.FinishReason != "tool_calls" {
				t.Errorf("finish_reason %q, want tool_calls", *ch.FinishReason)
			}
			finish = i
			continue
		}
		for _, tc := range ch.Delta.ToolCalls {
			if tc.Index == nil || *tc.Index != 0 || tc.Function.Arguments == nil {
				t.Errorf("argument chunk %s, want index 0 and an arguments fragment", data[i])
				continue
			}
			args.WriteString(*tc.Function.Arguments)
			pieces++
		}
	}
	if pieces < 2 {
		t.Errorf("arguments in %d fragment(s), want at least 2", pieces)
	}
	if args.String() != wantArgs || !json.Valid([]byte(args.String())) {
		t.Errorf("fragments concatenate to %q, want the JSON arguments %q", args.String(), wantArgs)
	}
	if finish < 0 || usageAt != finish+1 || usageAt != len(chunks)-1 {
		t.Errorf("finish chunk at %d, usage at %d of %d chunks: want finish, then usage, then [DONE]", finish, usageAt, len(chunks))
	}
}

// The OpenAI Go SDK's stream accumulator, which real clients use, puts the
// streamed call back together.
func TestStreamedToolCallWithTheOpenAISDK(t *testing.T) {
	_, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	client := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("test"),
		option.WithMaxRetries(0), option.WithHTTPClient(srv.Client()))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{
		Model:         model8B,
		Messages:      []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Weather?")},
		Tools:         []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(openai.FunctionDefinitionParam{Name: "get_weather", Parameters: openai.FunctionParameters(mustSchema(t, weatherSchema))})},
		StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)},
	})
	var acc openai.ChatCompletionAccumulator
	var finished []openai.FinishedChatCompletionToolCall
	for stream.Next() {
		acc.AddChunk(stream.Current())
		if tc, ok := acc.JustFinishedToolCall(); ok {
			finished = append(finished, tc)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream: %v", err)
	}
	if len(finished) != 1 || finished[0].Name != "get_weather" {
		t.Fatalf("finished tool calls %+v, want one get_weather", finished)
	}
	var args map[string]any
	if err := json.Unmarshal([]byte(finished[0].Arguments), &args); err != nil {
		t.Fatalf("accumulated arguments %q: %v", finished[0].Arguments, err)
	}
	if p := validate(mustSchema(t, weatherSchema), args, "arguments"); len(p) > 0 {
		t.Errorf("accumulated arguments do not validate: %v", p)
	}
	if acc.Choices[0].FinishReason != "tool_calls" || acc.Usage.CompletionTokens == 0 {
		t.Errorf("finish %q usage %+v, want tool_calls and usage", acc.Choices[0].FinishReason, acc.Usage)
	}
}

const pngDataURL = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

func TestImagePartsAreCounted(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	parts := func(urls ...string) map[string]any {
		content := []any{map[string]any{"type": "text", "text": "What is in this picture?"}}
		for _, u := range urls {
			content = append(content, map[string]any{"type": "image_url", "image_url": map[string]any{"url": u}})
		}
		return map[string]any{"model": model8B, "messages": []any{map[string]any{"role": "user", "content": content}}}
	}
	r, c := postChat(t, srv, parts(pngDataURL))
	if r.status != http.StatusOK || textOf(t, c) != "Hello from beast serving "+model8B+". I see 1 image" {
		t.Errorf("one image: %d %s", r.status, r.body)
	}
	r, c = postChat(t, srv, parts(pngDataURL, "https://example.com/cat.jpg"))
	if r.status != http.StatusOK || !strings.HasSuffix(textOf(t, c), "I see 2 images") {
		t.Errorf("two images: %d %s", r.status, r.body)
	}
	r, c = postChat(t, srv, parts())
	if r.status != http.StatusOK || textOf(t, c) != "Hello from beast serving "+model8B {
		t.Errorf("text parts only: %d %s", r.status, r.body)
	}
	var got []int
	for _, rec := range sim.InferenceRequests() {
		got = append(got, rec.Images)
	}
	if !slices.Equal(got, []int{1, 2, 0}) {
		t.Errorf("recorded image counts %v, want [1 2 0]", got)
	}

	// Streamed, the text says it too.
	body := parts(pngDataURL)
	body["stream"] = true
	r = do(t, srv, http.MethodPost, "/v1/chat/completions", body)
	if !strings.Contains(string(r.body), `"content":" image"`) {
		t.Errorf("stream with an image lacks the image mention:\n%s", r.body)
	}
}

func TestChatValidation(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	call := map[string]any{"id": "call_1", "type": "function", "function": map[string]any{"name": "get_weather", "arguments": `{"city":"Paris"}`}}
	asst := map[string]any{"role": "assistant", "content": nil, "tool_calls": []any{call}}
	toolMsg := func(id string) map[string]any {
		return map[string]any{"role": "tool", "tool_call_id": id, "content": "sunny"}
	}
	img := func(u string) map[string]any {
		return map[string]any{"role": "user", "content": []any{map[string]any{"type": "image_url", "image_url": map[string]any{"url": u}}}}
	}
	tools := []any{tool("get_weather", weatherSchema)}
	cases := []struct {
		name     string
		body     map[string]any
		param    string
		contains string
	}{
		{"tool result for an unknown call", map[string]any{"messages": []any{userMsg("hi"), asst, toolMsg("call_9")}},
			"messages[2].tool_call_id", `"call_9" matches no tool call of messages[1] (its tool call ids: call_1)`},
		{"tool result without a call", map[string]any{"messages": []any{userMsg("hi"), toolMsg("call_1")}},
			"messages[1].tool_call_id", "no assistant message with tool_calls comes before it"},
		{"tool result after an assistant without calls", map[string]any{"messages": []any{userMsg("hi"), map[string]any{"role": "assistant", "content": "ok"}, toolMsg("call_1")}},
			"messages[2].tool_call_id", "no assistant message with tool_calls"},
		{"tool message without tool_call_id", map[string]any{"messages": []any{userMsg("hi"), asst, map[string]any{"role": "tool", "content": "x"}}},
			"messages[2].tool_call_id", "is required"},
		{"messages missing", map[string]any{}, "messages", "messages is required"},
		{"messages not an array", map[string]any{"messages": "hi"}, "messages", "must be an array of message objects, got a string"},
		{"messages empty", map[string]any{"messages": []any{}}, "messages", "at least one message"},
		{"message not an object", map[string]any{"messages": []any{"hi"}}, "messages[0]", "must be an object with a role, got a string"},
		{"message without a role", map[string]any{"messages": []any{map[string]any{"content": "hi"}}}, "messages[0].role", "is required"},
		{"role not a string", map[string]any{"messages": []any{map[string]any{"role": 1, "content": "hi"}}}, "messages[0].role", "must be a string"},
		{"unknown role", map[string]any{"messages": []any{map[string]any{"role": "robot", "content": "hi"}}}, "messages[0].role", `got "robot"`},
		{"user without content", map[string]any{"messages": []any{map[string]any{"role": "user"}}}, "messages[0].content", "is required"},
		{"arguments not JSON", map[string]any{"messages": []any{userMsg("hi"), map[string]any{"role": "assistant", "tool_calls": []any{
			map[string]any{"id": "c", "type": "function", "function": map[string]any{"name": "f", "arguments": "{city"}}}}}},
			"messages[1].tool_calls[0].function.arguments", "must be a JSON object encoded as a string"},
		{"image in a system message", map[string]any{"messages": []any{map[string]any{"role": "system", "content": []any{
			map[string]any{"type": "image_url", "image_url": map[string]any{"url": pngDataURL}}}}, userMsg("hi")}},
			"messages[0].content[0].type", `must be "text" here`},
		{"unknown part type", map[string]any{"messages": []any{map[string]any{"role": "user", "content": []any{map[string]any{"type": "video"}}}}},
			"messages[0].content[0].type", `must be "text" or "image_url" here, got "video"`},
		{"image URL of another scheme", map[string]any{"messages": []any{img("ftp://x/y.png")}}, "messages[0].content[0].image_url.url", "data:image URL or an http(s) URL"},
		{"data URL not an image", map[string]any{"messages": []any{img("data:text/plain;base64,aGk=")}}, "messages[0].content[0].image_url.url", "data:image/<type>;base64"},
		{"data URL not base64", map[string]any{"messages": []any{img("data:image/png;base64,@@@")}}, "messages[0].content[0].image_url.url", "not valid base64"},
		{"tools not an array", map[string]any{"messages": []any{userMsg("hi")}, "tools": map[string]any{}}, "tools", "must be an array"},
		{"tool of another type", map[string]any{"messages": []any{userMsg("hi")}, "tools": []any{map[string]any{"type": "web_search"}}}, "tools[0].type", `must be "function"`},
		{"tool without a name", map[string]any{"messages": []any{userMsg("hi")}, "tools": []any{map[string]any{"type": "function", "function": map[string]any{}}}},
			"tools[0].function.name", "is required"},
		{"tool_choice names no tool", map[string]any{"messages": []any{userMsg("hi")}, "tools": tools,
			"tool_choice": map[string]any{"type": "function", "function": map[string]any{"name": "nope"}}},
			"tool_choice.function.name", `"nope", which is not among the tools (get_weather)`},
		{"tool_choice required without tools", map[string]any{"messages": []any{userMsg("hi")}, "tool_choice": "required"}, "tool_choice", "needs tools"},
		{"tool_choice unknown", map[string]any{"messages": []any{userMsg("hi")}, "tools": tools, "tool_choice": "sometimes"}, "tool_choice", `got "sometimes"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.body["model"] = model8B
			r := do(t, srv, http.MethodPost, "/v1/chat/completions", c.body)
			var e struct {
				Error struct {
					Message string  `json:"message"`
					Type    string  `json:"type"`
					Param   *string `json:"param"`
				} `json:"error"`
			}
			if r.status != http.StatusBadRequest || json.Unmarshal(r.body, &e) != nil || e.Error.Type != "invalid_request_error" {
				t.Fatalf("%d %s, want 400 invalid_request_error", r.status, r.body)
			}
			if e.Error.Param == nil || *e.Error.Param != c.param || !strings.Contains(e.Error.Message, c.contains) {
				t.Errorf("error %s, want param %q and a message containing %q", r.body, c.param, c.contains)
			}
		})
	}
	// Rejected requests reached the neuron (recorded) but took no slot.
	if n := len(sim.InferenceRequests()); n != len(cases) {
		t.Errorf("%d requests recorded, want %d", n, len(cases))
	}

	// The valid conversation those cases break is accepted.
	r, c := postChat(t, srv, map[string]any{"model": model8B, "messages": []any{userMsg("hi"), asst, toolMsg("call_1")}})
	if r.status != http.StatusOK || textOf(t, c) != "Tool get_weather returned: sunny" {
		t.Errorf("valid tool round: %d %s", r.status, r.body)
	}
}

// A real neuron speaks only OpenAI: /v1/messages is a 404 in OpenAI's
// error shape, recorded so tests can tell whether it reached the neuron;
// served natively only with AnthropicNative.
func TestMessagesIs404UnlessAnthropicNative(t *testing.T) {
	sim, srv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}})
	msg := map[string]any{"model": model8B, "max_tokens": 64, "stream": true, "messages": []any{userMsg("hi")}}
	r := do(t, srv, http.MethodPost, "/v1/messages", msg)
	var e struct {
		Error struct{ Message, Type, Code string }
	}
	if r.status != http.StatusNotFound || json.Unmarshal(r.body, &e) != nil || e.Error.Code != "not_found" ||
		e.Error.Type != "invalid_request_error" || !strings.Contains(e.Error.Message, "/v1/messages is not served by neuron beast") {
		t.Errorf("default /v1/messages: %d %s, want an OpenAI-shaped 404", r.status, r.body)
	}
	recs := sim.InferenceRequests()
	if len(recs) != 1 || recs[0].Path != "/v1/messages" || recs[0].Model != model8B || !recs[0].Stream {
		t.Errorf("records %+v, want the /v1/messages request", recs)
	}

	// Unknown paths and methods answer like that too.
	for _, c := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{http.MethodPost, "/v1/responses", http.StatusNotFound, ""},
		{http.MethodGet, "/v1/chat/completions", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPost, "/discovery", http.StatusMethodNotAllowed, "GET"},
		{http.MethodGet, "/nope", http.StatusNotFound, ""},
	} {
		r := do(t, srv, c.method, c.path, nil)
		if r.status != c.status || r.header.Get("allow") != c.allow || !json.Valid(r.body) || !strings.Contains(string(r.body), `"error"`) {
			t.Errorf("%s %s: %d allow %q %s, want %d allow %q with an OpenAI error", c.method, c.path, r.status, r.header.Get("allow"), r.body, c.status, c.allow)
		}
	}

	native, nsrv := startSim(t, Options{Models: []ModelSpec{{ID: model8B, VRAMMB: 17800}}, AnthropicNative: true})
	r = do(t, nsrv, http.MethodPost, "/v1/messages", map[string]any{"model": model8B, "max_tokens": 64, "messages": []any{userMsg("hi")}})
	var m struct{ Type string }
	if r.status != http.StatusOK || json.Unmarshal(r.body, &m) != nil || m.Type != "message" {
		t.Errorf("AnthropicNative /v1/messages: %d %s, want a message", r.status, r.body)
	}
	if recs := native.InferenceRequests(); len(recs) != 1 || recs[0].Path != "/v1/messages" {
		t.Errorf("native records %+v", recs)
	}
}
