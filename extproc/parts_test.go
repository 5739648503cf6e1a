package extproc

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/routing"
)

// TestCachedRepliesDecode checks the replies cached per target decode to the
// routing headers (an unchanged body is not sent back).
func TestCachedRepliesDecode(t *testing.T) {
	target := routing.Target{Model: "org/m", Node: "n1", Cluster: "neuron-n1"}
	parts := newReplyParts(ClusterHeader{Name: HeaderCluster}, &target, "neuron-n1")
	var routed, responded extprocv3.ProcessingResponse
	if err := proto.Unmarshal(parts.routed.Bytes(), &routed); err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(parts.responded.Bytes(), &responded); err != nil {
		t.Fatal(err)
	}
	common := routed.GetRequestBody().GetResponse()
	if !common.GetClearRouteCache() || common.GetBodyMutation() != nil || len(common.GetHeaderMutation().GetSetHeaders()) != 4 {
		t.Errorf("routed reply = %v; want 4 routing headers, the route cache cleared, no body", &routed)
	}
	if h := common.GetHeaderMutation().GetSetHeaders()[0].GetHeader(); h.GetKey() != HeaderCluster || string(h.GetRawValue()) != "neuron-n1" {
		t.Errorf("first header = %v; want %s: neuron-n1", h, HeaderCluster)
	}
	if got := len(responded.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()); got != 3 {
		t.Errorf("response headers reply sets %d headers; want node, model and cold start", got)
	}
}

// TestIsImmediateResponse: a stream interceptor (the service's drain) can
// tell a request cortex-extproc answered itself, after which Envoy ends the
// stream, from one it routed on.
func TestIsImmediateResponse(t *testing.T) {
	s := New(nil, Options{})
	st := newStream(s, nil)
	defer st.free()
	notRouted := st.requestHeaders(&extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
		{Key: ":method", RawValue: []byte("POST")}, {Key: ":path", RawValue: []byte("/models/load")}}}})
	if !IsImmediateResponse(notRouted) {
		t.Error("the 404 for POST /models/load is not reported as an immediate response")
	}
	target := routing.Target{Model: "org/m", Node: "n1", Cluster: "neuron-n1"}
	parts := newReplyParts(ClusterHeader{Name: HeaderCluster}, &target, "neuron-n1")
	if !IsImmediateResponse(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{}}}) {
		t.Error("an immediate response sent as a message is not reported")
	}
	for name, r := range map[string]any{"the headers reply": s.headersReply, "a routed body reply": parts.routed, "continue": continueBody, "a message": &extprocv3.ProcessingResponse{}} {
		if IsImmediateResponse(r) {
			t.Errorf("%s is reported as an immediate response", name)
		}
	}
}
