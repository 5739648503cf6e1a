package wire

import (
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/mem"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
)

// RewriteTemplate is what a body reply with a rewritten body shares with
// every other such reply to the same target. Fields are laid out in the
// order protobuf-go writes them (dynamic metadata before the oneof), so the
// reply is byte for byte what proto.Marshal would produce.
type RewriteTemplate struct {
	metadata   []byte // ProcessingResponse.dynamic_metadata, or nothing
	setHeaders []byte // HeaderMutation.set_headers entries for the target's headers
	model      []byte // the target's model id as a JSON string
	tail       []byte // the rest of CommonResponse after the body: clear_route_cache
	// modelPiece and tailPiece are model and tail as reply pieces, made
	// once: shared by every reply, never modified, and freeing them (gRPC
	// does, once written) does nothing.
	modelPiece, tailPiece mem.Buffer
}

// NewRewriteTemplate encodes what surrounds the body in a reply that routes
// with the set headers and a body whose model becomes model.
func NewRewriteTemplate(set []*corev3.HeaderValueOption, model string, md *extprocv3.ProcessingResponse) RewriteTemplate {
	t := RewriteTemplate{
		metadata:   mustMarshal(md),
		setHeaders: mustMarshal(&extprocv3.HeaderMutation{SetHeaders: set}),
		model:      reqbody.Quote(model),
		tail:       mustMarshal(&extprocv3.CommonResponse{ClearRouteCache: true}),
	}
	t.modelPiece, t.tailPiece = mem.SliceBuffer(t.model), mem.SliceBuffer(t.tail)
	return t
}

// Rewrite encodes the body reply that sends msg's body with its model m
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
func (t *RewriteTemplate) Rewrite(msg *Received, body []byte, m reqbody.Model) *Reply {
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
		return &Reply{pieces: mem.BufferSlice{mem.SliceBuffer(p)}}
	}
	if rewritten {
		return &Reply{pieces: mem.BufferSlice{mem.SliceBuffer(p), msg.piece(end, len(body)), t.tailPiece}}
	}
	return &Reply{pieces: mem.BufferSlice{
		mem.SliceBuffer(p), msg.piece(0, start), t.modelPiece, msg.piece(end, len(body)), t.tailPiece,
	}}
}

const headerContentLength = "content-length"
