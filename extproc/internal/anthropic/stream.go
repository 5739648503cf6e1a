package anthropic

import (
	"bytes"
	"encoding/json"
	"fmt"
)

// DefaultMaxEventBytes bounds one upstream SSE line, one event's data and
// the arguments of a tool call still waiting for its name. An upstream that
// sends more without a line break gets an error event instead of growing
// the buffer without end. Neurons send a tool call's whole arguments in one
// event, so this is sized for a large file written by a tool, not a token.
const DefaultMaxEventBytes = 16 << 20

var utf8BOM = []byte("\xEF\xBB\xBF")

// Stream translates one streamed chat completion (OpenAI
// chat.completion.chunk server-sent events) into Anthropic's Messages event
// stream, as the body arrives in chunks split anywhere (mid-line, mid-UTF-8,
// mid-"\r\n"). Feed every upstream body chunk to Write and send what it
// returns; at the end of the upstream body call Close and send that too.
//
// The output for the same upstream bytes is the same however they are
// split. Nothing is held back but an incomplete line and the data lines of
// an event whose blank line has not come yet; every complete event is
// translated at once.
//
// Upstream events map as follows:
//
//   - the first chunk: message_start (id msg_<upstream id>, model = the
//     name the client asked for, empty content, usage if the chunk has it);
//   - delta.content: text_delta in a text block;
//   - delta.reasoning_content (or reasoning): thinking_delta in a thinking
//     block with WithThinking, else a ping (see WithThinking);
//   - delta.tool_calls[i]: a tool_use block per index, started once the
//     call's name is known (arguments that came first are sent with it),
//     then input_json_delta with each arguments fragment as it is, so the
//     client's own JSON accumulation sees exactly what the model wrote;
//   - a new block closes the open one, as Anthropic streams one block at
//     a time and clients finish a block (parse its input, run the tool) at
//     its content_block_stop;
//   - finish_reason and usage (which include_usage sends in a last chunk
//     with no choices) are remembered; [DONE] closes the open block and
//     sends message_delta (stop_reason, stop_sequence, usage) and
//     message_stop. Without usage, output_tokens counts the text and
//     thinking deltas, which is exact for a neuron (one token per chunk).
//
// A data line that is not a JSON object, or an {"error": ...} object, ends
// the stream with an Anthropic error event (api_error); so does an
// upstream that ends without finish_reason or [DONE], or in the middle of
// an event, since the answer was cut off (helexa ended such streams as if
// they had finished, which a client cannot tell from a complete answer).
// An upstream that ends after finish_reason without [DONE] ends normally.
// One thing OpenAI's format allows but no server we know sends, more
// arguments for a tool call after another block has started, is an error
// too: that call's block is closed by then and clients have acted on it,
// so going on would hand them a silently wrong tool input. After
// message_stop or an error event further input is ignored.
//
// A Stream is not safe for concurrent use; one stream per response.
type Stream struct {
	model    string
	thinking bool
	maxEvent int
	newID    func() string // a msg_ id when the upstream gave none

	// SSE framing.
	line     []byte // incomplete trailing line
	data     []byte // data lines of the event being read
	hasData  bool
	afterCR  bool // the last line ended with \r: skip a \n that follows
	seenLine bool
	atEOF    bool // Close is reading what the upstream left unfinished

	// Translation.
	started   bool
	ended     bool // message_stop or error sent
	closed    bool
	msgID     string
	next      int // index of the next content block
	open      int // index of the open content block, -1 when none
	openKind  blockKind
	tools     map[int]*toolState // by OpenAI tool call index
	toolOrder []int
	toolUses  int
	finish    string // upstream finish_reason
	stopSeq   string
	usage     *chatUsage
	deltas    int64
	out       []byte
}

type blockKind uint8

const (
	noBlock blockKind = iota
	textKind
	thinkingKind
	toolKind
)

type toolState struct {
	id, name string
	block    int    // content block index, -1 until started
	pending  []byte // arguments that came before the name
}

