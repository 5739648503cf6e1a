// Package extproc is Envoy's external-processing protocol for cortex-extproc:
// the per-request stream loop, message order, header and body mutations and
// immediate responses (shared/docs/envoy-ext-proc.md). It knows nothing
// about GPUs: decisions come from a Router.
package extproc

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/extproc/internal/wire"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/tracing"
	"github.com/helexa/cortex-extproc/routing"
)

// The headers of contract.md. A client-sent copy of any of them is removed
// from every request: a client can never pick its own upstream.
const (
	HeaderCluster     = "x-cortex-cluster"
	HeaderDestination = "x-gateway-destination-endpoint"
	HeaderNode        = "x-cortex-node"
	HeaderModel       = "x-cortex-model"
	HeaderColdStart   = "x-cortex-cold-start"
)

// Router decides where a request goes (routing.Router in production). A
// routed request is counted in flight on its target into lease, which the
// stream owns and releases once the upstream answered or the stream ended.
type Router interface {
	Route(model string, lease *routing.Lease) (routing.Target, routing.Waiter, *apierr.Error)
}

// ModelList answers GET /v1/models and GET /v1/models/{id} (JSON bodies),
// in OpenAI's shape, and in Anthropic's for clients that send an
// anthropic-version header.
type ModelList interface {
	List() []byte
	Get(id string) ([]byte, bool)
	AnthropicList() []byte
	AnthropicGet(id string) ([]byte, bool)
}

// Upstream turns a Target into the header that makes Envoy route to it.
type Upstream interface {
	// Header is the header name to set; Value its value for t, or an error
	// when t cannot be addressed (e.g. a hostname that does not resolve).
	Header() string
	Value(t *routing.Target) (string, *apierr.Error)
	// DynamicMetadataKey, when non-empty, also puts Value into dynamic
	// metadata namespace "envoy.lb" under this key (Gateway API Inference
	// Extension endpoint-picker protocol).
	DynamicMetadataKey() string
}

// ClusterHeader routes by Envoy cluster name (contract mode cluster_header).
type ClusterHeader struct{ Name string }

// Header implements Upstream.
func (c ClusterHeader) Header() string { return c.Name }

// Value implements Upstream.
func (c ClusterHeader) Value(t *routing.Target) (string, *apierr.Error) { return t.Cluster, nil }

// DynamicMetadataKey implements Upstream.
func (c ClusterHeader) DynamicMetadataKey() string { return "" }

// Observer receives what the stream loop did, for metrics and logs.
type Observer interface {
	StreamStarted()
	StreamEnded()
	// Decided is called once per request that reached a decision: t is the
	// target (zero on error), err the client-visible error (nil if routed),
	// decision the time from body received to reply ready, without waits.
	Decided(requestID string, t *routing.Target, err *apierr.Error, decision time.Duration)
	// Waited is called after a request was held for a cold load.
	Waited(model string, d time.Duration, err *apierr.Error)
	// Refused is called for a request answered with an error before any
	// decision: at the request headers (a path that is not routed, Envoy's
	// processing mode, an empty body, an unknown id in GET
	// /v1/models/{id}), or a body that came without its headers.
	Refused(requestID string, err *apierr.Error)
}

// Options configure a Server.
type Options struct {
	// MaxRequestBytes: a larger body answers 413.
	MaxRequestBytes int
	// ColdLoadTimeout is the longest a request waits for a load.
	ColdLoadTimeout time.Duration
	// MaxMessageTimeout must equal Envoy's max_message_timeout; it caps the
	// override_message_timeout sent before a wait.
	MaxMessageTimeout time.Duration
	Upstream          Upstream
	Models            ModelList // nil: /v1/models answers 404
	Observer          Observer  // nil: nothing observed
	Log               *slog.Logger
	// TranslateAnthropic reports whether a POST /v1/messages routed to a
	// neuron must be translated to /v1/chat/completions (and its answer
	// back), because that neuron does not serve /v1/messages itself
	// (anthropic.go). nil: never translate.
	TranslateAnthropic func(node string) bool
	// UpstreamFailed, when set, is told of a routed request whose
	// upstream failed the way a dead neuron fails: Envoy answered it
	// itself (how FailedLocalReply, status its 502/503/504), or its
	// stream ended before any response headers (FailedNoResponse, status
	// 0); or whose neuron answered 404, not holding the model
	// (FailedModelMissing). See upstreamfail.go. Called on the stream's
	// goroutine: it must not block.
	UpstreamFailed func(node, model string, status int, how string)
}

