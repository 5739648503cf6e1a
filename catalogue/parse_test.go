package catalogue

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

const examplePath = "testdata/cortex-models.example.toml"

func TestParseShippedExample(t *testing.T) {
	data, err := os.ReadFile(examplePath)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Parse(data)
	if err != nil {
		t.Fatalf("the shipped example must load unchanged: %v", err)
	}

	var ids []string
	for _, p := range c.Models() {
		ids = append(ids, p.ID)
	}
	want := []string{"Qwen/Qwen3-8B", "Qwen/Qwen3.6-27B", "Tongyi-MAI/Z-Image-Turbo", "unsloth/Qwen3-0.6B-GGUF"}
	if !reflect.DeepEqual(ids, want) {
		t.Fatalf("models = %q, want %q", ids, want)
	}
	sum := sha256.Sum256(data)
	if c.Hash != hex.EncodeToString(sum[:]) {
		t.Errorf("Hash = %q, want the hex sha256 of the file", c.Hash)
	}
	if len(c.Warnings()) != 0 {
		t.Errorf("warnings on the shipped example: %v", c.Warnings())
	}
	if len(c.Aliases()) != 0 {
		t.Errorf("aliases are commented out in the example, got %v", c.Aliases())
	}

	big := c.Profile("Qwen/Qwen3.6-27B")
	if big == nil {
		t.Fatal("Qwen/Qwen3.6-27B missing")
	}
	if big.Priority() != 300 || c.Priority("Qwen/Qwen3.6-27B") != 300 {
		t.Errorf("priority = %d, want 300", big.Priority())
	}
	if big.Limit == nil || *big.Limit != (Limit{Context: 32768, Input: 28672, Output: 4096}) {
		t.Errorf("dotted limit.* keys: got %+v", big.Limit)
	}
	if big.Cost == nil || big.Cost.Input == nil || *big.Cost.Input != 0 || big.Cost.Output == nil || *big.Cost.Output != 0 {
		t.Errorf("cost.input/output = 0.0 must be explicit zeros (intentionally free), got %+v", big.Cost)
	}
	if big.Cost != nil && big.Cost.CacheRead != nil {
		t.Errorf("cost.cache_read is absent in the file, got %v", *big.Cost.CacheRead)
	}
	if big.Devices() != 2 || big.MinDeviceVRAMMB != 24000 || big.VRAMMB != 54000 || big.Harness != "candle" {
		t.Errorf("Qwen/Qwen3.6-27B sizing = %+v", big)
	}
	if !reflect.DeepEqual(big.PinnedOn, []string{"your-multi-gpu-neuron"}) || !reflect.DeepEqual(big.Capabilities, []string{"text", "reasoning"}) {
		t.Errorf("pinned_on/capabilities = %q / %q", big.PinnedOn, big.Capabilities)
	}

	mid := c.Profile("Qwen/Qwen3-8B")
	if mid.Cost != nil {
		t.Errorf("Qwen/Qwen3-8B has no cost block and must be 'not priced' (nil), got %+v", mid.Cost)
	}
	if mid.Priority() != DefaultPriority {
		t.Errorf("unset priority = %d, want %d", mid.Priority(), DefaultPriority)
	}
	if q := c.Profile("unsloth/Qwen3-0.6B-GGUF"); q.Quant != "Q4_K_M" || q.LoadID() != "unsloth/Qwen3-0.6B-GGUF" {
		t.Errorf("GGUF profile: quant %q, load id %q", q.Quant, q.LoadID())
	}
}

func TestParseDefaultsAndInlineTables(t *testing.T) {
	c, err := Parse([]byte(`
[[models]]
id = "Qwen/Qwen3.6-27B"
harness = "candle"
pinned_on = ["beast"]
limit = { context = 32768, output = 8192 }
cost = { input = 0.10, output = 0.40 }

[[models]]
id = "Helexa/Qwen3.6-27B-Uncensored"
harness = "candle"
source = "helexa"
cost.input = 0
cost.cache_read = 1

[aliases]
"helexa/large" = "Qwen/Qwen3.6-27B"
"Helexa/Large.V2" = "Helexa/Qwen3.6-27B-Uncensored"
`))
	if err != nil {
		t.Fatal(err)
	}
	pinned := c.Profile("Qwen/Qwen3.6-27B")
	if pinned.Priority() != PinnedDefaultPriority {
		t.Errorf("pinned profile without priority = %d, want %d", pinned.Priority(), PinnedDefaultPriority)
	}
	if pinned.Limit.Context != 32768 || pinned.Limit.Output != 8192 || *pinned.Cost.Input != 0.10 || *pinned.Cost.Output != 0.40 {
		t.Errorf("inline tables: limit %+v cost in=%v", pinned.Limit, *pinned.Cost.Input)
	}
	h := c.Profile("Helexa/Qwen3.6-27B-Uncensored")
	if got := h.LoadID(); got != "helexa:Helexa/Qwen3.6-27B-Uncensored" {
		t.Errorf("LoadID = %q", got)
	}
	if h.Cost.Input == nil || *h.Cost.Input != 0 || h.Cost.Output != nil || *h.Cost.CacheRead != 1 {
		t.Errorf("integer costs: %+v", h.Cost)
	}
	// Alias names keep their case and dots (Viper would have mangled both).
	if got := c.ResolveAlias("Helexa/Large.V2"); got != "Helexa/Qwen3.6-27B-Uncensored" {
		t.Errorf("ResolveAlias(Helexa/Large.V2) = %q", got)
	}
}

