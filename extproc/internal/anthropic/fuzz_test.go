package anthropic

import (
	"bytes"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// FuzzStream: for any upstream bytes cut anywhere, the translator never
// panics; its output is a sequence of well-formed SSE events whose data is
// a JSON object of the event's type, in an order Anthropic clients accept
// (checkProtocol), ending with message_stop or an error event after Close;
// and it is the same output as for the bytes fed whole.
func FuzzStream(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "stream", "*.sse"))
	for i, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint64(i), i%2 == 0)
	}
	f.Add([]byte("data: [DONE]\n\n"), uint64(0), false)
	f.Add([]byte("data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"finish_reason\":\"stop\"}]}\r\n\r\ndata: [DONE]\r"), uint64(1), true)
	f.Add([]byte("data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":3,\"function\":{\"arguments\":\"{\"}},{\"index\":3,\"id\":\"x\",\"function\":{\"name\":\"n\"}}]}}]}\n\n"), uint64(2), false)
	f.Add([]byte("\xEF\xBB\xBF: c\n\ndata:{\"error\":{\"message\":7}}\n\n"), uint64(3), false)
	f.Add([]byte("data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"r\",\"content\":\"c\"}}],\"usage\":{\"prompt_tokens\":-1}}\n\n"), uint64(4), true)

	f.Fuzz(func(t *testing.T, in []byte, seed uint64, thinking bool) {
		opts := []Option{WithThinking(thinking)}
		whole := run([][]byte{in}, opts...)
		evs, err := parseSSE(whole)
		if err != nil {
			t.Fatalf("malformed output: %v\n%q", err, whole)
		}
		if err := checkProtocol(evs, true); err != nil {
			t.Fatalf("protocol: %v\n%s", err, whole)
		}
		rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		var pieces [][]byte
		for rest := in; len(rest) > 0; {
			n := rng.IntN(len(rest) + 1)
			pieces = append(pieces, rest[:n])
			rest = rest[n:]
		}
		if got := run(pieces, opts...); !bytes.Equal(got, whole) {
			t.Fatalf("split %v changes the output\n got:\n%s\nwant:\n%s", pieceLens(pieces), got, whole)
		}
	})
}