// overrideMargin is added to the cold-load timeout in the override so our
// own 503 always beats Envoy's bare 504; replyMargin is kept free at the end
// of Envoy's budget to send that 503.
const (
	overrideMargin = time.Minute
	replyMargin    = 5 * time.Second
)

// Server implements envoy.service.ext_proc.v3.ExternalProcessor.
type Server struct {
	extprocv3.UnimplementedExternalProcessorServer
	router Router
	opt    Options
	log    *slog.Logger
	remove []string // client-sent routing headers to strip
	parts  partsCache
	// headersReply is the same for every request with a body: continue,
	// and strip client-sent routing headers.
	headersReply *wire.Reply
}

// New builds a Server.
func New(r Router, opt Options) *Server {
	if opt.Upstream == nil {
		opt.Upstream = ClusterHeader{Name: HeaderCluster}
	}
	if opt.Log == nil {
		opt.Log = slog.Default()
	}
	if opt.MaxRequestBytes <= 0 {
		opt.MaxRequestBytes = 32 << 20
	}
	if opt.ColdLoadTimeout <= 0 {
		opt.ColdLoadTimeout = 30 * time.Minute
	}
	if opt.MaxMessageTimeout <= 0 {
		opt.MaxMessageTimeout = time.Hour
	}
	remove := []string{HeaderCluster, HeaderDestination, HeaderNode, HeaderModel, HeaderColdStart}
	if h := strings.ToLower(opt.Upstream.Header()); h != "" && !contains(remove, h) {
		remove = append(remove, h)
	}
	s := &Server{router: r, opt: opt, log: opt.Log, remove: remove}
	s.headersReply = wire.MustEncode(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
		RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: remove},
		}}}})
	return s
}

// WaitBudget returns the override_message_timeout to send before a cold-load
// wait and how long the wait may last so that our reply beats Envoy's timer.
func (s *Server) WaitBudget() (override, wait time.Duration) {
	override = min(s.opt.ColdLoadTimeout+overrideMargin, s.opt.MaxMessageTimeout)
	wait = min(s.opt.ColdLoadTimeout, override-replyMargin)
	return override, max(wait, time.Millisecond)
}

// stream is the state of one HTTP request (one gRPC stream).
type stream struct {
	srv       *Server
	grpc      extprocv3.ExternalProcessor_ProcessServer
	path      string
	method    string
	requestID string
	anthropic bool // Anthropic-shaped: /v1/messages, or anthropic-version sent
	sawHeader bool
	bodyDone  bool
	badMode   string // non-empty when Envoy's body mode cannot route
	target    routing.Target
	// awaiting: the body reply routed the request to target and its
	// response headers have not come yet.
	awaiting bool
	// lease counts the request in flight on its target (eviction never
	// picks such a model) until the upstream answered or the stream ended.
	lease routing.Lease
	parts *replyParts // set once routed
	// ax is the translation of an Anthropic request sent to an
	// OpenAI-only neuron; nil otherwise.
	ax *anthropicExchange
	// encodeErr is why a reply could not be encoded (see reply).
	encodeErr error
	// W3C trace context, read only while tracing is on.
	traceparent, tracestate string
	span                    trace.Span
}

