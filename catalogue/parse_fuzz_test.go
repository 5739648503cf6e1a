package catalogue

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the catalogue parser. What must hold
// (FUZZING.md has the long runs):
//   - Parse never panics, and every error is a *ValidationError with at
//     least one problem and a message;
//   - a catalogue it accepts is one the router can trust: model ids are
//     unique, non-empty and without surrounding spaces; no alias equals a
//     model id; no alias points at another alias (resolution is one flat
//     lookup, so a chain would route to an alias name no neuron knows); no
//     alias points at itself or at nothing; Hash is the content's SHA-256.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile(examplePath); err == nil {
		f.Add(data)
	}
	for _, s := range []string{
		"# empty catalogue\n",
		"",
		"[[models]]\nid = \"Qwen/Qwen3-8B\"\nharness = \"candle\"\nvram_mb = 18000\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[aliases]\n\"helexa/small\" = \"a\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[aliases]\nx = \"y\"\ny = \"a\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[aliases]\na = \"a\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[[models]]\nid = \"b\"\nharness = \"candle\"\n[aliases]\na = \"b\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[[models]]\nid = \"a\"\nharness = \"candle\"\n",
		"[[models]]\nid = \" a \"\nharness = \"candle\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\nvram_mb = -1\nmin_devices = -2\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\ncost.input = nan\ncost.output = inf\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\nlimit = { context = 32768, input = 28672, output = 4096 }\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\npinned_on = [\"beast\", \"\"]\nresidency_priority = 300\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\nquant_typo = 1\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[hidden_aliases]\nold = \"a\"\n[aliases]\nold = \"a\"\n",
		"[[models]]\nid = \"a\"\nharness = \"candle\"\n[hidden_aliases]\nh = \"a\"\n[aliases]\nv = \"h\"\n",
		"[aliases]\n\"\" = \"\"\n",
		"[aliases]\n\"Qwen/Qwen3.6-27B\" = \"elsewhere\"\n",
		"models = 5\n",
		"[[models]]\nid = 7\n",
		"[[models]\n",
		"id = \"\\u0000\"\n",
		"\xff\xfe",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Parse error %T (%v), want *ValidationError", err, err)
			}
			if len(ve.Problems) == 0 || err.Error() == "" {
				t.Fatalf("ValidationError without problems: %q", err)
			}
			return
		}
		sum := sha256.Sum256(data)
		if c.Hash != hex.EncodeToString(sum[:]) {
			t.Fatal("Hash is not the SHA-256 of the content")
		}
		seen := map[string]bool{}
		for _, p := range c.Models() {
			if p.ID == "" || strings.TrimSpace(p.ID) != p.ID {
				t.Fatalf("accepted model id %q", p.ID)
			}
			if seen[p.ID] {
				t.Fatalf("duplicate model id %q accepted", p.ID)
			}
			seen[p.ID] = true
			if c.Profile(p.ID) != p {
				t.Fatalf("Profile(%q) does not return its profile", p.ID)
			}
			if strings.TrimSpace(p.Harness) == "" {
				t.Fatalf("model %q accepted without a harness", p.ID)
			}
		}
		for a, target := range c.Aliases() {
			if strings.TrimSpace(a) == "" || strings.TrimSpace(target) == "" {
				t.Fatalf("accepted empty alias %q -> %q", a, target)
			}
			if c.Profile(a) != nil {
				t.Fatalf("alias %q equals a model id", a)
			}
			if c.IsAlias(target) {
				t.Fatalf("alias chain %q -> %q -> %q", a, target, c.ResolveAlias(target))
			}
			if got := c.ResolveAlias(a); got != target {
				t.Fatalf("ResolveAlias(%q) = %q, want %q", a, got, target)
			}
			if r := c.ResolveAlias(c.ResolveAlias(a)); r != target {
				t.Fatalf("resolving twice moves %q from %q to %q", a, target, r)
			}
		}
		for _, w := range c.Warnings() {
			if w.Message == "" {
				t.Fatal("warning without a message")
			}
		}
	})
}
