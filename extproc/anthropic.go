package extproc

import (
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/extproc/internal/anthropic"
	"github.com/helexa/cortex-extproc/extproc/internal/reqbody"
	"github.com/helexa/cortex-extproc/extproc/internal/wire"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// Anthropic Messages on neurons that speak only OpenAI.
//
// A POST /v1/messages routed to such a neuron (Options.TranslateAnthropic)
// goes upstream as POST /v1/chat/completions with a translated body: the
// body reply sets :path and content-length beside the routing headers, and
// Envoy re-matches the route (clear_route_cache). Its answer comes back
// through ext_proc: the response-headers reply switches this one request's
// response body mode from the shipped NONE to STREAMED (mode_override,
// which Envoy honours only in a reply to a headers message and only with
// allow_mode_override), and each body chunk's reply carries its
// translation. STREAMED rather than FULL_DUPLEX_STREAMED: one reply per
// chunk, in order, is all the translation needs, FULL_DUPLEX cannot be
// reached by an override from a NONE config, and STREAMED keeps Envoy's
// per-message timer as a guard against a stuck translation. Other
// requests never pay for any of this: their response body mode stays NONE.

// chatCompletionsPath is where a translated request goes.
const chatCompletionsPath = "/v1/chat/completions"

// maxTranslatedAnswer bounds what is held to translate a whole answer (a
// non-streaming completion, or an error body).
const maxTranslatedAnswer = 32 << 20

// translatedMode is the mode_override of a translated request's answer:
// the response body streamed through ext_proc, everything else as shipped
// (envoy/envoy.yaml). Body modes in an override are always taken
// literally, so the request body mode (long past) is restated; the header
// and trailer modes are spelled out too, because older Envoys compare the
// override message itself, not its effect, with allowed_override_modes.
var translatedMode = &filterv3.ProcessingMode{
	RequestHeaderMode:   filterv3.ProcessingMode_SEND,
	ResponseHeaderMode:  filterv3.ProcessingMode_SEND,
	RequestBodyMode:     filterv3.ProcessingMode_BUFFERED,
	ResponseBodyMode:    filterv3.ProcessingMode_STREAMED,
	RequestTrailerMode:  filterv3.ProcessingMode_SKIP,
	ResponseTrailerMode: filterv3.ProcessingMode_SKIP,
}

// TranslatedMode is the processing mode cortex-extproc overrides to for a
// translated Anthropic request: the Envoy config needs allow_mode_override,
// and its allowed_override_modes, when set, must list exactly this.
func TranslatedMode() *filterv3.ProcessingMode {
	return proto.Clone(translatedMode).(*filterv3.ProcessingMode)
}

type answerKind int

const (
	answerStream answerKind = iota + 1 // 2xx SSE: translated chunk by chunk
	answerJSON                         // 2xx completion: translated whole
	answerError                        // non-2xx: an Anthropic error object
)

// anthropicExchange is the state of one translated request.
type anthropicExchange struct {
	requested string // the model the client named: Anthropic answers echo it
	stream    bool
	thinking  bool

	kind     answerKind
	status   int
	sse      *anthropic.Stream
	buf      []byte
	overflow bool
}

func (x *anthropicExchange) options() []anthropic.Option {
	return []anthropic.Option{anthropic.WithThinking(x.thinking)}
}

// translates reports whether t's neuron needs /v1/messages translated.
func (s *Server) translates(t *routing.Target) bool {
	return s.opt.TranslateAnthropic != nil && s.opt.TranslateAnthropic(t.Node)
}

// translateRequest is the body reply that sends an Anthropic Messages
// request to t as a chat completion.
func (st *stream) translateRequest(body []byte, m reqbody.Model, t *routing.Target, value string) (*wire.Reply, *apierr.Error) {
	req, err := anthropic.TranslateRequest(body, t.Model)
	if err != nil {
		return nil, apierr.InvalidRequest("%s", err.Error())
	}
	st.ax = &anthropicExchange{requested: string(m.ID), stream: req.Stream, thinking: req.Thinking}
	up := st.srv.opt.Upstream
	set := append(cortexHeaders(t, up.Header(), value),
		setHeader(":path", chatCompletionsPath),
		setHeader("content-length", strconv.Itoa(len(req.Body))))
	return st.reply(&extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
			HeaderMutation:  &extprocv3.HeaderMutation{SetHeaders: set},
			BodyMutation:    &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: req.Body}},
			ClearRouteCache: true,
		}}},
		DynamicMetadata: dynamicMetadata(up.DynamicMetadataKey(), value),
	}), nil
}