// streams are recycled: the stream owns its request's lease, and handing
// that to the Router (an interface) would otherwise move every stream to
// the heap.
var streams = sync.Pool{New: func() any { return new(stream) }}

func newStream(s *Server, g extprocv3.ExternalProcessor_ProcessServer) *stream {
	st := streams.Get().(*stream)
	st.srv, st.grpc = s, g
	return st
}

// free ends the request's lease and recycles the stream; nothing refers to
// it once Process returns (replies being written hold only their own parts).
func (st *stream) free() {
	st.lease.Release()
	*st = stream{}
	streams.Put(st)
}

// Process handles one HTTP request's messages, strictly one reply per
// message and in order. Returning nil before answering would make Envoy
// forward the request unprocessed, so every path either replies or ends the
// stream with an error status. Every reply is a *wire.Reply, already in
// wire format: the stream must be served by NewGRPCServer's codec.
func (s *Server) Process(g extprocv3.ExternalProcessor_ProcessServer) error {
	if s.opt.Observer != nil {
		s.opt.Observer.StreamStarted()
		defer s.opt.Observer.StreamEnded()
	}
	st := newStream(s, g)
	defer st.free()
	ctx := g.Context()
	for {
		msg := new(wire.Received)
		if err := g.RecvMsg(msg); err != nil {
			// EOF: Envoy has what it needs (or half-closed after a client
			// hang-up). Canceled: the HTTP request is gone.
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled || ctx.Err() != nil {
				st.ended()
				return nil
			}
			return err
		}
		resp, err := st.handle(ctx, msg)
		if err == nil && resp == nil && st.encodeErr != nil {
			err = status.Errorf(codes.Internal, "cortex-extproc could not encode its reply to Envoy (%v); this is a bug: please report it with the request that caused it", st.encodeErr)
		}
		if err == nil && resp != nil {
			err = g.SendMsg(resp)
		}
		// Answered: the receive buffer goes back (a reply still being
		// written holds its own references to the body).
		msg.Release()
		if err != nil || resp == nil { // resp nil: the client went away while we waited
			return err
		}
	}
}

// checkMode records whether Envoy's request body mode lets us route: only
// BUFFERED (and BUFFERED_PARTIAL, whose body fits the buffer) keep the
// headers until the body reply.
func (st *stream) checkMode(pc *extprocv3.ProtocolConfiguration) {
	switch m := pc.GetRequestBodyMode(); m {
	case filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_BUFFERED_PARTIAL:
		st.badMode = ""
	default:
		st.badMode = m.String()
	}
}

// handle answers one message from Envoy. A nil reply without an error
// means the stream is gone (the client went away while we waited).
func (st *stream) handle(ctx context.Context, msg *wire.Received) (*wire.Reply, error) {
	req := &msg.Msg
	if pc := req.GetProtocolConfig(); pc != nil {
		st.checkMode(pc)
	}
	switch r := req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return st.requestHeaders(r.RequestHeaders), nil
	case *extprocv3.ProcessingRequest_RequestBody:
		return st.requestBody(ctx, r.RequestBody, msg)
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return continueRequestTrailers, nil
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return st.responseHeaders(r.ResponseHeaders), nil
	case *extprocv3.ProcessingRequest_ResponseBody:
		if st.ax != nil {
			return st.anthropicResponseBody(r.ResponseBody), nil
		}
		return continueResponseBody, nil
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return continueResponseTrailers, nil
	default:
		return nil, status.Errorf(codes.InvalidArgument, "cortex-extproc: unsupported ext_proc message %T; expected request/response headers, body or trailers", r)
	}
}

