package catalogue

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// Problem is one thing wrong with a catalogue file, named by its key.
type Problem struct {
	// Key names the offending entry: `models[2] (id "Qwen/Qwen3-8B")`,
	// `aliases."helexa/small"`, `models.quant_typo`. Empty for a problem
	// with the whole file.
	Key string
	// Line and Column are 1-based, set when the position is known (syntax
	// and type errors, unknown keys); 0 otherwise.
	Line, Column int
	// Message says what is wrong and what to do about it.
	Message string
}

// String is "[line L, column C: ]key: message".
func (p Problem) String() string {
	var b strings.Builder
	if p.Line > 0 {
		fmt.Fprintf(&b, "line %d, column %d: ", p.Line, p.Column)
	}
	if p.Key != "" {
		b.WriteString(p.Key)
		b.WriteString(": ")
	}
	b.WriteString(p.Message)
	return b.String()
}

// ValidationError is a catalogue that cannot be used. It lists every problem
// found, not just the first (a syntax error stops parsing, so it comes
// alone).
type ValidationError struct {
	// File is the path the catalogue was read from; empty for Parse.
	File     string
	Problems []Problem
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	b.WriteString("catalogue ")
	if e.File != "" {
		b.WriteString(e.File)
		b.WriteString(" ")
	}
	b.WriteString("is invalid")
	if len(e.Problems) != 1 {
		fmt.Fprintf(&b, " (%d problems)", len(e.Problems))
	}
	for i, p := range e.Problems {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// file is the models.toml layout.
type file struct {
	Models  []*Profile        `toml:"models"`
	Aliases map[string]string `toml:"aliases"`
	// HiddenAliases have the [aliases] format and rules; they route the
	// same way but are not listed on GET /v1/models (internal or
	// deprecated names).
	HiddenAliases map[string]string `toml:"hidden_aliases"`
}

// allAliases merges [aliases] and [hidden_aliases]; a name in both keeps
// its [aliases] target (validate reports the clash).
func (f *file) allAliases() map[string]string {
	all := make(map[string]string, len(f.Aliases)+len(f.HiddenAliases))
	for a, t := range f.HiddenAliases {
		all[a] = t
	}
	for a, t := range f.Aliases {
		all[a] = t
	}
	return all
}

// Parse builds a validated catalogue from models.toml content (the existing
// cortex format, dotted keys and inline tables alike). Every problem found
// is returned together in a *ValidationError. Unknown keys and aliases whose
// target is not a catalogue model are not errors: they are returned by the
// catalogue's Warnings for the caller to log. Hash is the hex SHA-256 of
// data.
func Parse(data []byte) (*Catalogue, error) {
	// An empty file is almost always a write caught half way (an editor or
	// `cat >` truncates before writing); taking it would drop every model.
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &ValidationError{Problems: []Problem{{
			Message: "the file is empty (a write in progress?); a catalogue with no models still needs a comment line",
		}}}
	}

	// go-toml directly, not Viper: Viper lower-cases keys and splits them on
	// dots, which would mangle alias names such as "Qwen/Qwen3.6-27B".
	var f file
	var warnings []Problem
	err := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields().Decode(&f)
	var strict *toml.StrictMissingError
	var decodeErr *toml.DecodeError
	switch {
	case err == nil:
	case errors.As(err, &strict):
		// Strict mode still fills the struct; it only collects the keys
		// it had nowhere to put.
		for i := range strict.Errors {
			e := &strict.Errors[i]
			line, col := e.Position()
			warnings = append(warnings, Problem{
				Key:  formatKey(e.Key()),
				Line: line, Column: col,
				Message: "unknown key, ignored; check its spelling if cortex-extproc should use it",
			})
		}
	case errors.As(err, &decodeErr):
		line, col := decodeErr.Position()
		return nil, &ValidationError{Problems: []Problem{{
			Key:  formatKey(decodeErr.Key()),
			Line: line, Column: col,
			Message: describeDecodeError(decodeErr.Error()) + "; fix the TOML at this position",
		}}}
	default:
		return nil, &ValidationError{Problems: []Problem{{Message: err.Error()}}}
	}

	problems, more := validate(&f)
	warnings = append(warnings, more...)
	if len(problems) > 0 {
		return nil, &ValidationError{Problems: problems}
	}
	sum := sha256.Sum256(data)
	c := New(f.Models, f.allAliases(), hex.EncodeToString(sum[:]))
	if len(f.HiddenAliases) > 0 {
		hidden := make([]string, 0, len(f.HiddenAliases))
		for a := range f.HiddenAliases {
			hidden = append(hidden, a)
		}
		c = c.WithHidden(hidden...)
	}
	c.warnings = warnings
	return c, nil
}

// LoadFile reads and parses the catalogue at path. Errors name the file.
func LoadFile(path string) (*Catalogue, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	c, err := Parse(data)
	if err != nil {
		var ve *ValidationError
		if errors.As(err, &ve) {
			ve.File = path
		}
		return nil, err
	}
	return c, nil
}

// readFile reads the catalogue file, turning the common mistakes into
// errors that say what to do.
func readFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, readError(path, err)
	}
	return data, nil
}