func TestResolveAliasIsFlat(t *testing.T) {
	c, err := Parse([]byte(`
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"

[aliases]
"helexa/balanced" = "Qwen/Qwen3-8B"
"helexa/small" = "Qwen/Qwen3-1.7B"
`))
	if err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]string{
		"helexa/balanced": "Qwen/Qwen3-8B",
		"helexa/small":    "Qwen/Qwen3-1.7B", // a model only a neuron has
		"Qwen/Qwen3-8B":   "Qwen/Qwen3-8B",
		"nobody/unknown":  "nobody/unknown",
	} {
		if got := c.ResolveAlias(in); got != want {
			t.Errorf("ResolveAlias(%q) = %q, want %q", in, got, want)
		}
	}
	if !c.IsAlias("helexa/small") || c.IsAlias("Qwen/Qwen3-8B") {
		t.Error("IsAlias wrong")
	}
	// The alias to a model outside the catalogue is allowed but flagged.
	if !hasProblem(c.Warnings(), `aliases."helexa/small"`, `target "Qwen/Qwen3-1.7B" is not a model in this catalogue`) {
		t.Errorf("warnings = %v", c.Warnings())
	}
}

func TestParseUnknownKeysAreWarnings(t *testing.T) {
	c, err := Parse([]byte(`[server]
port = 1

[[models]]
id = "a"
harness = "candle"
quantt = "q4k"
limit.contxt = 5
`))
	if err != nil {
		t.Fatalf("unknown keys must not block a load: %v", err)
	}
	if c.Profile("a") == nil {
		t.Fatal("model a not loaded")
	}
	w := c.Warnings()
	if !hasProblem(w, "models.quantt", "unknown key") || !hasProblem(w, "models.limit.contxt", "unknown key") || !hasProblem(w, "server", "unknown key") {
		t.Fatalf("warnings = %v", w)
	}
	for _, p := range w {
		if p.Key == "models.quantt" && (p.Line != 7 || p.Column != 1) {
			t.Errorf("quantt position = %d:%d, want 7:1", p.Line, p.Column)
		}
	}
}

func TestParseSyntaxErrorHasPosition(t *testing.T) {
	_, err := Parse([]byte("[[models]]\nid = \"a\"\nharness = \"candle\"\nvram_mb = = 3\n"))
	var ve *ValidationError
	if !errors.As(err, &ve) || len(ve.Problems) != 1 {
		t.Fatalf("err = %v", err)
	}
	if p := ve.Problems[0]; p.Line != 4 || p.Column == 0 || !strings.Contains(err.Error(), "line 4, column") {
		t.Errorf("problem = %+v, error %q", p, err)
	}

	_, err = Parse([]byte("[[models]]\nid = \"a\"\nharness = \"candle\"\nvram_mb = \"big\"\n"))
	if !errors.As(err, &ve) || ve.Problems[0].Line != 4 || !strings.Contains(ve.Problems[0].Key, "vram_mb") {
		t.Errorf("type error = %v (%+v)", err, ve)
	}
}

func TestValidationProblems(t *testing.T) {
	const model = "[[models]]\nid = \"m\"\nharness = \"candle\"\n"
	cases := []struct {
		name string
		toml string
		key  string
		msg  string
	}{
		{"duplicate id", model + model, `models[1] (id "m")`, "duplicate id, first defined at models[0]"},
		{"missing id", "[[models]]\nharness = \"candle\"\n", "models[0]", "id is required"},
		{"spaces in id", "[[models]]\nid = \" m\"\nharness = \"candle\"\n", `models[0] (id " m")`, "leading or trailing spaces"},
		{"missing harness", "[[models]]\nid = \"m\"\n", `models[0] (id "m")`, "harness is required"},
		{"negative vram", model + "vram_mb = -1\n", `models[0] (id "m")`, "vram_mb is -1; it must be 0 or more"},
		{"negative devices", model + "min_devices = -2\n", `models[0] (id "m")`, "min_devices is -2"},
		{"negative device vram", model + "min_device_vram_mb = -5\n", `models[0] (id "m")`, "min_device_vram_mb is -5"},
		{"negative priority", model + "residency_priority = -1\n", `models[0] (id "m")`, "residency_priority is -1"},
		{"negative limit", model + "limit.output = -4\n", `models[0] (id "m")`, "limit.output is -4"},
		{"negative cost", model + "cost.cache_write = -0.5\n", `models[0] (id "m")`, "cost.cache_write is -0.5"},
		{"infinite cost", model + "cost.input = inf\n", `models[0] (id "m")`, "cost.input is +Inf; it must be a finite number"},
		{"empty pinned_on entry", model + "pinned_on = [\"beast\", \"\"]\n", `models[0] (id "m")`, "pinned_on[1] is empty"},
		{"alias of alias", model + "[aliases]\n\"helexa/small\" = \"helexa/tiny\"\n\"helexa/tiny\" = \"m\"\n", `aliases."helexa/small"`,
			`target "helexa/tiny" is itself an alias; aliases are not chained, point it at a model id`},
		{"alias to itself", model + "[aliases]\n\"x\" = \"x\"\n", "aliases.x", "alias points at itself"},
		{"alias equals model id", model + "[aliases]\nm = \"m\"\n", "aliases.m", "alias has the same name as the model at models[0]"},
		{"empty alias target", model + "[aliases]\n\"helexa/small\" = \"\"\n", `aliases."helexa/small"`, "target is empty"},
		{"empty alias name", model + "[aliases]\n\"\" = \"m\"\n", `aliases.""`, "alias name is empty"},
		{"empty file", "  \n", "", "the file is empty"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse([]byte(tc.toml))
			var ve *ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("Parse accepted it (%v, catalogue %v)", err, c)
			}
			if !hasProblem(ve.Problems, tc.key, tc.msg) {
				t.Fatalf("problems = %v, want key %q with %q", ve.Problems, tc.key, tc.msg)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Error() = %q lacks %q", err, tc.msg)
			}
		})
	}
}

