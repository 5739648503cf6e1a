package reqbody

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/tidwall/gjson"
)

// findOK runs Find on body and fails unless it routes on want.
func findOK(t *testing.T, body, want string) Model {
	t.Helper()
	m, err := Find([]byte(body))
	if err != nil {
		t.Fatalf("Find(%.80q): %d %s, want model %q", body, err.Status, err.Message, want)
	}
	if m.ID != want {
		t.Fatalf("Find(%.80q) = %q, want %q", body, m.ID, want)
	}
	return m
}

// findErr runs Find on body and fails unless it is a 400 saying msg.
func findErr(t *testing.T, body, msg string) {
	t.Helper()
	m, err := Find([]byte(body))
	if err == nil {
		t.Fatalf("Find(%.80q) = %q, want a 400 %q", body, m.ID, msg)
	}
	if err.Status != 400 || !strings.Contains(err.Message, msg) {
		t.Fatalf("Find(%.80q): %d %q, want a 400 %q", body, err.Status, err.Message, msg)
	}
}

const notJSON = "request body is not valid JSON"

// One pass still finds a model that comes after a large messages array,
// and the rewrite lands on it.
func TestFindModelLastAfterLargeMessages(t *testing.T) {
	msgs := make([]string, 0, 1000)
	for len(strings.Join(msgs, ",")) < 100<<10 {
		msgs = append(msgs, `{"role":"user","content":"line \"quoted\" \\ with a \"model\": \"decoy\"\n"}`)
	}
	body := `{"messages":[` + strings.Join(msgs, ",") + `],"stream":true,"model":"helexa/small"}`
	m := findOK(t, body, "helexa/small")
	if m.Near() {
		t.Fatal("a model after 100 KB of messages is Near")
	}
	want := strings.Replace(body, `"model":"helexa/small"`, `"model":"Qwen/Qwen3-8B"`, 1)
	if out := rewritten([]byte(body), m, "Qwen/Qwen3-8B"); string(out) != want {
		t.Fatalf("rewrite changed more than the model value")
	}
	// sjson rewrites it just the same when asked to walk that far.
	head, ok := appendRewrite(nil, []byte(body), m, Quote("Qwen/Qwen3-8B"))
	if _, end := m.Span(); !ok || string(head)+body[end:] != want {
		t.Fatalf("sjson's rewrite of a far model changed more than the model value")
	}
}

// A string ends at the first quote after an even run of backslashes, as in
// every JSON parser, so text that looks like a key inside a string never
// routes.
func TestFindStringEnds(t *testing.T) {
	for _, c := range []struct{ body, want string }{
		{`{"c":"a\\","model":"m"}`, "m"},
		{`{"c":"a\\\\","model":"m"}`, "m"},
		{`{"c":"a\\\"","model":"m"}`, "m"},
		{`{"c":"a\",\"model\":\"evil","model":"m"}`, "m"},
		{`{"c":"\\\",\"model\":\"evil\\","model":"m"}`, "m"},
		{`{"c":"` + strings.Repeat(`\\`, 5000) + `","model":"m"}`, "m"},
		{`{"c":"` + strings.Repeat(`\"`, 5000) + `","model":"m"}`, "m"},
		{`{"model":"a\\b\"c"}`, `a\b"c`},
		{`{"model":"Qwen\/Qwen3-8B"}`, "Qwen/Qwen3-8B"},
	} {
		if !json.Valid([]byte(c.body)) {
			t.Fatalf("test body is not JSON: %.80q", c.body)
		}
		findOK(t, c.body, c.want)
	}
	// An escaped quote does not end the string: the rest is not JSON.
	findErr(t, `{"c":"a\","model":"m"}`, notJSON)
	findErr(t, `{"model":"m","c":"a\\\"}`, notJSON)
}

