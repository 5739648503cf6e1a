package reqbody

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"math/bits"
	"strings"
)

// kind is the JSON type of a value, as far as Find's messages need it.
type kind uint8

const (
	kindNone kind = iota // no top-level "model" key
	kindString
	kindNumber
	kindBool
	kindNull
	kindContainer // an object or an array
)

// kindAt is the kind of the value starting with byte c.
func kindAt(c byte) kind {
	switch c {
	case '"':
		return kindString
	case '{', '[':
		return kindContainer
	case 't', 'f':
		return kindBool
	case 'n':
		return kindNull
	}
	return kindNumber
}

// shape is what Find needs to know about a body, learnt in one pass.
type shape struct {
	// models counts the top-level keys equal to "model" in any letter case
	// after unescaping (Find refuses more than one).
	models int
	// kind, start and end describe the value of the first top-level key
	// that is exactly "model" after unescaping (the one gjson and most
	// parsers would find first): its type and its raw bytes b[start:end].
	kind       kind
	start, end int
}

// scan checks that b is one JSON value and learns its shape, in one pass.
//
// The structure is checked strictly: objects, arrays, commas, colons,
// numbers, literals, nothing after the value; nesting uses an explicit
// stack, so deep input cannot exhaust the goroutine stack. Keys and the
// top-level "model" value are strings scanned strictly (strictString):
// keys are compared with "model" and the model value is decoded and routed
// on. Every other string is only skipped to its closing quote (skipString)
// and its content is not checked; see the package doc for why.
//
// On any body that encoding/json accepts, scan accepts too; on any body
// scan accepts that encoding/json rejects, encoding/json's first error is
// inside a string or is its nesting limit (FuzzValid).
func scan(b []byte) (shape, bool) {
	var s shape
	var stackBuf [64]byte
	stack := stackBuf[:0] // '{' or '[' per open container
	// modelNext: the next value is the first top-level "model" value.
	// modelOpen: that value has started and its end is not yet recorded.
	modelNext, modelOpen := false, false
	i := skipSpace(b, 0)
	for {
		// A value is expected at i.
		if i >= len(b) {
			return shape{}, false
		}
		c := b[i]
		if modelNext {
			modelNext, modelOpen = false, true
			s.start, s.kind = i, kindAt(c)
		}
		var ok bool
		switch {
		case c == '{':
			i = skipSpace(b, i+1)
			if i < len(b) && b[i] == '}' {
				i++
				break
			}
			stack = append(stack, '{')
			var k []byte
			if i, k, ok = key(b, i); !ok {
				return shape{}, false
			}
			if len(stack) == 1 {
				modelNext = s.noteKey(k)
			}
			continue
		case c == '[':
			i = skipSpace(b, i+1)
			if i < len(b) && b[i] == ']' {
				i++
				break
			}
			stack = append(stack, '[')
			continue
		case c == '"':
			if modelOpen && len(stack) == 1 {
				i, ok = strictString(b, i+1)
			} else {
				i, ok = skipString(b, i+1)
			}
			if !ok {
				return shape{}, false
			}
		case c == '-' || (c >= '0' && c <= '9'):
			if i, ok = scanNumber(b, i); !ok {
				return shape{}, false
			}
		case c == 't':
			if !hasLiteral(b, i, "true") {
				return shape{}, false
			}
			i += 4
		case c == 'f':
			if !hasLiteral(b, i, "false") {
				return shape{}, false
			}
			i += 5
		case c == 'n':
			if !hasLiteral(b, i, "null") {
				return shape{}, false
			}
			i += 4
		default:
			return shape{}, false
		}
		// A value ended at i: close containers or move to the next element.
		for {
			// Back at depth 1 with the model value open means it is the
			// value that just ended (its own elements are deeper).
			if modelOpen && len(stack) == 1 {
				s.end, modelOpen = i, false
			}
			i = skipSpace(b, i)
			if len(stack) == 0 {
				return s, i == len(b)
			}
			if i >= len(b) {
				return shape{}, false
			}
			top := stack[len(stack)-1]
			c := b[i]
			if c == ',' {
				i = skipSpace(b, i+1)
				if top == '{' {
					var k []byte
					if i, k, ok = key(b, i); !ok {
						return shape{}, false
					}
					if len(stack) == 1 {
						modelNext = s.noteKey(k)
					}
				}
				break
			}
			if (top == '{' && c == '}') || (top == '[' && c == ']') {
				stack = stack[:len(stack)-1]
				i++
				continue
			}
			return shape{}, false
		}
	}
}

