package anthropic

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
)

// Request is a translated Anthropic Messages request.
type Request struct {
	// Body is the OpenAI chat completions request to send to the neuron.
	Body []byte
	// Stream is the client's "stream": answer with Stream, not
	// TranslateResponse.
	Stream bool
	// Thinking is true when the client enabled extended thinking
	// ("thinking": {"type": "enabled"} or "adaptive"). Pass it on with
	// WithThinking so the model's reasoning comes back as thinking blocks;
	// a client that did not ask for thinking does not get them.
	Thinking bool
}

// Chat completions request, in the field order a reader of a trace expects.
type chatRequest struct {
	Model              string          `json:"model"`
	Messages           []chatMessage   `json:"messages"`
	MaxTokens          json.Number     `json:"max_tokens"`
	Temperature        json.Number     `json:"temperature,omitempty"`
	TopP               json.Number     `json:"top_p,omitempty"`
	TopK               json.Number     `json:"top_k,omitempty"`
	Stop               []string        `json:"stop,omitempty"`
	Stream             bool            `json:"stream,omitempty"`
	StreamOptions      *streamOptions  `json:"stream_options,omitempty"`
	Tools              []any           `json:"tools,omitempty"`
	ToolChoice         any             `json:"tool_choice,omitempty"`
	ParallelToolCalls  *bool           `json:"parallel_tool_calls,omitempty"`
	User               string          `json:"user,omitempty"`
	ChatTemplateKwargs *templateKwargs `json:"chat_template_kwargs,omitempty"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

type templateKwargs struct {
	EnableThinking bool `json:"enable_thinking"`
}

// chatMessage's Content is a string, a []any of content parts, or nil
// (JSON null: an assistant turn that only calls tools).
type chatMessage struct {
	Role       string         `json:"role"`
	Content    any            `json:"content"`
	ToolCalls  []chatToolCall `json:"tool_calls,omitempty"`
	ToolCallID string         `json:"tool_call_id,omitempty"`
}

type textPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

type imagePart struct {
	Type     string   `json:"type"`
	ImageURL imageURL `json:"image_url"`
}

type imageURL struct {
	URL string `json:"url"`
}

type chatToolCall struct {
	ID       string       `json:"id"`
	Type     string       `json:"type"`
	Function chatFunction `json:"function"`
}

type chatFunction struct {
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
}

type chatTool struct {
	Type     string           `json:"type"`
	Function chatToolFunction `json:"function"`
}

type chatToolFunction struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters"`
}

type namedToolChoice struct {
	Type     string `json:"type"`
	Function struct {
		Name string `json:"name"`
	} `json:"function"`
}

// block holds every field of every Anthropic content block this package
// reads; which ones matter depends on Type.
type block struct {
	Type      json.RawMessage `json:"type"`
	Text      json.RawMessage `json:"text"`
	Source    json.RawMessage `json:"source"`
	ID        json.RawMessage `json:"id"`
	Name      json.RawMessage `json:"name"`
	Input     json.RawMessage `json:"input"`
	ToolUseID json.RawMessage `json:"tool_use_id"`
	Content   json.RawMessage `json:"content"`
	IsError   json.RawMessage `json:"is_error"`
	Title     json.RawMessage `json:"title"`
}

const supportedBlocks = "text, image, document (text source), tool_use, tool_result, thinking, redacted_thinking"

