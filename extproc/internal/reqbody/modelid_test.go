package reqbody

import (
	"fmt"
	"strings"
	"testing"
	"unicode"

	"github.com/helexa/cortex-extproc/internal/apierr"
)

// Model ids are plain text: C0 and C1 controls, bidirectional controls and
// every other invisible format character (Unicode category Cf) are a 400
// naming the code point, raw in the body or escaped.
func TestModelIDFormatCharacters(t *testing.T) {
	for _, c := range []struct {
		r    rune
		want string
	}{
		{0x0085, "control character U+0085"}, // NEL, C1
		{0x0080, "control character U+0080"},
		{0x009f, "control character U+009F"},
		{0x202e, "bidirectional control character U+202E"}, // RLO
		{0x202a, "bidirectional control character U+202A"},
		{0x2066, "bidirectional control character U+2066"},
		{0x2069, "bidirectional control character U+2069"},
		{0x200e, "bidirectional control character U+200E"},
		{0x200f, "bidirectional control character U+200F"},
		{0x061c, "bidirectional control character U+061C"},
		{0x200b, "format character U+200B"}, // zero-width space
		{0xfeff, "format character U+FEFF"}, // byte-order mark
		{0x00ad, "format character U+00AD"}, // soft hyphen
		{0xe0041, "format character U+E0041"},
	} {
		id := "Qwen/Qwen3" + string(c.r) + "-8B"
		for _, body := range []string{
			`{"model":"` + id + `"}`,
			fmt.Sprintf(`{"model":"Qwen/Qwen3\u%04x-8B"}`, c.r), // escaped (BMP only)
		} {
			if c.r > 0xffff && strings.Contains(body, `\u`) {
				continue
			}
			_, err := Find([]byte(body))
			if err == nil {
				t.Errorf("%U: %q accepted", c.r, body)
				continue
			}
			if err.Status != 400 || err.Reason != apierr.ReasonInvalidModelID || !strings.Contains(err.Message, c.want) ||
				!strings.Contains(err.Message, "send the model id as plain text") {
				t.Errorf("%U: %d %s %q; want 400 invalid_model_id naming %q and saying to send plain text", c.r, err.Status, err.Reason, err.Message, c.want)
			}
		}
	}
	// Printable non-ASCII is fine, and so are separators that are not Cf.
	for _, id := range []string{"模型/ü", "Qwen/Qwen3-8B-é", "a\u2028b", "emoji-\U0001F600", "x\u00a0y"} {
		if err := CheckID(id); err != nil {
			t.Errorf("%q refused: %s", id, err.Message)
		}
	}
}

// Every Cf rune of the Unicode tables and every C1 control is refused;
// CheckID's ASCII fast path hands any non-ASCII byte to the slow path.
func TestCheckIDRefusesEveryFormatAndC1Rune(t *testing.T) {
	n := 0
	for _, table := range []*unicode.RangeTable{unicode.Cf} {
		for _, r16 := range table.R16 {
			for r := rune(r16.Lo); r <= rune(r16.Hi); r += rune(r16.Stride) {
				n++
				if CheckID("a"+string(r)+"b") == nil {
					t.Errorf("%U (Cf) accepted", r)
				}
			}
		}
		for _, r32 := range table.R32 {
			for r := rune(r32.Lo); r <= rune(r32.Hi); r += rune(r32.Stride) {
				n++
				if CheckID("a"+string(r)+"b") == nil {
					t.Errorf("%U (Cf) accepted", r)
				}
			}
		}
	}
	for r := rune(0x80); r <= 0x9f; r++ {
		n++
		if err := CheckID(string(r)); err == nil || !strings.Contains(err.Message, fmt.Sprintf("%U", r)) {
			t.Errorf("%U (C1) accepted or not named: %v", r, err)
		}
	}
	if n < 150 {
		t.Fatalf("checked only %d runes", n)
	}
}

// BenchmarkCheckID: an ASCII id (every real one) and one with a non-ASCII
// character, which takes the slow path.
func BenchmarkCheckID(b *testing.B) {
	for _, c := range []struct{ name, id string }{
		{"ascii", "Qwen/Qwen3.6-27B-Instruct-GGUF"},
		{"non-ascii", "Qwen/Qwen3.6-27B-Instrüct-GGUF"},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if CheckID(c.id) != nil {
					b.Fatal("refused")
				}
			}
		})
	}
}