func (st *stream) requestHeaders(h *extprocv3.HttpHeaders) *wire.Reply {
	st.sawHeader = true
	for _, kv := range h.GetHeaders().GetHeaders() {
		switch kv.GetKey() {
		case ":path":
			st.path = knownString(rawValue(kv))
		case ":method":
			st.method = knownString(rawValue(kv))
		case "x-request-id":
			st.requestID = headerValue(kv)
		case "anthropic-version":
			st.anthropic = true
		case "traceparent", "tracestate":
			if tracing.Enabled() {
				st.traceHeader(kv.GetKey(), headerValue(kv))
			}
		}
	}
	if i := strings.IndexByte(st.path, '?'); i >= 0 {
		st.path = st.path[:i]
	}
	st.anthropic = st.anthropic || strings.HasPrefix(st.path, "/v1/messages")
	if h.GetEndOfStream() {
		return st.bodiless()
	}
	if !inferencePath(st.method, st.path) {
		// Never forward: the neuron serves its management API (/models/load,
		// /models/unload) on the inference port, and a body naming a cold
		// model would otherwise cold-load it first.
		return st.refused(notRouted(st.method, st.path))
	}
	if st.badMode != "" {
		return st.refused(&apierr.Error{Status: 500, Type: apierr.TypeAPI, Code: "extproc_misconfigured",
			Message: "Envoy's ext_proc filter sends the request body in mode " + st.badMode +
				"; cortex-extproc routes on the body and needs processing_mode.request_body_mode: BUFFERED (see envoy/envoy.yaml)",
			Reason: apierr.ReasonMisconfigured})
	}
	return st.srv.headersReply
}

// bodiless answers a request with no body: the model list, or a clear error.
func (st *stream) bodiless() *wire.Reply {
	if m := st.srv.opt.Models; m != nil && (st.method == "GET" || st.method == "HEAD") {
		if st.path == "/v1/models" || st.path == "/v1/models/" {
			if st.anthropic {
				return st.reply(jsonReply(200, m.AnthropicList(), "cortex_model_list"))
			}
			return st.reply(jsonReply(200, m.List(), "cortex_model_list"))
		}
		if id, ok := strings.CutPrefix(st.path, "/v1/models/"); ok {
			get := m.Get
			if st.anthropic {
				get = m.AnthropicGet
			}
			if body, ok := get(unescapePath(id)); ok {
				return st.reply(jsonReply(200, body, "cortex_model"))
			}
			return st.refused(apierr.ModelNotFound("model %q not found on any node, in the catalogue or among the aliases", unescapePath(id)))
		}
	}
	if st.method == "POST" {
		return st.refused(apierr.InvalidRequest("request body is empty: send a JSON object with a \"model\" field"))
	}
	return st.refused(notRouted(st.method, st.path))
}

// inferencePaths are the only paths routed to a neuron (routing.md, "Only
// inference is routed"), always with POST and a body.
var inferencePaths = map[string]bool{
	"/v1/chat/completions":   true,
	"/v1/completions":        true,
	"/v1/responses":          true,
	"/v1/embeddings":         true,
	"/v1/images/generations": true,
	"/v1/messages":           true,
}

func inferencePath(method, path string) bool { return method == "POST" && inferencePaths[path] }

// notRouted is the 404 for a request cortex-extproc will not forward.
func notRouted(method, path string) *apierr.Error {
	if path == "/v1/messages/count_tokens" {
		return apierr.NotFound("POST /v1/messages/count_tokens is not offered by cortex-extproc: token counting is not available on this fleet; send the request to /v1/messages and read usage.input_tokens from the answer")
	}
	return apierr.NotFound("cortex-extproc routes only POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/images/generations and /v1/messages with a JSON body, and answers GET /v1/models; %s %s is none of these and is not forwarded", method, path)
}

