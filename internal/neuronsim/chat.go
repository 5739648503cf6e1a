package neuronsim

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"unicode/utf8"
)

// What the sim reads of a chat completions request, and how it answers,
// like an OpenAI-compatible server with a deterministic model:
//
//   - The request is validated as a real server would: messages is a
//     non-empty array of objects with a known role; content is a string or
//     an array of parts (text, and image_url in user messages: a data:image
//     URL in base64 or an http(s) URL); assistant tool_calls are
//     {id, type: function, function: {name, arguments}} with arguments a
//     JSON object in a string; a tool message names, in tool_call_id, a
//     call of the assistant message before it; tools are functions; a
//     tool_choice naming a function names one of the tools.
//   - With tools, tool_choice not "none", and a user message last, the
//     answer is one call to the first tool (the named one for a function
//     tool_choice; "required" and a named function call even after a tool
//     result), with arguments built from the tool's parameters schema.
//   - When tool results came after the last assistant message (the last
//     message is a tool message, or tool messages followed by a user
//     message, as a translated Anthropic tool_result turn is), the answer
//     is text quoting them: "Tool <name> returned: <first 40 characters>".
//   - Otherwise the greeting, "Hello from <neuron> serving <model>", with
//     ". I see N image(s)" when the request carried images.

// resultQuote is how much of a tool result the answer quotes, in runes.
const resultQuote = 40

