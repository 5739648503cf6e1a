package wire

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
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/extproc/internal/wiretest"
)

// TestRewriteReplyEncoding pins the hand-encoded rewrite reply to what
// protobuf itself produces for the same message, byte for byte, across body
// sizes where the nested lengths change width (127/128, 16383/16384, ...),
// with and without dynamic metadata; then for an alias longer than, as long
// as and shorter than its target (sjson writes in place or into its own
// buffer), first in the body or last (sjson's rewrite, or the splice).
func TestRewriteReplyEncoding(t *testing.T) {
	target := target{requested: "fleet/s", model: "org/model-8-instruct"}
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
	for _, up := range []upstream{clusterHeader, originalDst} {
		for _, size := range sizes {
			t.Run(fmt.Sprintf("%s/%d", up.header, size), func(t *testing.T) {
				checkRewriteReply(t, up, target, jsonBody("fleet/s", size), size%2 == 1)
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
					tt.requested = alias
					checkRewriteReply(t, clusterHeader, tt, body.b, aliased)
				})
			}
		}
	}
}

// target is the request's model and the id it is rewritten to.
type target struct{ requested, model string }

// upstream is how the reply addresses the neuron: a cluster header, or
// original_dst's destination header plus the same value in dynamic metadata
// (which protobuf-go writes before the reply's oneof).
type upstream struct {
	header, value string
	metadata      bool
}

var (
	clusterHeader = upstream{header: "x-cortex-cluster", value: "neuron-node-007"}
	originalDst   = upstream{header: "x-gateway-destination-endpoint", value: "10.1.2.3:8080", metadata: true}
)

func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

// checkRewriteReply checks the rewrite reply for body (whose model is
// tg.requested), received copied or aliasing the receive buffer, against
// protobuf's encoding of the same message.
func checkRewriteReply(t *testing.T, up upstream, tg target, body []byte, aliased bool) {
	t.Helper()
	set := []*corev3.HeaderValueOption{
		setHeader(up.header, up.value),
		setHeader("x-cortex-node", "node-007"),
		setHeader("x-cortex-model", tg.model),
		setHeader("x-cortex-cold-start", "true"),
	}
	var md *structpb.Struct
	if up.metadata {
		md = &structpb.Struct{Fields: map[string]*structpb.Value{
			"envoy.lb": structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
				up.header: structpb.NewStringValue(up.value)}})}}
	}
	tmpl := NewRewriteTemplate(set, tg.model, &extprocv3.ProcessingResponse{DynamicMetadata: md})
	// The body as received: copied (small bodies), or aliasing the
	// receive buffer (large ones).
	msg := new(Received)
	if aliased {
		if err := msg.decode(mem.SliceBuffer(wiretest.Marshal(t, wiretest.BodyRequest(body)))); err != nil || msg.buf == nil {
			t.Fatalf("decode: %v, aliased %v", err, msg.buf != nil)
		}
		body = msg.Msg.GetRequestBody().GetBody()
	}
	orig := bytes.Clone(body)
	m, aerr := reqbody.Find(body)
	if aerr != nil {
		t.Fatal(aerr)
	}
	got := tmpl.Rewrite(msg, body, m).Bytes()
	if !bytes.Equal(body, orig) {
		t.Fatal("the rewrite modified the request body")
	}

	newBody := []byte(strings.Replace(string(body), `"`+tg.requested+`"`, `"`+tg.model+`"`, 1))
	want := &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: append(set[:len(set):len(set)],
				setHeader("content-length", strconv.Itoa(len(newBody))))},
			BodyMutation:    &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: newBody}},
			ClearRouteCache: true,
		}}},
		DynamicMetadata: md,
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