func (st *stream) requestBody(ctx context.Context, b *extprocv3.HttpBody, msg *wire.Received) (*wire.Reply, error) {
	if st.bodyDone {
		// BUFFERED sends exactly one body message; in other modes (or from a
		// confused peer) every further chunk still needs its reply.
		return continueBody, nil
	}
	st.bodyDone = true
	if !st.sawHeader {
		return st.refused(&apierr.Error{Status: 500, Type: apierr.TypeAPI, Code: "extproc_misconfigured",
			Message: "Envoy sent the request body without the request headers; cortex-extproc needs processing_mode.request_header_mode: SEND (see envoy/envoy.yaml)",
			Reason:  apierr.ReasonMisconfigured}), nil
	}
	start := time.Now()
	ctx, st.span = tracing.StartDecision(ctx, st.traceparent, st.tracestate, st.requestID)
	defer st.span.End() // decided ends it first; this covers a client gone mid-wait
	body := b.GetBody()
	if len(body) > st.srv.opt.MaxRequestBytes {
		return st.decided(nil, apierr.TooLarge("request body is %d bytes; the limit is %d (extproc.max_request_bytes)", len(body), st.srv.opt.MaxRequestBytes), start), nil
	}
	m, aerr := reqbody.Find(body)
	if aerr != nil {
		return st.decided(nil, aerr, start), nil
	}
	t, waiter, aerr := st.srv.router.Route(m.ID, &st.lease)
	if aerr != nil {
		return st.decided(&t, aerr, start), nil
	}
	if waiter != nil {
		decision := time.Since(start)
		var ok bool
		t, aerr, ok = st.wait(ctx, waiter)
		if !ok {
			return nil, nil
		}
		start = time.Now().Add(-decision) // the wait is not decision time
		if aerr != nil {
			return st.decided(&t, aerr, start), nil
		}
	}
	st.target = t
	value, aerr := st.srv.opt.Upstream.Value(&t)
	if aerr != nil {
		st.lease.Release() // not sent there after all
		return st.decided(&t, aerr, start), nil
	}
	if st.anthropic && st.srv.translates(&t) {
		resp, aerr := st.translateRequest(body, m, &t, value)
		if aerr != nil {
			st.lease.Release()
			return st.decided(&t, aerr, start), nil
		}
		st.awaiting = true
		st.decided(&t, nil, start)
		return resp, nil
	}
	resp := st.route(msg, body, m, &t, value)
	st.awaiting = true
	st.decided(&t, nil, start)
	return resp, nil
}

// wait holds the request for a cold load. It first sends the one standalone
// override_message_timeout Envoy accepts per message, then waits with its
// own deadline inside Envoy's. ok is false when the stream is gone.
func (st *stream) wait(ctx context.Context, w routing.Waiter) (routing.Target, *apierr.Error, bool) {
	override, budget := st.srv.WaitBudget()
	if err := st.grpc.Send(&extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(override)}); err != nil {
		w.Leave() // the stream is gone: give the waiter slot back
		return routing.Target{}, nil, false
	}
	wctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	start := time.Now()
	_, span := tracing.StartWait(ctx, w.Model())
	t, err := w.Wait(wctx, &st.lease)
	tracing.EndWait(span, err)
	if o := st.srv.opt.Observer; o != nil {
		o.Waited(w.Model(), time.Since(start), err)
	}
	if ctx.Err() != nil {
		st.srv.log.Info("client went away while waiting for a cold load; the load continues for others",
			"request_id", st.requestID, "model", w.Model(), "waited_ms", time.Since(start).Milliseconds())
		st.lease.Release()
		return routing.Target{}, nil, false
	}
	if err != nil && wctx.Err() != nil {
		err = apierr.Unavailable(5, "model %q is still loading after %s, the longest cortex-extproc holds a request (cold_load.timeout, extproc.max_message_timeout); retry shortly", w.Model(), budget.Round(time.Second)).WithReason(apierr.ReasonLoadTimeout)
	}
	return t, err, true
}