// noteKey counts a top-level key that is "model" in any case and reports
// whether its value is the one to record: the first key exactly "model".
func (s *shape) noteKey(raw []byte) bool {
	exact, anyCase := modelKey(raw)
	if anyCase {
		s.models++
	}
	return exact && s.kind == kindNone
}

// key reads `"name" :` at i and returns the index after the colon and the
// raw name (between the quotes, still escaped).
func key(b []byte, i int) (int, []byte, bool) {
	if i >= len(b) || b[i] != '"' {
		return i, nil, false
	}
	start := i + 1
	i, ok := strictString(b, start)
	if !ok {
		return i, nil, false
	}
	name := b[start : i-1]
	i = skipSpace(b, i)
	if i >= len(b) || b[i] != ':' {
		return i, nil, false
	}
	return skipSpace(b, i+1), name, true
}

// modelKey reports whether a raw (escaped, strictly scanned) key is
// exactly "model" and whether it is "model" in any letter case. A key with
// escapes is decoded first; that is rare and may allocate.
func modelKey(raw []byte) (exact, anyCase bool) {
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw) == "model", len(raw) == 5 && bytes.EqualFold(raw, []byte("model"))
	}
	var k string
	quoted := make([]byte, 0, len(raw)+2)
	quoted = append(append(append(quoted, '"'), raw...), '"')
	if json.Unmarshal(quoted, &k) != nil {
		return false, false
	}
	return k == "model", strings.EqualFold(k, "model")
}

// skipString returns the index after the closing quote of the string whose
// content starts at i (b[i-1] is its opening quote). Only the closing
// quote is looked for, with bytes.IndexByte (vectorised in the standard
// library); the content is not checked. A quote preceded by an odd number
// of backslashes is escaped (`\\` is an escaped backslash), so the search
// goes on after it. That is where every JSON parser ends the string.
//
// Linear on any input: each backslash run is counted once, by the quote
// that follows it, because a run stops at the previous quote.
func skipString(b []byte, i int) (int, bool) {
	for {
		j := bytes.IndexByte(b[i:], '"')
		if j < 0 {
			return len(b), false
		}
		i += j
		// b[i-1] exists: at worst it is the opening quote.
		if b[i-1] != '\\' || !oddBackslashes(b, i) {
			return i + 1, true
		}
		i++
	}
}

// oddBackslashes reports whether the run of backslashes ending just before
// q is odd. The run cannot go past the string's opening quote.
func oddBackslashes(b []byte, q int) bool {
	k := q - 1
	for b[k-1] == '\\' {
		k--
	}
	return (q-k)%2 == 1
}

func skipSpace(b []byte, i int) int {
	for i < len(b) {
		switch b[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}

func hasLiteral(b []byte, i int, lit string) bool {
	return len(b)-i >= len(lit) && string(b[i:i+len(lit)]) == lit
}

const (
	ones  = 0x0101010101010101
	highs = 0x8080808080808080
)

// specialMask flags (in the high bit of each byte) the bytes of w that a
// string scan must stop at: '"', '\\' and control characters (< 0x20).
// The lowest flagged byte is exact; flags above it may be spurious.
func specialMask(w uint64) uint64 {
	quote := w ^ (ones * '"')
	slash := w ^ (ones * '\\')
	return ((quote-ones)&^quote | (slash-ones)&^slash | (w-ones*0x20)&^w) & highs
}

// strictString reads a string from i (just after the opening quote) and
// returns the index after the closing quote. Unlike skipString it checks
// the content as RFC 8259 does: no control characters, only the defined
// escapes, four hex digits after \u. It scans eight bytes at a time.
func strictString(b []byte, i int) (int, bool) {
	for {
		// Jump to the next quote, backslash or control byte.
		for i+8 <= len(b) {
			if m := specialMask(binary.LittleEndian.Uint64(b[i:])); m != 0 {
				i += bits.TrailingZeros64(m) >> 3
				break
			}
			i += 8
		}
		for i < len(b) && b[i] != '"' && b[i] != '\\' && b[i] >= 0x20 {
			i++
		}
		if i >= len(b) {
			return i, false
		}
		switch c := b[i]; {
		case c == '"':
			return i + 1, true
		case c == '\\':
			if i+1 >= len(b) {
				return i, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) || !isHex(b[i+5]) {
					return i, false
				}
				i += 6
			default:
				return i, false
			}
		default: // a control character
			return i, false
		}
	}
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

// scanNumber reads -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
func scanNumber(b []byte, i int) (int, bool) {
	if b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	default:
		return i, false
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || !isDigit(b[i]) {
			return i, false
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || !isDigit(b[i]) {
			return i, false
		}
		for i < len(b) && isDigit(b[i]) {
			i++
		}
	}
	return i, true
}
