package wire

import (
	"bytes"
	"strings"
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/extproc/internal/wiretest"
)

// TestReceivedDecodesLikeProtobuf: whatever Envoy sends decodes to exactly
// what protobuf decodes, whether or not the body is aliased.
func TestReceivedDecodesLikeProtobuf(t *testing.T) {
	big := []byte(`{"model":"m","messages":"` + strings.Repeat("x", 40<<10) + `"}`)
	full := wiretest.BodyRequest(big)
	full.GetRequestBody().EndOfStream = false
	full.MetadataContext = &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"a": {Fields: map[string]*structpb.Value{"k": structpb.NewStringValue("v")}}}}
	full.Attributes = map[string]*structpb.Struct{"envoy.filters.http.ext_proc": {Fields: map[string]*structpb.Value{"request.path": structpb.NewStringValue("/v1/chat/completions")}}}
	full.ObservabilityMode = true
	full.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED}
	headers := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{{Key: "x-big", RawValue: big}}}}}}
	respBody := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: big}}}

	cases := []struct {
		name    string
		wire    []byte
		aliased bool
	}{
		{"large body", wiretest.Marshal(t, wiretest.BodyRequest(big)), true},
		{"large body with every other field", wiretest.Marshal(t, full), true},
		{"small body", wiretest.Marshal(t, wiretest.BodyRequest([]byte(`{"model":"m"}`))), false},
		{"large headers", wiretest.Marshal(t, headers), false},
		{"large response body", wiretest.Marshal(t, respBody), false},
		// Repeated message fields merge in protobuf; left to it.
		{"request_body twice", append(wiretest.Marshal(t, wiretest.BodyRequest(big)), wiretest.Marshal(t, wiretest.BodyRequest([]byte("{}")))...), false},
		{"body then headers (last oneof wins)", append(wiretest.Marshal(t, wiretest.BodyRequest(big)), wiretest.Marshal(t, headers)...), false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var want extprocv3.ProcessingRequest
			if err := proto.Unmarshal(c.wire, &want); err != nil {
				t.Fatal(err)
			}
			r := new(Received)
			if err := NewCodec().Unmarshal(wiretest.Chunks(c.wire, 16<<10), r); err != nil {
				t.Fatal(err)
			}
			defer r.Release()
			if !proto.Equal(&r.Msg, &want) {
				t.Fatalf("decoded %v\nprotobuf %v", &r.Msg, &want)
			}
			if (r.buf != nil) != c.aliased {
				t.Errorf("body aliased = %v, want %v", r.buf != nil, c.aliased)
			}
			if r.buf != nil {
				body := r.Msg.GetRequestBody().GetBody()
				if !bytes.Equal(r.buf.ReadOnlyData()[r.bodyOff:r.bodyOff+len(body)], body) {
					t.Error("bodyOff does not point at the body in the receive buffer")
				}
			}
		})
	}
}

// FuzzReceivedDecode pins the aliasing decoder to protobuf on any input:
// same error-ness, same message.
func FuzzReceivedDecode(f *testing.F) {
	f.Add(wiretest.Marshal(f, wiretest.BodyRequest([]byte(`{"model":"m"}`))))
	f.Add(append(wiretest.Marshal(f, wiretest.BodyRequest([]byte("a"))), wiretest.Marshal(f, wiretest.BodyRequest([]byte("b")))...))
	f.Add(wiretest.Marshal(f, &extprocv3.ProcessingRequest{ObservabilityMode: true, Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{EndOfStream: true}}}))
	f.Add([]byte{0x22, 0x03, 0x0a, 0x05, 0x61})
	f.Fuzz(func(t *testing.T, b []byte) {
		var want extprocv3.ProcessingRequest
		werr := proto.Unmarshal(b, &want)
		r := new(Received)
		gerr := r.decode(mem.SliceBuffer(bytes.Clone(b)))
		defer r.Release()
		if (werr == nil) != (gerr == nil) {
			t.Fatalf("protobuf error %v, ours %v", werr, gerr)
		}
		if werr == nil && !proto.Equal(&r.Msg, &want) {
			t.Fatalf("decoded %v\nprotobuf %v", &r.Msg, &want)
		}
	})
}

// poisonPool is a BufferPool that overwrites a buffer when it comes back,
// so a reply still reading it would send garbage.
type poisonPool struct {
	mu   sync.Mutex
	puts int
}

func (p *poisonPool) Get(n int) *[]byte { b := make([]byte, n); return &b }

func (p *poisonPool) Put(b *[]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.puts++
	for i := range *b {
		(*b)[i] = 'X'
	}
}

// TestRewriteReplyHoldsTheReceiveBuffer: the stream releases the receive
// buffer as soon as it has answered, but a rewrite reply gRPC has not yet
// written still reads the body from it; the buffer goes back to its pool
// only when the reply is done with it too.
func TestRewriteReplyHoldsTheReceiveBuffer(t *testing.T) {
	body := []byte(`{"model":"fleet/s","messages":[{"role":"user","content":"` + strings.Repeat("y", 64<<10) + `"}]}`)
	wire := wiretest.Marshal(t, wiretest.BodyRequest(body))
	pool := &poisonPool{}
	data := mem.BufferSlice{mem.NewBuffer(&wire, pool)}

	r := new(Received)
	if err := NewCodec().Unmarshal(data, r); err != nil {
		t.Fatal(err)
	}
	data.Free() // gRPC frees what it handed the codec
	if r.buf == nil {
		t.Fatal("a 64 KB body was copied, not aliased")
	}
	m, aerr := reqbody.Find(r.Msg.GetRequestBody().GetBody())
	if aerr != nil {
		t.Fatal(aerr)
	}
	tmpl := NewRewriteTemplate([]*corev3.HeaderValueOption{setHeader("x-cortex-cluster", "neuron-n1")}, "org/model-8", &extprocv3.ProcessingResponse{})
	reply := tmpl.Rewrite(r, r.Msg.GetRequestBody().GetBody(), m)
	r.Release() // the stream is done with the message

	if pool.puts != 0 {
		t.Fatal("the receive buffer went back to its pool while a reply still referenced it")
	}
	var decoded extprocv3.ProcessingResponse
	if err := proto.Unmarshal(reply.pieces.Materialize(), &decoded); err != nil {
		t.Fatal(err)
	}
	want := bytes.Replace(body, []byte(`"fleet/s"`), []byte(`"org/model-8"`), 1)
	if got := decoded.GetRequestBody().GetResponse().GetBodyMutation().GetBody(); !bytes.Equal(got, want) {
		t.Fatalf("rewritten body differs (%d vs %d bytes)", len(got), len(want))
	}
	reply.pieces.Free() // gRPC, once the reply is written
	if pool.puts != 1 {
		t.Errorf("receive buffer returned %d times after the reply was written; want once", pool.puts)
	}
}
