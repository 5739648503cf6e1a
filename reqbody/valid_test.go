package reqbody

import (
	"encoding/json"
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
}

func TestValidMatchesEncodingJSON(t *testing.T) {
	for _, s := range validSeeds {
		if got, want := Valid([]byte(s)), json.Valid([]byte(s)); got != want {
			t.Errorf("Valid(%q) = %v, encoding/json says %v", s, got, want)
		}
	}
	deep := strings.Repeat("[", 100000) + strings.Repeat("]", 100000)
	if !Valid([]byte(deep)) {
		t.Error("deep nesting rejected")
	}
	if Valid([]byte(deep[:len(deep)-1])) {
		t.Error("unbalanced deep nesting accepted")
	}
}

// FuzzValid pins Valid to encoding/json.Valid on any input.
func FuzzValid(f *testing.F) {
	for _, s := range validSeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := Valid(b), json.Valid(b); got != want {
			t.Fatalf("Valid(%q) = %v, encoding/json says %v", b, got, want)
		}
	})
}

func benchBody(size int) []byte {
	head := `{"model":"Qwen/Qwen3-8B","messages":[{"role":"user","content":"`
	tail := `"}],"stream":true}`
	return []byte(head + strings.Repeat("lorem ipsum dolor sit amet, \\\"quoted\\\" ", size/20)[:size-len(head)-len(tail)] + tail)
}

func BenchmarkValid(b *testing.B) {
	for _, c := range []struct {
		name string
		body []byte
	}{{"escaped", benchBody(1 << 20)}, {"plain", plainBody(1 << 20)}} {
		b.Run(c.name, func(b *testing.B) { benchValid(b, c.body) })
	}
}

func plainBody(size int) []byte {
	head := `{"model":"Qwen/Qwen3-8B","messages":[{"role":"user","content":"`
	tail := `"}],"stream":true}`
	return []byte(head + strings.Repeat("lorem ipsum ", size/10)[:size-len(head)-len(tail)] + tail)
}

func benchValid(b *testing.B, body []byte) {
	b.Run("reqbody", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if !Valid(body) {
				b.Fatal("invalid")
			}
		}
	})
	b.Run("gjson", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if !gjson.ValidBytes(body) {
				b.Fatal("invalid")
			}
		}
	})
}