// NewStream starts translating one streamed answer. requestModel is the
// model name the client asked for, echoed in message_start.
func NewStream(requestModel string, opts ...Option) *Stream {
	o := collect(opts)
	return &Stream{
		model:    requestModel,
		thinking: o.thinking,
		maxEvent: DefaultMaxEventBytes,
		newID:    func() string { return randomID("msg_") },
		open:     -1,
	}
}

// Write takes the next upstream body chunk and returns the Anthropic SSE
// bytes it completes (often none). The returned slice is the caller's.
func (s *Stream) Write(chunk []byte) []byte {
	if s.ended || s.closed {
		return nil
	}
	s.feed(chunk)
	return s.take()
}

// Close ends the upstream body and returns the last Anthropic SSE bytes: a
// final unterminated line or event is read as complete; then, unless the
// stream already ended, message_delta and message_stop if finish_reason
// was seen, else an error event. Later calls return nil.
func (s *Stream) Close() []byte {
	if s.closed {
		return nil
	}
	s.closed = true
	s.atEOF = true
	if !s.ended && len(s.line) > 0 {
		line := s.line
		s.line = nil
		s.processLine(line)
	}
	if !s.ended {
		s.dispatch()
	}
	if !s.ended {
		switch {
		case s.finish != "":
			s.finishMessage()
		case !s.started:
			s.fail("upstream ended the stream without sending a response")
		default:
			s.fail("upstream stream ended before the response was complete (no finish_reason and no [DONE]); the answer is cut off")
		}
	}
	s.line, s.data = nil, nil
	return s.take()
}

// Done reports whether the output is complete: message_stop or an error
// event has been returned, and further input will be ignored.
func (s *Stream) Done() bool { return s.ended }

func (s *Stream) take() []byte {
	out := s.out
	s.out = nil
	return out
}

// --- SSE framing (https://html.spec.whatwg.org/multipage/server-sent-events.html) ---

// feed splits chunk into lines ended by \n, \r\n or \r; a line cut by the
// chunk's end waits in s.line for the rest.
func (s *Stream) feed(chunk []byte) {
	for len(chunk) > 0 && !s.ended {
		if s.afterCR {
			s.afterCR = false
			if chunk[0] == '\n' {
				chunk = chunk[1:]
				continue
			}
		}
		i := bytes.IndexAny(chunk, "\r\n")
		if i < 0 {
			s.line = append(s.line, chunk...)
			if len(s.line) > s.maxEvent {
				s.fail(s.lineTooLong())
			}
			return
		}
		line := chunk[:i]
		if len(s.line) > 0 {
			s.line = append(s.line, line...)
			line = s.line
		}
		s.afterCR = chunk[i] == '\r'
		chunk = chunk[i+1:]
		s.processLine(line)
		if cap(s.line) > 64<<10 {
			s.line = nil // do not keep a huge line's buffer for the stream's life
		} else {
			s.line = s.line[:0]
		}
	}
}

func (s *Stream) lineTooLong() string {
	return fmt.Sprintf("upstream sent an event line longer than %d bytes", s.maxEvent)
}

// processLine handles one complete line: a blank line dispatches the
// event; data lines accumulate; comments and other fields are ignored.
func (s *Stream) processLine(line []byte) {
	if len(line) > s.maxEvent {
		s.fail(s.lineTooLong())
		return
	}
	if !s.seenLine {
		s.seenLine = true
		line = bytes.TrimPrefix(line, utf8BOM)
	}
	if len(line) == 0 {
		s.dispatch()
		return
	}
	if line[0] == ':' {
		return // comment (keep-alive)
	}
	field, value := line, []byte(nil)
	if i := bytes.IndexByte(line, ':'); i >= 0 {
		field, value = line[:i], line[i+1:]
		if len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
	}
	if string(field) != "data" {
		return // event, id, retry: nothing to translate
	}
	if s.hasData {
		s.data = append(s.data, '\n')
	}
	s.data = append(s.data, value...)
	s.hasData = true
	if len(s.data) > s.maxEvent {
		s.fail(fmt.Sprintf("upstream sent an event longer than %d bytes", s.maxEvent))
	}
}

