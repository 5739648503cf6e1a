package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

// These tests hold envoyLite to envoy-ext-proc.md with a scripted ext_proc
// server: if envoyLite tolerated a mistake Envoy punishes, the end-to-end
// tests would pass against a cortex-extproc that fails behind real Envoy.

type scriptedExtProc struct {
	extprocv3.UnimplementedExternalProcessorServer
	streams atomic.Int32
	script  func(s extprocv3.ExternalProcessor_ProcessServer) error
}

func (f *scriptedExtProc) Process(s extprocv3.ExternalProcessor_ProcessServer) error {
	f.streams.Add(1)
	return f.script(s)
}

// upstreamRecord is what a test upstream received.
type upstreamRecord struct {
	cluster string
	header  http.Header
	body    string
	length  int64
}

type selfTestRig struct {
	envoy    *envoyLite
	front    *httptest.Server
	fake     *scriptedExtProc
	mu       sync.Mutex
	upstream []upstreamRecord
}

func (r *selfTestRig) received() []upstreamRecord {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]upstreamRecord(nil), r.upstream...)
}

// newSelfTestRig serves envoyLite with clusters neuron-a and neuron-b
// (upstreams that record the request and answer "ok from <cluster>") in
// front of a scripted ext_proc server.
func newSelfTestRig(t *testing.T, cfg envoyLiteConfig, script func(extprocv3.ExternalProcessor_ProcessServer) error) *selfTestRig {
	t.Helper()
	rig := &selfTestRig{fake: &scriptedExtProc{script: script}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(g, rig.fake)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)

	cfg.ExtProcAddr = lis.Addr().String()
	cfg.Clusters = map[string]string{}
	for _, name := range []string{"neuron-a", "neuron-b"} {
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			b, _ := io.ReadAll(r.Body)
			rig.mu.Lock()
			rig.upstream = append(rig.upstream, upstreamRecord{cluster: name, header: r.Header.Clone(), body: string(b), length: r.ContentLength})
			rig.mu.Unlock()
			w.Header().Set("content-type", "text/plain")
			fmt.Fprintf(w, "ok from %s", name)
		}))
		t.Cleanup(up.Close)
		cfg.Clusters[name] = up.URL
	}
	if rig.envoy, err = newEnvoyLite(cfg); err != nil {
		t.Fatal(err)
	}
	rig.front = httptest.NewServer(rig.envoy)
	t.Cleanup(func() {
		rig.front.Close()
		_ = rig.envoy.Close()
	})
	return rig
}

// post sends a JSON body with content-length and returns status, body and
// the access log entry.
func (r *selfTestRig) post(t *testing.T, body string, headers ...string) (*http.Response, string, accessEntry) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, r.front.URL+"/v1/chat/completions", strings.NewReader(body))
	req.Header.Set("content-type", "application/json")
	id := newUUID()
	req.Header.Set("x-request-id", id)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	r.envoy.bg.Wait()
	return resp, string(b), entry(t, r.envoy, id)
}

func recvKind(s extprocv3.ExternalProcessor_ProcessServer, want string) (*extprocv3.ProcessingRequest, error) {
	req, err := s.Recv()
	if err != nil {
		return nil, err
	}
	var got string
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		got = "request_headers"
	case *extprocv3.ProcessingRequest_RequestBody:
		got = "request_body"
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		got = "response_headers"
	default:
		got = fmt.Sprintf("%T", req.GetRequest())
	}
	if got != want {
		return nil, status.Errorf(codes.FailedPrecondition, "got %s, want %s", got, want)
	}
	return req, nil
}

func rawSet(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

var headersContinue = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
	RequestHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{RemoveHeaders: []string{"x-cortex-cluster"}}}}}}

var responseHeadersContinue = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
	ResponseHeaders: &extprocv3.HeadersResponse{}}}

func bodyReply(c *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{Response: c}}}
}

// routing is a well-behaved exchange whose body reply is body(...), with
// optional messages before it.
func routing(before []*extprocv3.ProcessingResponse, body *extprocv3.ProcessingResponse) func(extprocv3.ExternalProcessor_ProcessServer) error {
	return func(s extprocv3.ExternalProcessor_ProcessServer) error {
		if _, err := recvKind(s, "request_headers"); err != nil {
			return err
		}
		if err := s.Send(headersContinue); err != nil {
			return err
		}
		if _, err := recvKind(s, "request_body"); err != nil {
			return err
		}
		for _, m := range before {
			if err := s.Send(m); err != nil {
				return err
			}
		}
		if err := s.Send(body); err != nil {
			return err
		}
		if _, err := recvKind(s, "response_headers"); err != nil {
			return nil // the request ended before the upstream answered
		}
		if err := s.Send(responseHeadersContinue); err != nil {
			return err
		}
		_, _ = s.Recv() // EOF: Envoy half-closed
		return nil
	}
}

