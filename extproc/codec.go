package extproc

import (
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
)

// Replies go to gRPC already in protobuf wire format. gRPC's own codec
// marshals every reply into a fresh buffer: for a routed request that is the
// same few headers every time, and for a rewritten body it is a copy of the
// whole body (after the copy that built it). Here the parts that depend only
// on the target are encoded once and cached, and a rewritten body is never
// built whole: the reply is an encoded prefix ending with sjson's rewrite
// of the body up to the model value, then the request body itself from
// there on, then an encoded suffix. gRPC writes the pieces out in order.

// encoded is one ProcessingResponse in wire format, as pieces written in
// order. Its buffers are never modified once handed to gRPC, which writes
// them after Send returns and then releases them: a cached reply is made of
// plain slices (releasing does nothing), a rewrite reply holds references
// to a receive buffer (recv.go) and is sent exactly once.
type encoded struct{ pieces mem.BufferSlice }

// encode marshals a reply built as a message (errors, model lists: the cold
// paths).
func encode(resp *extprocv3.ProcessingResponse) *encoded {
	return &encoded{pieces: mem.BufferSlice{mem.SliceBuffer(mustMarshal(resp))}}
}

// codec is gRPC's proto codec that passes *encoded replies through as they
// are and decodes Envoy's messages into *received (recv.go). Every other
// message (health, xDS) uses the proto codec.
type codec struct{ proto encoding.CodecV2 }

func (c codec) Marshal(v any) (mem.BufferSlice, error) {
	if e, ok := v.(*encoded); ok {
		return e.pieces, nil
	}
	return c.proto.Marshal(v)
}

func (c codec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*received); ok {
		return r.unmarshal(data, c.proto.Unmarshal)
	}
	return c.proto.Unmarshal(data, v)
}

func (c codec) Name() string { return protocodec.Name }

// NewGRPCServer returns a gRPC server that serves s, with the codec its
// replies need. Other services (health, xDS) may be registered on it too.
func NewGRPCServer(s *Server, opts ...grpc.ServerOption) *grpc.Server {
	opts = append(opts[:len(opts):len(opts)], grpc.ForceServerCodecV2(codec{proto: protoCodec()}))
	g := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(g, s)
	return g
}

// protoCodec is gRPC's own proto codec.
func protoCodec() encoding.CodecV2 { return encoding.GetCodecV2(protocodec.Name) }

// Field numbers of the messages a body reply nests, from the descriptors so
// a renamed field fails at start-up rather than on the wire.
var (
	numRequestBody     = fieldNumber(&extprocv3.ProcessingResponse{}, "request_body")
	numBodyResponse    = fieldNumber(&extprocv3.BodyResponse{}, "response")
	numHeaderMutation  = fieldNumber(&extprocv3.CommonResponse{}, "header_mutation")
	numBodyMutation    = fieldNumber(&extprocv3.CommonResponse{}, "body_mutation")
	numBody            = fieldNumber(&extprocv3.BodyMutation{}, "body")
	numSetHeaders      = fieldNumber(&extprocv3.HeaderMutation{}, "set_headers")
	numHeaderOptHeader = fieldNumber(&corev3.HeaderValueOption{}, "header")
	numHeaderKey       = fieldNumber(&corev3.HeaderValue{}, "key")
	numHeaderRawValue  = fieldNumber(&corev3.HeaderValue{}, "raw_value")
)

func fieldNumber(m proto.Message, name protoreflect.Name) protowire.Number {
	f := m.ProtoReflect().Descriptor().Fields().ByName(name)
	if f == nil {
		panic("extproc: no field " + string(name) + " in " + string(m.ProtoReflect().Descriptor().FullName()))
	}
	return f.Number()
}

// rewriteTemplate is what a body reply with a rewritten body shares with
// every other such reply to the same target. Fields are laid out in the
// order protobuf-go writes them (dynamic metadata before the oneof), so the
// reply is byte for byte what proto.Marshal would produce.
type rewriteTemplate struct {
	metadata   []byte // ProcessingResponse.dynamic_metadata, or nothing
	setHeaders []byte // HeaderMutation.set_headers entries for the target's headers
	model      []byte // the target's model id as a JSON string
	tail       []byte // the rest of CommonResponse after the body: clear_route_cache
	// modelPiece and tailPiece are model and tail as reply pieces, made
	// once: shared by every reply, never modified, and freeing them (gRPC
	// does, once written) does nothing.
	modelPiece, tailPiece mem.Buffer
}