// dispatch handles the data of the event just ended.
func (s *Stream) dispatch() {
	if !s.hasData {
		return
	}
	data := bytes.TrimSpace(s.data)
	s.data = s.data[:0]
	s.hasData = false
	switch {
	case len(data) == 0:
		return
	case string(data) == "[DONE]":
		s.finishMessage()
		return
	case data[0] != '{':
		s.fail("upstream sent an event that is not a JSON object: " + snippet(data))
		return
	}
	var c chunk
	if err := json.Unmarshal(data, &c); err != nil {
		if s.atEOF {
			s.fail(fmt.Sprintf("upstream stream ended in the middle of an event (%v); the answer is cut off: %s", err, snippet(data)))
			return
		}
		s.fail(fmt.Sprintf("upstream sent a malformed event (%v): %s", err, snippet(data)))
		return
	}
	if !isAbsent(c.Error) {
		s.fail("upstream error: " + upstreamErrorMessage(c.Error))
		return
	}
	s.apply(&c)
}

// snippet quotes the start of a bad event for an error message.
func snippet(b []byte) string {
	const max = 200
	if len(b) > max {
		return truncateBytes(b, max) + "…"
	}
	return string(b)
}

func truncateBytes(b []byte, n int) string {
	for n > 0 && n < len(b) && b[n]&0xC0 == 0x80 {
		n--
	}
	return string(b[:n])
}

// --- chat.completion.chunk ---

type chunk struct {
	ID      string          `json:"id"`
	Model   string          `json:"model"`
	Choices []chunkChoice   `json:"choices"`
	Usage   *chatUsage      `json:"usage"`
	Error   json.RawMessage `json:"error"`
}

type chunkChoice struct {
	Index        int             `json:"index"`
	Delta        chunkDelta      `json:"delta"`
	FinishReason json.RawMessage `json:"finish_reason"`
	StopReason   json.RawMessage `json:"stop_reason"`
	MatchedStop  json.RawMessage `json:"matched_stop"`
}

type chunkDelta struct {
	Content          json.RawMessage `json:"content"`
	Refusal          json.RawMessage `json:"refusal"`
	ReasoningContent json.RawMessage `json:"reasoning_content"`
	Reasoning        json.RawMessage `json:"reasoning"`
	ToolCalls        []chunkToolCall `json:"tool_calls"`
	FunctionCall     *chatOutFunc    `json:"function_call"`
}

type chunkToolCall struct {
	Index    *int        `json:"index"`
	ID       string      `json:"id"`
	Function chatOutFunc `json:"function"`
}

// legacyFunctionCall keys the old single function_call among tool calls.
const legacyFunctionCall = -1 << 31

func (s *Stream) apply(c *chunk) {
	if !s.started {
		s.start(c.ID, c.Model, c.Usage)
	}
	if c.Usage != nil {
		s.usage = c.Usage
	}
	for i := range c.Choices {
		ch := &c.Choices[i]
		if ch.Index != 0 {
			continue // Anthropic has one answer; n > 1 is not asked for
		}
		d := &ch.Delta
		if r := reasoningText(d.ReasoningContent, d.Reasoning); r != "" {
			s.reasoning(r)
		}
		text, _ := rawString(d.Content)
		if text == "" {
			text, _ = rawString(d.Refusal)
		}
		if text != "" {
			s.text(text)
		}
		for j := range d.ToolCalls {
			tc := &d.ToolCalls[j]
			idx := j
			if tc.Index != nil {
				idx = *tc.Index
			}
			s.toolCall(idx, tc.ID, tc.Function)
			if s.ended {
				return
			}
		}
		if d.FunctionCall != nil {
			s.toolCall(legacyFunctionCall, "", *d.FunctionCall)
			if s.ended {
				return
			}
		}
		if f, ok := rawString(ch.FinishReason); ok && f != "" {
			s.finish = f
		}
		if seq := matchedStop(chatChoice{StopReason: ch.StopReason, MatchedStop: ch.MatchedStop}); seq != "" {
			s.stopSeq = seq
		}
	}
}

