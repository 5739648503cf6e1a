package extproc_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/routing"
)

// fuzzRouter is the fixture fleet plus models whose name makes them wait:
// "wait/ok…" is loaded at once, "wait/fail…" fails, "wait/hang…" never
// finishes (the server's own wait budget ends it).
type fuzzRouter struct{ inner *routing.Router }

func (r fuzzRouter) Route(model string, lease *routing.Lease) (routing.Target, routing.Waiter, *apierr.Error) {
	if strings.HasPrefix(model, "wait/") {
		return routing.Target{}, fuzzWaiter(model), nil
	}
	return r.inner.Route(model, lease)
}

type fuzzWaiter string

func (w fuzzWaiter) Model() string { return string(w) }

func (w fuzzWaiter) Leave() {}

func (w fuzzWaiter) Wait(ctx context.Context, _ *routing.Lease) (routing.Target, *apierr.Error) {
	switch {
	case strings.HasPrefix(string(w), "wait/ok"):
		return routing.Target{Requested: string(w), Model: string(w), Node: "beast", Cluster: "neuron-beast",
			Endpoint: "http://beast:13131", ColdStart: true}, nil
	case strings.HasPrefix(string(w), "wait/fail"):
		return routing.Target{Model: string(w)}, apierr.Unavailable(5, "cold load of %q failed", string(w))
	}
	<-ctx.Done()
	return routing.Target{Model: string(w)}, apierr.Unavailable(5, "still loading")
}

// startBufconn serves an extproc.Server over an in-memory listener.
func startBufconn(tb testing.TB, r extproc.Router, opt extproc.Options) extprocv3.ExternalProcessorClient {
	lis := bufconn.Listen(1 << 20)
	srv := extproc.NewGRPCServer(extproc.New(r, opt))
	go srv.Serve(lis)
	conn, err := grpc.NewClient("passthrough:///bufconn",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close(); srv.Stop() })
	return extprocv3.NewExternalProcessorClient(conn)
}

// script turns fuzz bytes into ext_proc messages.
type script struct{ b []byte }

func (s *script) next() (byte, bool) {
	if len(s.b) == 0 {
		return 0, false
	}
	c := s.b[0]
	s.b = s.b[1:]
	return c, true
}

func (s *script) take(n int) []byte {
	n = min(n, len(s.b))
	out := s.b[:n]
	s.b = s.b[n:]
	return out
}

var (
	fuzzPaths = []string{"/v1/chat/completions", "/v1/messages", "/v1/models", "/v1/models/Qwen%2FQwen3-1.7B",
		"/v1/models/nope%0d%0ax-evil:%201", "/v1/completions?x=1", "/admin", "", "/v1/models/",
		"/models/load", "/models/unload"}
	fuzzMethods = []string{"POST", "GET", "HEAD", "PUT", ""}
	fuzzBodies  = []string{
		`{"model":"helexa/small","messages":[]}`,
		`{"model":"Qwen/Qwen3-1.7B"}`,
		`{"model":"Qwen/Qwen3-8B"}`,
		`{"model":"helexa/large"}`,
		`{"model":"helexa/sick"}`,
		`{"model":"Nope/Nope"}`,
		`{"model":"wait/ok"}`,
		`{"model":"wait/fail"}`,
		`{"model":"wait/hang"}`,
		`{"model":"a\r\nx-cortex-cluster: evil"}`,
		`{"model":"a","model":"b"}`,
		`{"model":7}`,
		`not json`,
		``,
		`{"model":"` + strings.Repeat("x", 300) + `"}`,
	}
	fuzzModes = []filterv3.ProcessingMode_BodySendMode{filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_STREAMED,
		filterv3.ProcessingMode_BUFFERED_PARTIAL, filterv3.ProcessingMode_NONE, filterv3.ProcessingMode_FULL_DUPLEX_STREAMED}
)

// message builds the next message; kind names the reply it needs, "" for
// the unknown message that must end the stream with an error status.
func (s *script) message() (*extprocv3.ProcessingRequest, string, bool) {
	op, ok := s.next()
	if !ok {
		return nil, "", false
	}
	arg, _ := s.next()
	var m *extprocv3.ProcessingRequest
	var want string
	switch op % 9 {
	case 0, 1: // request headers, without or with end_of_stream
		kv := []string{":method", fuzzMethods[int(arg)%len(fuzzMethods)], ":path", fuzzPaths[int(arg>>3)%len(fuzzPaths)],
			"x-request-id", "fuzz", "x-cortex-cluster", "neuron-evil"}
		if arg&0x80 != 0 {
			raw, _ := s.next()
			kv = append(kv, ":path", string(s.take(int(raw%64))))
		}
		m, want = hdrs(op%9 == 1, kv...), "request_headers"
		m.ProtocolConfig = nil
	case 2, 3: // request body, complete or not
		var body []byte
		if arg < 200 {
			body = []byte(fuzzBodies[int(arg)%len(fuzzBodies)])
		} else {
			n, _ := s.next()
			body = s.take(int(n))
		}
		m = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
			RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: op%9 == 2}}}
		want = "request_body"
	case 4:
		m, want = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestTrailers{
			RequestTrailers: &extprocv3.HttpTrailers{}}}, "request_trailers"
	case 5:
		m, want = respHeaders(), "response_headers"
	case 6:
		m, want = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
			ResponseBody: &extprocv3.HttpBody{Body: s.take(int(arg % 32)), EndOfStream: arg&1 == 1}}}, "response_body"
	case 7:
		m, want = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseTrailers{
			ResponseTrailers: &extprocv3.HttpTrailers{}}}, "response_trailers"
	case 8: // no request set: a message type this server does not know
		m, want = &extprocv3.ProcessingRequest{}, ""
	}
	if op&0x80 != 0 {
		m.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: fuzzModes[int(op>>4)%len(fuzzModes)]}
	}
	return m, want, true
}

