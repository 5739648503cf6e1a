// Package wire is the ext_proc protocol in protobuf wire format, by hand
// where the hot path needs it: replies that go to gRPC already encoded
// (Reply; the codec passes them through), Envoy's messages decoded around
// a large request body so the body stays in gRPC's receive buffer
// (Received), and the body reply that sends a rewritten body without
// building it whole (RewriteTemplate). Everything else is protobuf-go's.
package wire

import (
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Replies go to gRPC already in protobuf wire format. gRPC's own codec
// marshals every reply into a fresh buffer: for a routed request that is the
// same few headers every time, and for a rewritten body it is a copy of the
// whole body (after the copy that built it). Here the parts that depend only
// on the target are encoded once and cached, and a rewritten body is never
// built whole: the reply is an encoded prefix ending with sjson's rewrite
// of the body up to the model value, then the request body itself from
// there on, then an encoded suffix. gRPC writes the pieces out in order.

// Reply is one ProcessingResponse in wire format, as pieces written in
// order: the one type a stream answers Envoy with. Its buffers are never
// modified once handed to gRPC, which writes them after Send returns and
// then releases them: a cached reply is made of plain slices (releasing
// does nothing), a rewrite reply holds references to a receive buffer
// (recv.go) and is sent exactly once.
type Reply struct {
	pieces mem.BufferSlice
	// immediate: the reply is an immediate response, after which Envoy
	// ends the stream.
	immediate bool
}

// Encode marshals a reply built as a message (errors, model lists,
// translations: the cold paths). It fails only where protobuf does: a
// string field that is not UTF-8.
func Encode(resp *extprocv3.ProcessingResponse) (*Reply, error) {
	b, err := proto.Marshal(resp)
	if err != nil {
		return nil, err
	}
	return &Reply{pieces: mem.BufferSlice{mem.SliceBuffer(b)}, immediate: resp.GetImmediateResponse() != nil}, nil
}

// MustEncode encodes a reply built once per server or target. Its only
// string fields are header names (constants, or upstream.cluster_header,
// which config validation keeps a lowercase ASCII token), so the UTF-8
// check, protobuf's one failure for these messages, cannot fail.
func MustEncode(resp *extprocv3.ProcessingResponse) *Reply {
	return &Reply{pieces: mem.BufferSlice{mem.SliceBuffer(mustMarshal(resp))}, immediate: resp.GetImmediateResponse() != nil}
}

// Immediate reports whether the reply is an immediate response: Envoy
// answers the client with it and ends the stream.
func (r *Reply) Immediate() bool { return r.immediate }

// Bytes returns the reply as one encoded message (a copy; for tests and
// diagnostics).
func (r *Reply) Bytes() []byte { return r.pieces.Materialize() }

// Codec is gRPC's proto codec that passes Reply values through as they are
// and decodes Envoy's messages into Received (recv.go). Every other message
// (health, xDS, a standalone override_message_timeout) uses the proto
// codec.
type Codec struct{ proto encoding.CodecV2 }

// NewCodec returns the codec an ext_proc server must be served with
// (grpc.ForceServerCodecV2).
func NewCodec() Codec { return Codec{proto: encoding.GetCodecV2(protocodec.Name)} }

// Marshal implements encoding.CodecV2.
func (c Codec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*Reply); ok {
		return r.pieces, nil
	}
	return c.proto.Marshal(v)
}

// Unmarshal implements encoding.CodecV2.
func (c Codec) Unmarshal(data mem.BufferSlice, v any) error {
	if r, ok := v.(*Received); ok {
		return r.unmarshal(data, c.proto.Unmarshal)
	}
	return c.proto.Unmarshal(data, v)
}

// Name implements encoding.CodecV2: it replaces gRPC's "proto".
func (c Codec) Name() string { return protocodec.Name }

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
		panic("wire: no field " + string(name) + " in " + string(m.ProtoReflect().Descriptor().FullName()))
	}
	return f.Number()
}

// mustMarshal encodes what is built once (MustEncode, RewriteTemplate).
func mustMarshal(m proto.Message) []byte {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		panic("wire: encoding a reply: " + err.Error())
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