func (s *Stream) start(id, upstreamModel string, u *chatUsage) {
	s.started = true
	if id == "" {
		s.msgID = s.newID()
	} else {
		s.msgID = messageID(id)
	}
	model := s.model
	if model == "" {
		model = upstreamModel
	}
	s.emit("message_start", evMessageStart{Type: "message_start", Message: message{
		ID:      s.msgID,
		Type:    "message",
		Role:    "assistant",
		Model:   model,
		Content: []any{},
		Usage:   anthropicUsage(u),
	}})
}

func (s *Stream) text(t string) {
	s.deltas++
	s.ensure(textKind, textBlock{Type: "text"})
	s.emit("content_block_delta", evBlockDelta{Type: "content_block_delta", Index: s.open, Delta: textDelta{Type: "text_delta", Text: t}})
}

func (s *Stream) reasoning(r string) {
	s.deltas++
	if !s.thinking {
		s.emit("ping", evType{Type: "ping"})
		return
	}
	s.ensure(thinkingKind, thinkingBlock{Type: "thinking"})
	s.emit("content_block_delta", evBlockDelta{Type: "content_block_delta", Index: s.open, Delta: thinkingDelta{Type: "thinking_delta", Thinking: r}})
}

// ensure opens a block of kind unless one is open.
func (s *Stream) ensure(kind blockKind, start any) {
	if s.open >= 0 && s.openKind == kind {
		return
	}
	s.openBlock(kind, start)
}

func (s *Stream) openBlock(kind blockKind, start any) int {
	s.closeOpen()
	s.open, s.openKind = s.next, kind
	s.next++
	s.emit("content_block_start", evBlockStart{Type: "content_block_start", Index: s.open, ContentBlock: start})
	return s.open
}

func (s *Stream) closeOpen() {
	if s.open < 0 {
		return
	}
	s.emit("content_block_stop", evBlockStop{Type: "content_block_stop", Index: s.open})
	s.open, s.openKind = -1, noBlock
}

func (s *Stream) toolCall(idx int, id string, fn chatOutFunc) {
	t := s.tools[idx]
	if t == nil {
		if s.tools == nil {
			s.tools = make(map[int]*toolState)
		}
		t = &toolState{block: -1}
		s.tools[idx] = t
		s.toolOrder = append(s.toolOrder, idx)
	}
	if t.id == "" {
		t.id = id
	}
	if t.name == "" {
		t.name = fn.Name
	}
	frag := argsFragment(fn.Arguments)
	if t.block < 0 {
		if t.name == "" {
			t.pending = append(t.pending, frag...)
			if len(t.pending) > s.maxEvent {
				s.fail(fmt.Sprintf("upstream sent over %d bytes of tool call arguments without naming the tool", s.maxEvent))
			}
			return
		}
		s.startTool(t)
		if len(t.pending) > 0 {
			frag = string(t.pending) + frag
			t.pending = nil
		}
	}
	if frag == "" {
		return
	}
	if t.block != s.open {
		s.fail(fmt.Sprintf("upstream sent more arguments for tool call %q after another content block started; interleaved tool calls cannot be streamed as Anthropic content blocks", t.name))
		return
	}
	s.emit("content_block_delta", evBlockDelta{Type: "content_block_delta", Index: t.block, Delta: inputJSONDelta{Type: "input_json_delta", PartialJSON: frag}})
}

func (s *Stream) startTool(t *toolState) {
	id := t.id
	if id == "" {
		id = toolUseID(s.msgID, s.toolUses)
	}
	s.toolUses++
	t.block = s.openBlock(toolKind, toolUseBlock{Type: "tool_use", ID: id, Name: t.name, Input: json.RawMessage(`{}`)})
}

// argsFragment is a tool call's arguments fragment as text: OpenAI sends a
// string; an object (some servers send the whole arguments so) is its JSON.
func argsFragment(raw json.RawMessage) string {
	if isAbsent(raw) {
		return ""
	}
	if s, ok := rawString(raw); ok {
		return s
	}
	return string(compact(raw))
}

