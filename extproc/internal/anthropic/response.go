package anthropic

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
)

// Option adjusts how responses are translated.
type Option func(*options)

type options struct {
	thinking bool
}

// WithThinking makes the model's reasoning (the neuron's reasoning_content)
// come back as thinking blocks. Pass Request.Thinking: Anthropic returns
// thinking blocks only to clients that enabled thinking, and a client that
// did not may read content[0] as the answer. Without it, reasoning is
// dropped from messages, and in a stream each reasoning delta becomes a
// ping event instead, so a model that thinks for minutes still shows the
// client a live stream (neuron made reasoning visible for the same reason:
// clients time out an idle stream).
func WithThinking(on bool) Option {
	return func(o *options) { o.thinking = on }
}

func collect(opts []Option) options {
	var o options
	for _, opt := range opts {
		if opt != nil {
			opt(&o)
		}
	}
	return o
}

// --- Anthropic output shapes ---

// message is an Anthropic Message (also the message of message_start).
type message struct {
	ID           string  `json:"id"`
	Type         string  `json:"type"`
	Role         string  `json:"role"`
	Model        string  `json:"model"`
	Content      []any   `json:"content"`
	StopReason   *string `json:"stop_reason"`
	StopSequence *string `json:"stop_sequence"`
	Usage        usage   `json:"usage"`
}

type usage struct {
	InputTokens              int64                `json:"input_tokens"`
	CacheCreationInputTokens int64                `json:"cache_creation_input_tokens"`
	CacheReadInputTokens     int64                `json:"cache_read_input_tokens"`
	OutputTokens             int64                `json:"output_tokens"`
	OutputTokensDetails      *outputTokensDetails `json:"output_tokens_details,omitempty"`
}

type outputTokensDetails struct {
	ThinkingTokens int64 `json:"thinking_tokens"`
}

type textBlock struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type thinkingBlock struct {
	Type      string `json:"type"`
	Thinking  string `json:"thinking"`
	Signature string `json:"signature"`
}

type toolUseBlock struct {
	Type  string          `json:"type"`
	ID    string          `json:"id"`
	Name  string          `json:"name"`
	Input json.RawMessage `json:"input"`
}

// --- OpenAI input shapes. Loosely typed fields are raw, so an odd value
// in a field we do not need never fails the whole answer. ---

type chatCompletion struct {
	ID      string          `json:"id"`
	Model   string          `json:"model"`
	Choices []chatChoice    `json:"choices"`
	Usage   *chatUsage      `json:"usage"`
	Error   json.RawMessage `json:"error"`
}

type chatChoice struct {
	Index        int             `json:"index"`
	Message      chatOutMessage  `json:"message"`
	FinishReason json.RawMessage `json:"finish_reason"`
	StopReason   json.RawMessage `json:"stop_reason"`  // vLLM: the stop string matched, or a token id
	MatchedStop  json.RawMessage `json:"matched_stop"` // SGLang: the same
}

type chatOutMessage struct {
	Content          json.RawMessage `json:"content"`
	Refusal          json.RawMessage `json:"refusal"`
	ReasoningContent json.RawMessage `json:"reasoning_content"`
	Reasoning        json.RawMessage `json:"reasoning"`
	ToolCalls        []chatOutCall   `json:"tool_calls"`
	FunctionCall     *chatOutFunc    `json:"function_call"`
}

type chatOutCall struct {
	ID       string      `json:"id"`
	Function chatOutFunc `json:"function"`
}

type chatOutFunc struct {
	Name      string          `json:"name"`
	Arguments json.RawMessage `json:"arguments"`
}

