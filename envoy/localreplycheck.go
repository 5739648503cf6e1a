package envoy

import (
	"encoding/json"
	"fmt"
	"strings"

	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// envoyErrors are the local replies Envoy sends on the inference routes
// that clients must get as JSON (issue 15).
var envoyErrors = []struct {
	what   string
	status int
	flag   string
	body   string
}{
	{"503 UF (the neuron cannot be reached)", 503, "UF", "upstream connect error or disconnect/reset before headers. reset reason: connection failure"},
	{"503 UH (no healthy upstream)", 503, "UH", "no healthy upstream"},
	{"503 NC (cluster not found)", 503, "NC", ""},
	{"504 (a timeout)", 504, "", ""},
	{"413 (request body above the buffer limit)", 413, "", "Payload Too Large"},
	{"408 (stream idle timeout)", 408, "", "stream timeout"},
}

// The kinds of client a local reply must speak to: OpenAI's error shape,
// or Anthropic's for /v1/messages (a translated request reaches Envoy's
// router as /v1/chat/completions, so anthropic-version counts too, as it
// does for cortex-extproc).
var replyClients = []struct {
	what      string
	anthropic bool
	request   map[string]string
}{
	{"an OpenAI client", false, map[string]string{":method": "POST", ":path": "/v1/chat/completions"}},
	{"an Anthropic client", true, map[string]string{":method": "POST", ":path": "/v1/messages", "anthropic-version": "2023-06-01"}},
	{"an Anthropic request translated for an OpenAI-only neuron", true, map[string]string{":method": "POST", ":path": "/v1/chat/completions", "anthropic-version": "2023-06-01"}},
	{"a /v1/messages request without anthropic-version", true, map[string]string{":method": "POST", ":path": "/v1/messages"}},
}

// cortexErrors are statuses of cortex-extproc's own immediate responses:
// local replies without response flags, already JSON.
var cortexErrors = []int{400, 404, 500, 503}

// checkLocalReplies: Envoy's own errors on the inference routes reach
// clients as OpenAI-style JSON (Anthropic's shape for Anthropic clients),
// and cortex-extproc's own JSON errors pass unchanged.
func (c *checker) checkLocalReplies(path string, hcm *hcmv3.HttpConnectionManager) {
	path += ".local_reply_config"
	cfg := hcm.GetLocalReplyConfig()
	if len(cfg.GetMappers()) == 0 {
		c.addf(path, "no mappers: Envoy's own errors (503 when a neuron cannot be reached, 504, 413, 408) reach clients as text/plain, which the OpenAI and Anthropic SDKs cannot parse; add the mappers of envoy/envoy.yaml")
		return
	}
	lr, err := NewLocalReplies(cfg)
	if err != nil {
		c.addf(path, "cannot be checked: %v", err)
		return
	}
	if cfg.GetBodyFormat() != nil {
		c.addf(path+".body_format", "rewrites every local reply, cortex-extproc's own JSON errors included; leave it unset and give each mapper a body_format_override")
	}
	for _, e := range envoyErrors {
		var flags []string
		if e.flag != "" {
			flags = []string{e.flag}
		}
		for _, cl := range replyClients {
			got := lr.Rewrite(LocalReply{Status: e.status, Flags: flags, Body: e.body, Request: cl.request})
			if got.Mapper < 0 {
				c.addf(path+".mappers", "no mapper matches Envoy's %s for %s: it reaches the client as text/plain; add one (see envoy/envoy.yaml)", e.what, cl.what)
				continue
			}
			if problem := replyShape(got, e.status, cl.anthropic); problem != "" {
				c.addf(fmt.Sprintf("%s.mappers[%d]", path, got.Mapper), "Envoy's %s for %s: %s", e.what, cl.what, problem)
			}
		}
	}
	for _, status := range cortexErrors {
		body := `{"error":{"message":"from cortex-extproc","type":"api_error","code":"service_unavailable"}}`
		for _, cl := range replyClients {
			got := lr.Rewrite(LocalReply{Status: status, Body: body, ContentType: "application/json", Request: cl.request})
			if got.Mapper >= 0 && (got.Body != body || got.Status != status || got.ContentType != "application/json") {
				c.addf(fmt.Sprintf("%s.mappers[%d]", path, got.Mapper), "matches cortex-extproc's own %d answers (local replies with no response flag) and rewrites their JSON, losing what they say and why; match Envoy's 503s by response_flag_filter (UF, UH, NC), not by status", status)
				break
			}
		}
	}
}

// replyShape says what is wrong with a rewritten reply ("" if nothing):
// JSON, the status kept, and OpenAI's {"error":{"message","type","code"}}
// or Anthropic's {"type":"error","error":{"type","message"}}.
func replyShape(r RewrittenReply, status int, anthropic bool) string {
	if r.Status != status {
		return fmt.Sprintf("the mapper changes the status to %d; keep Envoy's %d", r.Status, status)
	}
	if ct, _, _ := strings.Cut(r.ContentType, ";"); strings.TrimSpace(ct) != "application/json" {
		return fmt.Sprintf("content type %q, want application/json (body_format_override with json_format)", r.ContentType)
	}
	var v struct {
		Type  *string `json:"type"`
		Error *struct {
			Message *string `json:"message"`
			Type    *string `json:"type"`
			Code    *string `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(r.Body), &v); err != nil {
		return fmt.Sprintf("body %q is not JSON: %v", r.Body, err)
	}
	switch {
	case v.Error == nil || v.Error.Message == nil || v.Error.Type == nil:
		return fmt.Sprintf("body %s lacks error.message or error.type", strings.TrimSpace(r.Body))
	case anthropic && (v.Type == nil || *v.Type != "error"):
		return fmt.Sprintf(`body %s is not Anthropic's {"type":"error","error":{"type":…,"message":…}}; put a mapper for /v1/messages (or an anthropic-version header) before the OpenAI one`, strings.TrimSpace(r.Body))
	case !anthropic && (v.Type != nil || v.Error.Code == nil):
		return fmt.Sprintf(`body %s is not OpenAI's {"error":{"message":…,"type":…,"code":…}}`, strings.TrimSpace(r.Body))
	}
	return ""
}