const clientBody = `{"model":"helexa/small","messages":[]}`

var rewritten = strings.Replace(clientBody, "helexa/small", "Qwen/Qwen3-1.7B", 1)

// goodRoute is what cortex-extproc answers: cluster header, new
// content-length and body, clear_route_cache next to the header mutation.
func goodRoute(cluster string) *extprocv3.CommonResponse {
	return &extprocv3.CommonResponse{
		HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
			rawSet("x-cortex-cluster", cluster), rawSet("content-length", strconv.Itoa(len(rewritten)))}},
		BodyMutation:    &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte(rewritten)}},
		ClearRouteCache: true,
	}
}

func hasProblem(ent accessEntry, substr string) bool {
	for _, p := range ent.Problems {
		if strings.Contains(p, substr) {
			return true
		}
	}
	return false
}

func TestEnvoyLiteRoutesACorrectReply(t *testing.T) {
	rig := newSelfTestRig(t, envoyLiteConfig{}, routing(nil, bodyReply(goodRoute("neuron-a"))))
	resp, body, ent := rig.post(t, clientBody, "x-cortex-cluster", "neuron-b")
	if resp.StatusCode != 200 || body != "ok from neuron-a" {
		t.Fatalf("got %d %q, want 200 from neuron-a (problems %v)", resp.StatusCode, body, ent.Problems)
	}
	up := rig.received()
	if len(up) != 1 || up[0].body != rewritten || up[0].length != int64(len(rewritten)) {
		t.Errorf("upstream got %+v, want the rewritten body with its length", up)
	}
	if len(ent.Problems) != 0 {
		t.Errorf("problems %v for a correct exchange", ent.Problems)
	}
}

func TestEnvoyLiteRejectsWhatEnvoyRejects(t *testing.T) {
	both := goodRoute("neuron-a")
	both.HeaderMutation.SetHeaders = append(both.HeaderMutation.SetHeaders,
		&corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: "x-cortex-node", Value: "a", RawValue: []byte("a")}})
	staleLength := goodRoute("neuron-a")
	staleLength.HeaderMutation.SetHeaders = staleLength.HeaderMutation.SetHeaders[:1]

	cases := []struct {
		name    string
		script  func(extprocv3.ExternalProcessor_ProcessServer) error
		status  int
		details string
	}{
		{"value and raw_value both set", routing(nil, bodyReply(both)), 500, "ext_proc_invalid_header_mutation"},
		{"content-length not updated", routing(nil, bodyReply(staleLength)), 500, "mismatch_between_content_length_and_the_length_of_the_mutated_body"},
		{"body reply to the headers message", func(s extprocv3.ExternalProcessor_ProcessServer) error {
			if _, err := recvKind(s, "request_headers"); err != nil {
				return err
			}
			if err := s.Send(bodyReply(goodRoute("neuron-a"))); err != nil {
				return err
			}
			_, _ = s.Recv()
			return nil
		}, 500, "spurious_message_received_on_gRPC_stream"},
		{"gRPC error status", func(s extprocv3.ExternalProcessor_ProcessServer) error {
			return status.Error(codes.Internal, "boom")
		}, 500, "ext_proc_error_gRPC_error_13{boom}"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rig := newSelfTestRig(t, envoyLiteConfig{}, tc.script)
			resp, _, ent := rig.post(t, clientBody)
			if resp.StatusCode != tc.status || ent.Details != tc.details {
				t.Errorf("got %d %q, want %d %q", resp.StatusCode, ent.Details, tc.status, tc.details)
			}
			if up := rig.received(); len(up) != 0 {
				t.Errorf("the request reached upstream %s despite the error", up[0].cluster)
			}
		})
	}
}

func TestEnvoyLiteValueOnlyHeaderIsEmpty(t *testing.T) {
	c := goodRoute("neuron-a")
	c.HeaderMutation.SetHeaders = append(c.HeaderMutation.SetHeaders,
		&corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: "x-cortex-node", Value: "a"}})
	rig := newSelfTestRig(t, envoyLiteConfig{}, routing(nil, bodyReply(c)))
	resp, _, ent := rig.post(t, clientBody)
	up := rig.received()
	if resp.StatusCode != 200 || len(up) != 1 {
		t.Fatalf("got %d with %d upstream requests, want 200 and 1", resp.StatusCode, len(up))
	}
	if v, ok := up[0].header["X-Cortex-Node"]; !ok || len(v) != 1 || v[0] != "" {
		t.Errorf("upstream x-cortex-node %q, want present and empty", v)
	}
	if !hasProblem(ent, "not raw_value") {
		t.Errorf("problems %v do not mention the value-only header", ent.Problems)
	}
}