// requestError is a 400 invalid_request_error, with the offending param.
type requestError struct {
	param string
	msg   string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(param, format string, args ...any) *requestError {
	return &requestError{param: param, msg: fmt.Sprintf(format, args...)}
}

// chatTurn is what the answer depends on.
type chatTurn struct {
	tools  []chatTool
	choice toolChoice
	// images counts image_url parts in all messages.
	images int
	// lastRole is the role of the last message.
	lastRole string
	// results are the tool results after the last assistant message.
	results []toolResult
}

type chatTool struct {
	name   string
	params json.RawMessage // the JSON schema; nil when absent
}

// toolChoice mode is "auto" (also when absent), "none", "required" or
// "function" (then name is the function).
type toolChoice struct {
	mode string
	name string
}

type toolResult struct {
	name string // the function the call named
	text string
}

type chatRequestFields struct {
	Messages   json.RawMessage `json:"messages"`
	Tools      json.RawMessage `json:"tools"`
	ToolChoice json.RawMessage `json:"tool_choice"`
}

type chatMessageFields struct {
	Role       json.RawMessage `json:"role"`
	Content    json.RawMessage `json:"content"`
	ToolCalls  json.RawMessage `json:"tool_calls"`
	ToolCallID json.RawMessage `json:"tool_call_id"`
}

// toolCall is a call of an assistant message: id → function name.
type toolCall struct{ id, name string }

// parseChat reads and validates a chat completions body. On error the
// turn holds what was counted so far (images), for the request record.
func parseChat(body []byte) (*chatTurn, *requestError) {
	turn := &chatTurn{choice: toolChoice{mode: "auto"}}
	var f chatRequestFields
	if err := json.Unmarshal(body, &f); err != nil {
		return turn, badRequest("", "request body must be a JSON object: %v", err)
	}
	if err := turn.readTools(f.Tools, f.ToolChoice); err != nil {
		return turn, err
	}
	if absent(f.Messages) {
		return turn, badRequest("messages", `messages is required: an array of {"role": ..., "content": ...} objects`)
	}
	var msgs []json.RawMessage
	if f.Messages[0] != '[' || json.Unmarshal(f.Messages, &msgs) != nil {
		return turn, badRequest("messages", "messages must be an array of message objects, got %s", jsonKind(f.Messages))
	}
	if len(msgs) == 0 {
		return turn, badRequest("messages", "messages must contain at least one message")
	}
	var (
		calls    []toolCall // of the last assistant message
		lastAsst = -1
	)
	for i, raw := range msgs {
		path := fmt.Sprintf("messages[%d]", i)
		var m chatMessageFields
		if len(raw) == 0 || raw[0] != '{' || json.Unmarshal(raw, &m) != nil {
			return turn, badRequest(path, "%s must be an object with a role, got %s", path, jsonKind(raw))
		}
		role, err := requiredString(m.Role, path+".role")
		if err != nil {
			return turn, err
		}
		turn.lastRole = role
		switch role {
		case "system", "developer":
			if _, err := turn.content(m.Content, path+".content", false, true); err != nil {
				return turn, err
			}
		case "user":
			if _, err := turn.content(m.Content, path+".content", true, true); err != nil {
				return turn, err
			}
		case "assistant":
			if calls, err = assistantCalls(m.ToolCalls, path+".tool_calls"); err != nil {
				return turn, err
			}
			lastAsst = i
			if _, err := turn.content(m.Content, path+".content", false, len(calls) == 0); err != nil {
				return turn, err
			}
			turn.results = nil
		case "tool":
			id, err := requiredString(m.ToolCallID, path+".tool_call_id")
			if err != nil {
				return turn, err
			}
			text, err := turn.content(m.Content, path+".content", false, true)
			if err != nil {
				return turn, err
			}
			name, err := matchCall(id, calls, lastAsst, path)
			if err != nil {
				return turn, err
			}
			turn.results = append(turn.results, toolResult{name: name, text: text})
		default:
			return turn, badRequest(path+".role", `%s.role must be one of "system", "developer", "user", "assistant" or "tool", got %q`, path, role)
		}
	}
	return turn, nil
}

// matchCall finds the function a tool message answers: a tool_call_id of
// the assistant message before it.
func matchCall(id string, calls []toolCall, lastAsst int, path string) (string, *requestError) {
	if lastAsst < 0 || len(calls) == 0 {
		return "", badRequest(path+".tool_call_id",
			"%s is a tool result for %q, but no assistant message with tool_calls comes before it: a tool message must answer a tool call", path, id)
	}
	ids := make([]string, len(calls))
	for i, c := range calls {
		if c.id == id {
			return c.name, nil
		}
		ids[i] = c.id
	}
	return "", badRequest(path+".tool_call_id", "%s.tool_call_id %q matches no tool call of messages[%d] (its tool call ids: %s)",
		path, id, lastAsst, strings.Join(ids, ", "))
}

// assistantCalls validates an assistant message's tool_calls.
func assistantCalls(raw json.RawMessage, path string) ([]toolCall, *requestError) {
	if absent(raw) {
		return nil, nil
	}
	var items []json.RawMessage
	if raw[0] != '[' || json.Unmarshal(raw, &items) != nil {
		return nil, badRequest(path, "%s must be an array of tool calls, got %s", path, jsonKind(raw))
	}
	var out []toolCall
	for j, item := range items {
		p := fmt.Sprintf("%s[%d]", path, j)
		var c struct {
			ID       json.RawMessage `json:"id"`
			Type     json.RawMessage `json:"type"`
			Function json.RawMessage `json:"function"`
		}
		if len(item) == 0 || item[0] != '{' || json.Unmarshal(item, &c) != nil {
			return nil, badRequest(p, `%s must be {"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}, got %s`, p, jsonKind(item))
		}
		id, err := requiredString(c.ID, p+".id")
		if err != nil {
			return nil, err
		}
		if typ, err := requiredString(c.Type, p+".type"); err != nil {
			return nil, err
		} else if typ != "function" {
			return nil, badRequest(p+".type", `%s.type must be "function", got %q`, p, typ)
		}
		var fn struct {
			Name      json.RawMessage `json:"name"`
			Arguments json.RawMessage `json:"arguments"`
		}
		if absent(c.Function) || c.Function[0] != '{' || json.Unmarshal(c.Function, &fn) != nil {
			return nil, badRequest(p+".function", `%s.function must be {"name": ..., "arguments": ...}, got %s`, p, jsonKind(c.Function))
		}
		name, err := requiredString(fn.Name, p+".function.name")
		if err != nil {
			return nil, err
		}
		args, err := requiredString(fn.Arguments, p+".function.arguments")
		if err != nil {
			return nil, err
		}
		// Chat templates iterate the arguments: the server decodes them.
		var obj map[string]json.RawMessage
		if json.Unmarshal([]byte(args), &obj) != nil {
			return nil, badRequest(p+".function.arguments", "%s.function.arguments must be a JSON object encoded as a string, got %q", p, clip(args, 60))
		}
		out = append(out, toolCall{id: id, name: name})
	}
	return out, nil
}

// content validates a message's content and returns its text. Parts may
// be images only in user messages; required means null or absent is an
// error.
func (t *chatTurn) content(raw json.RawMessage, path string, images, required bool) (string, *requestError) {
	if absent(raw) {
		if required {
			return "", badRequest(path, "%s is required: a string or an array of content parts", path)
		}
		return "", nil
	}
	if raw[0] == '"' {
		var s string
		if json.Unmarshal(raw, &s) != nil {
			return "", badRequest(path, "%s is not a valid JSON string", path)
		}
		return s, nil
	}
	var parts []json.RawMessage
	if raw[0] != '[' || json.Unmarshal(raw, &parts) != nil {
		return "", badRequest(path, "%s must be a string or an array of content parts, got %s", path, jsonKind(raw))
	}
	allowed := `"text"`
	if images {
		allowed = `"text" or "image_url"`
	}
	var text strings.Builder
	for k, part := range parts {
		p := fmt.Sprintf("%s[%d]", path, k)
		var cp struct {
			Type     json.RawMessage `json:"type"`
			Text     json.RawMessage `json:"text"`
			ImageURL json.RawMessage `json:"image_url"`
		}
		if len(part) == 0 || part[0] != '{' || json.Unmarshal(part, &cp) != nil {
			return "", badRequest(p, "%s must be a content part object with a type, got %s", p, jsonKind(part))
		}
		typ, err := requiredString(cp.Type, p+".type")
		if err != nil {
			return "", err
		}
		switch {
		case typ == "text":
			s, err := requiredString(cp.Text, p+".text")
			if err != nil {
				return "", err
			}
			if text.Len() > 0 {
				text.WriteString("\n")
			}
			text.WriteString(s)
		case typ == "image_url" && images:
			if err := checkImage(cp.ImageURL, p+".image_url"); err != nil {
				return "", err
			}
			t.images++
		default:
			return "", badRequest(p+".type", "%s.type must be %s here, got %q", p, allowed, typ)
		}
	}
	return text.String(), nil
}

// checkImage validates an image_url part: a base64 data:image URL, or an
// http(s) URL (which a real server would fetch).
func checkImage(raw json.RawMessage, path string) *requestError {
	var img struct {
		URL json.RawMessage `json:"url"`
	}
	if absent(raw) || raw[0] != '{' || json.Unmarshal(raw, &img) != nil {
		return badRequest(path, `%s must be {"url": ...}, got %s`, path, jsonKind(raw))
	}
	u, err := requiredString(img.URL, path+".url")
	if err != nil {
		return err
	}
	switch {
	case strings.HasPrefix(u, "http://") || strings.HasPrefix(u, "https://"):
		return nil
	case strings.HasPrefix(u, "data:"):
		meta, data, ok := strings.Cut(strings.TrimPrefix(u, "data:"), ",")
		if !ok || !strings.HasPrefix(meta, "image/") || !strings.HasSuffix(meta, ";base64") {
			return badRequest(path+".url", "%s.url must be data:image/<type>;base64,<data>, got %q", path, clip(u, 40))
		}
		if _, err := base64.StdEncoding.DecodeString(data); err != nil || data == "" {
			return badRequest(path+".url", "%s.url: the image data is not valid base64", path)
		}
		return nil
	default:
		return badRequest(path+".url", "%s.url must be a data:image URL or an http(s) URL, got %q", path, clip(u, 40))
	}
}

// readTools validates tools and tool_choice.
func (t *chatTurn) readTools(tools, choice json.RawMessage) *requestError {
	if !absent(tools) {
		var items []json.RawMessage
		if tools[0] != '[' || json.Unmarshal(tools, &items) != nil {
			return badRequest("tools", "tools must be an array of function tools, got %s", jsonKind(tools))
		}
		for i, item := range items {
			p := fmt.Sprintf("tools[%d]", i)
			var tool struct {
				Type     json.RawMessage `json:"type"`
				Function struct {
					Name       json.RawMessage `json:"name"`
					Parameters json.RawMessage `json:"parameters"`
				} `json:"function"`
			}
			if len(item) == 0 || item[0] != '{' || json.Unmarshal(item, &tool) != nil {
				return badRequest(p, `%s must be {"type": "function", "function": {"name": ..., "parameters": {...}}}, got %s`, p, jsonKind(item))
			}
			if typ, err := requiredString(tool.Type, p+".type"); err != nil {
				return err
			} else if typ != "function" {
				return badRequest(p+".type", `%s.type must be "function", got %q`, p, typ)
			}
			name, err := requiredString(tool.Function.Name, p+".function.name")
			if err != nil {
				return err
			}
			params := tool.Function.Parameters
			if absent(params) {
				params = nil
			} else if params[0] != '{' {
				return badRequest(p+".function.parameters", "%s.function.parameters must be a JSON schema object, got %s", p, jsonKind(params))
			}
			t.tools = append(t.tools, chatTool{name: name, params: params})
		}
	}
	if absent(choice) {
		return nil
	}
	if choice[0] == '"' {
		var mode string
		_ = json.Unmarshal(choice, &mode)
		switch mode {
		case "auto", "none":
		case "required":
			if len(t.tools) == 0 {
				return badRequest("tool_choice", `tool_choice "required" needs tools`)
			}
		default:
			return badRequest("tool_choice", `tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}, got %q`, mode)
		}
		t.choice = toolChoice{mode: mode}
		return nil
	}
	var named struct {
		Type     json.RawMessage `json:"type"`
		Function struct {
			Name json.RawMessage `json:"name"`
		} `json:"function"`
	}
	if choice[0] != '{' || json.Unmarshal(choice, &named) != nil {
		return badRequest("tool_choice", `tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}, got %s`, jsonKind(choice))
	}
	if typ, err := requiredString(named.Type, "tool_choice.type"); err != nil {
		return err
	} else if typ != "function" {
		return badRequest("tool_choice.type", `tool_choice.type must be "function", got %q`, typ)
	}
	name, err := requiredString(named.Function.Name, "tool_choice.function.name")
	if err != nil {
		return err
	}
	names := make([]string, len(t.tools))
	for i, tool := range t.tools {
		if tool.name == name {
			t.choice = toolChoice{mode: "function", name: name}
			return nil
		}
		names[i] = tool.name
	}
	return badRequest("tool_choice.function.name", "tool_choice names function %q, which is not among the tools (%s)", name, strings.Join(names, ", "))
}

// call is the tool the answer calls, nil for a text answer.
func (t *chatTurn) call() *chatTool {
	if len(t.tools) == 0 {
		return nil
	}
	switch t.choice.mode {
	case "none":
		return nil
	case "function":
		for i := range t.tools {
			if t.tools[i].name == t.choice.name {
				return &t.tools[i]
			}
		}
		return nil
	case "required":
		return &t.tools[0]
	}
	if t.lastRole == "user" && len(t.results) == 0 {
		return &t.tools[0]
	}
	return nil
}

// answerText is the text answer: the tool results quoted, else the
// greeting (with what it saw).
func (t *chatTurn) answerText(greeting string) string {
	if len(t.results) > 0 {
		quotes := make([]string, len(t.results))
		for i, r := range t.results {
			quotes[i] = fmt.Sprintf("Tool %s returned: %s", r.name, clip(r.text, resultQuote))
		}
		return strings.Join(quotes, " ")
	}
	switch t.images {
	case 0:
		return greeting
	case 1:
		return greeting + ". I see 1 image"
	default:
		return fmt.Sprintf("%s. I see %d images", greeting, t.images)
	}
}

// toolArguments is the JSON object text of a call to tool: a value for
// every required property of its parameters schema, so that it validates.
func toolArguments(tool *chatTool) string {
	var schema map[string]any
	if tool.params != nil {
		_ = json.Unmarshal(tool.params, &schema)
	}
	b, _ := json.Marshal(objectFor(schema))
	return string(b)
}

// objectFor builds an object with each required property of schema.
func objectFor(schema map[string]any) map[string]any {
	out := map[string]any{}
	props, _ := schema["properties"].(map[string]any)
	req, _ := schema["required"].([]any)
	for _, r := range req {
		name, ok := r.(string)
		if !ok {
			continue
		}
		prop, _ := props[name].(map[string]any)
		out[name] = valueFor(prop)
	}
	return out
}

// valueFor is a value satisfying schema: its const or first enum value,
// else by type: string "sim", number and integer 1, boolean true, array []
// (or minItems values), object with its required properties, within the
// bounds the schema sets.
func valueFor(schema map[string]any) any {
	if v, ok := schema["const"]; ok {
		return v
	}
	if e, ok := schema["enum"].([]any); ok && len(e) > 0 {
		return e[0]
	}
	for _, k := range []string{"anyOf", "oneOf", "allOf"} {
		if alts, ok := schema[k].([]any); ok && len(alts) > 0 {
			if first, ok := alts[0].(map[string]any); ok && schemaType(schema) == "" {
				return valueFor(first)
			}
		}
	}
	num := func(key string) (float64, bool) { f, ok := schema[key].(float64); return f, ok }
	switch schemaType(schema) {
	case "string":
		s := "sim"
		if n, ok := num("minLength"); ok && int(n) > len(s) {
			s = strings.Repeat("s", int(n))
		}
		if n, ok := num("maxLength"); ok && int(n) < len(s) {
			s = s[:max(0, int(n))]
		}
		return s
	case "number", "integer":
		v := 1.0
		if lo, ok := num("minimum"); ok && v < lo {
			v = lo
		}
		if lo, ok := num("exclusiveMinimum"); ok && v <= lo {
			v = math.Floor(lo) + 1
		}
		if hi, ok := num("maximum"); ok && v > hi {
			v = hi
		}
		if hi, ok := num("exclusiveMaximum"); ok && v >= hi {
			v = math.Ceil(hi) - 1
		}
		if schemaType(schema) == "integer" {
			return int64(math.Ceil(v))
		}
		return v
	case "boolean":
		return true
	case "null":
		return nil
	case "array":
		out := []any{}
		if n, ok := num("minItems"); ok {
			item, _ := schema["items"].(map[string]any)
			for range int(n) {
				out = append(out, valueFor(item))
			}
		}
		return out
	case "object":
		return objectFor(schema)
	}
	if _, ok := schema["properties"]; ok {
		return objectFor(schema)
	}
	return "sim" // no constraint: anything validates
}

// schemaType is the schema's type, the first non-null one of a list.
func schemaType(schema map[string]any) string {
	switch t := schema["type"].(type) {
	case string:
		return t
	case []any:
		for _, x := range t {
			if s, ok := x.(string); ok && s != "null" {
				return s
			}
		}
		if len(t) > 0 {
			return "null"
		}
	}
	return ""
}

// fragments splits s into at least two pieces (at rune boundaries) of up
// to 8 runes: how a server streams a call's arguments.
func fragments(s string) []string {
	n := utf8.RuneCountInString(s)
	size := min(8, max(1, n/2))
	var out []string
	for len(s) > 0 {
		i, k := 0, 0
		for i < len(s) && k < size {
			_, w := utf8.DecodeRuneInString(s[i:])
			i += w
			k++
		}
		out = append(out, s[:i])
		s = s[i:]
	}
	return out
}

func requiredString(raw json.RawMessage, path string) (string, *requestError) {
	if absent(raw) {
		return "", badRequest(path, "%s is required", path)
	}
	var s string
	if raw[0] != '"' || json.Unmarshal(raw, &s) != nil {
		return "", badRequest(path, "%s must be a string, got %s", path, jsonKind(raw))
	}
	if s == "" {
		return "", badRequest(path, "%s must not be empty", path)
	}
	return s, nil
}

// absent: not given, or JSON null.
func absent(raw json.RawMessage) bool {
	return len(raw) == 0 || string(raw) == "null"
}

// jsonKind names the kind of a JSON value for error messages.
func jsonKind(raw json.RawMessage) string {
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

// clip is s's first n runes.
func clip(s string, n int) string {
	for i := range s {
		if n == 0 {
			return s[:i]
		}
		n--
	}
	return s
}