type chatUsage struct {
	PromptTokens        tokenCount `json:"prompt_tokens"`
	CompletionTokens    tokenCount `json:"completion_tokens"`
	PromptTokensDetails *struct {
		CachedTokens tokenCount `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
	CompletionTokensDetails *struct {
		ReasoningTokens tokenCount `json:"reasoning_tokens"`
	} `json:"completion_tokens_details"`
}

// tokenCount is a usage count that accepts any JSON: a count that is not
// a non-negative number reads as 0 instead of failing the answer it rides on.
type tokenCount int64

func (c *tokenCount) UnmarshalJSON(b []byte) error {
	var f float64
	if json.Unmarshal(b, &f) != nil || !(f >= 0) || f > math.MaxInt64/2 {
		*c = 0
		return nil
	}
	*c = tokenCount(f)
	return nil
}

// anthropicUsage maps OpenAI usage to Anthropic's. OpenAI's prompt_tokens
// include cached prompt tokens; Anthropic's input_tokens exclude cache
// reads, which are counted apart, so a client summing the fields (Claude
// Code does, to size its context) gets the prompt size either way.
func anthropicUsage(u *chatUsage) usage {
	if u == nil {
		return usage{}
	}
	out := usage{InputTokens: int64(u.PromptTokens), OutputTokens: int64(u.CompletionTokens)}
	if d := u.PromptTokensDetails; d != nil && d.CachedTokens > 0 && int64(d.CachedTokens) <= out.InputTokens {
		out.CacheReadInputTokens = int64(d.CachedTokens)
		out.InputTokens -= int64(d.CachedTokens)
	}
	if d := u.CompletionTokensDetails; d != nil && d.ReasoningTokens > 0 {
		out.OutputTokensDetails = &outputTokensDetails{ThinkingTokens: int64(d.ReasoningTokens)}
	}
	return out
}

// stopReason maps a finish_reason to Anthropic's stop_reason:
// stop → end_turn (stop_sequence when the upstream said which stop string
// ended it: vLLM's stop_reason, SGLang's matched_stop), length →
// max_tokens, tool_calls/function_call → tool_use, content_filter →
// refusal. A stop with tool calls is tool_use whatever the upstream said,
// since Anthropic clients run the tools only then; a missing or unknown
// finish_reason is end_turn (helexa's default).
func stopReason(finish, stopSeq string, toolUse bool) (string, *string) {
	switch finish {
	case "length":
		return "max_tokens", nil
	case "tool_calls", "function_call":
		return "tool_use", nil
	case "content_filter":
		return "refusal", nil
	}
	if toolUse {
		return "tool_use", nil
	}
	if stopSeq != "" && (finish == "stop" || finish == "") {
		return "stop_sequence", &stopSeq
	}
	return "end_turn", nil
}

// matchedStop is the stop string a choice reports it stopped on, if any.
func matchedStop(choice chatChoice) string {
	for _, raw := range []json.RawMessage{choice.StopReason, choice.MatchedStop} {
		if s, ok := rawString(raw); ok && s != "" {
			return s
		}
	}
	return ""
}

// rawString decodes raw when it is a JSON string.
func rawString(raw json.RawMessage) (string, bool) {
	if len(raw) == 0 || raw[0] != '"' {
		return "", false
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		return "", false
	}
	return s, true
}

// contentText reads a message's content: a string, or text parts.
func contentText(raw json.RawMessage) string {
	if s, ok := rawString(raw); ok {
		return s
	}
	var parts []struct {
		Type string          `json:"type"`
		Text json.RawMessage `json:"text"`
	}
	if len(raw) == 0 || raw[0] != '[' || json.Unmarshal(raw, &parts) != nil {
		return ""
	}
	var b strings.Builder
	for _, p := range parts {
		if t, ok := rawString(p.Text); ok {
			b.WriteString(t)
		}
	}
	return b.String()
}

// toolInput turns a tool call's arguments into tool_use input, which must
// be a JSON object. Arguments are a JSON string of an object; an object
// given directly, or a string double-encoded around one, is accepted too.
// Anything else a model produced (cut-off or invalid JSON) is kept as
// {"_raw_arguments": "..."}, so the client's tool reports a usable error
// and the model sees its own output in the history, instead of the call
// being lost.
func toolInput(args json.RawMessage) json.RawMessage {
	if isAbsent(args) {
		return json.RawMessage(`{}`)
	}
	text := string(args)
	if s, ok := rawString(args); ok {
		text = s
	} else if isObject(args) {
		return compact(args)
	}
	trimmed := strings.TrimSpace(text)
	if trimmed == "" {
		return json.RawMessage(`{}`)
	}
	if isObject([]byte(trimmed)) && json.Valid([]byte(trimmed)) {
		return compact([]byte(trimmed))
	}
	var inner string
	if json.Unmarshal([]byte(trimmed), &inner) == nil {
		inner = strings.TrimSpace(inner)
		if isObject([]byte(inner)) && json.Valid([]byte(inner)) {
			return compact([]byte(inner))
		}
	}
	return marshal(map[string]string{"_raw_arguments": text})
}

func compact(b []byte) json.RawMessage {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return marshal(map[string]string{"_raw_arguments": string(b)})
	}
	return buf.Bytes()
}

// messageID gives an upstream completion id Anthropic's msg_ prefix.
func messageID(upstream string) string {
	switch {
	case upstream == "":
		return randomID("msg_")
	case strings.HasPrefix(upstream, "msg_"):
		return upstream
	default:
		return "msg_" + upstream
	}
}

// toolUseID is the id of a tool call the upstream gave none: unique per
// message, so tool_result can answer it.
func toolUseID(msgID string, n int) string {
	return fmt.Sprintf("toolu_%s_%d", strings.TrimPrefix(msgID, "msg_"), n)
}

func randomID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// reasoningText is a message's or delta's reasoning: reasoning_content
// (neuron, vLLM, DeepSeek) or reasoning (OpenRouter, newer vLLM).
func reasoningText(content, alt json.RawMessage) string {
	if s, ok := rawString(content); ok && s != "" {
		return s
	}
	s, _ := rawString(alt)
	return s
}

// upstreamErrorMessage reads an {"error": ...} value inside a 200 answer.
func upstreamErrorMessage(raw json.RawMessage) string {
	if s, ok := rawString(raw); ok {
		return truncate(s)
	}
	var e struct {
		Message json.RawMessage `json:"message"`
	}
	if json.Unmarshal(raw, &e) == nil {
		if s, ok := rawString(e.Message); ok && s != "" {
			return truncate(s)
		}
	}
	return truncate(string(raw))
}

// TranslateResponse turns a non-streaming OpenAI chat completion into an
// Anthropic Message: id with a msg_ prefix, model = requestModel (the name
// the client asked for, not the concrete id it was routed to; the
// upstream's when empty), content = thinking (only WithThinking), text
// (omitted when empty: Anthropic refuses empty text blocks sent back in
// history), then a tool_use block per tool call with input parsed from the
// arguments; stop_reason and usage as stopReason and anthropicUsage say.
// Only the first choice is read: Anthropic has no n.
//
// An error means the upstream answer is not a chat completion (not a JSON
// object, or an {"error": ...} object); the caller should answer with
// ErrorBody(ErrAPI, err.Error()) and a 502.
func TranslateResponse(body []byte, requestModel string, opts ...Option) ([]byte, error) {
	o := collect(opts)
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return nil, errors.New("upstream answer is not a JSON object")
	}
	var c chatCompletion
	if err := json.Unmarshal(trimmed, &c); err != nil {
		return nil, fmt.Errorf("upstream answer is not a valid chat completion: %v", err)
	}
	if !isAbsent(c.Error) {
		return nil, fmt.Errorf("upstream error: %s", upstreamErrorMessage(c.Error))
	}

	msg := message{
		ID:      messageID(c.ID),
		Type:    "message",
		Role:    "assistant",
		Model:   requestModel,
		Content: []any{},
		Usage:   anthropicUsage(c.Usage),
	}
	if msg.Model == "" {
		msg.Model = c.Model
	}
	var (
		finish  string
		stopSeq string
		tools   int
	)
	for _, choice := range c.Choices {
		if choice.Index != 0 {
			continue
		}
		m := choice.Message
		if o.thinking {
			if r := reasoningText(m.ReasoningContent, m.Reasoning); r != "" {
				msg.Content = append(msg.Content, thinkingBlock{Type: "thinking", Thinking: r})
			}
		}
		text := contentText(m.Content)
		if refusal, ok := rawString(m.Refusal); ok && refusal != "" && text == "" {
			text = refusal
		}
		if text != "" {
			msg.Content = append(msg.Content, textBlock{Type: "text", Text: text})
		}
		calls := m.ToolCalls
		if m.FunctionCall != nil && len(calls) == 0 {
			calls = []chatOutCall{{Function: *m.FunctionCall}}
		}
		for _, call := range calls {
			id := call.ID
			if id == "" {
				id = toolUseID(msg.ID, tools)
			}
			name := call.Function.Name
			if name == "" {
				name = unknownToolName
			}
			msg.Content = append(msg.Content, toolUseBlock{Type: "tool_use", ID: id, Name: name, Input: toolInput(call.Function.Arguments)})
			tools++
		}
		finish, _ = rawString(choice.FinishReason)
		stopSeq = matchedStop(choice)
		break
	}
	reason, seq := stopReason(finish, stopSeq, tools > 0)
	msg.StopReason = &reason
	msg.StopSequence = seq
	return marshal(msg), nil
}

// unknownToolName names a tool call the upstream gave no name: the client
// answers it with "no such tool", which the model can recover from.
const unknownToolName = "unknown_tool"
