package anthropic

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"testing"

	sdk "github.com/anthropics/anthropic-sdk-go/v2"
	"github.com/anthropics/anthropic-sdk-go/v2/packages/ssestream"
)

// newTestStream is NewStream with a fixed id for streams whose upstream
// sends none, so outputs compare byte for byte.
func newTestStream(model string, opts ...Option) *Stream {
	s := NewStream(model, opts...)
	s.newID = func() string { return "msg_generated" }
	return s
}

// run feeds pieces to a fresh stream, then closes it.
func run(pieces [][]byte, opts ...Option) []byte {
	s := newTestStream("claude-sonnet-4-5", opts...)
	var out []byte
	for _, p := range pieces {
		out = append(out, s.Write(p)...)
	}
	return append(out, s.Close()...)
}

type sseEvent struct {
	Name string
	Data []byte
}

// parseSSE reads the translator's output strictly: every event is exactly
// "event: NAME\ndata: JSON\n\n" with one data line holding a JSON object
// whose type is NAME.
func parseSSE(out []byte) ([]sseEvent, error) {
	var evs []sseEvent
	for len(out) > 0 {
		if !bytes.HasPrefix(out, []byte("event: ")) {
			return evs, fmt.Errorf("event %d does not start with \"event: \": %q", len(evs), head(out))
		}
		out = out[len("event: "):]
		nl := bytes.IndexByte(out, '\n')
		if nl < 0 {
			return evs, fmt.Errorf("event %d: no newline after the event name", len(evs))
		}
		name := string(out[:nl])
		out = out[nl+1:]
		if !bytes.HasPrefix(out, []byte("data: ")) {
			return evs, fmt.Errorf("event %d (%s): no data line: %q", len(evs), name, head(out))
		}
		out = out[len("data: "):]
		end := bytes.Index(out, []byte("\n\n"))
		if end < 0 {
			return evs, fmt.Errorf("event %d (%s): not ended by a blank line", len(evs), name)
		}
		data := out[:end]
		out = out[end+2:]
		if bytes.ContainsAny(data, "\r\n") {
			return evs, fmt.Errorf("event %d (%s): data spans lines", len(evs), name)
		}
		var typ struct {
			Type string `json:"type"`
		}
		if !json.Valid(data) || data[0] != '{' || json.Unmarshal(data, &typ) != nil {
			return evs, fmt.Errorf("event %d (%s): data is not a JSON object: %q", len(evs), name, head(data))
		}
		if typ.Type != name {
			return evs, fmt.Errorf("event %d: name %q but type %q", len(evs), name, typ.Type)
		}
		evs = append(evs, sseEvent{Name: name, Data: data})
	}
	return evs, nil
}

func head(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}

var stopReasons = map[string]bool{
	"end_turn": true, "max_tokens": true, "stop_sequence": true, "tool_use": true, "refusal": true,
}

