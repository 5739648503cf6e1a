package catalogue

import (
	"errors"
	"testing"
)

const hiddenBase = `
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"

[aliases]
"helexa/balanced" = "Qwen/Qwen3-8B"

[hidden_aliases]
"helexa/internal" = "Qwen/Qwen3-8B"
`

func TestHiddenAliasesRouteButAreMarkedHidden(t *testing.T) {
	c, err := Parse([]byte(hiddenBase))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.ResolveAlias("helexa/internal"); got != "Qwen/Qwen3-8B" {
		t.Errorf("hidden alias resolves to %q, want Qwen/Qwen3-8B", got)
	}
	if !c.IsAlias("helexa/internal") || !c.Hidden("helexa/internal") {
		t.Errorf("helexa/internal: IsAlias=%v Hidden=%v, want both true", c.IsAlias("helexa/internal"), c.Hidden("helexa/internal"))
	}
	if c.Hidden("helexa/balanced") {
		t.Error("an [aliases] entry is reported hidden")
	}
	if len(c.Aliases()) != 2 {
		t.Errorf("Aliases() = %v, want both tables merged", c.Aliases())
	}
	if len(c.Warnings()) != 0 {
		t.Errorf("[hidden_aliases] produced warnings (unknown key?): %v", c.Warnings())
	}
}

func TestHiddenAliasesValidatedLikeAliases(t *testing.T) {
	cases := []struct {
		name, extra, key, msg string
	}{
		{"in both tables", "[hidden_aliases]\n\"helexa/balanced\" = \"Qwen/Qwen3-8B\"\n", `hidden_aliases."helexa/balanced"`, "alias is also in [aliases]"},
		{"chained through a listed alias", "[hidden_aliases]\n\"helexa/x\" = \"helexa/balanced\"\n", `hidden_aliases."helexa/x"`, "is itself an alias"},
		{"equals a model id", "[hidden_aliases]\n\"Qwen/Qwen3-8B\" = \"Qwen/Qwen3-8B\"\n", `hidden_aliases."Qwen/Qwen3-8B"`, "same name as the model"},
	}
	base := "[[models]]\nid = \"Qwen/Qwen3-8B\"\nharness = \"candle\"\n[aliases]\n\"helexa/balanced\" = \"Qwen/Qwen3-8B\"\n"
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(base + tc.extra))
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Parse: %v, want a ValidationError", err)
			}
			if !hasProblem(ve.Problems, tc.key, tc.msg) {
				t.Errorf("problems %v lack %s: %s", ve.Problems, tc.key, tc.msg)
			}
		})
	}
}

func TestDiffReportsAliasHiddenOrShown(t *testing.T) {
	shown, err := Parse([]byte("[[models]]\nid = \"m\"\nharness = \"candle\"\n[aliases]\na = \"m\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	hidden, err := Parse([]byte("[[models]]\nid = \"m\"\nharness = \"candle\"\n[hidden_aliases]\na = \"m\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d := Diff(shown, hidden); len(d.AliasesChanged) != 1 || d.AliasesChanged[0] != "a" {
		t.Errorf("Diff(shown, hidden).AliasesChanged = %v, want [a]", d.AliasesChanged)
	}
}