// validate returns the errors and the warnings for a decoded file, in file
// order (aliases sorted by name).
func validate(f *file) (problems, warnings []Problem) {
	fail := func(key, format string, args ...any) {
		problems = append(problems, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
	}
	firstAt := make(map[string]int, len(f.Models))
	for i, p := range f.Models {
		key := modelKey(i, p.ID)
		switch {
		case p.ID == "":
			fail(key, `id is required (the model's repo id, e.g. "Qwen/Qwen3-8B")`)
		case strings.TrimSpace(p.ID) != p.ID:
			fail(key, "id has leading or trailing spaces; no request or neuron would ever match it")
		default:
			if j, dup := firstAt[p.ID]; dup {
				fail(key, "duplicate id, first defined at models[%d]; ids must be unique, remove or merge one", j)
			} else {
				firstAt[p.ID] = i
			}
		}
		if strings.TrimSpace(p.Harness) == "" {
			fail(key, `harness is required (the engine that serves the model, e.g. "candle")`)
		}
		nonNegative := func(field string, v int64) {
			if v < 0 {
				fail(key, "%s is %d; it must be 0 or more", field, v)
			}
		}
		nonNegative("vram_mb", p.VRAMMB)
		nonNegative("min_devices", int64(p.MinDevices))
		nonNegative("min_device_vram_mb", p.MinDeviceVRAMMB)
		if p.ResidencyPriority != nil {
			nonNegative("residency_priority", int64(*p.ResidencyPriority))
		}
		for j, n := range p.PinnedOn {
			if strings.TrimSpace(n) == "" {
				fail(key, "pinned_on[%d] is empty; list neuron names as the neurons report them", j)
			}
		}
		if l := p.Limit; l != nil {
			nonNegative("limit.context", l.Context)
			nonNegative("limit.input", l.Input)
			nonNegative("limit.output", l.Output)
		}
		if c := p.Cost; c != nil {
			for _, t := range []struct {
				name string
				v    *float64
			}{{"cost.input", c.Input}, {"cost.output", c.Output}, {"cost.cache_read", c.CacheRead}, {"cost.cache_write", c.CacheWrite}} {
				// nan and inf are valid TOML but cannot be advertised
				// on /v1/models (JSON has no such numbers).
				if t.v != nil && (*t.v < 0 || math.IsNaN(*t.v) || math.IsInf(*t.v, 0)) {
					fail(key, "%s is %v; it must be a finite number, 0 or more (USD per 1M tokens; 0 means free)", t.name, *t.v)
				}
			}
		}
	}

	aliases := f.allAliases()
	names := make([]string, 0, len(aliases))
	for a := range aliases {
		names = append(names, a)
	}
	sort.Strings(names)
	for _, a := range names {
		target := aliases[a]
		key := "aliases." + formatKeyPart(a)
		if _, hidden := f.HiddenAliases[a]; hidden {
			if _, listed := f.Aliases[a]; listed {
				fail("hidden_aliases."+formatKeyPart(a), "alias is also in [aliases]; keep it in one table ([hidden_aliases] routes it without listing it on /v1/models)")
			} else {
				key = "hidden_aliases." + formatKeyPart(a)
			}
		}
		if strings.TrimSpace(a) == "" {
			fail(key, "alias name is empty; name the alias clients will request")
		}
		if i, isModel := firstAt[a]; isModel {
			fail(key, "alias has the same name as the model at models[%d]; requests for that name would be ambiguous, rename or remove the alias", i)
		}
		_, targetIsModel := firstAt[target]
		// A name that is both (reported above) counts as the model here.
		_, targetIsAlias := aliases[target]
		targetIsAlias = targetIsAlias && !targetIsModel
		switch {
		case strings.TrimSpace(target) == "":
			fail(key, "target is empty; point it at a model id")
		case target == a:
			fail(key, "alias points at itself; point it at a model id")
		case targetIsAlias:
			fail(key, "target %q is itself an alias; aliases are not chained, point it at a model id", target)
		case !targetIsModel:
			// Legitimate when a neuron pre-warms a model the catalogue
			// does not describe, so only a warning.
			warnings = append(warnings, Problem{Key: key, Message: fmt.Sprintf(
				"target %q is not a model in this catalogue; the alias only routes while a neuron has that model", target)})
		}
	}

	if len(f.Models) == 0 && len(aliases) == 0 {
		warnings = append(warnings, Problem{Message: "the catalogue declares no [[models]] and no [aliases]; only models a neuron already has can be served"})
	}
	return problems, warnings
}

// typeMismatch is go-toml's message for a value of the wrong type:
// "cannot decode TOML integer into struct field catalogue.Profile.ID of
// type string" (or "… into string" for a map value or a list element).
var typeMismatch = regexp.MustCompile(`cannot decode TOML ([a-z ]+?) into (?:struct field [\w.*\[\]]*?\.(\w+) of type )?(\S+)$`)

// expected says, in the catalogue's terms, what a Go type of the file
// layout holds.
var expected = map[string]string{
	"string":               "a string",
	"int":                  "a whole number",
	"int64":                "a whole number",
	"float64":              "a number",
	"[]string":             `a list of strings, e.g. ["a", "b"]`,
	"catalogue.Limit":      "a table, e.g. limit = { context = 32768, output = 8192 }",
	"catalogue.Cost":       "a table, e.g. cost = { input = 0.10, output = 0.40 }",
	"map[string]string":    `a table of "name" = "model id" lines`,
	"[]*catalogue.Profile": "an array of tables, each starting with [[models]]",
}

// listFields are the fields that hold a list of strings: go-toml names the
// element type when an element is wrong.
var listFields = map[string]bool{"PinnedOn": true, "Capabilities": true}

// describeDecodeError rewrites go-toml's decode errors, which name Go types
// (`catalogue.Profile.VRAMMB of type int64`), in the file's terms:
// "must be a whole number, not a string".
func describeDecodeError(msg string) string {
	msg = strings.TrimPrefix(msg, "toml: ")
	m := typeMismatch.FindStringSubmatch(msg)
	if m == nil {
		return msg
	}
	found, field, goType := tomlTypeName(m[1]), m[2], m[3]
	if listFields[field] && goType == "string" {
		return "must be " + expected["[]string"] + "; one of its elements is " + found
	}
	want, ok := expected[goType]
	if !ok {
		return msg
	}
	return "must be " + want + ", not " + found
}

// tomlTypeName is go-toml's name of a TOML value type with an article.
func tomlTypeName(t string) string {
	switch t {
	case "integer", "array", "inline table":
		return "an " + t
	case "float":
		return "a number with a fraction (float)"
	case "boolean":
		return "a boolean (true or false)"
	}
	return "a " + t
}

func modelKey(i int, id string) string {
	if id == "" {
		return fmt.Sprintf("models[%d]", i)
	}
	return fmt.Sprintf("models[%d] (id %q)", i, id)
}

var bareKey = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// formatKey writes a key the way it would be written in TOML, quoting the
// parts that need it.
func formatKey(k toml.Key) string {
	parts := make([]string, len(k))
	for i, p := range k {
		parts[i] = formatKeyPart(p)
	}
	return strings.Join(parts, ".")
}

func formatKeyPart(p string) string {
	if bareKey.MatchString(p) {
		return p
	}
	return strconv.Quote(p)
}