// checkProtocol checks the order Anthropic clients rely on: message_start
// first (or an error), blocks started in index order one at a time, deltas
// of the block's own kind, every block stopped once before message_delta,
// message_delta then message_stop, nothing after the end. ended asks for a
// finished stream: the last event is message_stop or error.
func checkProtocol(evs []sseEvent, ended bool) error {
	type blk struct {
		typ     string
		stopped bool
	}
	var (
		blocks    []blk
		started   bool
		done      bool
		sawDelta  bool
		lastEvent string
	)
	for i, ev := range evs {
		if done {
			return fmt.Errorf("event %d (%s) after the end (%s)", i, ev.Name, lastEvent)
		}
		lastEvent = ev.Name
		var e struct {
			Message *struct {
				ID      string            `json:"id"`
				Type    string            `json:"type"`
				Role    string            `json:"role"`
				Model   string            `json:"model"`
				Content []json.RawMessage `json:"content"`
				Usage   *struct {
					InputTokens  *int64 `json:"input_tokens"`
					OutputTokens *int64 `json:"output_tokens"`
				} `json:"usage"`
			} `json:"message"`
			Index        *int `json:"index"`
			ContentBlock *struct {
				Type string `json:"type"`
				ID   string `json:"id"`
				Name string `json:"name"`
			} `json:"content_block"`
			Delta *struct {
				Type        string  `json:"type"`
				Text        *string `json:"text"`
				Thinking    *string `json:"thinking"`
				PartialJSON *string `json:"partial_json"`
				StopReason  *string `json:"stop_reason"`
			} `json:"delta"`
			Usage *struct {
				OutputTokens *int64 `json:"output_tokens"`
			} `json:"usage"`
			Error *struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if err := json.Unmarshal(ev.Data, &e); err != nil {
			return fmt.Errorf("event %d (%s): %v", i, ev.Name, err)
		}
		switch ev.Name {
		case "error":
			if e.Error == nil || e.Error.Type == "" || e.Error.Message == "" {
				return fmt.Errorf("event %d: error without type or message: %s", i, ev.Data)
			}
			done = true
		case "message_start":
			m := e.Message
			if started || m == nil {
				return fmt.Errorf("event %d: second or empty message_start", i)
			}
			if m.Type != "message" || m.Role != "assistant" || len(m.ID) < 5 || m.ID[:4] != "msg_" || m.Content == nil || len(m.Content) != 0 || m.Usage == nil || m.Usage.InputTokens == nil || m.Usage.OutputTokens == nil {
				return fmt.Errorf("event %d: bad message_start: %s", i, ev.Data)
			}
			started = true
		case "ping":
			if !started {
				return fmt.Errorf("event %d: ping before message_start", i)
			}
		case "content_block_start":
			if !started || sawDelta || e.Index == nil || e.ContentBlock == nil {
				return fmt.Errorf("event %d: misplaced or incomplete content_block_start: %s", i, ev.Data)
			}
			if *e.Index != len(blocks) {
				return fmt.Errorf("event %d: block index %d, want %d", i, *e.Index, len(blocks))
			}
			for j, b := range blocks {
				if !b.stopped {
					return fmt.Errorf("event %d: block %d starts while block %d is open", i, *e.Index, j)
				}
			}
			switch e.ContentBlock.Type {
			case "text", "thinking":
			case "tool_use":
				if e.ContentBlock.ID == "" || e.ContentBlock.Name == "" {
					return fmt.Errorf("event %d: tool_use without id or name: %s", i, ev.Data)
				}
			default:
				return fmt.Errorf("event %d: block type %q", i, e.ContentBlock.Type)
			}
			blocks = append(blocks, blk{typ: e.ContentBlock.Type})
		case "content_block_delta":
			if e.Index == nil || *e.Index < 0 || *e.Index >= len(blocks) || e.Delta == nil {
				return fmt.Errorf("event %d: delta for no block: %s", i, ev.Data)
			}
			b := blocks[*e.Index]
			want := map[string]string{"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}[b.typ]
			if e.Delta.Type != want {
				return fmt.Errorf("event %d: %s delta in a %s block", i, e.Delta.Type, b.typ)
			}
			if (want == "text_delta" && e.Delta.Text == nil) || (want == "thinking_delta" && e.Delta.Thinking == nil) || (want == "input_json_delta" && e.Delta.PartialJSON == nil) {
				return fmt.Errorf("event %d: delta without its field: %s", i, ev.Data)
			}
			if b.stopped {
				return fmt.Errorf("event %d: delta for stopped block %d", i, *e.Index)
			}
		case "content_block_stop":
			if e.Index == nil || *e.Index < 0 || *e.Index >= len(blocks) || blocks[*e.Index].stopped {
				return fmt.Errorf("event %d: stop for no open block: %s", i, ev.Data)
			}
			blocks[*e.Index].stopped = true
		case "message_delta":
			if !started || sawDelta {
				return fmt.Errorf("event %d: misplaced message_delta", i)
			}
			for j, b := range blocks {
				if !b.stopped {
					return fmt.Errorf("event %d: message_delta with block %d open", i, j)
				}
			}
			if e.Delta == nil || e.Delta.StopReason == nil || !stopReasons[*e.Delta.StopReason] || e.Usage == nil || e.Usage.OutputTokens == nil {
				return fmt.Errorf("event %d: bad message_delta: %s", i, ev.Data)
			}
			sawDelta = true
		case "message_stop":
			if !sawDelta {
				return fmt.Errorf("event %d: message_stop without message_delta", i)
			}
			done = true
		default:
			return fmt.Errorf("event %d: unknown event %q", i, ev.Name)
		}
	}
	if ended && !done {
		return fmt.Errorf("stream did not end with message_stop or error (last: %q)", lastEvent)
	}
	return nil
}

// sdkAccumulate reads out with the Anthropic Go SDK's own SSE decoder and
// builds the message with Message.Accumulate, as an SDK client would.
func sdkAccumulate(out []byte) (sdk.Message, error) {
	res := &http.Response{
		Header: http.Header{"Content-Type": {"text/event-stream"}},
		Body:   io.NopCloser(bytes.NewReader(out)),
	}
	stream := ssestream.NewStream[sdk.MessageStreamEventUnion](ssestream.NewDecoder(res), nil)
	var msg sdk.Message
	for stream.Next() {
		if err := msg.Accumulate(stream.Current()); err != nil {
			return msg, err
		}
	}
	return msg, stream.Err()
}

// projBlock is a content block reduced to what the tests compare.
type projBlock struct {
	Type     string
	Text     string
	Thinking string
	ID       string
	Name     string
	Input    string
}

type projMessage struct {
	ID           string
	Model        string
	Blocks       []projBlock
	StopReason   string
	StopSequence string
	Input        int64
	CacheRead    int64
	Output       int64
}

func project(m sdk.Message) projMessage {
	p := projMessage{
		ID: m.ID, Model: string(m.Model), StopReason: string(m.StopReason), StopSequence: m.StopSequence,
		Input: m.Usage.InputTokens, CacheRead: m.Usage.CacheReadInputTokens, Output: m.Usage.OutputTokens,
	}
	for _, b := range m.Content {
		pb := projBlock{Type: b.Type, Text: b.Text, Thinking: b.Thinking, ID: b.ID, Name: b.Name}
		if b.Type == "tool_use" {
			var buf bytes.Buffer
			if json.Compact(&buf, b.Input) == nil {
				pb.Input = buf.String()
			} else {
				pb.Input = "INVALID:" + string(b.Input)
			}
		}
		p.Blocks = append(p.Blocks, pb)
	}
	return p
}

// jsonEqual compares two JSON documents by value.
func jsonEqual(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want JSON: %v\n%s", err, want)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("JSON differs\n got: %s\nwant: %s", got, compactString(want))
	}
}

func compactString(s string) string {
	var buf bytes.Buffer
	if json.Compact(&buf, []byte(s)) != nil {
		return s
	}
	return buf.String()
}

// asRequestError unwraps TranslateRequest's error.
func asRequestError(err error) *RequestError {
	var re *RequestError
	if errors.As(err, &re) {
		return re
	}
	return nil
}