// validReply reports whether r answers a message needing want: the
// matching response, or an immediate response where Envoy accepts one.
func validReply(want string, r *extprocv3.ProcessingResponse) bool {
	got := kind(r)
	if got == want {
		return true
	}
	return got == "immediate_response" && (want == "request_headers" || want == "request_body" || want == "response_headers")
}

// FuzzProcessSequence sends random sequences of ProcessingRequests on one
// stream, reading a reply after each as Envoy does. For every sequence: the
// server never panics; every message gets exactly one reply of a type
// Envoy accepts for it (a standalone override_message_timeout may precede
// a body reply); immediate responses carry a JSON body; the stream never
// ends with OK before a message is answered (Envoy would forward the
// request unprocessed); only an unknown message ends it, with an error.
func FuzzProcessSequence(f *testing.F) {
	cat, snap := fixture()
	inner := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	client := startBufconn(f, fuzzRouter{inner}, extproc.Options{
		MaxRequestBytes: 200,
		ColdLoadTimeout: time.Millisecond, // "wait/hang" ends at once with our 503
		Models:          modellist.New(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }),
		// /v1/messages to rig2 is translated (its answers then go through
		// the response-body path), to beast forwarded as is.
		TranslateAnthropic: func(node string) bool { return node == "rig2" },
	})

	// Seeds: Envoy's real sequences, then the out-of-order ones.
	for _, s := range [][]byte{
		{0, 0, 2, 0, 5, 0},     // POST, body helexa/small, response headers
		{0, 0, 2, 6, 5, 0},     // cold load that succeeds
		{0, 0, 2, 7},           // cold load that fails
		{0, 0, 2, 8},           // cold load past the budget
		{0, 8, 2, 9},           // CRLF in the model
		{0, 0, 2, 10},          // duplicate model key
		{1, 1 | 2<<3},          // GET /v1/models
		{1, 1 | 4<<3},          // GET /v1/models/<CRLF>
		{2, 0},                 // body before headers
		{5, 0, 0, 0, 2, 0},     // response headers first
		{0, 0, 2, 0, 2, 1},     // second body after end_of_stream
		{0, 0, 3, 1, 3, 0, 4},  // body in pieces, then trailers
		{0, 0, 8, 0},           // unknown message
		{0x80 | 0x10, 0, 2, 0}, // STREAMED mode
		{0, 0, 2, 200, 5, '{', '"', 'm', '"', ':'},
		{0, 0x80, 3, '/', 'x', 0xff, 2, 14},
		{6, 3, 'a', 'b', 7, 0, 4, 0, 5, 0},
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := client.Process(ctx)
		if err != nil {
			t.Fatal(err)
		}
		sc := &script{b: data}
		for i := 0; ; i++ {
			m, want, ok := sc.message()
			if !ok {
				break
			}
			if err := st.Send(m); err != nil {
				t.Fatalf("message %d: send: %v (the server ended the stream early)", i, err)
			}
			r, err := st.Recv()
			if err == nil && r.GetOverrideMessageTimeout() != nil && r.Response == nil {
				if want != "request_body" {
					t.Fatalf("message %d (%s): override_message_timeout outside a body reply", i, want)
				}
				r, err = st.Recv()
			}
			if want == "" {
				if status.Code(err) != codes.InvalidArgument {
					t.Fatalf("message %d (unknown type): got %v, %v; want the stream ended with InvalidArgument", i, replyKindOrNil(r), err)
				}
				return
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					t.Fatalf("message %d (%s): stream ended with OK before the reply; Envoy would pass the request through", i, want)
				}
				t.Fatalf("message %d (%s): %v", i, want, err)
			}
			if !validReply(want, r) {
				t.Fatalf("message %d: reply %s to %s; Envoy treats it as spurious", i, kind(r), want)
			}
			if ir := r.GetImmediateResponse(); ir != nil {
				if code := ir.GetStatus().GetCode(); code < 200 || code > 599 {
					t.Fatalf("immediate response status %d", code)
				}
				if !json.Valid(ir.GetBody()) {
					t.Fatalf("immediate response body is not JSON: %q", ir.GetBody())
				}
				for _, h := range ir.GetHeaders().GetSetHeaders() {
					if strings.ContainsAny(string(h.GetHeader().GetRawValue()), "\r\n\x00") {
						t.Fatalf("header %s carries CR/LF/NUL: %q", h.GetHeader().GetKey(), h.GetHeader().GetRawValue())
					}
				}
			}
			for _, h := range r.GetRequestBody().GetResponse().GetHeaderMutation().GetSetHeaders() {
				if strings.ContainsAny(string(h.GetHeader().GetRawValue()), "\r\n\x00") {
					t.Fatalf("routing header %s carries CR/LF/NUL: %q", h.GetHeader().GetKey(), h.GetHeader().GetRawValue())
				}
			}
		}
		// Envoy half-closes; everything was answered, so the server ends
		// with OK.
		if err := st.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if r, err := st.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("after half-close: %v, %v; want the stream to end with OK", replyKindOrNil(r), err)
		}
	})
}

func replyKindOrNil(r *extprocv3.ProcessingResponse) string {
	if r == nil {
		return "no reply"
	}
	return kind(r)
}