// route returns the body reply that sends the request to t: the routing
// headers, and for an alias the body with the model rewritten by sjson and
// its content-length (Envoy keeps the client's content-length in BUFFERED
// mode and rejects a body whose length differs from it). The body is sent
// back only when it changed; a large one is never copied (package wire).
func (st *stream) route(msg *wire.Received, body []byte, m reqbody.Model, t *routing.Target, value string) *wire.Reply {
	st.parts = st.srv.parts.get(st.srv.opt.Upstream, t, value)
	if t.Model == m.ID {
		return st.parts.routed
	}
	return st.parts.rewrite.Rewrite(msg, body, m)
}

// decided reports the decision and renders an error, if any (nil when
// routed).
func (st *stream) decided(t *routing.Target, err *apierr.Error, start time.Time) *wire.Reply {
	d := time.Since(start)
	if o := st.srv.opt.Observer; o != nil {
		o.Decided(st.requestID, t, err, d)
	}
	if st.span != nil && st.span.IsRecording() {
		var tt routing.Target
		if t != nil {
			tt = *t
		}
		tracing.EndDecision(st.span, tt.Requested, tt.Model, tt.Node, tt.ColdStart, err, d)
	}
	if err == nil {
		return nil
	}
	return st.immediate(err)
}

func (st *stream) responseHeaders(h *extprocv3.HttpHeaders) *wire.Reply {
	// The upstream has answered: the request no longer blocks an eviction
	// through us (the neuron's own in_flight covers the rest of a stream).
	st.lease.Release()
	st.upstreamAnswered(h)
	if st.ax != nil {
		return st.anthropicResponseHeaders(h)
	}
	if st.parts == nil {
		return plainResponseHeaders
	}
	return st.parts.responded
}

// refused reports a request answered before any decision, and renders its
// error.
func (st *stream) refused(e *apierr.Error) *wire.Reply {
	if o := st.srv.opt.Observer; o != nil {
		o.Refused(st.requestID, e)
	}
	return st.immediate(e)
}

// immediate renders a client-visible error as Envoy's local reply, in
// Anthropic's shape on /v1/messages and OpenAI's elsewhere.
func (st *stream) immediate(e *apierr.Error) *wire.Reply {
	body := e.OpenAIBody()
	if st.anthropic {
		body = e.AnthropicBody()
	}
	resp := jsonReply(e.Status, body, "cortex_"+e.Code)
	if e.RetryAfter > 0 {
		hm := resp.GetImmediateResponse().Headers
		hm.SetHeaders = append(hm.SetHeaders, setHeader("retry-after", strconv.Itoa(e.RetryAfter)))
	}
	return st.reply(resp)
}

// reply encodes a reply built for this request. Protobuf refuses only a
// string field that is not UTF-8, and these replies carry text only in
// header names, which are constants; should one ever fail, the stream ends
// with Internal (Envoy then answers 500 as for any ext_proc failure) and
// the log says why.
func (st *stream) reply(resp *extprocv3.ProcessingResponse) *wire.Reply {
	r, err := wire.Encode(resp)
	if err != nil {
		st.encodeErr = err
		st.srv.log.Error("encoding an ext_proc reply failed; ending the stream", "request_id", st.requestID, "error", err)
	}
	return r
}

func jsonReply(code int, body []byte, details string) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
		ImmediateResponse: immediateResponse(code, body, details)}}
}

// traceHeader keeps a W3C trace header for the decision span.
func (st *stream) traceHeader(key, value string) {
	if key == "traceparent" {
		st.traceparent = value
	} else {
		st.tracestate = value
	}
}

// setHeader overwrites a header. The value goes in raw_value only: Envoy
// reads raw_value, and setting both is rejected.
func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

// headerValue reads raw_value, falling back to value (older Envoy).
func headerValue(h *corev3.HeaderValue) string {
	if len(h.GetRawValue()) > 0 {
		return string(h.GetRawValue())
	}
	return h.GetValue()
}

// rawValue is headerValue without the copy.
func rawValue(h *corev3.HeaderValue) []byte {
	if len(h.GetRawValue()) > 0 {
		return h.GetRawValue()
	}
	return []byte(h.GetValue())
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
