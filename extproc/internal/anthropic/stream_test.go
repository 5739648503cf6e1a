package anthropic

import (
	"bytes"
	"flag"
	"math/rand/v2"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/stream/*.golden from the current output")

// streamCase is one upstream SSE answer in testdata/stream and what an SDK
// client must make of the translated stream.
type streamCase struct {
	name     string // golden file name
	input    string // upstream SSE file
	thinking bool
	want     *projMessage // nil: the stream ends with an error event
	errorMsg string       // substring of the error event's message
}

const (
	model   = "claude-sonnet-4-5"
	upMsgID = "msg_chatcmpl-7"
)

var streamCases = []streamCase{
	{name: "text", input: "text.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "end_turn", Output: 2,
		Blocks: []projBlock{{Type: "text", Text: "Hello, wörld ✓ <b>&</b>\n"}},
	}},
	{name: "tool_fragmented", input: "tool_fragmented.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "tool_use",
		Blocks: []projBlock{{Type: "tool_use", ID: "call_abc", Name: "get_weather", Input: `{"city":"Brno"}`}},
	}},
	{name: "text_two_tools", input: "text_two_tools.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "tool_use", Input: 176, CacheRead: 1024, Output: 31,
		Blocks: []projBlock{
			{Type: "text", Text: "Let me check both."},
			{Type: "tool_use", ID: "call_1", Name: "read_file", Input: `{"path":"/etc/hosts"}`},
			{Type: "tool_use", ID: "call_2", Name: "list_dir", Input: `{"dir":"/tmp"}`},
		},
	}},
	{name: "usage_final", input: "usage_final.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "max_tokens", Input: 225, Output: 42,
		Blocks: []projBlock{{Type: "text", Text: "Once upon a time"}},
	}},
	{name: "reasoning_thinking", input: "reasoning.sse", thinking: true, want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "end_turn", Input: 10, Output: 5,
		Blocks: []projBlock{
			{Type: "thinking", Thinking: "The user wants a greeting."},
			{Type: "text", Text: "Hi!"},
		},
	}},
	{name: "reasoning_hidden", input: "reasoning.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "end_turn", Input: 10, Output: 5,
		Blocks: []projBlock{{Type: "text", Text: "Hi!"}},
	}},
	{name: "stop_sequence", input: "stop_sequence.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "stop_sequence", StopSequence: "###", Output: 1,
		Blocks: []projBlock{{Type: "text", Text: "1, 2, 3"}},
	}},
	{name: "no_done", input: "no_done.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "end_turn", Input: 3, Output: 1,
		Blocks: []projBlock{{Type: "text", Text: "done"}},
	}},
	{name: "interleaved_tools", input: "interleaved_tools.sse", errorMsg: "interleaved tool calls cannot be streamed"},
	{name: "nameless_tool", input: "nameless_tool.sse", want: &projMessage{
		ID: upMsgID, Model: model, StopReason: "tool_use",
		Blocks: []projBlock{{Type: "tool_use", ID: "call_late", Name: "search", Input: `{"q":"go"}`}},
	}},
	{name: "error_midstream", input: "error_midstream.sse", errorMsg: "upstream error: CUDA out of memory"},
	{name: "malformed", input: "malformed.sse", errorMsg: "upstream sent a malformed event"},
	{name: "truncated", input: "truncated.sse", errorMsg: "ended in the middle of an event"},
	{name: "truncated_between_events", input: "truncated_between_events.sse", errorMsg: "ended before the response was complete"},
}

func readInput(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "stream", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func (c streamCase) opts() []Option {
	return []Option{WithThinking(c.thinking)}
}

// TestStreamGolden pins the exact bytes of each whole translated answer
// (go test -run TestStreamGolden -update rewrites them), checks the event
// protocol, and checks what the Anthropic SDK accumulates from it.
func TestStreamGolden(t *testing.T) {
	for _, c := range streamCases {
		t.Run(c.name, func(t *testing.T) {
			in := readInput(t, c.input)
			out := run([][]byte{in}, c.opts()...)

			golden := filepath.Join("testdata", "stream", c.name+".golden")
			if *update {
				if err := os.WriteFile(golden, out, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(out, want) {
				t.Errorf("output differs from %s\n got:\n%s\nwant:\n%s", golden, out, want)
			}

			evs, err := parseSSE(out)
			if err != nil {
				t.Fatalf("malformed SSE: %v\n%s", err, out)
			}
			if err := checkProtocol(evs, true); err != nil {
				t.Fatalf("protocol: %v\n%s", err, out)
			}

			msg, err := sdkAccumulate(out)
			if c.want == nil {
				if err == nil || !strings.Contains(err.Error(), c.errorMsg) {
					t.Fatalf("SDK error = %v, want one containing %q", err, c.errorMsg)
				}
				if last := evs[len(evs)-1]; last.Name != "error" || !strings.Contains(string(last.Data), c.errorMsg) {
					t.Fatalf("last event %s %s, want an error with %q", last.Name, last.Data, c.errorMsg)
				}
				return
			}
			if err != nil {
				t.Fatalf("SDK: %v\n%s", err, out)
			}
			if got := project(msg); !reflect.DeepEqual(got, *c.want) {
				t.Errorf("SDK accumulated\n got %+v\nwant %+v", got, *c.want)
			}
		})
	}
}

// TestStreamSplitInvariance: the same upstream bytes give the same output
// however Envoy cuts them — at every single boundary, one byte at a time,
// and at random boundaries (empty chunks included).
func TestStreamSplitInvariance(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, c := range streamCases {
		t.Run(c.name, func(t *testing.T) {
			in := readInput(t, c.input)
			whole := run([][]byte{in}, c.opts()...)
			for k := 0; k <= len(in); k++ {
				if got := run([][]byte{in[:k], in[k:]}, c.opts()...); !bytes.Equal(got, whole) {
					t.Fatalf("split at %d/%d differs\n got:\n%s\nwant:\n%s", k, len(in), got, whole)
				}
			}
			bytewise := make([][]byte, len(in))
			for i := range in {
				bytewise[i] = in[i : i+1]
			}
			if got := run(bytewise, c.opts()...); !bytes.Equal(got, whole) {
				t.Fatalf("byte-at-a-time differs\n got:\n%s\nwant:\n%s", got, whole)
			}
			for iter := 0; iter < 300; iter++ {
				pieces := randomSplit(rng, in)
				if got := run(pieces, c.opts()...); !bytes.Equal(got, whole) {
					t.Fatalf("random split %v differs\n got:\n%s\nwant:\n%s", pieceLens(pieces), got, whole)
				}
			}
		})
	}
}

func randomSplit(rng *rand.Rand, in []byte) [][]byte {
	var pieces [][]byte
	for len(in) > 0 {
		n := rng.IntN(min(len(in), 64) + 1) // 0 gives an empty chunk
		pieces = append(pieces, in[:n])
		in = in[n:]
	}
	return pieces
}

func pieceLens(pieces [][]byte) []int {
	n := make([]int, len(pieces))
	for i, p := range pieces {
		n[i] = len(p)
	}
	return n
}

// TestStreamLineEndings: CRLF and lone CR line ends, a BOM, comments and
// fields other than data translate exactly like plain LF.
func TestStreamLineEndings(t *testing.T) {
	for _, c := range streamCases {
		in := readInput(t, c.input)
		want := run([][]byte{in}, c.opts()...)
		variants := map[string][]byte{
			"crlf":     bytes.ReplaceAll(in, []byte("\n"), []byte("\r\n")),
			"cr":       bytes.ReplaceAll(in, []byte("\n"), []byte("\r")),
			"bom":      append([]byte("\xEF\xBB\xBF"), in...),
			"comments": bytes.ReplaceAll(in, []byte("data: "), []byte(": ping\nevent: completion\nid: 7\nretry: 100\ndata: ")),
			"nospace":  bytes.ReplaceAll(in, []byte("data: "), []byte("data:")),
		}
		for name, v := range variants {
			// Split the CRLF variant between \r and \n too.
			for k := 0; k <= len(v); k += 7 {
				if got := run([][]byte{v[:k], v[k:]}, c.opts()...); !bytes.Equal(got, want) {
					t.Fatalf("%s/%s split at %d differs\n got:\n%s\nwant:\n%s", c.name, name, k, got, want)
				}
			}
		}
	}
}

func TestStreamMidUTF8(t *testing.T) {
	in := []byte("data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"žluťoučký 🐎\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n")
	whole := run([][]byte{in})
	if !bytes.Contains(whole, []byte(`"text":"žluťoučký 🐎"`)) {
		t.Fatalf("text not intact:\n%s", whole)
	}
	i := bytes.Index(in, []byte("🐎")) + 2 // inside the horse's four bytes
	if got := run([][]byte{in[:i], in[i:]}); !bytes.Equal(got, whole) {
		t.Fatalf("mid-rune split differs\n got:\n%s\nwant:\n%s", got, whole)
	}
}

func TestStreamEndings(t *testing.T) {
	done := "data: [DONE]\n\n"
	chunk := func(delta, finish string) string {
		f := "null"
		if finish != "" {
			f = `"` + finish + `"`
		}
		return `data: {"id":"c1","choices":[{"index":0,"delta":` + delta + `,"finish_reason":` + f + "}]}\n\n"
	}
	tests := []struct {
		name string
		in   string
		// events is the sequence of event names after Close.
		events []string
		// contains must appear in the output.
		contains []string
	}{
		{"empty body", "", []string{"error"}, []string{"without sending a response"}},
		{"only comments", ": keep-alive\n\n", []string{"error"}, []string{"without sending a response"}},
		{"only DONE", done, []string{"message_start", "message_delta", "message_stop"}, []string{`"id":"msg_generated"`, `"stop_reason":"end_turn"`, `"output_tokens":0`}},
		{"DONE without finish", chunk(`{"content":"a"}`, "") + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"stop_reason":"end_turn"`}},
		{"finish without DONE", chunk(`{"content":"a"}`, "stop"), []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, nil},
		{"finish without DONE or final newline", strings.TrimSuffix(chunk(`{"content":"a"}`, "stop"), "\n\n"), []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, nil},
		{"cut mid-event", chunk(`{"content":"a"}`, "") + `data: {"choices":[{"delta":{"cont`, []string{"message_start", "content_block_start", "content_block_delta", "error"}, []string{"ended in the middle of an event"}},
		{"cut mid-event then more", chunk(`{"content":"a"}`, "") + "data: {\"choices\":[{\"delta\":{\"cont\n\n" + done, []string{"message_start", "content_block_start", "content_block_delta", "error"}, []string{"malformed event"}},
		{"not an object", "data: [1,2]\n\n", []string{"error"}, []string{"not a JSON object"}},
		{"null", "data: null\n\n", []string{"error"}, []string{"not a JSON object"}},
		{"error string", `data: {"error":"model unloaded"}` + "\n\n", []string{"error"}, []string{`"message":"upstream error: model unloaded"`, `"type":"api_error"`}},
		{"wrong field type", `data: {"choices":"nope"}` + "\n\n", []string{"error"}, []string{"malformed"}},
		{"input after DONE ignored", chunk(`{"content":"a"}`, "stop") + done + chunk(`{"content":"b"}`, "") + "data: {bad\n\n", []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, nil},
		{"content_filter", chunk(`{"content":"a"}`, "content_filter") + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"stop_reason":"refusal"`}},
		{"tool call with stop", chunk(`{"tool_calls":[{"index":0,"id":"t","function":{"name":"f","arguments":"{}"}}]}`, "stop") + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"stop_reason":"tool_use"`}},
		{"tool call without id", chunk(`{"tool_calls":[{"index":0,"function":{"name":"f"}}]}`, "tool_calls") + done, []string{"message_start", "content_block_start", "content_block_stop", "message_delta", "message_stop"}, []string{`"id":"toolu_c1_0"`}},
		{"nameless tool call", chunk(`{"tool_calls":[{"index":0,"id":"t","function":{"arguments":"{}"}}]}`, "tool_calls") + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"name":"unknown_tool"`}},
		{"legacy function_call", chunk(`{"function_call":{"name":"f","arguments":"{\"a\":1}"}}`, "function_call") + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"name":"f"`, `"partial_json":"{\"a\":1}"`, `"stop_reason":"tool_use"`}},
		{"second choice ignored", `data: {"id":"c1","choices":[{"index":1,"delta":{"content":"other"}},{"index":0,"delta":{"content":"mine"},"finish_reason":"stop"}]}` + "\n\n" + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, []string{`"text":"mine"`}},
		{"reasoning field", chunk(`{"reasoning":"hm"}`, "stop") + done, []string{"message_start", "ping", "message_delta", "message_stop"}, nil},
		{"multi-line data", "data: {\"id\":\"c1\",\ndata: \"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n" + done, []string{"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta", "message_stop"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestStream(model)
			out := s.Write([]byte(tt.in))
			out = append(out, s.Close()...)
			evs, err := parseSSE(out)
			if err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if err := checkProtocol(evs, true); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			var names []string
			for _, e := range evs {
				names = append(names, e.Name)
			}
			if !reflect.DeepEqual(names, tt.events) {
				t.Errorf("events %v, want %v\n%s", names, tt.events, out)
			}
			for _, want := range tt.contains {
				if !bytes.Contains(out, []byte(want)) {
					t.Errorf("output lacks %s\n%s", want, out)
				}
			}
			if !s.Done() {
				t.Error("Done() is false after Close")
			}
			if more := s.Write([]byte(done)); more != nil {
				t.Errorf("Write after Close returned %q", more)
			}
			if more := s.Close(); more != nil {
				t.Errorf("second Close returned %q", more)
			}
		})
	}
}

// TestStreamIncremental: output comes out as soon as an event is complete,
// not at the end, and an incomplete line is all that waits.
func TestStreamIncremental(t *testing.T) {
	s := newTestStream(model)
	first := `data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}]}`
	if out := s.Write([]byte(first)); out != nil {
		t.Fatalf("output before the line ended: %s", out)
	}
	out := s.Write([]byte("\n\n"))
	for _, want := range []string{"event: message_start", "event: content_block_start", `"text":"Hi"`} {
		if !bytes.Contains(out, []byte(want)) {
			t.Fatalf("after one event, output lacks %s:\n%s", want, out)
		}
	}
	if s.Done() {
		t.Fatal("Done before the end")
	}
	out = s.Write([]byte("data: [DONE]\n\n"))
	if !bytes.HasSuffix(out, []byte("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")) || !s.Done() {
		t.Fatalf("[DONE] did not end the message:\n%s", out)
	}
	if out := s.Close(); out != nil {
		t.Fatalf("Close after [DONE] returned %s", out)
	}
}

func TestStreamEventTooLarge(t *testing.T) {
	for _, tt := range []struct {
		name string
		max  int
		in   []string
		msg  string
	}{
		{"long line in pieces", 64, []string{"data: " + strings.Repeat("x", 40), strings.Repeat("y", 40)}, "line longer than 64 bytes"},
		{"long line whole", 64, []string{"data: " + strings.Repeat("x", 80) + "\n\n"}, "line longer than 64 bytes"},
		{"long event", 64, []string{strings.Repeat("data: 0123456789\n", 6)}, "event longer than 64 bytes"},
		{"nameless tool arguments", 200, []string{strings.Repeat(`data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"`+strings.Repeat("a", 50)+`"}}]}}]}`+"\n\n", 6)}, "over 200 bytes of tool call arguments without naming the tool"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestStream(model)
			s.maxEvent = tt.max
			var out []byte
			for _, p := range tt.in {
				out = append(out, s.Write([]byte(p))...)
			}
			out = append(out, s.Close()...)
			if !bytes.Contains(out, []byte(tt.msg)) || !bytes.HasPrefix(out[bytes.LastIndex(out, []byte("event: ")):], []byte("event: error")) {
				t.Fatalf("want an error event with %q, got:\n%s", tt.msg, out)
			}
			if len(s.line) != 0 || len(s.data) != 0 {
				t.Fatal("buffers kept after the error")
			}
		})
	}
}

// TestStreamConsistentWithResponse: a streamed answer and the same answer
// unstreamed come out as the same Anthropic message.
func TestStreamConsistentWithResponse(t *testing.T) {
	streamed, err := sdkAccumulate(run([][]byte{readInput(t, "text_two_tools.sse")}))
	if err != nil {
		t.Fatal(err)
	}
	body := `{"id":"chatcmpl-7","object":"chat.completion","model":"Qwen/Qwen3-8B","choices":[{"index":0,"message":{"role":"assistant","content":"Let me check both.","tool_calls":[
		{"id":"call_1","type":"function","function":{"name":"read_file","arguments":"{\"path\":\"/etc/hosts\"}"}},
		{"id":"call_2","type":"function","function":{"name":"list_dir","arguments":"{\"dir\":\"/tmp\"}"}}]},"finish_reason":"tool_calls"}],
		"usage":{"prompt_tokens":1200,"completion_tokens":31,"total_tokens":1231,"prompt_tokens_details":{"cached_tokens":1024}}}`
	out, err := TranslateResponse([]byte(body), model)
	if err != nil {
		t.Fatal(err)
	}
	whole := sdkMessage(t, out)
	if got, want := project(whole), project(streamed); !reflect.DeepEqual(got, want) {
		t.Errorf("unstreamed %+v\n  streamed %+v", got, want)
	}
}
