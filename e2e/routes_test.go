package e2e

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/openai/openai-go/v3/option"
)

// Only inference is routed (routing.md): envoy.yaml forwards POST to the
// inference paths and GET /v1/models[/{id}]; everything else, a neuron's
// management API included, gets Envoy's own 404 JSON, with ext_proc off.

// notRoutedRequest is a request envoy.yaml must answer itself.
type notRoutedRequest struct{ method, path, body string }

// sendRaw sends method path with a JSON body (if any) through front and
// returns status, content-type, body and the access log entry.
func sendRaw(t *testing.T, e *envoyLite, front string, req notRoutedRequest, headers ...string) (int, string, []byte, accessEntry) {
	t.Helper()
	var body io.Reader
	if req.body != "" {
		body = strings.NewReader(req.body)
	}
	r, err := http.NewRequest(req.method, front+req.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if req.body != "" {
		r.Header.Set("content-type", "application/json")
	}
	id := newUUID()
	r.Header.Set("x-request-id", id)
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(r)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	e.bg.Wait()
	return resp.StatusCode, resp.Header.Get("content-type"), b, entry(t, e, id)
}

// expectLocal404 checks Envoy's own 404 JSON: no ext_proc message, no
// upstream cluster.
func expectLocal404(t *testing.T, req notRoutedRequest, status int, ctype string, body []byte, ent accessEntry) {
	t.Helper()
	var e struct {
		Error struct{ Message, Type, Code string }
	}
	if status != 404 || ctype != "application/json" || json.Unmarshal(body, &e) != nil || e.Error.Code != "not_found" {
		t.Errorf("%s %s: %d %q %s, want 404 application/json with error code not_found", req.method, req.path, status, ctype, body)
	}
	if !strings.Contains(e.Error.Message, "/v1/chat/completions") {
		t.Errorf("%s %s: 404 message %q does not say what is served", req.method, req.path, e.Error.Message)
	}
	if len(ent.Sent) != 0 || ent.Details != "direct_response" || ent.Cluster != "" {
		t.Errorf("%s %s: ext_proc messages %v, details %q, cluster %q; want none, direct_response, none",
			req.method, req.path, ent.Sent, ent.Details, ent.Cluster)
	}
}

// TestEnvoyLiteAnswersNonInferenceItself: envoyLite applies envoy.yaml's
// route table, so a request outside it opens no ext_proc stream and
// reaches no upstream, even with a client-set x-cortex-cluster.
func TestEnvoyLiteAnswersNonInferenceItself(t *testing.T) {
	rig := newSelfTestRig(t, envoyLiteConfig{}, routing(nil, bodyReply(goodRoute("neuron-a"))))
	for _, req := range []notRoutedRequest{
		{"POST", "/models/load", `{"model_id":"Qwen/Qwen3-8B"}`},
		{"POST", "/models/unload", `{"model_id":"Qwen/Qwen3-1.7B"}`},
		{"POST", "/foo", `{"model":"Qwen/Qwen3-8B","messages":[]}`},
		{"GET", "/v1/chat/completions", ""},
		{"GET", "/v1/models/../../models/load", ""},
	} {
		status, ctype, body, ent := sendRaw(t, rig.envoy, rig.front.URL, req, "x-cortex-cluster", "neuron-a")
		expectLocal404(t, req, status, ctype, body, ent)
	}
	if n := rig.fake.streams.Load(); n != 0 {
		t.Errorf("%d ext_proc streams opened for requests Envoy answers itself", n)
	}
	if got := rig.received(); len(got) != 0 {
		t.Errorf("upstreams received %d requests, want none: %+v", len(got), got)
	}

	// The routed path still goes through ext_proc to the upstream.
	resp, _, ent := rig.post(t, `{"model":"m"}`)
	if resp.StatusCode != 200 || ent.Cluster != "neuron-a" || rig.fake.streams.Load() != 1 {
		t.Errorf("POST /v1/chat/completions: %d cluster %q, %d streams; want 200 via neuron-a and 1 stream", resp.StatusCode, ent.Cluster, rig.fake.streams.Load())
	}
}

// TestEnvoyLiteFollowsTheConfigFile: the route table is read from the
// YAML, not hard-coded; with a catch-all forwarding route put back, the
// management API reaches ext_proc and the upstream again.
func TestEnvoyLiteFollowsTheConfigFile(t *testing.T) {
	data, err := os.ReadFile(envoyYAML)
	if err != nil {
		t.Fatal(err)
	}
	const anchor = "              # Local 404s,"
	if !strings.Contains(string(data), anchor) {
		t.Fatalf("%q not in %s", anchor, envoyYAML)
	}
	open := strings.Replace(string(data), anchor, "              - match: { prefix: \"/\" }\n                route: *neuron\n"+anchor, 1)
	path := filepath.Join(t.TempDir(), "envoy.yaml")
	if err := os.WriteFile(path, []byte(open), 0o600); err != nil {
		t.Fatal(err)
	}
	rig := newSelfTestRig(t, envoyLiteConfig{EnvoyConfig: path}, routing(nil, bodyReply(goodRoute("neuron-a"))))
	status, _, _, ent := sendRaw(t, rig.envoy, rig.front.URL, notRoutedRequest{"POST", "/models/load", `{"model_id":"m"}`})
	if status != 200 || ent.Cluster != "neuron-a" {
		t.Errorf("POST /models/load with a catch-all route: %d via %q, want 200 via neuron-a", status, ent.Cluster)
	}
	if got := rig.received(); len(got) != 1 {
		t.Errorf("upstream received %d requests, want the one /models/load", len(got))
	}
}

// TestManagementAPINotRouted: through envoyLite (envoy.yaml's routes) in
// front of cortex-extproc and a neuron-sim, POST /models/load,
// /models/unload and /foo, with bodies naming a resident and a cold
// catalogue model, get Envoy's 404 JSON; the sim sees none of them (its
// request log) and nothing is loaded or unloaded.
func TestManagementAPINotRouted(t *testing.T) {
	const resident, cold = "Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B"
	st := freshStack(t, []simSpec{{name: "solo", args: []string{"--devices", "24564", "--models", resident,
		"--load-latency", "300ms", "--token-interval", "20ms", "--log-requests"}}})
	sim := st.sims["solo"]
	start := sim.proc.lineCount()

	for _, req := range []notRoutedRequest{
		{"POST", "/models/load", `{"model_id":"` + cold + `","model":"` + cold + `"}`},
		{"POST", "/models/unload", `{"model_id":"` + resident + `","model":"` + resident + `"}`},
		{"POST", "/foo", `{"model":"` + cold + `","messages":[{"role":"user","content":"hi"}]}`},
		{"POST", "/v1/models/../../models/load", `{"model_id":"` + cold + `"}`},
	} {
		status, ctype, body, ent := sendRaw(t, st.envoy, st.front.URL, req)
		expectLocal404(t, req, status, ctype, body, ent)
	}

	// Everything the sim received before this marker is in its log by now:
	// it logs a request before handling it, and ours were all answered.
	marker := "/health?e2e-marker=" + newUUID()
	resp, err := http.Get(sim.url + marker)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, err := sim.proc.waitLine(5*time.Second, func(l string) bool { return strings.Contains(l, marker) }); err != nil {
		t.Fatal(err)
	}
	for _, l := range sim.proc.linesFrom(start) {
		if strings.Contains(l, "msg=request") && !strings.Contains(l, "method=GET") {
			t.Errorf("the neuron received a request Envoy should have answered: %s", l)
		}
	}
	if n := sim.tap.loadCount(cold); n != 0 {
		t.Errorf("cortex-extproc asked the neuron to load %s %d times", cold, n)
	}
	ms, err := sim.models(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	if ms[resident] != "loaded" {
		t.Errorf("%s is %q after POST /models/unload through Envoy, want loaded", resident, ms[resident])
	}
	if s, ok := ms[cold]; ok {
		t.Errorf("%s is %q after POST /models/load through Envoy, want absent", cold, s)
	}

	// The log does record what is routed: inference still arrives.
	c := newClient(st)
	var httpResp *http.Response
	cc, err := c.Chat.Completions.New(testContext(t), chat(resident), option.WithResponseInto(&httpResp))
	if err != nil {
		t.Fatalf("chat completion for %s: %v", resident, err)
	}
	served(t, httpResp, cc.Choices[0].Message.Content, "solo", resident, false)
	if _, err := sim.proc.waitLine(5*time.Second, func(l string) bool {
		return strings.Contains(l, "msg=request") && strings.Contains(l, "method=POST uri=/v1/chat/completions")
	}); err != nil {
		t.Errorf("inference did not show in the sim's request log: %v", err)
	}
}
