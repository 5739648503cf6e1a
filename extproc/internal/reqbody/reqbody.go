// Package reqbody reads and rewrites the "model" of an OpenAI- or
// Anthropic-shaped JSON request body without decoding the rest: a strict
// one-pass validator checks the body, gjson reads the model (its value and,
// through Result.Index and Raw, where it is), and sjson writes the new
// model into a buffer of ours, so every byte outside the model string is
// kept exactly and the body itself is never copied.
//
// # What is checked, and what is left to the neuron
//
// The body can be megabytes of chat history, and it is read on every
// request, so the validator is built for speed (BenchmarkScan):
//
//   - The JSON structure is checked strictly: objects, arrays, commas,
//     colons, numbers, literals, nothing after the value.
//   - Every key, and the top-level "model" value, is checked strictly as a
//     JSON string (escapes, no control characters): keys are compared with
//     "model" in any letter case, so a second one is refused, and the
//     model value is what is routed on.
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
//
// # gjson and sjson
//
// The validator guarantees there is exactly one top-level "model" key, so
// gjson (which takes the first) and any parser that takes the last, or
// ignores case, read the same one; Find also checks that gjson found the
// value exactly where the validator did. gjson and sjson find "model" by
// walking the body from its start. Most clients put "model" first, where
// that walk is a few bytes. When it comes later (the OpenAI and Anthropic
// SDKs send it after the messages), gjson's walk and sjson's, which also
// copies the body up to the model into the buffer it rewrites, would add
// 0.7–1.1 ms per MB to the validator's 0.14 ms (BenchmarkRewrite;
// BENCHMARKS.md, "gjson and sjson on the request path"). So past NearLimit
// bytes gjson reads the value at the validator's span instead of searching
// for it, and the rewrite is a splice (Model.Near).
package reqbody

import (
	"bytes"
	"encoding/json"
	"unicode"
	"unicode/utf8"

	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"

	"github.com/helexa/cortex-extproc/internal/apierr"
)

// MaxModelLen bounds a model id; longer ids are refused before they reach a
// log line, a metric or a neuron URL.
const MaxModelLen = 256

// NearLimit is how far into a body gjson searches for "model" and sjson
// rewrites it: a model value ending within the first NearLimit bytes is
// near (Model.Near). Every client that sends "model" first is near; the
// bound keeps the walk to the model, which gjson and sjson each make, well
// under a microsecond, and the region sjson rewrites small.
const NearLimit = 512

// Model is the top-level "model" of body plus where its raw JSON value sits.
type Model struct {
	ID    string // unescaped value (gjson's Result.Str)
	start int    // offset of the raw JSON string (with quotes) in the body
	end   int
	near  bool // end <= NearLimit: gjson found it, sjson rewrites it
}

// Find returns the body's top-level "model". The body must be a JSON object
// whose model is a non-empty string of at most MaxModelLen printable
// characters; anything else is a 400 saying what was wrong.
//
// The validator reads the body once. It checks the JSON structure, every
// key and the model value strictly, but not the content of the other
// strings (see the package doc): a body whose only fault is, say, a raw tab
// inside a message is accepted here and refused by the neuron's JSON
// parser. Then gjson reads the model: it searches the body for it when it
// is near the start (Model.Near), and otherwise reads the value where the
// validator found it, which saves a second walk over the whole body.
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
	m := Model{start: s.start, end: s.end, near: s.end <= NearLimit}
	var r gjson.Result
	if m.near {
		r = gjson.GetBytes(body, "model")
	} else {
		r = gjson.ParseBytes(body[s.start:s.end])
		r.Index = s.start
	}
	// Not reached (FuzzValid, FuzzFindRewrite): on the bodies the validator
	// accepts, gjson finds the same value. Were it ever to read another,
	// the body would mean two things; refuse it rather than route on one.
	if r.Type != gjson.String || r.Index != s.start || len(r.Raw) != s.end-s.start {
		return Model{}, apierr.InvalidRequest("request body's \"model\" could not be read unambiguously; send it as a plain JSON string")
	}
	// gjson unescapes as encoding/json does, and leaves bytes that are not
	// UTF-8 as they are, so CheckID refuses them (encoding/json would
	// quietly turn them into U+FFFD).
	m.ID = r.Str
	if err := CheckID(m.ID); err != nil {
		return Model{}, err
	}
	return m, nil
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

// Near reports whether the model value ends within the first NearLimit
// bytes of the body: gjson found it by searching the body, and
// AppendRewrite can have sjson rewrite it.
func (m Model) Near() bool { return m.near }

// inPlace: sjson finds "model" with gjson's lookup (Optimistic) and writes
// the new value into the buffer it is given (ReplaceInPlace) when it fits.
var inPlace = sjson.Options{Optimistic: true, ReplaceInPlace: true}

// AppendRewrite appends to dst the beginning of the rewritten body: body up
// to the end of the model value, with the value replaced by value (a JSON
// string, as Quote makes it). The rewritten body is what it appended
// followed by body[end:], with end from Span; body is neither modified nor
// retained.
//
// The bytes are copied into dst and sjson (SetRawBytesOptions, Optimistic
// and ReplaceInPlace) writes the new value into that copy: in place when it
// is not longer than the old one, otherwise into a buffer of its own that
// is then appended; dst needs room for max(end, start+len(value)) more
// bytes to avoid growing. ok is false, and dst is returned as it was, for a
// model that is not Near: rewriting there would copy and walk the body up
// to the model, so the caller splices value between body[:start] and
// body[end:] instead.
func AppendRewrite(dst, body []byte, m Model, value []byte) (out []byte, ok bool) {
	if !m.near {
		return dst, false
	}
	return appendRewrite(dst, body, m, value)
}

// appendRewrite is AppendRewrite for a model at any distance (the fuzz
// target holds it to the splice everywhere).
func appendRewrite(dst, body []byte, m Model, value []byte) ([]byte, bool) {
	h := len(dst)
	dst = append(dst, body[:m.end]...)
	w, err := sjson.SetRawBytesOptions(dst[h:], "model", value, &inPlace)
	// sjson's lookup is gjson's, which Find already held to the validator,
	// so it rewrites the same value; checked all the same, as a mistake
	// here would send a neuron a body that is not the client's.
	if err != nil || len(w) != m.start+len(value) || !bytes.Equal(w[m.start:], value) || !bytes.Equal(w[:m.start], body[:m.start]) {
		return dst[:h], false
	}
	if &w[0] == &dst[h] { // written in place
		return dst[:h+len(w)], true
	}
	return append(dst[:h], w...), true
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
