package wire

import (
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// A request body is not copied out of gRPC's receive buffer. protobuf
// copies every bytes field it decodes, so a large body would be one fresh
// allocation of its size per request (and the garbage collector's work);
// instead the request_body message is decoded around its body, and
// HttpBody.body is a slice of the (pooled) buffer gRPC received it in. The
// stream holds that buffer until it has answered the message; a reply that
// sends parts of the body back holds its own references to it, which gRPC
// releases once they are written.

// Received is one message from Envoy, decoded by Codec.Unmarshal.
type Received struct {
	Msg extprocv3.ProcessingRequest
	// buf, when set, holds msg's request body at body[bodyOff:]; the
	// stream frees it (Release) after answering.
	buf     mem.Buffer
	bodyOff int
}

// Release gives the receive buffer back once the message is answered.
func (r *Received) Release() {
	if r.buf != nil {
		r.buf.Free()
		r.buf = nil
	}
}

// piece returns body[from:to] of r's aliased request body as a view of the
// receive buffer for a reply, holding its own reference.
func (r *Received) piece(from, to int) mem.Buffer {
	return r.buf.Slice(r.bodyOff+from, r.bodyOff+to)
}

// minAliasedBody: smaller messages are decoded the ordinary way; copying a
// few kilobytes is cheaper than the bookkeeping.
const minAliasedBody = 16 << 10

// unmarshal decodes data into r, aliasing a large request body.
func (r *Received) unmarshal(data mem.BufferSlice, fallback func(mem.BufferSlice, any) error) error {
	if data.Len() < minAliasedBody {
		return fallback(data, &r.Msg)
	}
	return r.decode(data.MaterializeToBuffer(mem.DefaultBufferPool()))
}

// decode decodes buf into r, keeping buf (r.buf) when the body aliases it
// and freeing it otherwise.
func (r *Received) decode(buf mem.Buffer) error {
	b := buf.ReadOnlyData()
	sp, ok := findBody(b)
	if !ok {
		defer buf.Free()
		return proto.Unmarshal(b, &r.Msg)
	}
	hb := &extprocv3.HttpBody{}
	// Both messages are decoded from their bytes minus one field (what is
	// left is runs of whole fields), merging, and the body is set by hand.
	outer := b[sp.outer.contentStart:sp.outer.contentEnd]
	if err := unmarshalAround(b, sp.outer, &r.Msg); err != nil {
		buf.Free()
		return err
	}
	if err := unmarshalAround(outer, sp.inner.shift(-sp.outer.contentStart), hb); err != nil {
		buf.Free()
		return err
	}
	hb.Body = b[sp.inner.contentStart:sp.inner.contentEnd:sp.inner.contentEnd]
	r.Msg.Request = &extprocv3.ProcessingRequest_RequestBody{RequestBody: hb}
	r.buf, r.bodyOff = buf, sp.inner.contentStart
	return nil
}

// field is where one length-delimited field sits in a message's bytes:
// b[start:end] is the whole field, b[contentStart:contentEnd] its content.
type field struct{ start, end, contentStart, contentEnd int }

func (f field) shift(d int) field {
	return field{f.start + d, f.end + d, f.contentStart + d, f.contentEnd + d}
}

// bodySpan locates a request body in an encoded ProcessingRequest: the
// request_body field (outer) and within it the HttpBody.body field (inner,
// whose content is the body), both at offsets in the whole message.
type bodySpan struct{ outer, inner field }

var (
	numPRRequestBody = fieldNumber(&extprocv3.ProcessingRequest{}, "request_body")
	numHBBody        = fieldNumber(&extprocv3.HttpBody{}, "body")
	// prOneof: the fields of ProcessingRequest's "request" oneof.
	prOneof = oneofNumbers(&extprocv3.ProcessingRequest{}, "request")
)

func oneofNumbers(m proto.Message, name protoreflect.Name) map[protowire.Number]bool {
	o := m.ProtoReflect().Descriptor().Oneofs().ByName(name)
	if o == nil {
		panic("wire: no oneof " + string(name))
	}
	nums := map[protowire.Number]bool{}
	for i := 0; i < o.Fields().Len(); i++ {
		nums[o.Fields().Get(i).Number()] = true
	}
	return nums
}

// findBody reports where the body is when b is a ProcessingRequest whose
// only oneof member is one request_body field holding one body field. Any
// other shape (including the repeated fields protobuf would merge) is left
// to the ordinary decoder.
func findBody(b []byte) (bodySpan, bool) {
	var sp bodySpan
	outer, ok := onlyField(b, numPRRequestBody, prOneof)
	if !ok {
		return sp, false
	}
	content := b[outer.contentStart:outer.contentEnd]
	inner, ok := onlyField(content, numHBBody, map[protowire.Number]bool{numHBBody: true})
	if !ok {
		return sp, false
	}
	return bodySpan{outer: outer, inner: inner.shift(outer.contentStart)}, true
}

// onlyField finds the one length-delimited field num in b, and checks that
// no other field of the group (num's oneof, or num itself) occurs. It fails
// on malformed input, which the ordinary decoder then reports.
func onlyField(b []byte, num protowire.Number, group map[protowire.Number]bool) (field, bool) {
	var found field
	seen := false
	for i := 0; i < len(b); {
		n, typ, tagLen := protowire.ConsumeTag(b[i:])
		if tagLen < 0 {
			return field{}, false
		}
		if n == num {
			if seen || typ != protowire.BytesType {
				return field{}, false
			}
			v, vLen := protowire.ConsumeBytes(b[i+tagLen:])
			if vLen < 0 {
				return field{}, false
			}
			end := i + tagLen + vLen
			found = field{start: i, end: end, contentStart: end - len(v), contentEnd: end}
			seen = true
			i = end
			continue
		}
		if group[n] {
			return field{}, false
		}
		vLen := protowire.ConsumeFieldValue(n, typ, b[i+tagLen:])
		if vLen < 0 {
			return field{}, false
		}
		i += tagLen + vLen
	}
	return found, seen
}

// unmarshalAround decodes b without the field f into m (merging the parts
// before and after it).
func unmarshalAround(b []byte, f field, m proto.Message) error {
	opts := proto.UnmarshalOptions{Merge: true}
	if err := opts.Unmarshal(b[:f.start], m); err != nil {
		return err
	}
	return opts.Unmarshal(b[f.end:], m)
}
