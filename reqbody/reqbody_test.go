package reqbody

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
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
	out := joined(Splice([]byte(body), m, "Qwen/Qwen3-8B"))
	want := strings.Replace(body, `"model":"helexa/small"`, `"model":"Qwen/Qwen3-8B"`, 1)
	if string(out) != want {
		t.Fatalf("rewrite changed more than the model value")
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

func TestSpliceAliasesBody(t *testing.T) {
	body := []byte(`{"model":"helexa/small","messages":[]}`)
	orig := bytes.Clone(body)
	m := findOK(t, string(body), "helexa/small")
	if m.start != bytes.Index(body, []byte(`"helexa`)) || m.end != bytes.Index(body, []byte(`,"messages`)) {
		t.Fatalf("span [%d,%d) is not the quoted model value", m.start, m.end)
	}
	before, value, after := Splice(body, m, `Qwen/"8B"`)
	if string(before) != `{"model":` || string(value) != `"Qwen/\"8B\""` || string(after) != `,"messages":[]}` {
		t.Fatalf("pieces %q %q %q", before, value, after)
	}
	if &before[0] != &body[0] || &after[0] != &body[m.end] {
		t.Fatal("before/after are copies, not slices of the body")
	}
	_ = append(before, "XXXX"...) // must not write into body
	if !bytes.Equal(body, orig) {
		t.Fatalf("appending to before changed the body: %q", body)
	}
}

// joined is the body Envoy receives from Splice's pieces.
func joined(before, value, after []byte) []byte {
	return bytes.Join([][]byte{before, value, after}, nil)
}