// TranslateRequest turns an Anthropic Messages request body into an OpenAI
// chat completions request body for model (the concrete id the request is
// routed to, valid UTF-8; empty keeps the body's own "model"). Any error is
// a *RequestError.
//
// The mapping:
//
//   - system (a string or text blocks) and any role "system" turns inside
//     messages become one leading system message. Claude Code injects such
//     turns, and chat templates such as Qwen's refuse a system message
//     anywhere but first (helexa learned this the hard way).
//   - A message's text blocks become its string content (user text blocks
//     joined by a newline; an assistant's joined as they were generated);
//     with images the content is a list of text and image_url parts
//     (base64 sources become data URLs). A document block with a plain-text
//     source becomes text.
//   - An assistant's tool_use blocks become tool_calls whose arguments are
//     the JSON text of input (the OpenAI shape; the neuron turns it back
//     into an object for chat templates that iterate it).
//   - A user's tool_result blocks become role "tool" messages with
//     tool_call_id, placed before the rest of that user turn, because
//     OpenAI wants tool results right after the calls. Their text is the
//     content; is_error prefixes it with "Error: "; images in a result
//     follow in a user message, since a tool message carries only text.
//   - thinking and redacted_thinking blocks are dropped: the neuron cannot
//     check their signatures and templates strip old reasoning anyway.
//   - tools: {name, description, input_schema} becomes {type: function,
//     function: {name, description, parameters}}; already OpenAI-shaped
//     tools pass. Server tools (web search, bash, …) are refused: no one
//     here runs them.
//   - tool_choice auto/any/tool/none becomes auto/required/{function}/none;
//     disable_parallel_tool_use becomes parallel_tool_calls false.
//   - max_tokens (required, as in Anthropic's API), temperature, top_p,
//     stop_sequences (as stop) and metadata.user_id (as user) are copied;
//     top_k too, since the neuron samples with it (helexa did the same).
//   - stream adds stream_options.include_usage, so usage reaches the last
//     chunk for message_delta.
//   - thinking enabled/adaptive sets chat_template_kwargs.enable_thinking
//     true, disabled sets it false: the neuron only lets a reasoning model
//     think when asked. budget_tokens has no OpenAI counterpart and is
//     dropped.
//
// Unknown top-level fields (cache_control, service_tier, container, …)
// are ignored; unknown content block types and fields of the wrong type
// are refused, naming the field and what to send.
func TranslateRequest(body []byte, model string) (Request, error) {
	r, err := translateRequest(body, model)
	if err != nil {
		return Request{}, err
	}
	return r, nil
}

func translateRequest(body []byte, model string) (Request, *RequestError) {
	var top map[string]json.RawMessage
	trimmed := bytes.TrimSpace(body)
	if len(trimmed) == 0 {
		return Request{}, requestErrorf("request body is empty: send an Anthropic Messages request, a JSON object with model, max_tokens and messages")
	}
	if err := json.Unmarshal(trimmed, &top); err != nil || trimmed[0] != '{' {
		if trimmed[0] != '{' && json.Valid(trimmed) {
			return Request{}, requestErrorf("request body must be a JSON object, got %s: send an Anthropic Messages request with model, max_tokens and messages", kind(trimmed))
		}
		return Request{}, requestErrorf("request body is not valid JSON (%v): send an Anthropic Messages request, a JSON object with model, max_tokens and messages", err)
	}

	out := chatRequest{Model: model}
	if model == "" {
		m, err := str(top["model"], "model")
		if err != nil {
			return Request{}, err
		}
		if m == "" {
			return Request{}, requestErrorf("model is required: name the model to use, e.g. \"model\": \"Qwen/Qwen3-8B\"")
		}
		out.Model = m
	}

	maxTokens, err := positiveInt(top["max_tokens"], "max_tokens")
	if err != nil {
		return Request{}, err
	}
	out.MaxTokens = maxTokens

	var system []string
	if sys, err := systemText(top["system"], "system"); err != nil {
		return Request{}, err
	} else if sys != "" {
		system = append(system, sys)
	}

	msgs, err := arrayOf(top["messages"], "messages")
	if err != nil {
		return Request{}, err
	}
	if msgs == nil {
		return Request{}, requestErrorf("messages is required: send a non-empty array of {\"role\": \"user\" or \"assistant\", \"content\": ...} objects")
	}
	if len(msgs) == 0 {
		return Request{}, requestErrorf("messages is empty: send at least one {\"role\": \"user\", \"content\": ...} message")
	}
	for i, raw := range msgs {
		path := fmt.Sprintf("messages[%d]", i)
		sys, converted, err := translateMessage(raw, path)
		if err != nil {
			return Request{}, err
		}
		if sys != "" {
			system = append(system, sys)
		}
		out.Messages = append(out.Messages, converted...)
	}
	if len(system) > 0 {
		out.Messages = append([]chatMessage{{Role: "system", Content: strings.Join(system, "\n\n")}}, out.Messages...)
	}

	if out.Temperature, err = number(top["temperature"], "temperature"); err != nil {
		return Request{}, err
	}
	if out.TopP, err = number(top["top_p"], "top_p"); err != nil {
		return Request{}, err
	}
	if out.TopK, err = nonNegativeInt(top["top_k"], "top_k"); err != nil {
		return Request{}, err
	}
	if out.Stop, err = stringArray(top["stop_sequences"], "stop_sequences"); err != nil {
		return Request{}, err
	}
	stream, err := boolean(top["stream"], "stream")
	if err != nil {
		return Request{}, err
	}
	if stream {
		out.Stream = true
		out.StreamOptions = &streamOptions{IncludeUsage: true}
	}
	if out.User, err = metadataUser(top["metadata"]); err != nil {
		return Request{}, err
	}
	if out.Tools, err = translateTools(top["tools"]); err != nil {
		return Request{}, err
	}
	if out.ToolChoice, out.ParallelToolCalls, err = translateToolChoice(top["tool_choice"]); err != nil {
		return Request{}, err
	}
	thinking, err := translateThinking(top["thinking"])
	if err != nil {
		return Request{}, err
	}
	if thinking != nil {
		out.ChatTemplateKwargs = &templateKwargs{EnableThinking: *thinking}
	}

	return Request{Body: marshal(out), Stream: stream, Thinking: thinking != nil && *thinking}, nil
}