// The content of strings Find does not route on is the neuron's to check:
// such a body is routed, and only a strict JSON parser refuses it.
func TestFindLeavesMessageContentToNeuron(t *testing.T) {
	for _, content := range []string{"a\tb", "a\nb", "\x00", "\x1f", `\q`, `\x41`, `\u12zz`, `\u`, `\U0041`, `a\` + "\n"} {
		body := `{"model":"m","messages":[{"role":"user","content":"` + content + `"}],"metadata":{"model":"` + content + `"}}`
		if json.Valid([]byte(body)) {
			t.Fatalf("test body %q is valid JSON; it should not be", body)
		}
		findOK(t, body, "m")
	}
}

// Keys and the model value are checked strictly: they decide the routing.
func TestFindStrictWhereItRoutes(t *testing.T) {
	for _, bad := range []string{"a\tb", "\x01", `\q`, `\u12zz`, `\u00`} {
		findErr(t, `{"model":"m","`+bad+`":1}`, notJSON)                        // top-level key
		findErr(t, `{"model":"m","messages":[{"`+bad+`":"x"}]}`, notJSON)       // nested key
		findErr(t, `{"`+bad+`":1,"model":"m"}`, notJSON)                        // before the model
		findErr(t, `{"model":"`+bad+`"}`, notJSON)                              // the model value
		findErr(t, `{"messages":[],"model":"x`+bad+`","stream":true}`, notJSON) // model last
	}
}

func TestFindStructureErrors(t *testing.T) {
	for _, body := range []string{
		`{"model":"m"`, `{"model":"m`, `{"model":`, `{"model"`, `{`,
		`{"model":"m",}`, `{"model":"m","messages":[1,]}`, `{"model":"m",,"x":1}`,
		`{"model" "m"}`, `{"model":"m","x" 1}`, `{"model":"m","x"}`,
		`{"model":"m"} x`, `{"model":"m"}{}`, `{"model":"m"}]`,
		`{"model":"m","a":01}`, `{"model":"m","a":tru}`, `{"model":"m","a":[}`, `{"model":"m","a":"x}`,
		`{model:"m"}`, `{'model':'m'}`, "\ufeff{\"model\":\"m\"}",
	} {
		findErr(t, body, notJSON)
	}
	findErr(t, ``, "request body is empty")
	findErr(t, `[{"model":"m"}]`, "must be a JSON object")
	findErr(t, ` "model" `, "must be a JSON object")
	findErr(t, `{"messages":[{"model":"nested"}]}`, `has no "model" field`)
	findErr(t, `{"MODEL":"other-case"}`, `has no "model" field`)
}

func TestFindDuplicateModelKeys(t *testing.T) {
	for _, body := range []string{
		`{"model":"a","model":"b"}`,
		`{"model":"a","mod\u0065l":"b"}`,
		`{"mod\u0065l":"a","model":"b"}`,
		`{"model":"a","MODEL":"b"}`,
		`{"MODEL":"a","model":"b"}`,
		`{"model":"a","messages":[],"Model":{"x":1}}`,
	} {
		findErr(t, body, `more than one "model" field`)
	}
	// As before: the first exact "model" is checked for its type first.
	findErr(t, `{"model":1,"MODEL":"b"}`, `"model" must be a string, got a number`)
}

func TestFindModelKinds(t *testing.T) {
	for value, want := range map[string]string{
		`42`: "a number", `-1.5e3`: "a number", `true`: "a boolean", `false`: "a boolean", `null`: "null",
		`{}`: "an object or array", `{"id":"a"}`: "an object or array", `[]`: "an object or array", `["a"]`: "an object or array",
	} {
		findErr(t, `{"model":`+value+`,"stream":true}`, `"model" must be a string, got `+want)
		findErr(t, `{"stream":true,"model":`+value+`}`, `"model" must be a string, got `+want)
	}
	findErr(t, `{"model":""}`, `"model" is empty`)
	findErr(t, `{"model":"`+strings.Repeat("x", MaxModelLen+1)+`"}`, "model ids are at most")
	findErr(t, "{\"model\":\"a\xffb\"}", "not valid UTF-8")
	findErr(t, "{\"model\":\"\\u0041\xff\"}", "not valid UTF-8")
	findErr(t, `{"model":"a\r\nx-cortex-cluster: evil"}`, "control character")
}

// sjson writes the new model into the caller's buffer: in place when the
// new value is not longer than the old (no allocation at all), into its own
// buffer otherwise; either way the body is neither modified nor copied past
// the model, and what follows it is the caller's to send from the body.
func TestAppendRewrite(t *testing.T) {
	for _, c := range []struct{ old, id, how string }{
		{"helexa/balanced", "Qwen/Qwen3-8B", "shorter"},
		{"helexa/qwen8b", "Qwen/Qwen3-8B", "same length"},
		{"helexa/small", "Qwen/Qwen3-1.7B", "longer"},
		{"helexa/small", `Qwen/"8B"`, "escaped"},
	} {
		t.Run(c.how, func(t *testing.T) {
			body := []byte(`{"model":"` + c.old + `","messages":[{"role":"user","content":"hi"}]}`)
			orig := bytes.Clone(body)
			m := findOK(t, string(body), c.old)
			if !m.Near() {
				t.Fatal("a model first in the body is not Near")
			}
			start, end := m.Span()
			if start != bytes.IndexByte(body, ':')+1 || string(body[start:end]) != `"`+c.old+`"` {
				t.Fatalf("span [%d,%d) is not the quoted model value", start, end)
			}
			value := Quote(c.id)
			dst := make([]byte, 3, 3+max(end, start+len(value)))
			copy(dst, "PFX")
			out, ok := AppendRewrite(dst, body, m, value)
			if !ok {
				t.Fatal("AppendRewrite refused a Near model")
			}
			want := `PFX{"model":` + string(value)
			if string(out) != want || &out[0] != &dst[0] {
				t.Fatalf("AppendRewrite = %q (in the caller's buffer: %v), want %q", out, &out[0] == &dst[0], want)
			}
			if !bytes.Equal(body, orig) {
				t.Fatalf("AppendRewrite changed the body: %q", body)
			}
			if got := string(out[3:]) + string(body[end:]); got != strings.Replace(string(body), `"`+c.old+`"`, string(value), 1) {
				t.Fatalf("rewritten body %q", got)
			}
			allocs := testing.AllocsPerRun(100, func() { AppendRewrite(dst[:3], body, m, value) })
			if inPlace := len(value) <= end-start; inPlace && allocs != 0 {
				t.Errorf("%v allocations; sjson must write in place into the caller's buffer", allocs)
			}
		})
	}
}

// Near is decided by where the model value ends; both sides of the bound
// give the same body.
func TestNearLimit(t *testing.T) {
	for _, pad := range []int{0, 1} {
		// {"a":"xxx…","model":"helexa/small"} with the value ending at
		// NearLimit+pad.
		tail := `","model":"helexa/small"`
		fill := NearLimit + pad - len(`{"a":"`) - len(tail)
		body := `{"a":"` + strings.Repeat("x", fill) + tail + `}`
		m := findOK(t, body, "helexa/small")
		if _, end := m.Span(); end != NearLimit+pad || m.Near() != (pad == 0) {
			t.Fatalf("value ends at %d: Near %v", end, m.Near())
		}
		want := strings.Replace(body, `"helexa/small"`, `"Qwen/Qwen3-1.7B"`, 1)
		if got := rewritten([]byte(body), m, "Qwen/Qwen3-1.7B"); string(got) != want {
			t.Fatalf("pad %d: rewritten %q", pad, got)
		}
	}
}

// rewritten is the body Envoy receives for body with its model m replaced
// by id, built as the reply does: sjson's rewrite and the rest of the
// body, or for a model that is not Near the splice.
func rewritten(body []byte, m Model, id string) []byte {
	value := Quote(id)
	start, end := m.Span()
	if head, ok := AppendRewrite(nil, body, m, value); ok {
		return append(head, body[end:]...)
	}
	return bytes.Join([][]byte{body[:start], value, body[end:]}, nil)
}

// BenchmarkRewrite is Find plus the rewrite to a longer id on a 1 MB chat
// body, as the reply makes it, with "model" first (sjson rewrites the body
// up to it) and last (the splice, which writes nothing: the reply
// references the body around the value). walk-last is what gjson and sjson
// would cost were they to find a model sent last themselves: gjson.GetBytes
// and sjson's own lookup each walk the whole body, and sjson's region is
// the whole body; gjson-walk-last is gjson's walk alone (BENCHMARKS.md,
// "gjson and sjson on the request path").
func BenchmarkRewrite(b *testing.B) {
	value := Quote("Qwen/Qwen3-30B-A3B-Instruct")
	first, last := benchBody(1<<20, true, false), benchBody(1<<20, true, true)
	dst := make([]byte, 0, 2<<20)
	for _, c := range []struct {
		name string
		body []byte
		run  func(body []byte, m Model) []byte
	}{
		{"first", first, func(body []byte, m Model) []byte {
			out, _ := AppendRewrite(dst, body, m, value)
			return out
		}},
		{"last", last, func(body []byte, m Model) []byte {
			// Not Near: nothing to write here; the reply references the
			// body around the value.
			out, _ := AppendRewrite(dst, body, m, value)
			return out
		}},
		{"gjson-walk-last", last, func(body []byte, m Model) []byte {
			_ = gjson.GetBytes(body, "model")
			return nil
		}},
		{"walk-last", last, func(body []byte, m Model) []byte {
			_ = gjson.GetBytes(body, "model")
			out, _ := appendRewrite(dst, body, m, value)
			return out
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.body)))
			b.ReportAllocs()
			for b.Loop() {
				m, err := Find(c.body)
				if err != nil {
					b.Fatal(err.Message)
				}
				c.run(c.body, m)
			}
		})
	}
}
