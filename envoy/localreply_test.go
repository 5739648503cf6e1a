package envoy

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// shippedLocalReplies is envoy.yaml's local_reply_config.
func shippedLocalReplies(t *testing.T) *LocalReplies {
	t.Helper()
	b, err := ParseBootstrapYAML([]byte(readFile(t, "envoy.yaml")))
	if err != nil {
		t.Fatal(err)
	}
	rt, err := InferenceRouteTable(b)
	if err != nil {
		t.Fatal(err)
	}
	lr, err := NewLocalReplies(rt.HCM.GetLocalReplyConfig())
	if err != nil {
		t.Fatal(err)
	}
	return lr
}

var (
	openAIRequest    = map[string]string{":method": "POST", ":path": "/v1/chat/completions"}
	anthropicRequest = map[string]string{":method": "POST", ":path": "/v1/messages", "anthropic-version": "2023-06-01"}
	translated       = map[string]string{":method": "POST", ":path": "/v1/chat/completions", "anthropic-version": "2023-06-01"}
)

const ufBody = "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: delayed connect error: 111"

// What a client gets from the shipped config when Envoy cannot reach the
// neuron: JSON in its own SDK's shape, the status kept, Envoy's reason in
// the message and a Retry-After.
func TestShippedLocalRepliesAsClientsSeeThem(t *testing.T) {
	lr := shippedLocalReplies(t)

	got := lr.Rewrite(LocalReply{Status: 503, Flags: []string{"UF"}, Body: ufBody, Details: "upstream_reset_before_response_started{connection_failure}", Request: openAIRequest})
	var oa struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal([]byte(got.Body), &oa); err != nil {
		t.Fatalf("OpenAI client: body %q: %v", got.Body, err)
	}
	if got.Status != 503 || got.ContentType != "application/json" || oa.Error.Type != "api_error" || oa.Error.Code != "upstream_unavailable" ||
		!strings.Contains(oa.Error.Message, "(UF: "+ufBody+")") {
		t.Errorf("OpenAI client got %d %s %s", got.Status, got.ContentType, got.Body)
	}
	if !slices.Contains(got.Headers, [2]string{"retry-after", "2"}) {
		t.Errorf("OpenAI client: headers %v lack retry-after: 2", got.Headers)
	}

	for name, req := range map[string]map[string]string{"Anthropic client": anthropicRequest, "translated Anthropic request": translated} {
		got := lr.Rewrite(LocalReply{Status: 503, Flags: []string{"UH"}, Body: "no healthy upstream", Request: req})
		var an struct {
			Type  string
			Error struct{ Type, Message string }
		}
		if err := json.Unmarshal([]byte(got.Body), &an); err != nil {
			t.Fatalf("%s: body %q: %v", name, got.Body, err)
		}
		if got.Status != 503 || an.Type != "error" || an.Error.Type != "overloaded_error" || !strings.Contains(an.Error.Message, "UH: no healthy upstream") {
			t.Errorf("%s got %d %s", name, got.Status, got.Body)
		}
	}

	for _, c := range []struct {
		status int
		typ    string
	}{{504, "timeout_error"}, {413, "request_too_large"}, {408, "timeout_error"}} {
		got := lr.Rewrite(LocalReply{Status: c.status, Request: anthropicRequest})
		if !strings.Contains(got.Body, `"type":"`+c.typ+`"`) || got.ContentType != "application/json" {
			t.Errorf("Anthropic client, Envoy's %d: %s %s", c.status, got.ContentType, got.Body)
		}
	}
}

// cortex-extproc's own errors are local replies too: they pass unchanged,
// and so does Envoy's 500 for an ext_proc failure (no mapper for it).
func TestShippedLocalRepliesLeaveOtherRepliesAlone(t *testing.T) {
	lr := shippedLocalReplies(t)
	own := `{"error":{"message":"no healthy neuron","type":"api_error","code":"service_unavailable"}}`
	for _, status := range []int{400, 404, 503} {
		for _, req := range []map[string]string{openAIRequest, anthropicRequest} {
			got := lr.Rewrite(LocalReply{Status: status, Body: own, ContentType: "application/json", Request: req})
			if got.Mapper != -1 || got.Body != own || got.ContentType != "application/json" || got.Status != status || len(got.Headers) != 0 {
				t.Errorf("cortex-extproc's %d rewritten: %+v", status, got)
			}
		}
	}
	got := lr.Rewrite(LocalReply{Status: 500, Body: "", Details: "ext_proc_error_gRPC_error_14", Request: openAIRequest})
	if got.Mapper != -1 || got.Body != "" {
		t.Errorf("ext_proc's 500: %+v", got)
	}
}

// A config using filters or formats the model does not know is refused
// with what is missing, rather than modelled wrongly.
func TestLocalRepliesRefuseWhatIsNotModelled(t *testing.T) {
	for _, c := range []struct{ yaml, want string }{
		{`mappers: [{filter: {duration_filter: {comparison: {op: GE, value: {default_value: 1000, runtime_key: k}}}}}]`, "duration_filter is not modelled"},
		{`mappers: [{filter: {header_filter: {header: {name: x, string_match: {safe_regex: {regex: ".*"}}}}}}]`, "string_match.safe_regex is not modelled"},
		{`mappers: [{filter: {header_filter: {header: {name: x, present_match: true, invert_match: true}}}}]`, "invert_match"},
		{`mappers: [{filter: {not_health_check_filter: {}}, body_format_override: {text_format: "%START_TIME%"}}]`, "%START_TIME%"},
		{`body_format: {text_format_source: {filename: /etc/x}}`, "inline_string"},
	} {
		js, err := yaml.YAMLToJSON([]byte(c.yaml))
		if err != nil {
			t.Fatal(err)
		}
		cfg := &hcmv3.LocalReplyConfig{}
		if err := protojson.Unmarshal(js, cfg); err != nil {
			t.Fatalf("%s: %v", c.yaml, err)
		}
		if _, err := NewLocalReplies(cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one naming %s", c.yaml, err, c.want)
		}
	}
}
