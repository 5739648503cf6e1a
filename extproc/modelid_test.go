package extproc_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
)

// Model ids with C1 controls, bidirectional controls or other invisible
// format characters are a 400 naming the code point, before routing: such
// an id could make one model display as another in a log or a dashboard.
func TestModelIDWithFormatCharactersIs400(t *testing.T) {
	h := startFixture(t)
	for _, c := range []struct {
		name, id, named string
	}{
		{"NEL (C1)", "helexa/small\u0085", "U+0085"},
		{"C1 escaped", `helexa/\u0090small`, "U+0090"},
		{"RLO", "helexa/\u202ellams", "U+202E"},
		{"RLO escaped", `helexa/\u202Ellams`, "U+202E"},
		{"LRI", "\u2066helexa/small\u2069", "U+2066"},
		{"RLM", "helexa/small\u200f", "U+200F"},
		{"ALM", "helexa/\u061csmall", "U+061C"},
		{"zero-width space", "helexa/sm\u200ball", "U+200B"},
		{"BOM", "\ufeffhelexa/small", "U+FEFF"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// Raw in the body, or as the JSON escape the client wrote.
			body := []byte(`{"model":"` + c.id + `","messages":[]}`)
			if !strings.Contains(c.id, `\u`) {
				body, _ = json.Marshal(map[string]any{"model": c.id, "messages": []any{}})
			}
			rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
			checkImmediate(t, rs[len(rs)-1], errCase{status: 400, code: "invalid_request", typ: "invalid_request_error", contains: c.named})
			var env struct{ Error struct{ Message string } }
			if err := json.Unmarshal(rs[len(rs)-1].GetImmediateResponse().GetBody(), &env); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(env.Error.Message, "send the model id as plain text") {
				t.Errorf("message %q does not say to send the id as plain text", env.Error.Message)
			}
			if strings.ContainsAny(env.Error.Message, "\u0085\u0090\u202e\u2066\u2069\u200f\u061c\u200b\ufeff") {
				t.Errorf("message %q carries the character it refuses", env.Error.Message)
			}
		})
	}
}

// Anthropic's path gets the same 400 in its own shape, and the router is
// never asked (no decision, no cold load for a disguised name).
func TestModelIDWithBidiOverrideNeverReachesTheRouter(t *testing.T) {
	cat, snap := fixture()
	cr := &countingRouter{Router: routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)}
	h := start(t, cr, extproc.Options{})
	body := []byte(fmt.Sprintf(`{"model":%q,"max_tokens":5,"messages":[]}`, "Qwen/Qwen3-8B\u202e"))
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body))
	ir := rs[len(rs)-1].GetImmediateResponse()
	if ir == nil || ir.GetStatus().GetCode() != 400 {
		t.Fatalf("reply %v, want an immediate 400", rs[len(rs)-1])
	}
	var env struct {
		Type  string
		Error struct{ Type, Message string }
	}
	if err := json.Unmarshal(ir.GetBody(), &env); err != nil {
		t.Fatal(err)
	}
	if env.Type != "error" || env.Error.Type != "invalid_request_error" || !strings.Contains(env.Error.Message, "U+202E") {
		t.Errorf("Anthropic error %+v, want invalid_request_error naming U+202E", env)
	}
	for k := range setHeaders(ir.GetHeaders()) {
		if strings.HasPrefix(k, "x-cortex-") {
			t.Errorf("refused reply sets %s", k)
		}
	}
	cr.mu.Lock()
	defer cr.mu.Unlock()
	if len(cr.calls) != 0 {
		t.Errorf("router asked for %q", cr.calls)
	}
}