// FuzzTranslateRequest: any body either translates to a JSON object with
// the given model and a non-empty messages array, or is refused with a
// *RequestError whose body is Anthropic's invalid_request_error; never a
// panic.
func FuzzTranslateRequest(f *testing.F) {
	for _, s := range []string{
		`{"model":"claude","max_tokens":1024,"messages":[{"role":"user","content":"Hello"}]}`,
		`{"max_tokens":8,"system":[{"type":"text","text":"s"}],"stream":true,"messages":[{"role":"system","content":"x"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AA=="}}]}]}`,
		`{"max_tokens":8,"messages":[{"role":"assistant","content":[{"type":"thinking","thinking":"t"},{"type":"tool_use","id":"a","name":"f","input":{"x":[1,{"y":null}]}}]},{"role":"user","content":[{"type":"tool_result","tool_use_id":"a","is_error":true,"content":[{"type":"text","text":"e"},{"type":"image","source":{"type":"url","url":"u"}}]}]}],"tools":[{"name":"f","input_schema":{"type":"object"}}],"tool_choice":{"type":"tool","name":"f","disable_parallel_tool_use":true},"thinking":{"type":"enabled","budget_tokens":1}}`,
		`{"max_tokens":8,"messages":[{"role":"user","content":[{"type":"document","source":{"type":"text","data":"d"}}]}],"temperature":1e-3,"top_p":1,"top_k":0,"stop_sequences":["a"],"metadata":{"user_id":"u"}}`,
		`{"max_tokens":8,"messages":[{"role":"user","content":[]}]}`,
		`[]`, `null`, `{`, ``,
	} {
		f.Add([]byte(s), "Qwen/Qwen3-8B")
	}
	f.Add([]byte(`{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"a"}]}`), "")

	f.Fuzz(func(t *testing.T, body []byte, model string) {
		r, err := TranslateRequest(body, model)
		if err != nil {
			re := asRequestError(err)
			if re == nil || re.Message == "" {
				t.Fatalf("error %v (%T) is not a *RequestError with a message", err, err)
			}
			var e struct {
				Type  string `json:"type"`
				Error struct{ Type, Message string }
			}
			if json.Unmarshal(re.Body(), &e) != nil || e.Type != "error" || e.Error.Type != ErrInvalidRequest {
				t.Fatalf("bad error body %s", re.Body())
			}
			return
		}
		var out struct {
			Model    *string           `json:"model"`
			Messages []json.RawMessage `json:"messages"`
		}
		if !json.Valid(r.Body) || r.Body[0] != '{' || json.Unmarshal(r.Body, &out) != nil {
			t.Fatalf("output is not a JSON object: %s", r.Body)
		}
		// JSON carries text, so a model id that is not UTF-8 arrives with
		// U+FFFD in place of its bad bytes (routing only passes valid ids).
		var want string
		if err := json.Unmarshal(marshal(model), &want); err != nil {
			t.Fatal(err)
		}
		if out.Model == nil || (model != "" && *out.Model != want) || *out.Model == "" {
			t.Fatalf("model %v, want %q: %s", out.Model, want, r.Body)
		}
		if len(out.Messages) == 0 {
			t.Fatalf("no messages: %s", r.Body)
		}
		for _, m := range out.Messages {
			var msg struct{ Role string }
			if json.Unmarshal(m, &msg) != nil || (msg.Role != "system" && msg.Role != "user" && msg.Role != "assistant" && msg.Role != "tool") {
				t.Fatalf("bad message %s", m)
			}
		}
	})
}

// FuzzTranslateResponse: any upstream answer gives an error or a Message
// the SDK decodes; never a panic.
func FuzzTranslateResponse(f *testing.F) {
	f.Add([]byte(completion(`{"role":"assistant","content":"hi","reasoning_content":"r","tool_calls":[{"id":"a","function":{"name":"f","arguments":"{\"x\":"}}]}`, "tool_calls", "")), true)
	f.Add([]byte(`{"choices":[{"message":{"content":[{"type":"text","text":"a"}]},"stop_reason":"x"}]}`), false)
	f.Add([]byte(`{"error":{"message":"m"}}`), false)
	f.Fuzz(func(t *testing.T, body []byte, thinking bool) {
		out, err := TranslateResponse(body, "m", WithThinking(thinking))
		if err != nil {
			return
		}
		sdkMessage(t, out)
		var m struct {
			Content []struct {
				Type  string          `json:"type"`
				Input json.RawMessage `json:"input"`
			} `json:"content"`
			StopReason string `json:"stop_reason"`
		}
		if json.Unmarshal(out, &m) != nil || !stopReasons[m.StopReason] {
			t.Fatalf("bad message %s", out)
		}
		for _, b := range m.Content {
			if b.Type == "tool_use" && !isObject(b.Input) {
				t.Fatalf("tool_use input is not an object: %s", out)
			}
		}
	})
}

// FuzzTranslateError: any status and body give Anthropic's error object.
func FuzzTranslateError(f *testing.F) {
	f.Add(500, []byte(`{"error":{"message":"m"}}`))
	f.Add(429, []byte(`{"detail":[1]}`))
	f.Add(0, []byte("\xff"))
	f.Fuzz(func(t *testing.T, status int, body []byte) {
		out := TranslateError(status, body)
		var e struct {
			Type  string `json:"type"`
			Error struct{ Type, Message string }
		}
		if json.Unmarshal(out, &e) != nil || e.Type != "error" || e.Error.Type != ErrorType(status) || e.Error.Message == "" {
			t.Fatalf("bad error %s", out)
		}
	})
}
