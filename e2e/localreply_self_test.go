package e2e

import (
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
)

// envoyLite applies envoy.yaml's local_reply_config to its local replies,
// and hands the router's replies to ext_proc as the Envoy version it
// models does (envoyLiteConfig.LocalRepliesToExtProc).

// deadRig is a self-test rig with a cluster neuron-dead nobody listens on.
func deadRig(t *testing.T, cfg envoyLiteConfig, script func(extprocv3.ExternalProcessor_ProcessServer) error) *selfTestRig {
	t.Helper()
	rig := newSelfTestRig(t, cfg, script)
	rig.envoy.clusters["neuron-dead"] = "http://127.0.0.1:1" // connection refused
	return rig
}

// seen records what the scripted ext_proc server saw after its body reply.
type seen struct {
	ch chan *extprocv3.ProcessingRequest // nil: the stream ended
}

// routeToDead routes to neuron-dead and reports what came after the body
// reply: response headers (answered), or the end of the stream.
func routeToDead(after *seen) func(extprocv3.ExternalProcessor_ProcessServer) error {
	return func(s extprocv3.ExternalProcessor_ProcessServer) error {
		if _, err := recvKind(s, "request_headers"); err != nil {
			return err
		}
		if err := s.Send(headersContinue); err != nil {
			return err
		}
		if _, err := recvKind(s, "request_body"); err != nil {
			return err
		}
		if err := s.Send(bodyReply(goodRoute("neuron-dead"))); err != nil {
			return err
		}
		req, err := s.Recv()
		if err != nil {
			if !errors.Is(err, io.EOF) && s.Context().Err() == nil {
				return err
			}
			after.ch <- nil
			return nil
		}
		after.ch <- req
		if err := s.Send(responseHeadersContinue); err != nil {
			return err
		}
		_, _ = s.Recv()
		return nil
	}
}

type openAIError struct {
	Error struct{ Message, Type, Code string }
}

func TestEnvoyLiteConnectFailureShippedImage(t *testing.T) {
	after := &seen{ch: make(chan *extprocv3.ProcessingRequest, 1)}
	rig := deadRig(t, envoyLiteConfig{}, routeToDead(after))
	resp, body, ent := rig.post(t, clientBody)
	if got := <-after.ch; got != nil {
		t.Errorf("ext_proc got %v after the body reply; Envoy >= 1.34 sends it nothing of a local reply", got)
	}
	var e openAIError
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	if resp.StatusCode != 503 || resp.Header.Get("content-type") != "application/json" || resp.Header.Get("retry-after") != "2" ||
		e.Error.Code != "upstream_unavailable" || !strings.Contains(e.Error.Message, "(UF: upstream connect error") {
		t.Errorf("client got %d %v %q", resp.StatusCode, resp.Header, body)
	}
	if ent.Flags != "UF" || ent.Cluster != "neuron-dead" || !slices.Equal(ent.Sent, []string{"request_headers", "request_body"}) {
		t.Errorf("access log: flags %q cluster %q sent %v", ent.Flags, ent.Cluster, ent.Sent)
	}
}

func TestEnvoyLiteConnectFailureBefore134(t *testing.T) {
	after := &seen{ch: make(chan *extprocv3.ProcessingRequest, 1)}
	rig := deadRig(t, envoyLiteConfig{LocalRepliesToExtProc: true}, routeToDead(after))
	resp, body, ent := rig.post(t, clientBody)
	got := <-after.ch
	if got.GetResponseHeaders() == nil {
		t.Fatalf("ext_proc got %v after the body reply, want the local reply's response headers", got)
	}
	hs := map[string]string{}
	for _, h := range got.GetResponseHeaders().GetHeaders().GetHeaders() {
		hs[h.GetKey()] = string(h.GetRawValue())
	}
	// Rewritten by local_reply_config first; nothing an upstream sends.
	if hs[":status"] != "503" || hs["content-type"] != "application/json" || hs["retry-after"] != "2" || hs["date"] != "" {
		t.Errorf("response headers ext_proc saw: %v", hs)
	}
	if resp.StatusCode != 503 || !strings.Contains(body, `"code":"upstream_unavailable"`) || ent.Flags != "UF" ||
		!slices.Equal(ent.Sent, []string{"request_headers", "request_body", "response_headers"}) {
		t.Errorf("client got %d %q; access log flags %q sent %v", resp.StatusCode, body, ent.Flags, ent.Sent)
	}
}

// Anthropic clients get Anthropic's shape: by path, or by their
// anthropic-version header when the request was translated.
func TestEnvoyLiteConnectFailureAnthropicClient(t *testing.T) {
	after := &seen{ch: make(chan *extprocv3.ProcessingRequest, 1)}
	rig := deadRig(t, envoyLiteConfig{}, routeToDead(after))
	resp, body, _ := rig.post(t, clientBody, "anthropic-version", "2023-06-01")
	<-after.ch
	var e struct {
		Type  string
		Error struct{ Type, Message string }
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("body %q: %v", body, err)
	}
	if resp.StatusCode != 503 || e.Type != "error" || e.Error.Type != "overloaded_error" || !strings.Contains(e.Error.Message, "UF") {
		t.Errorf("Anthropic client got %d %q", resp.StatusCode, body)
	}
}

// cortex-extproc's own errors are local replies too, and pass unchanged.
func TestEnvoyLiteLeavesCortexErrorsAlone(t *testing.T) {
	own := `{"error":{"message":"no healthy neuron can serve Org/X","type":"api_error","code":"service_unavailable"}}`
	rig := newSelfTestRig(t, envoyLiteConfig{}, func(s extprocv3.ExternalProcessor_ProcessServer) error {
		if _, err := recvKind(s, "request_headers"); err != nil {
			return err
		}
		if err := s.Send(headersContinue); err != nil {
			return err
		}
		if _, err := recvKind(s, "request_body"); err != nil {
			return err
		}
		return s.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
			ImmediateResponse: &extprocv3.ImmediateResponse{
				Status:  &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable},
				Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{rawSet("content-type", "application/json"), rawSet("retry-after", "5")}},
				Body:    []byte(own),
				Details: "cortex_service_unavailable",
			}}})
	})
	resp, body, _ := rig.post(t, clientBody)
	if resp.StatusCode != 503 || body != own || resp.Header.Get("retry-after") != "5" || resp.Header.Get("content-type") != "application/json" {
		t.Errorf("got %d %v %q, want cortex-extproc's reply unchanged", resp.StatusCode, resp.Header, body)
	}
}
