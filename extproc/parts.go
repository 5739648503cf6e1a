package extproc

import (
	"strconv"
	"sync"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/extproc/internal/wire"
	"github.com/helexa/cortex-extproc/routing"
)

// replyParts are the replies that depend only on the target, encoded once
// and shared by every request to it (see package wire): the body reply that
// routes an unchanged body, the template of one that routes a rewritten
// body, and the response-headers reply.
type replyParts struct {
	routed    *wire.Reply
	rewrite   wire.RewriteTemplate
	responded *wire.Reply
}

type partsKey struct {
	value, node, model string
	cold               bool
}

// maxCachedParts bounds the cache: targets are (neuron, model) pairs the
// fleet has, not client input, but endpoints and fleets change over time.
const maxCachedParts = 4096

type partsCache struct {
	m atomic.Pointer[sync.Map]
	n atomic.Int64
}

func (c *partsCache) get(up Upstream, t *routing.Target, value string) *replyParts {
	m := c.m.Load()
	if m == nil {
		c.m.CompareAndSwap(nil, &sync.Map{})
		m = c.m.Load()
	}
	k := partsKey{value: value, node: t.Node, model: t.Model, cold: t.ColdStart}
	if p, ok := m.Load(k); ok {
		return p.(*replyParts)
	}
	p := newReplyParts(up, t, value)
	if c.n.Add(1) > maxCachedParts {
		c.m.Store(&sync.Map{})
		c.n.Store(0)
	}
	if prev, loaded := m.LoadOrStore(k, p); loaded {
		return prev.(*replyParts)
	}
	return p
}

// newReplyParts encodes the replies for target t: the routing headers (the
// upstream header, node, model, cold start) and a route cache clear in the
// same CommonResponse (Envoy ignores the clear without a header mutation);
// node, model and cold start again on the response to the client.
func newReplyParts(up Upstream, t *routing.Target, value string) *replyParts {
	set := []*corev3.HeaderValueOption{
		setHeader(up.Header(), value),
		setHeader(HeaderNode, t.Node),
		setHeader(HeaderModel, t.Model),
		setHeader(HeaderColdStart, strconv.FormatBool(t.ColdStart)),
	}
	md := dynamicMetadata(up.DynamicMetadataKey(), value)
	routed := &extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation:  &extprocv3.HeaderMutation{SetHeaders: set},
			ClearRouteCache: true,
		}}},
		DynamicMetadata: md,
	}
	responded := &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: set[1:]}}}}}
	return &replyParts{
		routed:    wire.MustEncode(routed),
		rewrite:   wire.NewRewriteTemplate(set, t.Model, &extprocv3.ProcessingResponse{DynamicMetadata: md}),
		responded: wire.MustEncode(responded),
	}
}

// Replies that never vary are encoded once.
var (
	continueBody = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{}}})
	continueRequestTrailers = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
		RequestTrailers: &extprocv3.TrailersResponse{}}})
	continueResponseBody = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
		ResponseBody: &extprocv3.BodyResponse{}}})
	continueResponseTrailers = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
		ResponseTrailers: &extprocv3.TrailersResponse{}}})
	plainResponseHeaders = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{}}}}})
)

// knownString returns a constant for the values most requests carry, so
// reading them allocates nothing; anything else is copied.
func knownString(b []byte) string {
	switch string(b) {
	case "POST":
		return "POST"
	case "GET":
		return "GET"
	case "/v1/chat/completions":
		return "/v1/chat/completions"
	case "/v1/completions":
		return "/v1/completions"
	case "/v1/responses":
		return "/v1/responses"
	case "/v1/embeddings":
		return "/v1/embeddings"
	case "/v1/messages":
		return "/v1/messages"
	case "/v1/models":
		return "/v1/models"
	}
	return string(b)
}