// translateMessage turns one Anthropic message into OpenAI messages. A role
// "system" message returns its text as sys instead.
func translateMessage(raw json.RawMessage, path string) (sys string, out []chatMessage, err *RequestError) {
	var m map[string]json.RawMessage
	if !isObject(raw) || json.Unmarshal(raw, &m) != nil {
		return "", nil, requestErrorf("%s must be an object {\"role\": ..., \"content\": ...}, got %s", path, kind(raw))
	}
	role, err := str(m["role"], path+".role")
	if err != nil {
		return "", nil, err
	}
	switch role {
	case "user", "assistant", "system":
	case "":
		return "", nil, requestErrorf("%s.role is required: \"user\" or \"assistant\"", path)
	default:
		return "", nil, requestErrorf("%s.role must be \"user\" or \"assistant\", got %q", path, role)
	}
	content := m["content"]
	if isAbsent(content) {
		return "", nil, requestErrorf("%s.content is required: a string or an array of content blocks", path)
	}
	if content[0] == '"' {
		var text string
		if json.Unmarshal(content, &text) != nil {
			return "", nil, requestErrorf("%s.content is not a valid JSON string", path)
		}
		if role == "system" {
			return text, nil, nil
		}
		return "", []chatMessage{{Role: role, Content: text}}, nil
	}
	blocks, err := arrayOf(content, path+".content")
	if err != nil {
		return "", nil, requestErrorf("%s.content must be a string or an array of content blocks, got %s", path, kind(content))
	}
	if role == "system" {
		text, err := textBlocks(blocks, path+".content")
		return text, nil, err
	}

	var (
		texts      []string
		parts      []any // text and image parts, in order
		hasImage   bool
		toolCalls  []chatToolCall
		toolMsgs   []chatMessage
		toolImages []any // image parts from tool results, with labels
	)
	for j, rawBlock := range blocks {
		bpath := fmt.Sprintf("%s.content[%d]", path, j)
		b, typ, err := decodeBlock(rawBlock, bpath)
		if err != nil {
			return "", nil, err
		}
		switch typ {
		case "text":
			text, err := requiredString(b.Text, bpath+".text")
			if err != nil {
				return "", nil, err
			}
			texts = append(texts, text)
			parts = append(parts, textPart{Type: "text", Text: text})
		case "image":
			part, err := imageSource(b.Source, bpath+".source")
			if err != nil {
				return "", nil, err
			}
			parts = append(parts, part)
			hasImage = true
		case "document":
			text, err := documentText(b, bpath)
			if err != nil {
				return "", nil, err
			}
			texts = append(texts, text)
			parts = append(parts, textPart{Type: "text", Text: text})
		case "tool_use":
			if role != "assistant" {
				return "", nil, requestErrorf("%s: tool_use blocks belong in assistant messages; answer a tool call with a tool_result block in the next user message", bpath)
			}
			call, err := toolUse(b, bpath)
			if err != nil {
				return "", nil, err
			}
			toolCalls = append(toolCalls, call)
		case "tool_result":
			if role != "user" {
				return "", nil, requestErrorf("%s: tool_result blocks belong in user messages, right after the assistant message with the matching tool_use", bpath)
			}
			msg, images, err := toolResult(b, bpath)
			if err != nil {
				return "", nil, err
			}
			toolMsgs = append(toolMsgs, msg)
			if len(images) > 0 {
				toolImages = append(toolImages, textPart{Type: "text", Text: "Images returned by tool call " + msg.ToolCallID + ":"})
				toolImages = append(toolImages, images...)
			}
		case "thinking", "redacted_thinking":
			// Dropped: see TranslateRequest.
		default:
			return "", nil, requestErrorf("%s: unknown content block type %q; send one of: %s", bpath, typ, supportedBlocks)
		}
	}

	out = toolMsgs
	if len(toolImages) > 0 {
		parts = append(toolImages, parts...)
		hasImage = true
	}
	sep := "\n"
	if role == "assistant" {
		sep = ""
	}
	switch {
	case len(toolCalls) > 0:
		var content any
		if len(texts) > 0 {
			content = strings.Join(texts, sep)
		}
		out = append(out, chatMessage{Role: role, Content: content, ToolCalls: toolCalls})
	case hasImage:
		out = append(out, chatMessage{Role: role, Content: parts})
	case len(texts) > 0:
		out = append(out, chatMessage{Role: role, Content: strings.Join(texts, sep)})
	case len(toolMsgs) == 0:
		// Only thinking, or an empty array: keep the turn so the
		// conversation keeps alternating.
		out = append(out, chatMessage{Role: role, Content: ""})
	}
	return "", out, nil
}

