package reqbody

import (
	"strings"
	"testing"
)

// A client must not be able to show cortex-extproc one model and the neuron
// another. JSON parsers disagree on duplicate keys (Go and Python take the
// last, Go also matches keys ignoring case), so a body with two top-level
// "model" keys is refused instead of routed on the first.
func TestSecondModelKeyIsRefused(t *testing.T) {
	for _, body := range []string{
		`{"model":"helexa/small","model":"secret/model"}`,
		`{"model":"helexa/small","messages":[],"MODEL":"secret/model"}`,
		`{"model":"helexa/small","Model":"secret/model"}`,
		`{"model":"helexa/small","m\u006fdel":"secret/model"}`,
		`{"\u006d\u006f\u0064\u0065\u006c":"helexa/small","model":"secret/model"}`,
	} {
		_, err := Find([]byte(body))
		if err == nil || err.Status != 400 || !strings.Contains(err.Message, "more than one") {
			t.Errorf("%s: got %v, want 400 for a second model key", body, err)
		}
	}
	// Lookalikes are not duplicates: nested keys, values and text.
	for _, body := range []string{
		`{"model":"org/model-8","messages":[{"role":"user","content":"which \"model\" are you? model"}]}`,
		`{"model":"a","metadata":{"model":"b"},"role":"model"}`,
		`{"model":"a","content":"caf\u00e9"}`,
		`{"models":["x"],"model":"a","modelx":1}`,
	} {
		if m, err := Find([]byte(body)); err != nil {
			t.Errorf("%s: %v, want it accepted", body, err)
		} else if m.ID != map[bool]string{true: "org/model-8", false: "a"}[strings.Contains(body, "org/model-8")] {
			t.Errorf("%s: id %q", body, m.ID)
		}
	}
}
