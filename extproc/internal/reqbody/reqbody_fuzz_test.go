package reqbody

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// FuzzFindRewrite feeds arbitrary bodies and replacement ids to Find and
// AppendRewrite (the rewrite). What must hold for every input (FUZZING.md
// has the long runs):
//   - none panics;
//   - Find accepts only a JSON object whose top-level "model" is a string
//     that passes CheckID, and its ID is exactly that string as an
//     independent decoder (encoding/json) reads it from the recorded span;
//     the body is valid JSON, or encoding/json refuses it only for a fault
//     inside a string Find does not check (left to the neuron, see the
//     package doc);
//   - Find's Near is where the value ends; for a Near model gjson found it
//     where the validator did;
//   - the rewrite, as the reply builds it (sjson's AppendRewrite for a
//     Near model, the splice otherwise), changes nothing but the model
//     value: every byte before and after the span is kept, the result is
//     as valid as the body, and Find on it returns the new id. sjson's
//     rewrite gives the same bytes at any distance, and never writes into
//     the body or into the caller's bytes before what it appends.
func FuzzFindRewrite(f *testing.F) {
	seeds := []struct{ body, id string }{
		{`{"model":"helexa/small","messages":[{"role":"user","content":"hi"}]}`, "Qwen/Qwen3-1.7B"},
		{`{"messages":[{"role":"user","content":"héllo \"model\": x"}],  "model" : "helexa/small","stream":true}`, "Qwen/Qwen3-8B"},
		{`{"model":"Qwen\/Qwen3-8B"}`, "Qwen/Qwen3-8B"},
		{`{"model":"\u0051wen"}`, "Qwen"},
		{`{"model":"a\"b\\c"}`, "x"},
		{`{"model":"same-len"}`, "SAME-LEN"},
		{`{"model":"","x":1}`, "y"},
		{`{"model":null}`, "y"},
		{`{"model":42}`, "y"},
		{`{"model":["a"]}`, "y"},
		{`{"model":{"id":"a"}}`, "y"},
		{`{"nested":{"model":"inner"},"model":"outer"}`, "z"},
		{`{"model":"first","model":"second"}`, "z"},
		{`{"mod\u0065l":"escaped-key"}`, "z"},
		{`{"Model":"case"}`, "z"},
		{`{"model":"a","MODEL":"b"}`, "z"},
		{`{"model":"a","x":{"model":"b"},"m\u006fdel":"c"}`, "z"},
		{`{"model":"org/model-8","content":"\"model\" \u00e9"}`, "z"},
		{`[{"model":"array"}]`, "z"},
		{`"model"`, "z"},
		{``, "z"},
		{`   `, "z"},
		{`{`, "z"},
		{`{"model":"trunc`, "z"},
		{`{"model":"ok"} trailing`, "z"},
		{`{"model":"ok"}{"model":"two"}`, "z"},
		{"{\"model\":\"a\r\nx-cortex-cluster: evil\"}", "z"},
		{`{"model":"a\r\nx-cortex-cluster: evil"}`, "z"},
		{`{"model":"\u0000"}`, "z"},
		{`{"model":"\ud800"}`, "z"},
		{"{\"model\":\"\xff\xfe\"}", "z"},
		{"\ufeff{\"model\":\"bom\"}", "z"},
		{`{"model":"` + string(bytes.Repeat([]byte("x"), MaxModelLen)) + `"}`, "short"},
		{`{"model":"` + string(bytes.Repeat([]byte("x"), MaxModelLen+1)) + `"}`, "short"},
		{" \t\r\n{\"model\" \t:\r\n\"ws\"\n}\n", "ü/ñ"},
		{`{"model":"x","n":1e400,"s":"\ud83d\ude00"}`, "emoji \U0001F600"},
		// String content Find leaves to the neuron, and where strings end.
		{"{\"model\":\"m\",\"messages\":[{\"content\":\"a\tb \\q \\u12zz\x01\"}]}", "z"},
		{`{"c":"a\",\"model\":\"evil","model":"m"}`, "z"},
		{`{"c":"a\\","model":"m","d":"\\\""}`, "z"},
		{"{\"model\":\"a\tb\"}", "z"},
		{`{"model":"\q"}`, "z"},
		{`{"model":"m","k\q":1}`, "z"},
		{`{"model":"m","mod\u0065l":"n"}`, "z"},
		{"{\"model\":\"\\u0041\xff\"}", "z"},
		// Past NearLimit: gjson reads the value at the validator's span.
		{`{"messages":[{"content":"` + strings.Repeat(`a \"model\": \"x\" `, 40) + `"}],"model":"helexa/small"}`, "Qwen/Qwen3-1.7B"},
		{`{"c":"` + strings.Repeat("x", NearLimit-30) + `","model":"helexa/small"}`, "Qwen/Qwen3-8B"},
		{`{"c":"` + strings.Repeat("x", NearLimit-29) + `","model":"helexa/small"}`, "Qwen/Qwen3-8B"},
		{`{"c":"` + strings.Repeat(`\\`, NearLimit) + `","m\u006fdel":"a\u00e9\"b"}`, "é"},
	}
	for _, s := range seeds {
		f.Add([]byte(s.body), s.id)
	}
	f.Fuzz(func(t *testing.T, body []byte, newID string) {
		orig := bytes.Clone(body)
		m, aerr := Find(body)
		if !bytes.Equal(body, orig) {
			t.Fatal("Find modified its input")
		}
		if aerr != nil {
			if aerr.Status != 400 {
				t.Fatalf("Find error status %d, want 400 (%s)", aerr.Status, aerr.Message)
			}
			return
		}

		// What Find accepted.
		valid := json.Valid(body)
		if err := jsonError(body); !valid && !leftToNeuron(err) {
			t.Fatalf("Find accepted %q, which encoding/json refuses outside a string: %v", body, err)
		}
		if CheckID(m.ID) != nil {
			t.Fatalf("Find returned id %q that CheckID refuses", m.ID)
		}
		if m.start < 0 || m.end > len(body) || m.start >= m.end {
			t.Fatalf("span [%d,%d) outside body of %d bytes", m.start, m.end, len(body))
		}
		var atSpan string
		if err := json.Unmarshal(body[m.start:m.end], &atSpan); err != nil {
			t.Fatalf("span %q is not a JSON string: %v", body[m.start:m.end], err)
		}
		if atSpan != m.ID {
			t.Fatalf("Find ID %q, but the span decodes to %q", m.ID, atSpan)
		}
		if r := gjson.GetBytes(body, "model"); r.Str != m.ID {
			t.Fatalf("Find ID %q, gjson's unescaped value %q", m.ID, r.Str)
		}
		// Exactly one top-level "model" (in any case: Go's decoder ignores
		// case), and an independent decoder agrees on its value: the
		// neuron reads the model we routed.
		if n, v := topLevelModels(body); valid && (n != 1 || v != m.ID) {
			t.Fatalf("Find ID %q, encoding/json sees %d model keys, the last %q", m.ID, n, v)
		}

		if m.Near() != (m.end <= NearLimit) {
			t.Fatalf("Near %v for a value ending at %d", m.Near(), m.end)
		}
		if r := gjson.GetBytes(body, "model"); m.Near() && (r.Index != m.start || r.Raw != string(body[m.start:m.end])) {
			t.Fatalf("Find's span [%d,%d), gjson's value %q at %d", m.start, m.end, r.Raw, r.Index)
		}

		// Rewrite with an arbitrary replacement. Only ids that CheckID
		// accepts ever reach the rewrite in production (catalogue ids and
		// requested ids), but it must hold for any valid UTF-8.
		if !utf8.ValidString(newID) {
			return
		}
		q := Quote(newID)
		want := bytes.Join([][]byte{body[:m.start], q, body[m.end:]}, nil)
		dst := []byte("PFX")
		head, ok := AppendRewrite(dst, body, m, q)
		if ok != m.Near() || string(head[:3]) != "PFX" || (!ok && len(head) != 3) {
			t.Fatalf("AppendRewrite ok %v for Near %v, head %q", ok, m.Near(), head)
		}
		out := want
		if ok {
			out = append(bytes.Clone(head[3:]), body[m.end:]...)
		}
		if forced, ok := appendRewrite([]byte("PFX"), body, m, q); !ok || string(forced[:3]) != "PFX" ||
			!bytes.Equal(append(forced[3:], body[m.end:]...), want) {
			t.Fatalf("sjson's rewrite %q (ok %v) differs from the splice %q", forced, ok, want)
		}
		if !bytes.Equal(body, orig) {
			t.Fatal("the rewrite modified its input")
		}
		if len(out) != len(body)-(m.end-m.start)+len(q) {
			t.Fatalf("rewritten length %d, want %d", len(out), len(body)-(m.end-m.start)+len(q))
		}
		if !bytes.Equal(out[:m.start], body[:m.start]) {
			t.Fatal("bytes before the model value changed")
		}
		if !bytes.Equal(out[m.start+len(q):], body[m.end:]) {
			t.Fatal("bytes after the model value changed")
		}
		if valid && !json.Valid(out) {
			t.Fatalf("rewrite of a valid body is invalid JSON: %q", out)
		}
		if err := jsonError(out); !valid && !leftToNeuron(err) {
			t.Fatalf("rewrite %q is refused by encoding/json outside a string: %v", out, err)
		}
		if CheckID(newID) == nil {
			m2, aerr := Find(out)
			if aerr != nil {
				t.Fatalf("Find on the rewritten body: %s", aerr.Message)
			}
			if m2.ID != newID {
				t.Fatalf("rewritten body's model is %q, want %q", m2.ID, newID)
			}
		}
	})
}

// topLevelModels counts the top-level keys of a JSON object that equal
// "model" after unescaping, ignoring case, and returns the last one's value
// when it is a string (what encoding/json would decode into a struct).
func topLevelModels(body []byte) (n int, last string) {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return 0, ""
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return 0, ""
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return 0, ""
		}
		if strings.EqualFold(key, "model") {
			n++
			last = ""
			_ = json.Unmarshal(v, &last)
		}
	}
	return n, last
}