// finishMessage ends the message: open block, message_delta, message_stop.
func (s *Stream) finishMessage() {
	if s.ended {
		return
	}
	if !s.started {
		s.start("", "", nil)
	}
	// Tool calls whose name never came: send them under a name the
	// client will report as unknown, rather than lose them silently.
	for _, idx := range s.toolOrder {
		t := s.tools[idx]
		if t.block >= 0 || (t.id == "" && len(t.pending) == 0) {
			continue
		}
		t.name = unknownToolName
		s.startTool(t)
		if len(t.pending) > 0 {
			s.emit("content_block_delta", evBlockDelta{Type: "content_block_delta", Index: t.block, Delta: inputJSONDelta{Type: "input_json_delta", PartialJSON: string(t.pending)}})
			t.pending = nil
		}
	}
	s.closeOpen()
	reason, seq := stopReason(s.finish, s.stopSeq, s.toolUses > 0)
	var du deltaUsage
	if s.usage != nil {
		u := anthropicUsage(s.usage)
		du = deltaUsage{
			InputTokens:              &u.InputTokens,
			CacheCreationInputTokens: &u.CacheCreationInputTokens,
			CacheReadInputTokens:     &u.CacheReadInputTokens,
			OutputTokens:             u.OutputTokens,
			OutputTokensDetails:      u.OutputTokensDetails,
		}
	} else {
		du.OutputTokens = s.deltas
	}
	s.emit("message_delta", evMessageDelta{Type: "message_delta", Delta: messageDeltaBody{StopReason: reason, StopSequence: seq}, Usage: du})
	s.emit("message_stop", evType{Type: "message_stop"})
	s.ended = true
}

// fail ends the stream with an Anthropic error event.
func (s *Stream) fail(msg string) {
	if s.ended {
		return
	}
	s.ended = true
	s.line, s.data = nil, nil
	s.emit("error", errorObject{Type: "error", Error: errorDetail{Type: ErrAPI, Message: msg}})
}

func (s *Stream) emit(event string, v any) {
	s.out = append(s.out, "event: "...)
	s.out = append(s.out, event...)
	s.out = append(s.out, "\ndata: "...)
	s.out = append(s.out, marshal(v)...)
	s.out = append(s.out, "\n\n"...)
}

// --- Anthropic stream events ---

type evMessageStart struct {
	Type    string  `json:"type"`
	Message message `json:"message"`
}

type evBlockStart struct {
	Type         string `json:"type"`
	Index        int    `json:"index"`
	ContentBlock any    `json:"content_block"`
}

type evBlockDelta struct {
	Type  string `json:"type"`
	Index int    `json:"index"`
	Delta any    `json:"delta"`
}

type evBlockStop struct {
	Type  string `json:"type"`
	Index int    `json:"index"`
}

type evMessageDelta struct {
	Type  string           `json:"type"`
	Delta messageDeltaBody `json:"delta"`
	Usage deltaUsage       `json:"usage"`
}

type messageDeltaBody struct {
	StopReason   string  `json:"stop_reason"`
	StopSequence *string `json:"stop_sequence"`
}

// deltaUsage is message_delta's usage: cumulative totals; the input counts
// only once the upstream has reported usage.
type deltaUsage struct {
	InputTokens              *int64               `json:"input_tokens,omitempty"`
	CacheCreationInputTokens *int64               `json:"cache_creation_input_tokens,omitempty"`
	CacheReadInputTokens     *int64               `json:"cache_read_input_tokens,omitempty"`
	OutputTokens             int64                `json:"output_tokens"`
	OutputTokensDetails      *outputTokensDetails `json:"output_tokens_details,omitempty"`
}

// evType is an event with nothing but its type: message_stop, ping.
type evType struct {
	Type string `json:"type"`
}

type textDelta struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type thinkingDelta struct {
	Type     string `json:"type"`
	Thinking string `json:"thinking"`
}

type inputJSONDelta struct {
	Type        string `json:"type"`
	PartialJSON string `json:"partial_json"`
}