// The route is cached from the client's headers; only a clear next to a
// header mutation re-reads x-cortex-cluster.
func TestEnvoyLiteRouteCache(t *testing.T) {
	t.Run("clear without header_mutation is ignored", func(t *testing.T) {
		c := goodRoute("neuron-a")
		c.HeaderMutation = nil
		c.BodyMutation = nil
		rig := newSelfTestRig(t, envoyLiteConfig{}, routing(nil, bodyReply(c)))
		resp, _, ent := rig.post(t, clientBody)
		if resp.StatusCode != 503 || ent.Details != "cluster_not_found" || ent.Flags != "NC" {
			t.Errorf("got %d %q %q, want 503 cluster_not_found NC", resp.StatusCode, ent.Details, ent.Flags)
		}
		if !hasProblem(ent, "clear_route_cache_ignored") {
			t.Errorf("problems %v do not mention the ignored clear", ent.Problems)
		}
	})
	t.Run("no clear keeps the client's cluster", func(t *testing.T) {
		c := goodRoute("neuron-a")
		c.ClearRouteCache = false
		rig := newSelfTestRig(t, envoyLiteConfig{}, routing(nil, bodyReply(c)))
		_, body, ent := rig.post(t, clientBody, "x-cortex-cluster", "neuron-b")
		if body != "ok from neuron-b" || ent.Cluster != "neuron-b" {
			t.Errorf("got %q via %q, want the client's neuron-b: the route was cached at header time", body, ent.Cluster)
		}
	})
}

func TestEnvoyLiteMessageTimer(t *testing.T) {
	override := &extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(10 * time.Second)}
	t.Run("no reply is a 504, in JSON by local_reply_config", func(t *testing.T) {
		release := make(chan struct{})
		defer close(release)
		rig := newSelfTestRig(t, envoyLiteConfig{MessageTimeout: 300 * time.Millisecond}, func(s extprocv3.ExternalProcessor_ProcessServer) error {
			if _, err := recvKind(s, "request_headers"); err != nil {
				return err
			}
			select {
			case <-release:
			case <-s.Context().Done():
			}
			return nil
		})
		resp, body, ent := rig.post(t, clientBody)
		// Envoy's own reply is a bare 504; envoy.yaml's mappers make it
		// OpenAI's error, naming the timer.
		if resp.StatusCode != 504 || ent.Details != "ext_proc_error_per-message_timeout_exceeded" ||
			resp.Header.Get("content-type") != "application/json" || !strings.Contains(body, `"code":"gateway_timeout"`) ||
			!strings.Contains(body, "ext_proc_error_per-message_timeout_exceeded") {
			t.Errorf("got %d %q %q, want a JSON 504 gateway_timeout naming the per-message timeout", resp.StatusCode, body, ent.Details)
		}
	})
	t.Run("one override restarts the timer", func(t *testing.T) {
		slow := func(s extprocv3.ExternalProcessor_ProcessServer) error {
			if _, err := recvKind(s, "request_headers"); err != nil {
				return err
			}
			if err := s.Send(headersContinue); err != nil {
				return err
			}
			if _, err := recvKind(s, "request_body"); err != nil {
				return err
			}
			if err := s.Send(override); err != nil {
				return err
			}
			time.Sleep(time.Second) // longer than message_timeout, well inside the override
			if err := s.Send(bodyReply(goodRoute("neuron-a"))); err != nil {
				return err
			}
			if _, err := recvKind(s, "response_headers"); err != nil {
				return err
			}
			return s.Send(responseHeadersContinue)
		}
		rig := newSelfTestRig(t, envoyLiteConfig{MessageTimeout: 300 * time.Millisecond}, slow)
		resp, _, ent := rig.post(t, clientBody)
		if resp.StatusCode != 200 || ent.Overrides != 1 {
			t.Errorf("got %d with %d overrides, want 200 with 1", resp.StatusCode, ent.Overrides)
		}
	})
	t.Run("a second override is ignored and reported", func(t *testing.T) {
		rig := newSelfTestRig(t, envoyLiteConfig{}, routing([]*extprocv3.ProcessingResponse{override, override}, bodyReply(goodRoute("neuron-a"))))
		resp, _, ent := rig.post(t, clientBody)
		if resp.StatusCode != 200 || ent.Overrides != 1 || !hasProblem(ent, "second override_message_timeout") {
			t.Errorf("got %d, %d overrides, problems %v; want 200, 1, a second-override problem", resp.StatusCode, ent.Overrides, ent.Problems)
		}
	})
}

