package anthropic

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	sdk "github.com/anthropics/anthropic-sdk-go/v2"
)

// sdkMessage decodes a translated Message with the Anthropic SDK's type.
func sdkMessage(t *testing.T, b []byte) sdk.Message {
	t.Helper()
	var m sdk.Message
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("SDK cannot decode %s: %v", b, err)
	}
	return m
}

func completion(message, finish, extra string) string {
	f := "null"
	if finish != "" {
		f = `"` + finish + `"`
	}
	return `{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"Qwen/Qwen3-8B","choices":[{"index":0,"message":` + message + `,"finish_reason":` + f + extra + `}],"usage":{"prompt_tokens":20,"completion_tokens":7,"total_tokens":27}}`
}

func TestTranslateResponse(t *testing.T) {
	tests := []struct {
		name     string
		body     string
		model    string
		thinking bool
		want     projMessage
	}{
		{
			name:  "text",
			body:  completion(`{"role":"assistant","content":"Hello!"}`, "stop", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "Hello!"}}},
		},
		{
			name:  "length",
			body:  completion(`{"role":"assistant","content":"Once"}`, "length", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "max_tokens", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "Once"}}},
		},
		{
			name:  "content_filter is a refusal",
			body:  completion(`{"role":"assistant","content":""}`, "content_filter", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "refusal", Input: 20, Output: 7},
		},
		{
			name:  "vLLM stop string",
			body:  completion(`{"role":"assistant","content":"1, 2"}`, "stop", `,"stop_reason":"###"`),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "stop_sequence", StopSequence: "###", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "1, 2"}}},
		},
		{
			name:  "SGLang matched_stop",
			body:  completion(`{"role":"assistant","content":"1, 2"}`, "stop", `,"matched_stop":"END"`),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "stop_sequence", StopSequence: "END", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "1, 2"}}},
		},
		{
			name:  "stop token id is not a stop sequence",
			body:  completion(`{"role":"assistant","content":"1, 2"}`, "stop", `,"stop_reason":151645`),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "1, 2"}}},
		},
		{
			name: "tool calls",
			body: completion(`{"role":"assistant","content":null,"tool_calls":[
				{"id":"call_1","type":"function","function":{"name":"Read","arguments":"{\"path\": \"/etc/hosts\"}"}},
				{"id":"call_2","type":"function","function":{"name":"Glob","arguments":""}}]}`, "tool_calls", ""),
			model: model,
			want: projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "tool_use", Input: 20, Output: 7, Blocks: []projBlock{
				{Type: "tool_use", ID: "call_1", Name: "Read", Input: `{"path":"/etc/hosts"}`},
				{Type: "tool_use", ID: "call_2", Name: "Glob", Input: `{}`},
			}},
		},
		{
			name: "text and a tool call finishing with stop",
			body: completion(`{"role":"assistant","content":"Reading.","tool_calls":[{"id":"call_1","type":"function","function":{"name":"Read","arguments":"{}"}}]}`, "stop", ""),
			want: projMessage{ID: "msg_chatcmpl-1", Model: "Qwen/Qwen3-8B", StopReason: "tool_use", Input: 20, Output: 7, Blocks: []projBlock{
				{Type: "text", Text: "Reading."},
				{Type: "tool_use", ID: "call_1", Name: "Read", Input: `{}`},
			}},
		},
		{
			name: "awkward arguments",
			body: completion(`{"role":"assistant","tool_calls":[
				{"id":"a","function":{"name":"f","arguments":"{\"x\": 1"}},
				{"id":"b","function":{"name":"f","arguments":"\"{\\\"y\\\": 2}\""}},
				{"id":"c","function":{"name":"f","arguments":{"z":3}}},
				{"id":"d","function":{"name":"f","arguments":"[1,2]"}},
				{"id":"e","function":{"name":"f","arguments":null}},
				{"function":{"arguments":"{}"}}]}`, "tool_calls", ""),
			model: model,
			want: projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "tool_use", Input: 20, Output: 7, Blocks: []projBlock{
				{Type: "tool_use", ID: "a", Name: "f", Input: `{"_raw_arguments":"{\"x\": 1"}`},
				{Type: "tool_use", ID: "b", Name: "f", Input: `{"y":2}`},
				{Type: "tool_use", ID: "c", Name: "f", Input: `{"z":3}`},
				{Type: "tool_use", ID: "d", Name: "f", Input: `{"_raw_arguments":"[1,2]"}`},
				{Type: "tool_use", ID: "e", Name: "f", Input: `{}`},
				{Type: "tool_use", ID: "toolu_chatcmpl-1_5", Name: "unknown_tool", Input: `{}`},
			}},
		},
		{
			name:  "legacy function_call",
			body:  completion(`{"role":"assistant","function_call":{"name":"f","arguments":"{\"a\":1}"}}`, "function_call", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "tool_use", Input: 20, Output: 7, Blocks: []projBlock{{Type: "tool_use", ID: "toolu_chatcmpl-1_0", Name: "f", Input: `{"a":1}`}}},
		},
		{
			name:     "reasoning as thinking",
			body:     completion(`{"role":"assistant","content":"42","reasoning_content":"6 times 7"}`, "stop", ""),
			model:    model,
			thinking: true,
			want:     projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "thinking", Thinking: "6 times 7"}, {Type: "text", Text: "42"}}},
		},
		{
			name:  "reasoning hidden without thinking",
			body:  completion(`{"role":"assistant","content":"42","reasoning_content":"6 times 7"}`, "stop", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "42"}}},
		},
		{
			name:  "content parts and refusal",
			body:  completion(`{"role":"assistant","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}`, "stop", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "ab"}}},
		},
		{
			name:  "refusal field",
			body:  completion(`{"role":"assistant","content":null,"refusal":"I can't help with that."}`, "stop", ""),
			model: model,
			want:  projMessage{ID: "msg_chatcmpl-1", Model: model, StopReason: "end_turn", Input: 20, Output: 7, Blocks: []projBlock{{Type: "text", Text: "I can't help with that."}}},
		},
		{
			name:  "no finish_reason, no usage, msg_ id kept",
			body:  `{"id":"msg_abc","choices":[{"message":{"content":"x"}}]}`,
			model: model,
			want:  projMessage{ID: "msg_abc", Model: model, StopReason: "end_turn", Blocks: []projBlock{{Type: "text", Text: "x"}}},
		},
		{
			name:  "no choices",
			body:  `{"id":"c","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":0}}`,
			model: model,
			want:  projMessage{ID: "msg_c", Model: model, StopReason: "end_turn", Input: 5},
		},
		{
			name:  "cached tokens and odd usage values",
			body:  `{"id":"c","choices":[{"message":{"content":"x"},"finish_reason":"stop"}],"usage":{"prompt_tokens":100.0,"completion_tokens":"7","prompt_tokens_details":{"cached_tokens":64}}}`,
			model: model,
			want:  projMessage{ID: "msg_c", Model: model, StopReason: "end_turn", Input: 36, CacheRead: 64, Output: 0, Blocks: []projBlock{{Type: "text", Text: "x"}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := TranslateResponse([]byte(tt.body), tt.model, WithThinking(tt.thinking))
			if err != nil {
				t.Fatal(err)
			}
			m := sdkMessage(t, out)
			if got := project(m); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("\n got %+v\nwant %+v\n%s", got, tt.want, out)
			}
			// The raw shape: the fields every Message has.
			var raw map[string]json.RawMessage
			if err := json.Unmarshal(out, &raw); err != nil {
				t.Fatal(err)
			}
			for _, k := range []string{"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"} {
				if _, ok := raw[k]; !ok {
					t.Errorf("no %q in %s", k, out)
				}
			}
			if string(raw["type"]) != `"message"` || string(raw["role"]) != `"assistant"` || string(raw["content"])[0] != '[' {
				t.Errorf("bad envelope %s", out)
			}
		})
	}
}

func TestTranslateResponseGeneratedID(t *testing.T) {
	out, err := TranslateResponse([]byte(`{"choices":[{"message":{"content":"x"}}]}`), "m")
	if err != nil {
		t.Fatal(err)
	}
	if id := sdkMessage(t, out).ID; !strings.HasPrefix(id, "msg_") || len(id) < 20 {
		t.Errorf("id %q", id)
	}
}

func TestTranslateResponseErrors(t *testing.T) {
	for _, tt := range []struct{ body, want string }{
		{``, "not a JSON object"},
		{`<html>`, "not a JSON object"},
		{`[]`, "not a JSON object"},
		{`{"choices":`, "not a valid chat completion"},
		{`{"choices":{}}`, "not a valid chat completion"},
		{`{"error":{"message":"model not loaded","type":"invalid_request_error"}}`, "upstream error: model not loaded"},
		{`{"error":"boom"}`, "upstream error: boom"},
	} {
		if _, err := TranslateResponse([]byte(tt.body), "m"); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: error %v, want %q", tt.body, err, tt.want)
		}
	}
}
