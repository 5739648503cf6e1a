package extproc

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/routing"
)

// TestRewriteReplyEncoding pins the hand-encoded rewrite reply to what
// protobuf itself produces for the same message, byte for byte, across body
// sizes where the nested lengths change width (127/128, 16383/16384, ...),
// with and without dynamic metadata; then for an alias longer than, as long
// as and shorter than its target (sjson writes in place or into its own
// buffer), first in the body or last (sjson's rewrite, or the splice).
func TestRewriteReplyEncoding(t *testing.T) {
	target := routing.Target{Requested: "fleet/s", Model: "org/model-8-instruct", Node: "node-007", Cluster: "neuron-node-007", ColdStart: true}
	// Every size around the points where the nested lengths change width
	// (they differ from the body size by up to ~130 bytes); past 2 MB,
	// samples on both sides.
	var sizes []int
	for _, edge := range []int{1 << 7, 1 << 14} {
		for size := max(edge-130, 64); size <= edge+10; size++ {
			sizes = append(sizes, size)
		}
	}
	for _, d := range []int{-130, -100, -60, -30, -13, -10, -5, -1, 0, 1, 10} {
		sizes = append(sizes, 1<<21+d)
	}
	sizes = append(sizes, 1<<20+3)
	for _, up := range []Upstream{ClusterHeader{Name: HeaderCluster}, NewOriginalDst(nil)} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("%s/%d", up.Header(), size), func(t *testing.T) {
				checkRewriteReply(t, up, &target, jsonBody("fleet/s", size), size%2 == 1)
			})
		}
	}
	for _, alias := range []string{"fleet/s", "fleet/same-length-1", "fleet/an-alias-longer-than-its-target"} {
		for _, body := range []struct {
			name string
			b    []byte
		}{
			{"first/600", jsonBody(alias, 600)},
			{"first/64KB", jsonBody(alias, 64<<10)},
			{"last/300", jsonBodyModelLast(alias, 300)},
			{"last/600", jsonBodyModelLast(alias, 600)},
			{"last/64KB", jsonBodyModelLast(alias, 64<<10)},
		} {
			for _, aliased := range []bool{false, true} {
				t.Run(fmt.Sprintf("%s/%s/aliased=%v", alias, body.name, aliased), func(t *testing.T) {
					tt := target
					tt.Requested = alias
					checkRewriteReply(t, ClusterHeader{Name: HeaderCluster}, &tt, body.b, aliased)
				})
			}
		}
	}
}

// checkRewriteReply checks the rewrite reply for body (whose model is
// t.Requested), received copied or aliasing the receive buffer, against
// protobuf's encoding of the same message.
func checkRewriteReply(t *testing.T, up Upstream, target *routing.Target, body []byte, aliased bool) {
	t.Helper()
	value := "neuron-node-007"
	if up.DynamicMetadataKey() != "" {
		value = "10.1.2.3:8080"
	}
	parts := newReplyParts(up, target, value)
	// The body as received: copied (small bodies), or aliasing the
	// receive buffer (large ones).
	msg := new(received)
	if aliased {
		if err := msg.decode(mem.SliceBuffer(marshal(t, bodyRequest(body)))); err != nil || msg.buf == nil {
			t.Fatalf("decode: %v, aliased %v", err, msg.buf != nil)
		}
		body = msg.msg.GetRequestBody().GetBody()
	}
	orig := bytes.Clone(body)
	m, aerr := reqbody.Find(body)
	if aerr != nil {
		t.Fatal(aerr)
	}
	got := parts.rewrite.rewrite(msg, body, m).pieces.Materialize()
	if !bytes.Equal(body, orig) {
		t.Fatal("the rewrite modified the request body")
	}

	newBody := []byte(strings.Replace(string(body), `"`+target.Requested+`"`, `"`+target.Model+`"`, 1))
	want := &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
				setHeader(up.Header(), value),
				setHeader(HeaderNode, target.Node),
				setHeader(HeaderModel, target.Model),
				setHeader(HeaderColdStart, "true"),
				setHeader("content-length", strconv.Itoa(len(newBody))),
			}},
			BodyMutation:    &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: newBody}},
			ClearRouteCache: true,
		}}},
		DynamicMetadata: dynamicMetadata(up.DynamicMetadataKey(), value),
	}
	var decoded extprocv3.ProcessingResponse
	if err := proto.Unmarshal(got, &decoded); err != nil {
		t.Fatalf("the encoded reply does not parse: %v", err)
	}
	if !proto.Equal(&decoded, want) {
		t.Fatalf("the encoded reply decodes to a different message:\ngot  %v\nwant %v", trim(&decoded), trim(want))
	}
	if wantBytes := mustMarshal(want); !bytes.Equal(got, wantBytes) {
		t.Errorf("encoding differs from protobuf's (%d vs %d bytes)", len(got), len(wantBytes))
	}
}

// TestCachedRepliesDecode checks the replies cached per target decode to the
// routing headers (an unchanged body is not sent back).
func TestCachedRepliesDecode(t *testing.T) {
	target := routing.Target{Model: "org/m", Node: "n1", Cluster: "neuron-n1"}
	parts := newReplyParts(ClusterHeader{Name: HeaderCluster}, &target, "neuron-n1")
	var routed, responded extprocv3.ProcessingResponse
	if err := proto.Unmarshal(parts.routed.pieces.Materialize(), &routed); err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(parts.responded.pieces.Materialize(), &responded); err != nil {
		t.Fatal(err)
	}
	common := routed.GetRequestBody().GetResponse()
	if !common.GetClearRouteCache() || common.GetBodyMutation() != nil || len(common.GetHeaderMutation().GetSetHeaders()) != 4 {
		t.Errorf("routed reply = %v; want 4 routing headers, the route cache cleared, no body", trim(&routed))
	}
	if h := common.GetHeaderMutation().GetSetHeaders()[0].GetHeader(); h.GetKey() != HeaderCluster || string(h.GetRawValue()) != "neuron-n1" {
		t.Errorf("first header = %v; want %s: neuron-n1", h, HeaderCluster)
	}
	if got := len(responded.GetResponseHeaders().GetResponse().GetHeaderMutation().GetSetHeaders()); got != 3 {
		t.Errorf("response headers reply sets %d headers; want node, model and cold start", got)
	}
}

// jsonBody is a chat body of exactly size bytes (size ≥ 40) for model.
func jsonBody(model string, size int) []byte {
	head := `{"model":"` + model + `","messages":[{"role":"user","content":"`
	tail := `"}]}`
	fill := size - len(head) - len(tail)
	if fill < 0 {
		panic("body too small")
	}
	return []byte(head + strings.Repeat("x", fill) + tail)
}

// jsonBodyModelLast is jsonBody with "model" after the messages, as the
// OpenAI and Anthropic SDKs send it.
func jsonBodyModelLast(model string, size int) []byte {
	head := `{"messages":[{"role":"user","content":"`
	tail := `"}],"model":"` + model + `"}`
	fill := size - len(head) - len(tail)
	if fill < 0 {
		panic("body too small")
	}
	return []byte(head + strings.Repeat("x", fill) + tail)
}

// trim renders a reply without its (possibly huge) body.
func trim(r *extprocv3.ProcessingResponse) string {
	c := proto.Clone(r).(*extprocv3.ProcessingResponse)
	if bm := c.GetRequestBody().GetResponse().GetBodyMutation(); bm != nil {
		bm.Mutation = &extprocv3.BodyMutation_Body{Body: []byte(fmt.Sprintf("<%d bytes>", len(bm.GetBody())))}
	}
	return c.String()
}