func TestValidationReportsEveryProblem(t *testing.T) {
	_, err := Parse([]byte(`
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"

[[models]]
id = "Qwen/Qwen3-8B"
vram_mb = -1

[aliases]
"helexa/small" = "helexa/tiny"
"helexa/tiny" = "Qwen/Qwen3-8B"
"Qwen/Qwen3-8B" = "Qwen/Qwen3-8B"
`))
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("err = %v", err)
	}
	wantKeys := []string{
		`models[1] (id "Qwen/Qwen3-8B")`, // duplicate
		`models[1] (id "Qwen/Qwen3-8B")`, // harness
		`models[1] (id "Qwen/Qwen3-8B")`, // vram_mb
		`aliases."Qwen/Qwen3-8B"`,        // equals a model id
		`aliases."Qwen/Qwen3-8B"`,        // points at itself
		`aliases."helexa/small"`,         // chained
	}
	var keys []string
	for _, p := range ve.Problems {
		keys = append(keys, p.Key)
	}
	if !reflect.DeepEqual(keys, wantKeys) {
		t.Fatalf("problem keys = %q\nwant %q\n(%v)", keys, wantKeys, err)
	}
	if !strings.Contains(err.Error(), "(6 problems)") {
		t.Errorf("Error() = %q", err)
	}
}

func TestLoadFileNamesTheFile(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "models.toml")
	if _, err := LoadFile(missing); err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := LoadFile(dir); err == nil || !strings.Contains(err.Error(), "is a directory") {
		t.Errorf("directory: %v", err)
	}
	bad := filepath.Join(dir, "bad.toml")
	writeFile(t, bad, "[[models]]\nid = \"m\"\n")
	_, err := LoadFile(bad)
	var ve *ValidationError
	if !errors.As(err, &ve) || ve.File != bad || !strings.Contains(err.Error(), "catalogue "+bad+" is invalid: ") {
		t.Errorf("invalid file: %v", err)
	}
	c, err := LoadFile(examplePath)
	if err != nil || len(c.Models()) != 4 {
		t.Errorf("example: %v", err)
	}
}

func TestDiff(t *testing.T) {
	prev := mustParse(t, `
[[models]]
id = "a"
harness = "candle"
[[models]]
id = "b"
harness = "candle"
[aliases]
small = "a"
gone = "a"
same = "b"
`)
	next := mustParse(t, `
[[models]]
id = "b"
harness = "candle"
vram_mb = 10
[[models]]
id = "c"
harness = "candle"
[aliases]
small = "c"
same = "b"
new = "b"
`)
	d := Diff(prev, next)
	want := Changes{Added: []string{"c"}, Removed: []string{"a"}, Changed: []string{"b"}, AliasesChanged: []string{"gone", "new", "small"}}
	if !reflect.DeepEqual(d, want) {
		t.Fatalf("Diff = %+v, want %+v", d, want)
	}
	if got := d.String(); got != "added=[c] removed=[a] changed=[b] aliases_changed=[gone new small]" {
		t.Errorf("String() = %q", got)
	}
	if same := Diff(next, next); !same.Empty() || same.String() != "added=[] removed=[] changed=[] aliases_changed=[]" {
		t.Errorf("self diff = %v", same)
	}
	if fromNothing := Diff(nil, next); !reflect.DeepEqual(fromNothing.Added, []string{"b", "c"}) {
		t.Errorf("Diff(nil, next) = %v", fromNothing)
	}
}

func mustParse(t *testing.T, s string) *Catalogue {
	t.Helper()
	c, err := Parse([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func hasProblem(ps []Problem, key, msg string) bool {
	for _, p := range ps {
		if p.Key == key && strings.Contains(p.Message, msg) {
			return true
		}
	}
	return false
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
