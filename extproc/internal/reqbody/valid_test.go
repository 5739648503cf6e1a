package reqbody

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/tidwall/gjson"
)

var validSeeds = []string{
	`{}`, `[]`, `""`, `0`, `-0`, `1.5e-3`, `true`, `false`, `null`, ` {"a" : [1, 2, {"b": null}], "c": "\u00e9\n"} `,
	`{"model":"helexa\/small","messages":[{"role":"user","content":"h\u00e9llo \"x\""}]}`,
	`{"a":1,}`, `[1,]`, `{"a"}`, `{"a":}`, `{1:2}`, `01`, `1.`, `.5`, `-`, `1e`, `+1`, `"\x"`, `"\u12"`, "\"a\tb\"",
	`[[[[]]]]`, `[[[[]]]`, `{"a":[}`, `nul`, `truex`, `{"a":1}{}`, `"abcdefghijklmnop\"qrstuvwxyz0123456789"`,
	"\"\x7f\x80\xff\"", `{"a":"b"  ,  "c":"d"}`, "", " ", `"unterminated`, `{"a":"b\\`,
	// Where strings end: backslash runs and escaped quotes.
	`["a\\"]`, `["a\\\\"]`, `["a\\\""]`, `["a\"]`, `["\\\\\\\"\\"]`, `["\u0022"]`, `["\u"]`, `["\u0", 1]`,
	// Invalid only inside a skipped string, in a key, in the model value.
	"[\"a\tb\"]", `["\q"]`, `["\u12zz"]`, "{\"a\tb\":1}", `{"\q":1}`, "{\"model\":\"a\tb\"}", `{"model":"\q"}`,
	// The recorded model value, every kind, first of several, nested.
	`{"model":"m","messages":[]}`, `{"messages":[{"model":"inner"}],"model":"last"}`, `{"model":1e5 }`,
	`{"model":true}`, `{"model":false}`, `{"model":null}`, `{"model":{"a":[1,{"b":2}]},"x":3}`, `{"model":[]}`,
	`{"model":{}}`, `{"MODEL":"a","model":"b","Model":"c"}`, `{"mod\u0065l":"a","model":"b"}`, `{"model"  :  "sp" , "x":1}`,
}

// checkScan holds scan to encoding/json on one input:
//   - every body encoding/json accepts, scan accepts;
//   - every body scan accepts and encoding/json refuses is refused for a
//     fault inside a string (or nesting past its depth limit): what scan
//     leaves to the neuron by design;
//   - on a body both accept, the recorded model value (first top-level
//     "model" key, exact case) is what gjson finds, and the count of
//     top-level "model" keys in any case is what encoding/json's decoder
//     sees.
func checkScan(t *testing.T, b []byte) {
	t.Helper()
	s, ok := scan(b)
	valid := json.Valid(b)
	if valid && !ok {
		t.Fatalf("scan rejects %q, which encoding/json accepts", b)
	}
	if !ok {
		return
	}
	if !valid {
		if err := jsonError(b); !leftToNeuron(err) {
			t.Fatalf("scan accepts %q; encoding/json refuses it outside a string: %v", b, err)
		}
		return
	}
	if firstNonSpace(b) != '{' {
		if s != (shape{}) {
			t.Fatalf("scan(%q) recorded %+v for a body that is not an object", b, s)
		}
		return
	}
	r := gjson.GetBytes(b, "model")
	switch {
	case !r.Exists() && s.kind != kindNone:
		t.Fatalf("scan(%q) recorded a model value %q; gjson finds none", b, b[s.start:s.end])
	case r.Exists() && (s.kind != gjsonKind(r.Type) || s.start != r.Index || string(b[s.start:s.end]) != r.Raw):
		t.Fatalf("scan(%q) recorded kind %d at [%d,%d); gjson finds %s %q at %d", b, s.kind, s.start, s.end, r.Type, r.Raw, r.Index)
	}
	if n, _ := topLevelModels(b); s.models != n {
		t.Fatalf("scan(%q) counted %d model keys; encoding/json sees %d", b, s.models, n)
	}
}

func jsonError(b []byte) error {
	var v any
	return json.Unmarshal(b, &v)
}

// leftToNeuron reports whether err is encoding/json refusing a body for
// something scan deliberately does not check (texts from Go 1.26's
// encoding/json/scanner.go).
func leftToNeuron(err error) bool {
	var se *json.SyntaxError
	if !errors.As(err, &se) {
		return false
	}
	for _, where := range []string{" in string literal", " in string escape code", ` in \u hexadecimal character escape`, " exceeded max depth"} {
		if strings.HasSuffix(se.Error(), where) {
			return true
		}
	}
	return false
}

func gjsonKind(t gjson.Type) kind {
	switch t {
	case gjson.String:
		return kindString
	case gjson.Number:
		return kindNumber
	case gjson.True, gjson.False:
		return kindBool
	case gjson.Null:
		return kindNull
	case gjson.JSON:
		return kindContainer
	}
	return kindNone
}

