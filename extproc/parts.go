package extproc

import (
	"strconv"
	"sync"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/helexa/cortex-extproc/routing"
)

// replyParts are the pieces of a routing reply that depend only on the
// target, built once and shared by every request to it. Protobuf messages
// are safe to marshal concurrently as long as nobody mutates them, so these
// are never modified after they are cached: a reply that needs one more
// header copies the slice.
type replyParts struct {
	set      []*corev3.HeaderValueOption // upstream header, node, model, cold start
	response []*corev3.HeaderValueOption // node, model, cold start (response direction)
	metadata *structpb.Struct
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
	cold := strconv.FormatBool(t.ColdStart)
	p := &replyParts{
		set: []*corev3.HeaderValueOption{
			setHeader(up.Header(), value),
			setHeader(HeaderNode, t.Node),
			setHeader(HeaderModel, t.Model),
			setHeader(HeaderColdStart, cold),
		},
		metadata: dynamicMetadata(up.DynamicMetadataKey(), value),
	}
	p.response = p.set[1:]
	if c.n.Add(1) > maxCachedParts {
		c.m.Store(&sync.Map{})
		c.n.Store(0)
	}
	if prev, loaded := m.LoadOrStore(k, p); loaded {
		return prev.(*replyParts)
	}
	return p
}

// Replies that never vary are built once.
var (
	continueBody = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{}}}
	continueRequestTrailers = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
		RequestTrailers: &extprocv3.TrailersResponse{}}}
	continueResponseBody = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
		ResponseBody: &extprocv3.BodyResponse{}}}
	continueResponseTrailers = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
		ResponseTrailers: &extprocv3.TrailersResponse{}}}
	plainResponseHeaders = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
		ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{HeaderMutation: &extprocv3.HeaderMutation{}}}}}
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
