// Package reqbody reads and rewrites the "model" of an OpenAI- or
// Anthropic-shaped JSON request body without decoding the rest, in one
// pass over the body, and splices a new model value into the original
// bytes, so every byte outside the model string is kept exactly.
//
// # What is checked, and what is left to the neuron
//
// The body can be megabytes of chat history, and it is read on every
// request, so the pass is built for speed (BenchmarkScan):
//
//   - The JSON structure is checked strictly: objects, arrays, commas,
//     colons, numbers, literals, nothing after the value.
//   - Every key, and the top-level "model" value, is checked strictly as a
//     JSON string (escapes, no control characters): keys are compared with
//     "model" and the model value is decoded and routed on.
//   - Every other string is only skipped to its closing quote: an escaped
//     quote (one after an odd run of backslashes) does not end it. Its
//     content is not checked: raw control characters, unknown escape
//     letters and bad \u digits pass.
//
// Leaving string content unchecked cannot change the routing: where a
// string ends is decided the same way by every JSON parser, so on every
// body a JSON parser accepts, Find sees the same keys and the same model
// as the neuron. A body that is invalid only inside such a string is
// routed, and the neuron's own (conforming) JSON parser refuses it with its
// 400; so does nesting deeper than that parser allows. FuzzValid pins this
// against encoding/json.
package reqbody

import (
	"bytes"
	"encoding/json"
	"unicode"
	"unicode/utf8"

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
//
// Find reads the body once. It checks the JSON structure, every key and
// the model value strictly, but not the content of the other strings (see
// the package doc): a body whose only fault is, say, a raw tab inside a
// message is accepted here and refused by the neuron's JSON parser.
func Find(body []byte) (Model, *apierr.Error) {
	if len(body) == 0 {
		return Model{}, apierr.InvalidRequest("request body is empty: send a JSON object with a \"model\" field")
	}
	s, ok := scan(body)
	if !ok {
		return Model{}, apierr.InvalidRequest("request body is not valid JSON: send a JSON object with a \"model\" field")
	}
	if firstNonSpace(body) != '{' {
		return Model{}, apierr.InvalidRequest("request body must be a JSON object with a \"model\" field")
	}
	if s.kind == kindNone {
		return Model{}, apierr.InvalidRequest("request body has no \"model\" field: name the model to use, e.g. \"model\": \"Qwen/Qwen3-8B\"")
	}
	if s.kind != kindString {
		return Model{}, apierr.InvalidRequest("\"model\" must be a string, got %s", typeName(s.kind))
	}
	// We route on the first "model"; a neuron whose parser takes the last
	// (Python, Go) or ignores case (Go) would serve another model than the
	// one routed, so a second one, in any case or escaped, is refused.
	if s.models > 1 {
		return Model{}, apierr.InvalidRequest("request body has more than one \"model\" field; send exactly one")
	}
	id, ok := decodeString(body[s.start:s.end])
	if !ok { // not reached: strictString accepts what encoding/json does
		return Model{}, apierr.InvalidRequest("request body is not valid JSON: send a JSON object with a \"model\" field")
	}
	if err := CheckID(id); err != nil {
		return Model{}, err
	}
	return Model{ID: id, start: s.start, end: s.end}, nil
}

// decodeString unescapes a quoted JSON string that strictString accepted.
// Without a backslash the content is the value: one allocation. Content
// that is not UTF-8 is returned raw, so that CheckID refuses it, where
// encoding/json would quietly turn it into U+FFFD.
func decodeString(quoted []byte) (string, bool) {
	raw := quoted[1 : len(quoted)-1]
	if bytes.IndexByte(raw, '\\') < 0 || !utf8.Valid(raw) {
		return string(raw), true
	}
	var s string
	err := json.Unmarshal(quoted, &s)
	return s, err == nil
}

// CheckID refuses model ids that are empty, too long, not UTF-8, or carry
// control characters (C0, DEL, C1) or invisible format characters
// (Unicode category Cf: bidirectional overrides and marks, zero-width
// spaces, byte-order marks): they could otherwise end up in headers, logs
// or URLs, or make one id display as another. Every error says which code
// point was found.
//
// An id is almost always ASCII: that is checked byte by byte, and only an
// id with a non-ASCII byte takes the slow path that decodes runes.
func CheckID(id string) *apierr.Error {
	if id == "" {
		return invalidID("\"model\" is empty: name the model to use")
	}
	if len(id) > MaxModelLen {
		return invalidID("\"model\" is %d bytes long; model ids are at most %d", len(id), MaxModelLen)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c >= utf8.RuneSelf {
			return checkNonASCII(id[i:])
		}
		if c < 0x20 || c == 0x7f {
			return controlChar(rune(c))
		}
	}
	return nil
}

// checkNonASCII is CheckID's slow path, from the first non-ASCII byte on.
func checkNonASCII(id string) *apierr.Error {
	if !utf8.ValidString(id) {
		return invalidID("\"model\" is not valid UTF-8: send the model id as UTF-8 plain text")
	}
	for _, c := range id {
		switch {
		case c < 0x20 || c == 0x7f || (c >= 0x80 && c <= 0x9f):
			return controlChar(c)
		case isBidiControl(c):
			return invalidID("\"model\" contains the bidirectional control character %U, which changes how text around it is displayed; send the model id as plain text, without direction marks, embeddings, overrides or isolates", c)
		case unicode.Is(unicode.Cf, c):
			return invalidID("\"model\" contains the invisible format character %U; send the model id as plain text, without zero-width or other format characters", c)
		}
	}
	return nil
}

// isBidiControl reports the characters of Unicode's bidirectional
// algorithm that are not letters: marks (LRM, RLM, ALM), embeddings and
// overrides (LRE…RLO), isolates (LRI…PDI). All are category Cf too; they
// get their own message because they are the ones used to disguise text.
func isBidiControl(c rune) bool {
	return c == 0x061c || c == 0x200e || c == 0x200f || (c >= 0x202a && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069)
}

func controlChar(c rune) *apierr.Error {
	return invalidID("\"model\" contains the control character %U; send the model id as plain text", c)
}

func invalidID(format string, args ...any) *apierr.Error {
	return apierr.InvalidRequest(format, args...).WithReason(apierr.ReasonInvalidModelID)
}

// Span is where the model's raw JSON string (quotes included) sits in the
// body: body[start:end].
func (m Model) Span() (start, end int) { return m.start, m.end }

// Splice returns body with the model value replaced by id, in three
// pieces to be sent one after the other, so the rewritten body is never
// built: before and after alias body (no copy; before's capacity ends at
// the model value, so appending to it cannot overwrite body), and value is
// Quote(id).
func Splice(body []byte, m Model, id string) (before, value, after []byte) {
	return body[:m.start:m.start], Quote(id), body[m.end:]
}

// Quote renders id as the JSON string that replaces a model value.
func Quote(id string) []byte {
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

func typeName(k kind) string {
	switch k {
	case kindNull:
		return "null"
	case kindBool:
		return "a boolean"
	case kindNumber:
		return "a number"
	case kindContainer:
		return "an object or array"
	}
	return "a string"
}
