// Package reqbody reads and rewrites the "model" of an OpenAI- or
// Anthropic-shaped JSON request body without decoding the rest: gjson finds
// the value, and the rewrite splices the new value into the original bytes,
// so every byte outside the model string is kept exactly.
package reqbody

import (
	"encoding/json"
	"unicode/utf8"

	"github.com/tidwall/gjson"

	"github.com/helexa/cortex-extproc/apierr"
)

// MaxModelLen bounds a model id; longer ids are refused before they reach a
// log line, a metric or a neuron URL.
const MaxModelLen = 256

// Model is the top-level "model" of body plus where its raw JSON value sits.
type Model struct {
	ID    string // unescaped value
	start int    // offset of the raw JSON string (with quotes) in the body
	end   int
}

// Find returns the body's top-level "model". The body must be a JSON object
// whose model is a non-empty string of at most MaxModelLen printable
// characters; anything else is a 400 saying what was wrong.
func Find(body []byte) (Model, *apierr.Error) {
	if len(body) == 0 {
		return Model{}, apierr.InvalidRequest("request body is empty: send a JSON object with a \"model\" field")
	}
	valid, models := scan(body)
	if !valid {
		return Model{}, apierr.InvalidRequest("request body is not valid JSON: send a JSON object with a \"model\" field")
	}
	if firstNonSpace(body) != '{' {
		return Model{}, apierr.InvalidRequest("request body must be a JSON object with a \"model\" field")
	}
	r := gjson.GetBytes(body, "model")
	if !r.Exists() {
		return Model{}, apierr.InvalidRequest("request body has no \"model\" field: name the model to use, e.g. \"model\": \"Qwen/Qwen3-8B\"")
	}
	if r.Type != gjson.String {
		return Model{}, apierr.InvalidRequest("\"model\" must be a string, got %s", typeName(r.Type))
	}
	// We route on the first "model"; a neuron whose parser takes the last
	// (Python, Go) or ignores case (Go) would serve another model than the
	// one routed, so a second one, in any case or escaped, is refused.
	if models > 1 {
		return Model{}, apierr.InvalidRequest("request body has more than one \"model\" field; send exactly one")
	}
	id := r.Str
	if err := CheckID(id); err != nil {
		return Model{}, err
	}
	return Model{ID: id, start: r.Index, end: r.Index + len(r.Raw)}, nil
}

// CheckID refuses model ids that are empty, too long, not UTF-8 or carry
// control characters: they could otherwise end up in headers, logs or URLs.
func CheckID(id string) *apierr.Error {
	if id == "" {
		return apierr.InvalidRequest("\"model\" is empty: name the model to use")
	}
	if len(id) > MaxModelLen {
		return apierr.InvalidRequest("\"model\" is %d bytes long; model ids are at most %d", len(id), MaxModelLen)
	}
	if !utf8.ValidString(id) {
		return apierr.InvalidRequest("\"model\" is not valid UTF-8")
	}
	for _, c := range id {
		if c < 0x20 || c == 0x7f {
			return apierr.InvalidRequest("\"model\" contains a control character (%U); model ids are plain text", c)
		}
	}
	return nil
}

// Rewrite returns body with the model value replaced by id. When the new
// JSON string has the same length as the old one it is written in place
// (body is modified and returned); otherwise one new buffer is allocated.
func Rewrite(body []byte, m Model, id string) []byte {
	q := quote(id)
	old := m.end - m.start
	if len(q) == old {
		copy(body[m.start:m.end], q)
		return body
	}
	out := make([]byte, 0, len(body)-old+len(q))
	out = append(out, body[:m.start]...)
	out = append(out, q...)
	return append(out, body[m.end:]...)
}

// quote renders id as a JSON string.
func quote(id string) []byte {
	b, err := json.Marshal(id)
	if err != nil { // a Go string always marshals; keep the compiler honest
		panic(err)
	}
	return b
}

func firstNonSpace(b []byte) byte {
	for _, c := range b {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return c
	}
	return 0
}

func typeName(t gjson.Type) string {
	switch t {
	case gjson.Null:
		return "null"
	case gjson.False, gjson.True:
		return "a boolean"
	case gjson.Number:
		return "a number"
	case gjson.JSON:
		return "an object or array"
	}
	return t.String()
}
