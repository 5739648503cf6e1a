package benchtool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// envoyWindow is Envoy's default HTTP/2 stream and connection window
// (http2_protocol_options initial_*_window_size, 256 MiB): Envoy never makes
// the server wait for flow-control credit to send a 1 MB body back, so the
// bench client must not either.
const envoyWindow = 256 << 20

// dial opens the one HTTP/2 connection all workers share, as Envoy uses one
// connection per ext_proc cluster host by default.
func dial(addr string) (*grpc.ClientConn, error) {
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMsg), grpc.MaxCallSendMsgSize(maxMsg)),
		grpc.WithInitialWindowSize(envoyWindow),
		grpc.WithInitialConnWindowSize(envoyWindow),
	)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return conn, nil
}

// request is what one simulated HTTP request sends; body is shared by all
// workers and never written.
type request struct {
	path            string
	body            []byte
	responseHeaders bool
	timeout         time.Duration
}

// outcome is what one request got back.
type outcome struct {
	latency   time.Duration // first message sent → last reply received
	err       error         // transport or protocol error: the request failed
	immediate *extprocv3.ImmediateResponse
	mutated   bool // the body reply replaced the body
	overrides int  // standalone override_message_timeout replies skipped
	headers   *extprocv3.ProcessingResponse
	bodyReply *extprocv3.ProcessingResponse
}

// do runs one HTTP request's ext_proc exchange exactly as Envoy does with
// request_header_mode SEND, request_body_mode BUFFERED: headers, wait for
// the reply, the whole body with end_of_stream, wait for the reply
// (skipping standalone override_message_timeout replies), optionally
// response headers, then half-close.
func do(ctx context.Context, client extprocv3.ExternalProcessorClient, r *request, requestID string) (o outcome) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	start := time.Now()
	stream, err := client.Process(ctx)
	if err != nil {
		o.err = fmt.Errorf("open stream: %w", err)
		return o
	}
	defer func() {
		// Half-close and wait for the server to end the stream, so no stream
		// outlives its request; not part of the latency (Envoy does not wait).
		if o.err == nil {
			if err := stream.CloseSend(); err != nil {
				o.err = fmt.Errorf("half-close: %w", err)
				return
			}
			for {
				if _, err := stream.Recv(); err != nil {
					if !errors.Is(err, io.EOF) {
						o.err = fmt.Errorf("server ended the stream with %w", err)
					}
					return
				}
			}
		}
	}()

	if err := stream.Send(headersMessage(r, requestID)); err != nil {
		o.err = fmt.Errorf("send request_headers: %w", err)
		return o
	}
	resp, err := recvReply(stream, &o)
	if err != nil {
		o.err = fmt.Errorf("request_headers reply: %w", err)
		return o
	}
	o.headers = resp
	if o.immediate = resp.GetImmediateResponse(); o.immediate != nil {
		o.latency = time.Since(start)
		return o
	}
	if resp.GetRequestHeaders() == nil {
		o.err = fmt.Errorf("request_headers answered with %s; Envoy treats that as a spurious message and fails the request", replyKind(resp))
		return o
	}

	if err := stream.Send(&extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: r.body, EndOfStream: true}}}); err != nil {
		o.err = fmt.Errorf("send request_body: %w", err)
		return o
	}
	resp, err = recvReply(stream, &o)
	if err != nil {
		o.err = fmt.Errorf("request_body reply: %w", err)
		return o
	}
	o.bodyReply = resp
	if o.immediate = resp.GetImmediateResponse(); o.immediate != nil {
		o.latency = time.Since(start)
		return o
	}
	br := resp.GetRequestBody()
	if br == nil {
		o.err = fmt.Errorf("request_body answered with %s; Envoy treats that as a spurious message and fails the request", replyKind(resp))
		return o
	}
	if nb := br.GetResponse().GetBodyMutation().GetBody(); nb != nil {
		o.mutated = true
		// Envoy rejects a replaced body whose content-length it keeps (§2.4).
		if cl := headerSet(br.GetResponse().GetHeaderMutation(), "content-length"); cl != strconv.Itoa(len(nb)) {
			o.err = fmt.Errorf("body replaced (%d bytes) with content-length %q; Envoy answers 500 mismatch_between_content_length_and_the_length_of_the_mutated_body", len(nb), cl)
			return o
		}
	}

	if r.responseHeaders {
		if err := stream.Send(responseHeadersMessage(requestID)); err != nil {
			o.err = fmt.Errorf("send response_headers: %w", err)
			return o
		}
		resp, err := recvReply(stream, &o)
		if err != nil {
			o.err = fmt.Errorf("response_headers reply: %w", err)
			return o
		}
		if resp.GetResponseHeaders() == nil && resp.GetImmediateResponse() == nil {
			o.err = fmt.Errorf("response_headers answered with %s; Envoy treats that as a spurious message", replyKind(resp))
			return o
		}
	}
	o.latency = time.Since(start)
	return o
}

// recvReply returns the next real reply: a standalone
// override_message_timeout only extends Envoy's timer, the answer follows.
func recvReply(stream extprocv3.ExternalProcessor_ProcessClient, o *outcome) (*extprocv3.ProcessingResponse, error) {
	for {
		resp, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil, errors.New("server ended the stream without replying; Envoy would forward the request unprocessed")
			}
			return nil, err
		}
		if resp.GetResponse() == nil && resp.GetOverrideMessageTimeout() != nil {
			o.overrides++
			continue
		}
		return resp, nil
	}
}

func replyKind(resp *extprocv3.ProcessingResponse) string {
	if resp.GetResponse() == nil {
		return "an empty ProcessingResponse"
	}
	return fmt.Sprintf("%T", resp.GetResponse())
}

// headerSet is the value a header mutation sets for key ("" if none).
func headerSet(hm *extprocv3.HeaderMutation, key string) string {
	for _, h := range hm.GetSetHeaders() {
		if h.GetHeader().GetKey() == key {
			if v := h.GetHeader().GetRawValue(); len(v) > 0 {
				return string(v)
			}
			return h.GetHeader().GetValue()
		}
	}
	return ""
}

func raw(k, v string) *corev3.HeaderValue { return &corev3.HeaderValue{Key: k, RawValue: []byte(v)} }

// headersMessage is Envoy's first message for a client's POST: lower-case
// keys, values in raw_value, x-request-id added by the HCM, and the
// protocol_config Envoy puts on a stream's first message.
func headersMessage(r *request, requestID string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
				raw(":authority", "llm.example.com"),
				raw(":path", r.path),
				raw(":method", "POST"),
				raw(":scheme", "https"),
				raw("content-type", "application/json"),
				raw("content-length", strconv.Itoa(len(r.body))),
				raw("accept", "application/json"),
				raw("user-agent", "OpenAI/Python 1.99.9"),
				raw("authorization", "Bearer sk-bench-0123456789abcdef0123456789abcdef"),
				raw("x-forwarded-proto", "https"),
				raw("x-request-id", requestID),
			}},
			EndOfStream: false,
		}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{
			RequestBodyMode:  filterv3.ProcessingMode_BUFFERED,
			ResponseBodyMode: filterv3.ProcessingMode_NONE,
		},
	}
}

func responseHeadersMessage(requestID string) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			raw(":status", "200"),
			raw("content-type", "text/event-stream"),
			raw("cache-control", "no-cache"),
			raw("x-request-id", requestID),
		}}}}}
}