func TestEnvoyLiteImmediateResponse(t *testing.T) {
	reply := func(headers ...*corev3.HeaderValueOption) func(extprocv3.ExternalProcessor_ProcessServer) error {
		return func(s extprocv3.ExternalProcessor_ProcessServer) error {
			if _, err := recvKind(s, "request_headers"); err != nil {
				return err
			}
			return s.Send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{
				ImmediateResponse: &extprocv3.ImmediateResponse{
					Status:  &typev3.HttpStatus{Code: typev3.StatusCode_NotFound},
					Headers: &extprocv3.HeaderMutation{SetHeaders: headers},
					Body:    []byte(`{"error":{}}`),
					Details: "cortex test",
				}}})
		}
	}
	for _, tc := range []struct {
		name    string
		headers []*corev3.HeaderValueOption
		want    string
	}{
		{"content-type defaults to text/plain", nil, "text/plain"},
		{"content-type from the reply sticks", []*corev3.HeaderValueOption{rawSet("content-type", "application/json")}, "application/json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rig := newSelfTestRig(t, envoyLiteConfig{}, reply(tc.headers...))
			resp, body, ent := rig.post(t, clientBody)
			if resp.StatusCode != 404 || body != `{"error":{}}` || resp.Header.Get("content-type") != tc.want || ent.Details != "cortex_test" {
				t.Errorf("got %d %q content-type %q details %q; want 404, the body, %s, cortex_test",
					resp.StatusCode, body, resp.Header.Get("content-type"), ent.Details, tc.want)
			}
		})
	}
}

func TestEnvoyLiteBufferLimit(t *testing.T) {
	rig := newSelfTestRig(t, envoyLiteConfig{BufferLimit: 1024}, routing(nil, bodyReply(goodRoute("neuron-a"))))
	resp, body, ent := rig.post(t, strings.Repeat("x", 2048))
	if resp.StatusCode != 413 || ent.Details != "request_payload_too_large" || !strings.Contains(body, `"code":"request_too_large"`) {
		t.Errorf("got %d %q (%s), want 413 request_too_large in JSON", resp.StatusCode, body, ent.Details)
	}
	if n := rig.fake.streams.Load(); n != 0 {
		t.Errorf("ext_proc saw %d streams for a body over the buffer limit, want 0", n)
	}
}

func TestEnvoyLiteReportsLateAndUnprocessed(t *testing.T) {
	t.Run("message after the last reply", func(t *testing.T) {
		// A second response_headers reply, before the half-close.
		early := func(s extprocv3.ExternalProcessor_ProcessServer) error {
			if _, err := recvKind(s, "request_headers"); err != nil {
				return err
			}
			_ = s.Send(headersContinue)
			if _, err := recvKind(s, "request_body"); err != nil {
				return err
			}
			_ = s.Send(bodyReply(goodRoute("neuron-a")))
			if _, err := recvKind(s, "response_headers"); err != nil {
				return err
			}
			_ = s.Send(responseHeadersContinue)
			_ = s.Send(responseHeadersContinue)
			_, _ = s.Recv()
			return nil
		}
		rig := newSelfTestRig(t, envoyLiteConfig{}, early)
		resp, _, ent := rig.post(t, clientBody)
		if resp.StatusCode != 200 || !hasProblem(ent, "after the last expected reply") {
			t.Errorf("got %d, problems %v; want 200 and a late-message problem", resp.StatusCode, ent.Problems)
		}
	})
	t.Run("stream closed with OK before answering", func(t *testing.T) {
		rig := newSelfTestRig(t, envoyLiteConfig{}, func(s extprocv3.ExternalProcessor_ProcessServer) error {
			_, err := recvKind(s, "request_headers")
			return err
		})
		resp, _, ent := rig.post(t, clientBody, "x-cortex-cluster", "neuron-b")
		// Envoy forwards the request unprocessed: the client's header routes it.
		if resp.StatusCode != 200 || ent.Cluster != "neuron-b" || !hasProblem(ent, "unprocessed") {
			t.Errorf("got %d via %q, problems %v; want the unprocessed request on neuron-b, reported", resp.StatusCode, ent.Cluster, ent.Problems)
		}
	})
}
