package catalogue

import (
	"errors"
	"regexp"
	"strings"
	"testing"
)

// A value of the wrong type is reported in the file's terms ("must be a
// string"), never with the Go type it would have been decoded into.
func TestTypeErrorsSayWhatTheValueMustBe(t *testing.T) {
	const model = "[[models]]\nid = \"m\"\nharness = \"candle\"\n"
	cases := []struct {
		name, toml, key, msg string
	}{
		{"id not a string", "[[models]]\nid = 5\nharness = \"c\"\n", "models.id", "must be a string, not an integer"},
		{"harness not a string", "[[models]]\nid = \"m\"\nharness = true\n", "models.harness", "must be a string, not a boolean (true or false)"},
		{"vram_mb a string", model + "vram_mb = \"big\"\n", "models.vram_mb", "must be a whole number, not a string"},
		{"min_devices a float", model + "min_devices = 1.5\n", "models.min_devices", "must be a whole number, not a number with a fraction (float)"},
		{"residency_priority a boolean", model + "residency_priority = true\n", "models.residency_priority", "must be a whole number, not a boolean"},
		{"pinned_on a string", model + "pinned_on = \"beast\"\n", "models.pinned_on", `must be a list of strings, e.g. ["a", "b"], not a string`},
		{"pinned_on element", model + "pinned_on = [\"beast\", 2]\n", "models.pinned_on", `must be a list of strings, e.g. ["a", "b"]; one of its elements is an integer`},
		{"capabilities a string", model + "capabilities = \"text\"\n", "models.capabilities", "must be a list of strings"},
		{"limit a number", model + "limit = 3\n", "models.limit", "must be a table, e.g. limit = { context = 32768, output = 8192 }, not an integer"},
		{"limit.context a string", model + "limit = { context = \"x\" }\n", "models.limit", "must be a whole number, not a string"},
		{"cost a number", model + "cost = 3\n", "models.cost", "must be a table, e.g. cost = { input = 0.10, output = 0.40 }, not an integer"},
		{"cost.input a string", model + "cost.input = \"x\"\n", "models.cost.input", "must be a number, not a string"},
		{"alias target a number", "[aliases]\n\"a\" = 5\n", "aliases.a", "must be a string, not an integer"},
		{"aliases not a table", "aliases = 5\n", "aliases", `must be a table of "name" = "model id" lines, not an integer`},
		{"models not an array of tables", "models = 5\n", "models", "must be an array of tables, each starting with [[models]], not an integer"},
		{"id a date", "[[models]]\nid = 2024-01-01\nharness = \"c\"\n", "models.id", "must be a string, not a local date"},
	}
	goType := regexp.MustCompile(`catalogue\.|int64|float64|\[\]string|map\[|struct field|of type`)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.toml))
			var ve *ValidationError
			if !errors.As(err, &ve) || len(ve.Problems) != 1 {
				t.Fatalf("Parse: %v, want one problem", err)
			}
			p := ve.Problems[0]
			if p.Key != tc.key || !strings.Contains(p.Message, tc.msg) || p.Line == 0 {
				t.Errorf("problem %q (key %q, line %d), want key %q with %q and a position", p.Message, p.Key, p.Line, tc.key, tc.msg)
			}
			if goType.MatchString(err.Error()) {
				t.Errorf("the error names Go types: %q", err)
			}
		})
	}
}

// Messages go-toml writes that are not type mismatches are kept.
func TestDescribeDecodeErrorKeepsOtherMessages(t *testing.T) {
	for _, msg := range []string{
		"toml: decimal number is too large to fit in a 64-bit signed integer",
		"cannot decode TOML integer into some.Unknown",
	} {
		if got := describeDecodeError(msg); got != strings.TrimPrefix(msg, "toml: ") {
			t.Errorf("describeDecodeError(%q) = %q", msg, got)
		}
	}
}