// cortexHeaders are the routing headers of a routed request: the upstream
// header first, then x-cortex-node, -model and -cold-start (also set on
// the answer).
func cortexHeaders(t *routing.Target, upstreamHeader, value string) []*corev3.HeaderValueOption {
	return []*corev3.HeaderValueOption{
		setHeader(upstreamHeader, value),
		setHeader(HeaderNode, t.Node),
		setHeader(HeaderModel, t.Model),
		setHeader(HeaderColdStart, strconv.FormatBool(t.ColdStart)),
	}
}

// anthropicResponseHeaders answers the upstream's response headers of a
// translated request: our headers, the content type of what the client
// will get, and the switch to a streamed response body.
func (st *stream) anthropicResponseHeaders(h *extprocv3.HttpHeaders) *wire.Reply {
	x := st.ax
	ct := ""
	for _, kv := range h.GetHeaders().GetHeaders() {
		switch kv.GetKey() {
		case ":status":
			x.status, _ = strconv.Atoi(headerValue(kv))
		case "content-type":
			ct = headerValue(kv)
		}
	}
	switch {
	case x.status < 200 || x.status > 299:
		x.kind, ct = answerError, "application/json"
	case x.stream && isEventStream(ct):
		x.kind = answerStream
		x.sse = anthropic.NewStream(x.requested, x.options()...)
	default:
		x.kind, ct = answerJSON, "application/json"
	}
	if h.GetEndOfStream() {
		// No body will follow: an error gets its Anthropic body now.
		if x.kind == answerError {
			return st.reply(jsonReply(x.status, anthropic.TranslateError(x.status, nil), "cortex_anthropic_upstream_error"))
		}
		return st.reply(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
				HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: cortexHeaders(&st.target, "", "")[1:]}}}}})
	}
	set := append(cortexHeaders(&st.target, "", "")[1:], setHeader("content-type", ct))
	return st.reply(&extprocv3.ProcessingResponse{
		Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
			// The translation changes the length; Envoy drops the header in
			// STREAMED mode anyway.
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: set, RemoveHeaders: []string{"content-length"}},
		}}},
		ModeOverride: translatedMode,
	})
}

func isEventStream(ct string) bool {
	return len(ct) >= len("text/event-stream") && ct[:len("text/event-stream")] == "text/event-stream"
}

// anthropicResponseBody translates one chunk of the upstream's answer.
// Streams are translated as they come (nothing of the answer is held but an
// unfinished line); whole answers are held until the last chunk.
func (st *stream) anthropicResponseBody(b *extprocv3.HttpBody) *wire.Reply {
	x := st.ax
	chunk, end := b.GetBody(), b.GetEndOfStream()
	var out []byte
	switch x.kind {
	case answerStream:
		out = x.sse.Write(chunk)
		if end {
			out = append(out, x.sse.Close()...)
		}
	case answerJSON, answerError:
		if !x.overflow {
			if len(x.buf)+len(chunk) > maxTranslatedAnswer {
				x.overflow, x.buf = true, nil
			} else {
				x.buf = append(x.buf, chunk...)
			}
		}
		if end {
			out = x.finish()
		}
	default:
		// A body without the headers reply that set x.kind: pass it on.
		return continueResponseBody
	}
	bm := &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_ClearBody{ClearBody: true}}
	if len(out) > 0 {
		bm = &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: out}}
	}
	return st.reply(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
		ResponseBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{BodyMutation: bm}}}})
}

// finish translates a whole answer.
func (x *anthropicExchange) finish() []byte {
	if x.overflow {
		return anthropic.ErrorBody(anthropic.ErrorType(502),
			"the neuron's answer is larger than "+strconv.Itoa(maxTranslatedAnswer>>20)+
				" MiB, the most cortex-extproc translates to Anthropic's format; ask for fewer tokens or stream the answer")
	}
	if x.kind == answerError {
		return anthropic.TranslateError(x.status, x.buf)
	}
	out, err := anthropic.TranslateResponse(x.buf, x.requested, x.options()...)
	if err != nil {
		return anthropic.ErrorBody(anthropic.ErrorType(502), "the neuron's answer could not be translated to Anthropic's format: "+err.Error())
	}
	return out
}