// decodeBlock decodes a content block and its type.
func decodeBlock(raw json.RawMessage, path string) (block, string, *RequestError) {
	var b block
	if !isObject(raw) || json.Unmarshal(raw, &b) != nil {
		return b, "", requestErrorf("%s must be a content block object with a \"type\", got %s", path, kind(raw))
	}
	typ, err := str(b.Type, path+".type")
	if err != nil {
		return b, "", err
	}
	if typ == "" {
		return b, "", requestErrorf("%s.type is required; send one of: %s", path, supportedBlocks)
	}
	return b, typ, nil
}

// textBlocks joins the text of an array of text blocks (system prompts).
func textBlocks(blocks []json.RawMessage, path string) (string, *RequestError) {
	texts := make([]string, 0, len(blocks))
	for j, raw := range blocks {
		bpath := fmt.Sprintf("%s[%d]", path, j)
		b, typ, err := decodeBlock(raw, bpath)
		if err != nil {
			return "", err
		}
		if typ != "text" {
			return "", requestErrorf("%s: a system prompt takes only text blocks, got %q", bpath, typ)
		}
		text, err := requiredString(b.Text, bpath+".text")
		if err != nil {
			return "", err
		}
		texts = append(texts, text)
	}
	return strings.Join(texts, "\n"), nil
}

// systemText reads the top-level system: a string or text blocks.
func systemText(raw json.RawMessage, path string) (string, *RequestError) {
	if isAbsent(raw) {
		return "", nil
	}
	if raw[0] == '"' {
		return str(raw, path)
	}
	blocks, err := arrayOf(raw, path)
	if err != nil {
		return "", requestErrorf("%s must be a string or an array of text blocks, got %s", path, kind(raw))
	}
	return textBlocks(blocks, path)
}

// imageSource turns an image block's source into an image_url part.
func imageSource(raw json.RawMessage, path string) (imagePart, *RequestError) {
	var src struct {
		Type      json.RawMessage `json:"type"`
		MediaType json.RawMessage `json:"media_type"`
		Data      json.RawMessage `json:"data"`
		URL       json.RawMessage `json:"url"`
	}
	if !isObject(raw) || json.Unmarshal(raw, &src) != nil {
		return imagePart{}, requestErrorf("%s must be an object: {\"type\": \"base64\", \"media_type\": \"image/png\", \"data\": ...} or {\"type\": \"url\", \"url\": ...}", path)
	}
	typ, err := str(src.Type, path+".type")
	if err != nil {
		return imagePart{}, err
	}
	switch typ {
	case "base64":
		media, err := requiredString(src.MediaType, path+".media_type")
		if err != nil {
			return imagePart{}, err
		}
		data, err := requiredString(src.Data, path+".data")
		if err != nil {
			return imagePart{}, err
		}
		return imagePart{Type: "image_url", ImageURL: imageURL{URL: "data:" + media + ";base64," + data}}, nil
	case "url":
		url, err := requiredString(src.URL, path+".url")
		if err != nil {
			return imagePart{}, err
		}
		return imagePart{Type: "image_url", ImageURL: imageURL{URL: url}}, nil
	default:
		return imagePart{}, requestErrorf("%s.type %q is not supported: send the image inline as {\"type\": \"base64\", ...} or by {\"type\": \"url\", ...}", path, typ)
	}
}

