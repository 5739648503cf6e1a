package anthropic

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestTranslateRequest(t *testing.T) {
	tests := []struct {
		name     string
		body     string
		model    string // "" → "Qwen/Qwen3-8B"
		want     string
		stream   bool
		thinking bool
	}{
		{
			name: "minimal",
			body: `{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}`,
		},
		{
			name:  "empty model keeps the body's",
			body:  `{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[{"role":"user","content":"Hi"}]}`,
			model: "-",
			want:  `{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[{"role":"user","content":"Hi"}]}`,
		},
		{
			name: "system string",
			body: `{"max_tokens":1,"system":"Be brief.","messages":[{"role":"user","content":"Hi"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}`,
		},
		{
			name: "system blocks and system turns merge into one leading message",
			body: `{"max_tokens":1,"system":[{"type":"text","text":"You are Claude Code.","cache_control":{"type":"ephemeral"}},{"type":"text","text":"Be brief."}],
				"messages":[{"role":"user","content":"Hi"},{"role":"system","content":[{"type":"text","text":"Injected."}]},{"role":"assistant","content":"Hello"},{"role":"system","content":"Late."}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[
				{"role":"system","content":"You are Claude Code.\nBe brief.\n\nInjected.\n\nLate."},
				{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]}`,
		},
		{
			name: "empty system is no system message",
			body: `{"max_tokens":1,"system":"","messages":[{"role":"user","content":"Hi"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"Hi"}]}`,
		},
		{
			name: "text blocks",
			body: `{"max_tokens":1,"messages":[
				{"role":"user","content":[{"type":"text","text":"<system-reminder>x</system-reminder>"},{"type":"text","text":"Fix the bug."}]},
				{"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"sig"},{"type":"text","text":"Sure"},{"type":"text","text":", done."}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[
				{"role":"user","content":"<system-reminder>x</system-reminder>\nFix the bug."},
				{"role":"assistant","content":"Sure, done."}]}`,
		},
		{
			name: "images",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":[
				{"type":"text","text":"What is this?"},
				{"type":"image","source":{"type":"base64","media_type":"image/jpeg","data":"/9j/4AAQ"}},
				{"type":"image","source":{"type":"url","url":"https://example.com/cat.png"}}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":[
				{"type":"text","text":"What is this?"},
				{"type":"image_url","image_url":{"url":"data:image/jpeg;base64,/9j/4AAQ"}},
				{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}]}`,
		},
		{
			name: "document with a text source",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","title":"notes.txt","source":{"type":"text","media_type":"text/plain","data":"line 1"}},{"type":"text","text":"Summarise."}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"notes.txt\n\nline 1\nSummarise."}]}`,
		},
		{
			name: "tool round trip",
			body: `{"max_tokens":1,"messages":[
				{"role":"user","content":"Read /etc/hosts"},
				{"role":"assistant","content":[{"type":"text","text":"Reading."},{"type":"tool_use","id":"toolu_01","name":"Read","input":{"path": "/etc/hosts", "n": 1.50}}]},
				{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":"127.0.0.1 localhost"},{"type":"text","text":"Now what?"}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[
				{"role":"user","content":"Read /etc/hosts"},
				{"role":"assistant","content":"Reading.","tool_calls":[{"id":"toolu_01","type":"function","function":{"name":"Read","arguments":"{\"path\":\"/etc/hosts\",\"n\":1.50}"}}]},
				{"role":"tool","content":"127.0.0.1 localhost","tool_call_id":"toolu_01"},
				{"role":"user","content":"Now what?"}]}`,
		},
		{
			name: "parallel tool calls without text, results as blocks, errors and images",
			body: `{"max_tokens":1,"messages":[
				{"role":"assistant","content":[{"type":"tool_use","id":"a","name":"Glob","input":{}},{"type":"tool_use","id":"b","name":"Shot"},{"type":"tool_use","id":"c","name":"Bash","input":{"cmd":"false"}}]},
				{"role":"user","content":[
					{"type":"tool_result","tool_use_id":"a","content":[{"type":"text","text":"x.go"},{"type":"text","text":"y.go"}]},
					{"type":"tool_result","tool_use_id":"b","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBO"}}]},
					{"type":"tool_result","tool_use_id":"c","is_error":true,"content":"exit status 1"}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[
				{"role":"assistant","content":null,"tool_calls":[
					{"id":"a","type":"function","function":{"name":"Glob","arguments":"{}"}},
					{"id":"b","type":"function","function":{"name":"Shot","arguments":"{}"}},
					{"id":"c","type":"function","function":{"name":"Bash","arguments":"{\"cmd\":\"false\"}"}}]},
				{"role":"tool","content":"x.go\ny.go","tool_call_id":"a"},
				{"role":"tool","content":"","tool_call_id":"b"},
				{"role":"tool","content":"Error: exit status 1","tool_call_id":"c"},
				{"role":"user","content":[{"type":"text","text":"Images returned by tool call b:"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBO"}}]}]}`,
		},
		{
			name: "tool result without content",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"a"}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"tool","content":"","tool_call_id":"a"}]}`,
		},
		{
			name: "thinking-only assistant turn is kept empty",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":[{"type":"redacted_thinking","data":"xx"}]}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"},{"role":"assistant","content":""}]}`,
		},
		{
			name: "tools and tool_choice tool",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"}],
				"tools":[{"name":"Read","description":"Read a file","input_schema":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]},"cache_control":{"type":"ephemeral"}},
					{"name":"Now","input_schema":{"type":"object"}},
					{"type":"custom","name":"Bare"},
					{"type":"function","function":{"name":"already","parameters":{}}}],
				"tool_choice":{"type":"tool","name":"Read","disable_parallel_tool_use":true}}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}],
				"tools":[
					{"type":"function","function":{"name":"Read","description":"Read a file","parameters":{"type":"object","properties":{"path":{"type":"string"}},"required":["path"]}}},
					{"type":"function","function":{"name":"Now","parameters":{"type":"object"}}},
					{"type":"function","function":{"name":"Bare","parameters":{"type":"object","properties":{}}}},
					{"type":"function","function":{"name":"already","parameters":{}}}],
				"tool_choice":{"type":"function","function":{"name":"Read"}},
				"parallel_tool_calls":false}`,
		},
		{
			name: "tool_choice auto",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":{"type":"auto"}}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":"auto"}`,
		},
		{
			name: "tool_choice any",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":{"type":"any","disable_parallel_tool_use":false}}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":"required"}`,
		},
		{
			name: "tool_choice none",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":{"type":"none"}}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}],"tool_choice":"none"}`,
		},
		{
			name: "sampling, stop, user; unknown fields ignored",
			body: `{"max_tokens":512,"messages":[{"role":"user","content":"a"}],"temperature":0.7,"top_p":0.95,"top_k":40,
				"stop_sequences":["###","\n\nHuman:"],"metadata":{"user_id":"u-42"},"service_tier":"auto","container":null,"output_config":{"effort":"high"}}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":512,"messages":[{"role":"user","content":"a"}],"temperature":0.7,"top_p":0.95,"top_k":40,
				"stop":["###","\n\nHuman:"],"user":"u-42"}`,
		},
		{
			name: "nulls are absent",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"a"}],"system":null,"temperature":null,"top_k":null,"stop_sequences":null,"stream":null,"metadata":{"user_id":null},"tools":null,"tool_choice":null,"thinking":null}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}]}`,
		},
		{
			name:   "stream asks for usage",
			body:   `{"max_tokens":1,"stream":true,"messages":[{"role":"user","content":"a"}]}`,
			want:   `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}],"stream":true,"stream_options":{"include_usage":true}}`,
			stream: true,
		},
		{
			name: "stream false",
			body: `{"max_tokens":1,"stream":false,"messages":[{"role":"user","content":"a"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"a"}]}`,
		},
		{
			name:     "thinking enabled",
			body:     `{"max_tokens":2048,"thinking":{"type":"enabled","budget_tokens":1024},"messages":[{"role":"user","content":"a"}]}`,
			want:     `{"model":"Qwen/Qwen3-8B","max_tokens":2048,"messages":[{"role":"user","content":"a"}],"chat_template_kwargs":{"enable_thinking":true}}`,
			thinking: true,
		},
		{
			name:     "thinking adaptive",
			body:     `{"max_tokens":2048,"thinking":{"type":"adaptive"},"messages":[{"role":"user","content":"a"}]}`,
			want:     `{"model":"Qwen/Qwen3-8B","max_tokens":2048,"messages":[{"role":"user","content":"a"}],"chat_template_kwargs":{"enable_thinking":true}}`,
			thinking: true,
		},
		{
			name: "thinking disabled",
			body: `{"max_tokens":2048,"thinking":{"type":"disabled"},"messages":[{"role":"user","content":"a"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":2048,"messages":[{"role":"user","content":"a"}],"chat_template_kwargs":{"enable_thinking":false}}`,
		},
		{
			name: "html characters are not escaped",
			body: `{"max_tokens":1,"messages":[{"role":"user","content":"<b>a & b</b>"}]}`,
			want: `{"model":"Qwen/Qwen3-8B","max_tokens":1,"messages":[{"role":"user","content":"<b>a & b</b>"}]}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := tt.model
			switch m {
			case "":
				m = "Qwen/Qwen3-8B"
			case "-":
				m = ""
			}
			r, err := TranslateRequest([]byte(tt.body), m)
			if err != nil {
				t.Fatal(err)
			}
			jsonEqual(t, r.Body, tt.want)
			if r.Stream != tt.stream || r.Thinking != tt.thinking {
				t.Errorf("stream %v thinking %v, want %v %v", r.Stream, r.Thinking, tt.stream, tt.thinking)
			}
			if strings.Contains(string(r.Body), `\u003c`) {
				t.Errorf("HTML-escaped output: %s", r.Body)
			}
		})
	}
}

func TestTranslateRequestErrors(t *testing.T) {
	const msgs = `"messages":[{"role":"user","content":"a"}]`
	tests := []struct {
		name string
		body string
		want string // substring of the message
	}{
		{"empty", ``, "request body is empty"},
		{"not JSON", `{"model":`, "not valid JSON"},
		{"array", `[1]`, "must be a JSON object, got an array"},
		{"null", `null`, "must be a JSON object, got null"},
		{"max_tokens missing", `{` + msgs + `}`, "max_tokens is required"},
		{"max_tokens zero", `{"max_tokens":0,` + msgs + `}`, "max_tokens must be a positive integer, got 0"},
		{"max_tokens fraction", `{"max_tokens":1.5,` + msgs + `}`, "max_tokens must be a positive integer"},
		{"max_tokens string", `{"max_tokens":"100",` + msgs + `}`, "max_tokens must be a number, got a string"},
		{"messages missing", `{"max_tokens":1}`, "messages is required"},
		{"messages empty", `{"max_tokens":1,"messages":[]}`, "messages is empty"},
		{"messages object", `{"max_tokens":1,"messages":{}}`, "messages must be an array, got an object"},
		{"message not object", `{"max_tokens":1,"messages":["hi"]}`, "messages[0] must be an object"},
		{"role missing", `{"max_tokens":1,"messages":[{"content":"a"}]}`, "messages[0].role is required"},
		{"role wrong", `{"max_tokens":1,"messages":[{"role":"bot","content":"a"}]}`, `messages[0].role must be "user" or "assistant", got "bot"`},
		{"role number", `{"max_tokens":1,"messages":[{"role":1,"content":"a"}]}`, "messages[0].role must be a string, got a number"},
		{"content missing", `{"max_tokens":1,"messages":[{"role":"user"}]}`, "messages[0].content is required"},
		{"content number", `{"max_tokens":1,"messages":[{"role":"user","content":5}]}`, "messages[0].content must be a string or an array of content blocks, got a number"},
		{"block not object", `{"max_tokens":1,"messages":[{"role":"user","content":["a"]}]}`, "messages[0].content[0] must be a content block object"},
		{"block type missing", `{"max_tokens":1,"messages":[{"role":"user","content":[{"text":"a"}]}]}`, "messages[0].content[0].type is required"},
		{"unknown block", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"video"}]}]}`, `messages[0].content[1]: unknown content block type "video"; send one of: text, image`},
		{"text not string", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"text","text":["a"]}]}]}`, "messages[0].content[0].text must be a string, got an array"},
		{"text missing", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"text"}]}]}`, "messages[0].content[0].text is required"},
		{"image without source", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"image"}]}]}`, "messages[0].content[0].source must be an object"},
		{"image file source", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"file","file_id":"f"}}]}]}`, `source.type "file" is not supported`},
		{"image without media type", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","data":"x"}}]}]}`, "source.media_type is required"},
		{"pdf", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"base64","media_type":"application/pdf","data":"x"}}]}]}`, `document blocks with a "base64" source are not supported`},
		{"tool_use from user", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_use","id":"a","name":"f","input":{}}]}]}`, "tool_use blocks belong in assistant messages"},
		{"tool_result from assistant", `{"max_tokens":1,"messages":[{"role":"assistant","content":[{"type":"tool_result","tool_use_id":"a"}]}]}`, "tool_result blocks belong in user messages"},
		{"tool_use without id", `{"max_tokens":1,"messages":[{"role":"assistant","content":[{"type":"tool_use","name":"f","input":{}}]}]}`, "messages[0].content[0].id is required"},
		{"tool_use input array", `{"max_tokens":1,"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"a","name":"f","input":[1]}]}]}`, "messages[0].content[0].input must be an object"},
		{"tool_result without id", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","content":"x"}]}]}`, "tool_use_id is required"},
		{"tool_result is_error string", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","is_error":"yes"}]}]}`, "is_error must be true or false"},
		{"tool_result content number", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":3}]}]}`, "content must be a string or an array of text and image blocks"},
		{"tool_result inner block", `{"max_tokens":1,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","content":[{"type":"tool_use"}]}]}]}`, `a tool_result holds text, image and document blocks, got "tool_use"`},
		{"system number", `{"max_tokens":1,"system":1,` + msgs + `}`, "system must be a string or an array of text blocks, got a number"},
		{"system image", `{"max_tokens":1,"system":[{"type":"image"}],` + msgs + `}`, `system[0]: a system prompt takes only text blocks, got "image"`},
		{"system role image", `{"max_tokens":1,"messages":[{"role":"system","content":[{"type":"image"}]}]}`, "a system prompt takes only text blocks"},
		{"temperature string", `{"max_tokens":1,"temperature":"hot",` + msgs + `}`, "temperature must be a number, got a string"},
		{"top_k negative", `{"max_tokens":1,"top_k":-1,` + msgs + `}`, "top_k must be a non-negative integer"},
		{"stop_sequences string", `{"max_tokens":1,"stop_sequences":"###",` + msgs + `}`, "stop_sequences must be an array, got a string"},
		{"stop_sequences number", `{"max_tokens":1,"stop_sequences":[1],` + msgs + `}`, "stop_sequences[0] must be a string"},
		{"stream string", `{"max_tokens":1,"stream":"yes",` + msgs + `}`, "stream must be true or false, got a string"},
		{"metadata string", `{"max_tokens":1,"metadata":"u",` + msgs + `}`, "metadata must be an object"},
		{"tools object", `{"max_tokens":1,"tools":{},` + msgs + `}`, "tools must be an array, got an object"},
		{"tool without name", `{"max_tokens":1,"tools":[{"input_schema":{}}],` + msgs + `}`, "tools[0].name is required"},
		{"tool schema string", `{"max_tokens":1,"tools":[{"name":"f","input_schema":"x"}],` + msgs + `}`, "tools[0].input_schema must be a JSON Schema object, got a string"},
		{"server tool", `{"max_tokens":1,"tools":[{"type":"web_search_20250305","name":"web_search"}],` + msgs + `}`, `tool type "web_search_20250305" is an Anthropic server tool`},
		{"tool_choice string", `{"max_tokens":1,"tool_choice":"auto",` + msgs + `}`, "tool_choice must be an object such as {\"type\": \"auto\"}, got a string"},
		{"tool_choice unknown", `{"max_tokens":1,"tool_choice":{"type":"all"},` + msgs + `}`, `tool_choice.type must be "auto", "any", "tool" or "none", got "all"`},
		{"tool_choice tool without name", `{"max_tokens":1,"tool_choice":{"type":"tool"},` + msgs + `}`, "tool_choice.name is required"},
		{"thinking unknown", `{"max_tokens":1,"thinking":{"type":"max"},` + msgs + `}`, `thinking.type must be "enabled", "adaptive" or "disabled", got "max"`},
		{"thinking bool", `{"max_tokens":1,"thinking":true,` + msgs + `}`, "thinking must be an object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := TranslateRequest([]byte(tt.body), "m")
			if err == nil {
				t.Fatalf("accepted, translated to %s", r.Body)
			}
			re := asRequestError(err)
			if re == nil {
				t.Fatalf("error %T is not a *RequestError", err)
			}
			if !strings.Contains(re.Message, tt.want) {
				t.Errorf("message %q\nwant it to contain %q", re.Message, tt.want)
			}
			var body struct {
				Type  string `json:"type"`
				Error struct {
					Type    string `json:"type"`
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(re.Body(), &body); err != nil || body.Type != "error" || body.Error.Type != "invalid_request_error" || body.Error.Message != re.Message {
				t.Errorf("bad error body %s", re.Body())
			}
		})
	}
}

func TestTranslateRequestModelRequiredWhenNotGiven(t *testing.T) {
	for body, want := range map[string]string{
		`{"max_tokens":1,"messages":[{"role":"user","content":"a"}]}`:           "model is required",
		`{"model":7,"max_tokens":1,"messages":[{"role":"user","content":"a"}]}`: "model must be a string, got a number",
	} {
		_, err := TranslateRequest([]byte(body), "")
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: error %v, want %q", body, err, want)
		}
	}
}