// newRewriteTemplate encodes what surrounds the body in a reply that routes
// with the set headers and a body whose model becomes model.
func newRewriteTemplate(set []*corev3.HeaderValueOption, model string, md *extprocv3.ProcessingResponse) rewriteTemplate {
	t := rewriteTemplate{
		metadata:   mustMarshal(md),
		setHeaders: mustMarshal(&extprocv3.HeaderMutation{SetHeaders: set}),
		model:      reqbody.Quote(model),
		tail:       mustMarshal(&extprocv3.CommonResponse{ClearRouteCache: true}),
	}
	t.modelPiece, t.tailPiece = mem.SliceBuffer(t.model), mem.SliceBuffer(t.tail)
	return t
}

// rewrite encodes the body reply that sends msg's body with its model m
// replaced by the template's model, and the template's headers plus
// content-length.
//
// sjson writes the new model (reqbody.AppendRewrite): the body up to the
// end of the model value is copied into the reply's first buffer, after the
// encoded heads, and sjson rewrites it there (in place when the new value
// is not longer). The rest of a large body is not copied: the reply
// references msg's receive buffer from the end of the model value on. A
// small body is copied whole into that one buffer, which is cheaper than
// the references. A model that is not Near (far into the body: the SDKs
// send it last) is spliced instead, so nothing walks or copies the body up
// to it: the receive buffer before the value, the quoted id, the receive
// buffer after it.
func (t *rewriteTemplate) rewrite(msg *received, body []byte, m reqbody.Model) *encoded {
	start, end := m.Span()
	n := len(body) - (end - start) + len(t.model)
	cl := strconv.Itoa(n)
	// content-length is one more HeaderMutation.set_headers entry.
	hv := lenField(numHeaderKey, len(headerContentLength)) + lenField(numHeaderRawValue, len(cl))
	hvo := lenField(numHeaderOptHeader, hv)
	hm := len(t.setHeaders) + lenField(numSetHeaders, hvo)
	bm := lenField(numBody, n)
	cr := lenField(numHeaderMutation, hm) + lenField(numBodyMutation, bm) + len(t.tail)
	br := lenField(numBodyResponse, cr)

	// Everything up to the first body byte: the heads of the nested fields
	// (each head is at most a 1-byte tag and a 5-byte length) and headers;
	// then room for what sjson rewrites (it copies body[:end] first), or
	// for a small body the whole of it.
	size := len(t.metadata) + 8*6 + len(t.setHeaders) + len(headerContentLength) + len(cl)
	switch {
	case msg.buf == nil:
		size += max(n, end) + len(t.tail)
	case m.Near():
		size += max(end, start+len(t.model))
	}
	p := make([]byte, 0, size)
	p = append(p, t.metadata...)
	p = appendLenHead(p, numRequestBody, br)
	p = appendLenHead(p, numBodyResponse, cr)
	p = appendLenHead(p, numHeaderMutation, hm)
	p = append(p, t.setHeaders...)
	p = appendLenHead(p, numSetHeaders, hvo)
	p = appendLenHead(p, numHeaderOptHeader, hv)
	p = append(appendLenHead(p, numHeaderKey, len(headerContentLength)), headerContentLength...)
	p = append(appendLenHead(p, numHeaderRawValue, len(cl)), cl...)
	p = appendLenHead(p, numBodyMutation, bm)
	p = appendLenHead(p, numBody, n)
	p, rewritten := reqbody.AppendRewrite(p, body, m, t.model)
	if msg.buf == nil {
		if !rewritten {
			p = append(append(p, body[:start]...), t.model...)
		}
		p = append(append(p, body[end:]...), t.tail...)
		return &encoded{pieces: mem.BufferSlice{mem.SliceBuffer(p)}}
	}
	if rewritten {
		return &encoded{pieces: mem.BufferSlice{mem.SliceBuffer(p), msg.piece(end, len(body)), t.tailPiece}}
	}
	return &encoded{pieces: mem.BufferSlice{
		mem.SliceBuffer(p), msg.piece(0, start), t.modelPiece, msg.piece(end, len(body)), t.tailPiece,
	}}
}

const headerContentLength = "content-length"

// mustMarshal encodes the replies built once per server or target. Their
// only string fields are header names (constants, or
// upstream.cluster_header, which config validation keeps a lowercase ASCII
// token) and ip:port values, so the UTF-8 check, protobuf's one failure for
// these messages, cannot fail.
func mustMarshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic("extproc: encoding a reply: " + err.Error())
	}
	return b
}

// lenField is the encoded size of a length-delimited field holding n bytes.
func lenField(num protowire.Number, n int) int {
	return protowire.SizeTag(num) + protowire.SizeBytes(n)
}

// appendLenHead appends the tag and length of a length-delimited field whose
// n bytes of content follow.
func appendLenHead(b []byte, num protowire.Number, n int) []byte {
	return protowire.AppendVarint(protowire.AppendTag(b, num, protowire.BytesType), uint64(n))
}