// documentText reads a document block whose source is plain text; PDFs and
// file references need a document pipeline the neurons do not have.
func documentText(b block, path string) (string, *RequestError) {
	var src struct {
		Type json.RawMessage `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	if !isObject(b.Source) || json.Unmarshal(b.Source, &src) != nil {
		return "", requestErrorf("%s.source must be an object {\"type\": \"text\", \"media_type\": \"text/plain\", \"data\": ...}", path)
	}
	typ, err := str(src.Type, path+".source.type")
	if err != nil {
		return "", err
	}
	if typ != "text" {
		return "", requestErrorf("%s: document blocks with a %q source are not supported; send the document's text as a text block or a {\"type\": \"text\"} document source", path, typ)
	}
	data, err := requiredString(src.Data, path+".source.data")
	if err != nil {
		return "", err
	}
	title, err := str(b.Title, path+".title")
	if err != nil {
		return "", err
	}
	if title != "" {
		return title + "\n\n" + data, nil
	}
	return data, nil
}

// toolUse turns an assistant tool_use block into an OpenAI tool call.
func toolUse(b block, path string) (chatToolCall, *RequestError) {
	id, err := requiredString(b.ID, path+".id")
	if err != nil {
		return chatToolCall{}, err
	}
	name, err := requiredString(b.Name, path+".name")
	if err != nil {
		return chatToolCall{}, err
	}
	args := "{}"
	if !isAbsent(b.Input) {
		if !isObject(b.Input) {
			return chatToolCall{}, requestErrorf("%s.input must be an object (the tool's arguments), got %s", path, kind(b.Input))
		}
		var buf bytes.Buffer
		if json.Compact(&buf, b.Input) != nil {
			return chatToolCall{}, requestErrorf("%s.input is not valid JSON", path)
		}
		args = buf.String()
	}
	return chatToolCall{ID: id, Type: "function", Function: chatFunction{Name: name, Arguments: args}}, nil
}

// toolResult turns a user tool_result block into a role "tool" message and
// the image parts it carried.
func toolResult(b block, path string) (chatMessage, []any, *RequestError) {
	id, err := requiredString(b.ToolUseID, path+".tool_use_id")
	if err != nil {
		return chatMessage{}, nil, err
	}
	isError, err := boolean(b.IsError, path+".is_error")
	if err != nil {
		return chatMessage{}, nil, err
	}
	var (
		text   string
		images []any
	)
	switch {
	case isAbsent(b.Content):
	case b.Content[0] == '"':
		if text, err = str(b.Content, path+".content"); err != nil {
			return chatMessage{}, nil, err
		}
	default:
		blocks, err := arrayOf(b.Content, path+".content")
		if err != nil {
			return chatMessage{}, nil, requestErrorf("%s.content must be a string or an array of text and image blocks, got %s", path, kind(b.Content))
		}
		var texts []string
		for j, raw := range blocks {
			bpath := fmt.Sprintf("%s.content[%d]", path, j)
			inner, typ, err := decodeBlock(raw, bpath)
			if err != nil {
				return chatMessage{}, nil, err
			}
			switch typ {
			case "text":
				t, err := requiredString(inner.Text, bpath+".text")
				if err != nil {
					return chatMessage{}, nil, err
				}
				texts = append(texts, t)
			case "image":
				part, err := imageSource(inner.Source, bpath+".source")
				if err != nil {
					return chatMessage{}, nil, err
				}
				images = append(images, part)
			case "document":
				t, err := documentText(inner, bpath)
				if err != nil {
					return chatMessage{}, nil, err
				}
				texts = append(texts, t)
			default:
				return chatMessage{}, nil, requestErrorf("%s: a tool_result holds text, image and document blocks, got %q", bpath, typ)
			}
		}
		text = strings.Join(texts, "\n")
	}
	if isError {
		text = "Error: " + text
	}
	return chatMessage{Role: "tool", Content: text, ToolCallID: id}, images, nil
}

// translateTools reshapes Anthropic tool definitions into OpenAI's.
func translateTools(raw json.RawMessage) ([]any, *RequestError) {
	tools, err := arrayOf(raw, "tools")
	if err != nil || tools == nil {
		return nil, err
	}
	out := make([]any, 0, len(tools))
	for i, rawTool := range tools {
		path := fmt.Sprintf("tools[%d]", i)
		var t struct {
			Type        json.RawMessage `json:"type"`
			Name        json.RawMessage `json:"name"`
			Description json.RawMessage `json:"description"`
			InputSchema json.RawMessage `json:"input_schema"`
			Function    json.RawMessage `json:"function"`
		}
		if !isObject(rawTool) || json.Unmarshal(rawTool, &t) != nil {
			return nil, requestErrorf("%s must be an object {\"name\": ..., \"description\": ..., \"input_schema\": {...}}, got %s", path, kind(rawTool))
		}
		typ, err := str(t.Type, path+".type")
		if err != nil {
			return nil, err
		}
		switch {
		case typ == "function" && isObject(t.Function):
			// Already OpenAI-shaped (a client mixing conventions): pass.
			var buf bytes.Buffer
			if json.Compact(&buf, rawTool) != nil {
				return nil, requestErrorf("%s is not valid JSON", path)
			}
			out = append(out, json.RawMessage(buf.Bytes()))
			continue
		case typ != "" && typ != "custom":
			return nil, requestErrorf("%s: tool type %q is an Anthropic server tool, which this gateway cannot run; define a custom tool with name, description and input_schema instead", path, typ)
		}
		name, err := requiredString(t.Name, path+".name")
		if err != nil {
			return nil, err
		}
		desc, err := str(t.Description, path+".description")
		if err != nil {
			return nil, err
		}
		params := json.RawMessage(`{"type":"object","properties":{}}`)
		if !isAbsent(t.InputSchema) {
			if !isObject(t.InputSchema) {
				return nil, requestErrorf("%s.input_schema must be a JSON Schema object, got %s", path, kind(t.InputSchema))
			}
			params = t.InputSchema
		}
		out = append(out, chatTool{Type: "function", Function: chatToolFunction{Name: name, Description: desc, Parameters: params}})
	}
	return out, nil
}

// translateToolChoice maps tool_choice; the second result is
// parallel_tool_calls (false when the client disabled parallel tool use).
func translateToolChoice(raw json.RawMessage) (any, *bool, *RequestError) {
	if isAbsent(raw) {
		return nil, nil, nil
	}
	var tc struct {
		Type                   json.RawMessage `json:"type"`
		Name                   json.RawMessage `json:"name"`
		DisableParallelToolUse json.RawMessage `json:"disable_parallel_tool_use"`
	}
	if !isObject(raw) || json.Unmarshal(raw, &tc) != nil {
		return nil, nil, requestErrorf("tool_choice must be an object such as {\"type\": \"auto\"}, got %s", kind(raw))
	}
	typ, err := str(tc.Type, "tool_choice.type")
	if err != nil {
		return nil, nil, err
	}
	var parallel *bool
	if off, err := boolean(tc.DisableParallelToolUse, "tool_choice.disable_parallel_tool_use"); err != nil {
		return nil, nil, err
	} else if off {
		parallel = new(bool)
	}
	switch typ {
	case "auto":
		return "auto", parallel, nil
	case "any":
		return "required", parallel, nil
	case "none":
		return "none", nil, nil
	case "tool":
		name, err := requiredString(tc.Name, "tool_choice.name")
		if err != nil {
			return nil, nil, err
		}
		var choice namedToolChoice
		choice.Type = "function"
		choice.Function.Name = name
		return choice, parallel, nil
	default:
		return nil, nil, requestErrorf("tool_choice.type must be \"auto\", \"any\", \"tool\" or \"none\", got %q", typ)
	}
}

// translateThinking reads thinking: nil when absent, else whether the
// model should think.
func translateThinking(raw json.RawMessage) (*bool, *RequestError) {
	if isAbsent(raw) {
		return nil, nil
	}
	var t struct {
		Type json.RawMessage `json:"type"`
	}
	if !isObject(raw) || json.Unmarshal(raw, &t) != nil {
		return nil, requestErrorf("thinking must be an object such as {\"type\": \"enabled\", \"budget_tokens\": 1024}, got %s", kind(raw))
	}
	typ, err := str(t.Type, "thinking.type")
	if err != nil {
		return nil, err
	}
	on := false
	switch typ {
	case "enabled", "adaptive":
		on = true
	case "disabled":
	default:
		return nil, requestErrorf("thinking.type must be \"enabled\", \"adaptive\" or \"disabled\", got %q", typ)
	}
	return &on, nil
}

// metadataUser reads metadata.user_id.
func metadataUser(raw json.RawMessage) (string, *RequestError) {
	if isAbsent(raw) {
		return "", nil
	}
	var m struct {
		UserID json.RawMessage `json:"user_id"`
	}
	if !isObject(raw) || json.Unmarshal(raw, &m) != nil {
		return "", requestErrorf("metadata must be an object such as {\"user_id\": \"...\"}, got %s", kind(raw))
	}
	return str(m.UserID, "metadata.user_id")
}

// --- JSON value helpers. Absent and null are the same: not given. ---

func isAbsent(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

func isObject(raw json.RawMessage) bool {
	return len(raw) > 0 && raw[0] == '{'
}

// kind names a JSON value's type for error messages.
func kind(raw []byte) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return "nothing"
	}
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		return "a number"
	}
}

// str reads an optional string ("" when absent).
func str(raw json.RawMessage, path string) (string, *RequestError) {
	if isAbsent(raw) {
		return "", nil
	}
	var s string
	if raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", requestErrorf("%s must be a string, got %s", path, kind(raw))
	}
	return s, nil
}

// requiredString reads a string that must be present (it may be empty).
func requiredString(raw json.RawMessage, path string) (string, *RequestError) {
	if isAbsent(raw) {
		return "", requestErrorf("%s is required (a string)", path)
	}
	return str(raw, path)
}

// arrayOf reads an optional array (nil when absent).
func arrayOf(raw json.RawMessage, path string) ([]json.RawMessage, *RequestError) {
	if isAbsent(raw) {
		return nil, nil
	}
	var a []json.RawMessage
	if raw[0] != '[' || json.Unmarshal(raw, &a) != nil {
		return nil, requestErrorf("%s must be an array, got %s", path, kind(raw))
	}
	if a == nil {
		a = []json.RawMessage{}
	}
	return a, nil
}

func boolean(raw json.RawMessage, path string) (bool, *RequestError) {
	if isAbsent(raw) {
		return false, nil
	}
	switch string(raw) {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, requestErrorf("%s must be true or false, got %s", path, kind(raw))
}

// number reads an optional JSON number, kept as written.
func number(raw json.RawMessage, path string) (json.Number, *RequestError) {
	if isAbsent(raw) {
		return "", nil
	}
	var n json.Number
	if raw[0] == '"' || json.Unmarshal(raw, &n) != nil {
		return "", requestErrorf("%s must be a number, got %s", path, kind(raw))
	}
	return n, nil
}

// nonNegativeInt reads an optional integer ≥ 0.
func nonNegativeInt(raw json.RawMessage, path string) (json.Number, *RequestError) {
	n, err := number(raw, path)
	if err != nil || n == "" {
		return n, err
	}
	if v, perr := n.Int64(); perr != nil || v < 0 {
		return "", requestErrorf("%s must be a non-negative integer, got %s", path, n)
	}
	return n, nil
}

// positiveInt reads a required integer > 0.
func positiveInt(raw json.RawMessage, path string) (json.Number, *RequestError) {
	if isAbsent(raw) {
		return "", requestErrorf("%s is required: the most tokens to generate, e.g. \"%s\": 1024", path, path)
	}
	n, err := number(raw, path)
	if err != nil {
		return "", err
	}
	if v, perr := n.Int64(); perr != nil || v <= 0 {
		return "", requestErrorf("%s must be a positive integer, got %s", path, n)
	}
	return n, nil
}

func stringArray(raw json.RawMessage, path string) ([]string, *RequestError) {
	items, err := arrayOf(raw, path)
	if err != nil || items == nil {
		return nil, err
	}
	out := make([]string, 0, len(items))
	for i, item := range items {
		s, err := requiredString(item, fmt.Sprintf("%s[%d]", path, i))
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}