func TestScanAgainstEncodingJSON(t *testing.T) {
	for _, s := range validSeeds {
		checkScan(t, []byte(s))
	}
	// Nesting uses an explicit stack: far deeper than any parser allows is
	// still one pass, no goroutine stack growth, and unbalanced is caught.
	deep := strings.Repeat("[", 100000) + strings.Repeat("]", 100000)
	if _, ok := scan([]byte(deep)); !ok {
		t.Error("deep nesting rejected")
	}
	if _, ok := scan([]byte(deep[:len(deep)-1])); ok {
		t.Error("unbalanced deep nesting accepted")
	}
	checkScan(t, []byte(deep))
}

// A hostile run of backslashes or escaped quotes is skipped correctly: the
// string ends at the first quote after an even run.
func TestSkipStringBackslashRuns(t *testing.T) {
	for n := 0; n <= 9; n++ {
		str := `"` + strings.Repeat(`\`, n) + `"` + `x"`
		end, ok := skipString([]byte(str), 1)
		want := n + 2 // the first quote after the run ends it when n is even
		if n%2 == 1 {
			want = len(str)
		}
		if !ok || end != want {
			t.Errorf("%d backslashes: end %d ok %v, want %d", n, end, ok, want)
		}
	}
	many := `"` + strings.Repeat(`\"`, 100000)
	if _, ok := skipString([]byte(many), 1); ok {
		t.Error("a string of escaped quotes was ended")
	}
	if end, ok := skipString([]byte(many+`"`), 1); !ok || end != len(many)+1 {
		t.Errorf("end %d ok %v, want %d", end, ok, len(many)+1)
	}
}

// FuzzValid holds scan to encoding/json on any input (see checkScan). CI
// runs it by name.
func FuzzValid(f *testing.F) {
	for _, s := range validSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(checkScan)
}

// benchBody returns a JSON body of about size bytes shaped like a chat
// request. plain: one long message of prose without escapes. escaped: chat
// text with a `\n` and a `\"` every 60 bytes, in messages of about 4 KB.
// modelLast puts "model" after everything else, so the whole body is
// scanned before the model is seen.
func benchBody(size int, escaped, modelLast bool) []byte {
	const model = `"model":"Qwen/Qwen3-8B"`
	line, perMessage := "lorem ipsum dolor sit amet consectetur adipiscing elit sed ", size
	if escaped {
		line, perMessage = `she said \"lorem ipsum dolor sit amet, consectetur adipisc.\n`, 4096
	}
	var b bytes.Buffer
	b.Grow(size + 256)
	b.WriteString("{")
	if !modelLast {
		b.WriteString(model + ",")
	}
	b.WriteString(`"messages":[`)
	for n := 0; b.Len() < size-128; n++ {
		if n > 0 {
			b.WriteString(",")
		}
		b.WriteString(`{"role":"user","content":"`)
		for j := 0; j < perMessage/len(line) && b.Len() < size-128; j++ {
			b.WriteString(line)
		}
		b.WriteString(`"}`)
	}
	b.WriteString(`],"stream":true,"max_tokens":512`)
	if modelLast {
		b.WriteString("," + model)
	}
	b.WriteString("}")
	return b.Bytes()
}

// hostileBody is a megabyte of the worst strings for skipString: escaped
// quotes every two bytes and long backslash runs before a quote.
func hostileBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString(`{"model":"Qwen/Qwen3-8B","messages":[`)
	for b.Len() < size-64 {
		b.WriteString(`"` + strings.Repeat(`\"`, 2000) + strings.Repeat(`\\`, 2000) + `",`)
	}
	b.WriteString(`""]}`)
	return b.Bytes()
}

var benchBodies = []struct {
	name string
	body []byte
}{
	{"plain", benchBody(1<<20, false, false)},
	{"escaped", benchBody(1<<20, true, false)},
	{"model-last", benchBody(1<<20, true, true)},
	{"hostile", hostileBody(1 << 20)},
}

func TestBenchBodies(t *testing.T) {
	for _, c := range benchBodies {
		checkScan(t, c.body)
		if m, err := Find(c.body); err != nil || m.ID != "Qwen/Qwen3-8B" {
			t.Errorf("%s: Find = %q, %v", c.name, m.ID, err)
		}
	}
}

// BenchmarkScan is the one pass Find makes over a 1 MB body.
func BenchmarkScan(b *testing.B) {
	for _, c := range benchBodies {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.body)))
			for b.Loop() {
				if _, ok := scan(c.body); !ok {
					b.Fatal("invalid")
				}
			}
		})
	}
}

// BenchmarkStrictValidGJSON is strict validation (every string's content
// checked), for reference: what scan avoids by skipping string content.
func BenchmarkStrictValidGJSON(b *testing.B) {
	for _, c := range benchBodies[:3] {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.body)))
			for b.Loop() {
				if !gjson.ValidBytes(c.body) {
					b.Fatal("invalid")
				}
			}
		})
	}
}

// BenchmarkFind is all the work Find does on a 1 MB chat body, with the
// model first and last.
func BenchmarkFind(b *testing.B) {
	for _, c := range []struct {
		name string
		body []byte
	}{{"model-first", benchBody(1<<20, true, false)}, {"model-last", benchBody(1<<20, true, true)}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.body)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := Find(c.body); err != nil {
					b.Fatal(err.Message)
				}
			}
		})
	}
}
