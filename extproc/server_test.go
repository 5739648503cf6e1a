package extproc_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fixture is a fleet of two neurons and a catalogue with aliases.
func fixture() (*catalogue.Catalogue, *fleet.Snapshot) {
	cat := catalogue.New([]*catalogue.Profile{
		{ID: "Qwen/Qwen3-1.7B", Harness: "candle", VRAMMB: 4000},
		{ID: "Qwen/Qwen3-8B", Harness: "candle", VRAMMB: 18000},
		{ID: "Qwen/Qwen3.6-27B", Harness: "candle", VRAMMB: 54000, MinDevices: 2},
	}, map[string]string{
		"helexa/small":    "Qwen/Qwen3-1.7B",
		"helexa/balanced": "Qwen/Qwen3-8B",
		"helexa/large":    "Qwen/Qwen3.6-27B",
		"helexa/gone":     "Other/Missing",
		"helexa/sick":     "Sick/Model",
		"helexa/q":        "Qwen/Q",
	}, "h")
	model := func(id string, st neuron.Status, inflight, queue int, endpoint string) *fleet.Model {
		return &fleet.Model{Model: neuron.Model{ID: id, Status: st}, InFlight: inflight, QueueDepth: queue, Endpoint: endpoint}
	}
	disc := &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}}}
	snap := &fleet.Snapshot{Round: 1, Nodes: []*fleet.Node{
		{Name: "beast", Cluster: "neuron-beast", Healthy: true, Discovery: disc, Models: []*fleet.Model{
			model("Qwen/Qwen3-1.7B", neuron.StatusLoaded, 3, 2, "http://beast:13131"),
			model("Qwen/Qwen3-8B", neuron.StatusUnloaded, 0, 0, "http://beast:13131"),
			model("Sick/Model", neuron.StatusRecovering, 0, 0, "http://beast:13131"),
		}},
		{Name: "rig2", Cluster: "neuron-rig2", Healthy: true, Discovery: disc, Models: []*fleet.Model{
			model("Qwen/Qwen3-1.7B", neuron.StatusLoaded, 1, 1, "http://rig2:13131"),
			model("Qwen/Q", neuron.StatusLoaded, 0, 0, "http://rig2:13131"),
		}},
	}}
	return cat, snap
}

type harness struct {
	client extprocv3.ExternalProcessorClient
	conn   *grpc.ClientConn
	srv    *grpc.Server
}

func start(t *testing.T, r extproc.Router, opt extproc.Options) *harness {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := extproc.NewGRPCServer(extproc.New(r, opt))
	go srv.Serve(lis)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{client: extprocv3.NewExternalProcessorClient(conn), conn: conn, srv: srv}
	t.Cleanup(func() { conn.Close(); srv.Stop() })
	return h
}

func startFixture(t *testing.T) *harness {
	cat, snap := fixture()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	return start(t, r, extproc.Options{Models: modellist.New(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap })})
}

func hdrs(eos bool, kv ...string) *extprocv3.ProcessingRequest {
	hs := &corev3.HeaderMap{}
	for i := 0; i < len(kv); i += 2 {
		// Envoy sends values in raw_value with value empty.
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{
		Request:        &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{Headers: hs, EndOfStream: eos}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_BUFFERED},
	}
}

func post(path string, body []byte) *extprocv3.ProcessingRequest {
	return hdrs(false, ":method", "POST", ":path", path, ":authority", "gw", "content-type", "application/json",
		"content-length", strconv.Itoa(len(body)), "x-request-id", "req-1",
		"x-cortex-cluster", "neuron-evil", "x-cortex-node", "evil", "x-gateway-destination-endpoint", "6.6.6.6:1")
}

func bodyMsg(b []byte) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: b, EndOfStream: true}}}
}

func respHeaders() *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: &corev3.HeaderMap{Headers: []*corev3.HeaderValue{
			{Key: ":status", RawValue: []byte("200")}}}}}}
}

// exchange sends each message and reads one reply after each, as Envoy does.
func (h *harness) exchange(t *testing.T, msgs ...*extprocv3.ProcessingRequest) []*extprocv3.ProcessingResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*extprocv3.ProcessingResponse
	for _, m := range msgs {
		if err := s.Send(m); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("recv after %T: %v", m.Request, err)
		}
		out = append(out, r)
		if r.GetImmediateResponse() != nil {
			break // Envoy stops processing after an immediate response
		}
	}
	s.CloseSend()
	return out
}

func setHeaders(hm *extprocv3.HeaderMutation) map[string]string {
	out := map[string]string{}
	for _, h := range hm.GetSetHeaders() {
		out[h.GetHeader().GetKey()] = string(h.GetHeader().GetRawValue())
	}
	return out
}

func checkRawOnly(t *testing.T, hm *extprocv3.HeaderMutation) {
	t.Helper()
	for _, h := range hm.GetSetHeaders() {
		if h.GetHeader().GetValue() != "" {
			t.Errorf("header %s set in value (%q): Envoy wants raw_value only", h.GetHeader().GetKey(), h.GetHeader().GetValue())
		}
		if h.GetAppendAction() != corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
			t.Errorf("header %s has append settings; overwrite is wanted", h.GetHeader().GetKey())
		}
	}
}

func TestAliasIsRewrittenAndRoutedToLeastBusyReplica(t *testing.T) {
	h := startFixture(t)
	body := []byte(`{"messages":[{"role":"user","content":"héllo \"model\": x"}],  "model" : "helexa/small","stream":true,"n":1}`)
	rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body), respHeaders())
	if len(rs) != 3 {
		t.Fatalf("got %d replies, want 3", len(rs))
	}

	// Headers reply: continue, strip client-sent routing headers.
	hr := rs[0].GetRequestHeaders()
	if hr == nil {
		t.Fatalf("first reply is %T, want request_headers", rs[0].Response)
	}
	removed := strings.Join(hr.GetResponse().GetHeaderMutation().GetRemoveHeaders(), ",")
	for _, hname := range []string{"x-cortex-cluster", "x-cortex-node", "x-cortex-model", "x-cortex-cold-start", "x-gateway-destination-endpoint"} {
		if !strings.Contains(removed, hname) {
			t.Errorf("headers reply does not remove client-sent %s (removes %s)", hname, removed)
		}
	}

	br := rs[1].GetRequestBody()
	if br == nil {
		t.Fatalf("second reply is %T, want request_body", rs[1].Response)
	}
	c := br.GetResponse()
	if !c.GetClearRouteCache() || c.GetHeaderMutation() == nil {
		t.Fatal("body reply must clear the route cache together with a header mutation")
	}
	checkRawOnly(t, c.GetHeaderMutation())
	got := setHeaders(c.GetHeaderMutation())
	want := `{"messages":[{"role":"user","content":"héllo \"model\": x"}],  "model" : "Qwen/Qwen3-1.7B","stream":true,"n":1}`
	if nb := c.GetBodyMutation().GetBody(); string(nb) != want {
		t.Fatalf("rewritten body\n got %s\nwant %s", nb, want)
	}
	if got["content-length"] != strconv.Itoa(len(want)) {
		t.Errorf("content-length %q, want %d", got["content-length"], len(want))
	}
	// rig2 has in_flight+queue 2, beast 5.
	for k, v := range map[string]string{"x-cortex-cluster": "neuron-rig2", "x-cortex-node": "rig2",
		"x-cortex-model": "Qwen/Qwen3-1.7B", "x-cortex-cold-start": "false"} {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if md := rs[1].GetDynamicMetadata(); md != nil {
		t.Errorf("dynamic metadata %v in cluster_header mode; access logs read the x-cortex-* headers", md)
	}

	rh := setHeaders(rs[2].GetResponseHeaders().GetResponse().GetHeaderMutation())
	if rh["x-cortex-node"] != "rig2" || rh["x-cortex-model"] != "Qwen/Qwen3-1.7B" || rh["x-cortex-cold-start"] != "false" {
		t.Errorf("response headers = %v", rh)
	}
}

func TestConcreteModelGetsNoBodyMutation(t *testing.T) {
	h := startFixture(t)
	body := []byte(`{"model":"Qwen/Qwen3-1.7B","prompt":"hi"}`)
	rs := h.exchange(t, post("/v1/completions", body), bodyMsg(body))
	c := rs[1].GetRequestBody().GetResponse()
	if c.GetBodyMutation() != nil {
		t.Fatalf("body mutation %v for a concrete id; the body must not be sent back", c.GetBodyMutation())
	}
	got := setHeaders(c.GetHeaderMutation())
	if _, ok := got["content-length"]; ok {
		t.Error("content-length set although the body is unchanged")
	}
	if got["x-cortex-cluster"] != "neuron-rig2" || !c.GetClearRouteCache() {
		t.Errorf("headers %v clear=%v", got, c.GetClearRouteCache())
	}
}

func TestEveryInferencePathAndEscapedModel(t *testing.T) {
	h := startFixture(t)
	for _, path := range []string{"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/v1/images/generations", "/v1/messages?beta=true"} {
		body := []byte(`{"input":"x","model":"helexa\/small"}`)
		rs := h.exchange(t, post(path, body), bodyMsg(body))
		nb := rs[1].GetRequestBody().GetResponse().GetBodyMutation().GetBody()
		if string(nb) != `{"input":"x","model":"Qwen/Qwen3-1.7B"}` {
			t.Errorf("%s: body %s", path, nb)
		}
	}
}

func TestUnloadedModelRoutesWithColdStart(t *testing.T) {
	h := startFixture(t)
	body := []byte(`{"model":"helexa/balanced"}`)
	rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
	got := setHeaders(rs[1].GetRequestBody().GetResponse().GetHeaderMutation())
	if got["x-cortex-node"] != "beast" || got["x-cortex-cold-start"] != "true" {
		t.Errorf("headers %v, want beast with cold start", got)
	}
}

type errCase struct {
	name, path, body string
	status           int
	code, typ        string
	retryAfter       string
	contains         string
}

func TestErrorsAreImmediateJSON(t *testing.T) {
	h := startFixture(t)
	cases := []errCase{
		{"not json", "/v1/chat/completions", `{"model": "x",`, 400, "invalid_request", "invalid_request_error", "", "not valid JSON"},
		{"array", "/v1/chat/completions", `["model"]`, 400, "invalid_request", "invalid_request_error", "", "JSON object"},
		{"missing model", "/v1/chat/completions", `{"messages":[]}`, 400, "invalid_request", "invalid_request_error", "", "no \"model\""},
		{"model not string", "/v1/chat/completions", `{"model":7}`, 400, "invalid_request", "invalid_request_error", "", "must be a string"},
		{"model control char", "/v1/chat/completions", `{"model":"a\r\nx-cortex-cluster: evil"}`, 400, "invalid_request", "invalid_request_error", "", "control character"},
		{"unknown", "/v1/chat/completions", `{"model":"Nope/Nope"}`, 404, "model_not_found", "invalid_request_error", "", "not in the catalogue"},
		{"alias to unknown", "/v1/chat/completions", `{"model":"helexa/gone"}`, 404, "model_not_found", "invalid_request_error", "", "helexa/gone"},
		{"recovering", "/v1/chat/completions", `{"model":"helexa/sick"}`, 503, "service_unavailable", "api_error", "2", "recovering"},
		{"catalogue only, no loader", "/v1/chat/completions", `{"model":"helexa/large"}`, 503, "service_unavailable", "api_error", "5", "cold loads are disabled"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rs := h.exchange(t, post(c.path, []byte(c.body)), bodyMsg([]byte(c.body)))
			checkImmediate(t, rs[len(rs)-1], c)
		})
	}
}

func checkImmediate(t *testing.T, r *extprocv3.ProcessingResponse, c errCase) {
	t.Helper()
	ir := r.GetImmediateResponse()
	if ir == nil {
		t.Fatalf("reply is %T, want immediate_response", r.Response)
	}
	if int(ir.GetStatus().GetCode()) != c.status {
		t.Errorf("status %d, want %d", ir.GetStatus().GetCode(), c.status)
	}
	checkRawOnly(t, ir.GetHeaders())
	hs := setHeaders(ir.GetHeaders())
	if hs["content-type"] != "application/json" {
		t.Errorf("content-type %q", hs["content-type"])
	}
	if hs["retry-after"] != c.retryAfter {
		t.Errorf("retry-after %q, want %q", hs["retry-after"], c.retryAfter)
	}
	var env struct {
		Error struct{ Message, Type, Code string }
	}
	if err := json.Unmarshal(ir.GetBody(), &env); err != nil {
		t.Fatalf("body %s: %v", ir.GetBody(), err)
	}
	if env.Error.Code != c.code || env.Error.Type != c.typ || !strings.Contains(env.Error.Message, c.contains) {
		t.Errorf("error %+v, want code %s type %s containing %q", env.Error, c.code, c.typ, c.contains)
	}
}

func TestNoHealthyNode(t *testing.T) {
	cat, _ := fixture()
	snap := &fleet.Snapshot{Nodes: []*fleet.Node{{Name: "beast", Cluster: "neuron-beast"}}}
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	h := start(t, r, extproc.Options{})
	body := []byte(`{"model":"helexa/small"}`)
	rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
	checkImmediate(t, rs[1], errCase{status: 503, code: "service_unavailable", typ: "api_error", retryAfter: "5", contains: "no healthy neuron"})
}

func TestAnthropicErrorShape(t *testing.T) {
	h := startFixture(t)
	body := []byte(`{"model":"Nope/Nope","max_tokens":5}`)
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body))
	ir := rs[1].GetImmediateResponse()
	var env struct {
		Type  string
		Error struct{ Type, Message string }
	}
	if err := json.Unmarshal(ir.GetBody(), &env); err != nil {
		t.Fatal(err)
	}
	if ir.GetStatus().GetCode() != 404 || env.Type != "error" || env.Error.Type != "not_found_error" || env.Error.Message == "" {
		t.Errorf("status %d body %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
}

func TestBodilessRequests(t *testing.T) {
	h := startFixture(t)

	// GET /v1/models is answered at the headers phase.
	rs := h.exchange(t, hdrs(true, ":method", "GET", ":path", "/v1/models", "x-cortex-cluster", "neuron-evil"))
	ir := rs[0].GetImmediateResponse()
	if ir == nil || ir.GetStatus().GetCode() != 200 {
		t.Fatalf("GET /v1/models reply %v", rs[0])
	}
	var list struct {
		Object string
		Data   []struct{ ID string }
	}
	if err := json.Unmarshal(ir.GetBody(), &list); err != nil || list.Object != "list" || len(list.Data) == 0 {
		t.Fatalf("list %s: %v", ir.GetBody(), err)
	}

	rs = h.exchange(t, hdrs(true, ":method", "GET", ":path", "/v1/models/Qwen%2FQwen3-1.7B"))
	if ir := rs[0].GetImmediateResponse(); ir.GetStatus().GetCode() != 200 || !bytes.Contains(ir.GetBody(), []byte(`"id":"Qwen/Qwen3-1.7B"`)) {
		t.Errorf("GET one model: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
	rs = h.exchange(t, hdrs(true, ":method", "GET", ":path", "/v1/models/Qwen/Qwen3-1.7B"))
	if ir := rs[0].GetImmediateResponse(); ir.GetStatus().GetCode() != 200 {
		t.Errorf("GET one model with a raw slash: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
	rs = h.exchange(t, hdrs(true, ":method", "GET", ":path", "/v1/models/nope"))
	checkImmediate(t, rs[0], errCase{status: 404, code: "model_not_found", typ: "invalid_request_error", contains: "nope"})

	// Anything else without a body gets a JSON error, never a pass-through
	// that a client-sent routing header could steer.
	rs = h.exchange(t, hdrs(true, ":method", "GET", ":path", "/admin", "x-cortex-cluster", "neuron-evil"))
	checkImmediate(t, rs[0], errCase{status: 404, code: "not_found", typ: "invalid_request_error", contains: "/admin"})
	rs = h.exchange(t, hdrs(true, ":method", "POST", ":path", "/v1/chat/completions"))
	checkImmediate(t, rs[0], errCase{status: 400, code: "invalid_request", typ: "invalid_request_error", contains: "empty"})
}

func TestBodyOverLimitIs413(t *testing.T) {
	cat, snap := fixture()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	h := start(t, r, extproc.Options{MaxRequestBytes: 64})
	body := []byte(`{"model":"helexa/small","messages":"` + strings.Repeat("x", 100) + `"}`)
	rs := h.exchange(t, post("/v1/messages", body), bodyMsg(body))
	ir := rs[1].GetImmediateResponse()
	if ir.GetStatus().GetCode() != 413 || !bytes.Contains(ir.GetBody(), []byte(`"request_too_large"`)) {
		t.Errorf("got %d %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
}

func TestStreamedBodyModeIsAConfigError(t *testing.T) {
	h := startFixture(t)
	m := post("/v1/chat/completions", []byte(`{}`))
	m.ProtocolConfig = &extprocv3.ProtocolConfiguration{RequestBodyMode: filterv3.ProcessingMode_STREAMED}
	rs := h.exchange(t, m)
	ir := rs[0].GetImmediateResponse()
	if ir.GetStatus().GetCode() != 500 || !bytes.Contains(ir.GetBody(), []byte("BUFFERED")) {
		t.Errorf("got %d %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
}

func TestEveryMessageGetsItsReply(t *testing.T) {
	h := startFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"model":"Qwen/Qwen3-1.7B"}`)
	msgs := []*extprocv3.ProcessingRequest{
		post("/v1/chat/completions", body),
		{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: false}}},
		{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte("more"), EndOfStream: true}}},
		{Request: &extprocv3.ProcessingRequest_RequestTrailers{RequestTrailers: &extprocv3.HttpTrailers{}}},
		respHeaders(),
		{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte("data: x\n\n")}}},
		{Request: &extprocv3.ProcessingRequest_ResponseTrailers{ResponseTrailers: &extprocv3.HttpTrailers{}}},
	}
	want := []string{"request_headers", "request_body", "request_body", "request_trailers", "response_headers", "response_body", "response_trailers"}
	for i, m := range msgs {
		if err := s.Send(m); err != nil {
			t.Fatal(err)
		}
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if got := kind(r); got != want[i] {
			t.Errorf("reply %d is %s, want %s", i, got, want[i])
		}
	}
	// An unknown message (no request set) ends the stream with an error
	// status, so Envoy answers status_on_error instead of passing through.
	if err := s.Send(&extprocv3.ProcessingRequest{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.InvalidArgument {
		t.Errorf("unknown message: %v, want InvalidArgument", err)
	}
}

func kind(r *extprocv3.ProcessingResponse) string {
	switch r.Response.(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingResponse_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingResponse_RequestTrailers:
		return "request_trailers"
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingResponse_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingResponse_ResponseTrailers:
		return "response_trailers"
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return "immediate_response"
	}
	return "none"
}

func TestOriginalDstSetsDestinationHeaderAndMetadata(t *testing.T) {
	cat := catalogue.New(nil, map[string]string{"a/ip": "IP/Model", "a/host": "Host/Model"}, "h")
	snap := &fleet.Snapshot{Round: 1, Nodes: []*fleet.Node{{Name: "n1", Cluster: "neuron-n1", Healthy: true, Models: []*fleet.Model{
		{Model: neuron.Model{ID: "IP/Model", Status: neuron.StatusLoaded}, Endpoint: "http://10.1.2.3:8000"},
		{Model: neuron.Model{ID: "Host/Model", Status: neuron.StatusLoaded}, Endpoint: "http://localhost:13131"},
	}}}}
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	h := start(t, r, extproc.Options{Upstream: extproc.NewOriginalDst(nil)})
	for model, want := range map[string][]string{
		"a/ip":   {"10.1.2.3:8000"},
		"a/host": {"127.0.0.1:13131", "[::1]:13131"}, // hostnames are resolved: ORIGINAL_DST wants an IP
	} {
		body := []byte(`{"model":"` + model + `"}`)
		rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
		got := setHeaders(rs[1].GetRequestBody().GetResponse().GetHeaderMutation())
		dest := got["x-gateway-destination-endpoint"]
		if !slices.Contains(want, dest) {
			t.Errorf("%s: destination %q, want one of %v", model, dest, want)
		}
		if _, ok := got["x-cortex-cluster"]; ok {
			t.Errorf("%s: x-cortex-cluster set in original_dst mode", model)
		}
		lb := rs[1].GetDynamicMetadata().GetFields()["envoy.lb"].GetStructValue().GetFields()
		if lb["x-gateway-destination-endpoint"].GetStringValue() != dest {
			t.Errorf("%s: envoy.lb metadata %v, want it equal to the header %q", model, lb, dest)
		}
	}
}

// TestLargeBodiesConcurrently: many large alias bodies at once, each
// distinct, each rewritten exactly. The bodies are not copied on receipt
// and are sent back as views of gRPC's receive buffers; a buffer recycled
// too early would show up here as another request's bytes.
func TestLargeBodiesConcurrently(t *testing.T) {
	h := startFixture(t)
	const workers, each = 12, 4
	errs := make(chan error, workers*each)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				fill := strings.Repeat(fmt.Sprintf("w%di%d-", w, i), (200<<10)/8)
				body := []byte(`{"model":"helexa/small","messages":[{"role":"user","content":"` + fill + `"}]}`)
				want := strings.Replace(string(body), "helexa/small", "Qwen/Qwen3-1.7B", 1)
				errs <- largeExchange(h, body, want)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

func largeExchange(h *harness, body []byte, want string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := h.client.Process(ctx)
	if err != nil {
		return err
	}
	defer s.CloseSend()
	for _, m := range []*extprocv3.ProcessingRequest{post("/v1/chat/completions", body), bodyMsg(body)} {
		if err := s.Send(m); err != nil {
			return err
		}
		r, err := s.Recv()
		if err != nil {
			return err
		}
		if got := r.GetRequestBody().GetResponse().GetBodyMutation().GetBody(); r.GetRequestBody() != nil && string(got) != want {
			return fmt.Errorf("rewritten body of %d bytes differs from the expected %d bytes", len(got), len(want))
		}
		if r.GetImmediateResponse() != nil {
			return fmt.Errorf("immediate response %s", r.GetImmediateResponse().GetBody())
		}
	}
	return nil
}

// countingRouter counts Route calls: a request that must not be forwarded
// must not reach routing either (no decision, no cold load).
type countingRouter struct {
	extproc.Router
	mu    sync.Mutex
	calls []string
}

func (c *countingRouter) Route(model string, lease *routing.Lease) (routing.Target, routing.Waiter, *apierr.Error) {
	c.mu.Lock()
	c.calls = append(c.calls, model)
	c.mu.Unlock()
	return c.Router.Route(model, lease)
}

func TestOnlyInferenceIsRouted(t *testing.T) {
	cat, snap := fixture()
	cr := &countingRouter{Router: routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)}
	h := start(t, cr, extproc.Options{})

	// The neuron's management API shares the inference port: these must
	// never be forwarded, and a cold catalogue model in the body must not
	// be loaded first. The 404 comes at the headers phase, so Envoy never
	// even sends the body.
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/models/unload", `{"model":"helexa/small","model_id":"Qwen/Qwen3-1.7B"}`},
		{"POST", "/models/load", `{"model":"helexa/large","model_id":"Qwen/Qwen3.6-27B","harness":"candle"}`},
		{"POST", "/models/load?x=1", `{"model":"helexa/small"}`},
		{"POST", "/v1/unknown", `{"model":"helexa/large"}`},
		{"POST", "/v1/chat/completions/", `{"model":"helexa/small"}`},
		{"POST", "/V1/chat/completions", `{"model":"helexa/small"}`},
		{"PUT", "/v1/chat/completions", `{"model":"helexa/small"}`},
		{"GET", "/v1/chat/completions", `{"model":"helexa/small"}`},
		{"DELETE", "/v1/models/Qwen%2FQwen3-1.7B", `{"model":"helexa/small"}`},
	} {
		t.Run(c.method+" "+c.path, func(t *testing.T) {
			m := post(c.path, []byte(c.body))
			setMethod(m, c.method)
			rs := h.exchange(t, m)
			path, _, _ := strings.Cut(c.path, "?")
			checkImmediate(t, rs[0], errCase{status: 404, code: "not_found", typ: "invalid_request_error", contains: c.method + " " + path})
			checkImmediate(t, rs[0], errCase{status: 404, code: "not_found", typ: "invalid_request_error", contains: "/v1/chat/completions"})
		})
	}
	// Anthropic's token counting is not forwarded either, and says so in
	// Anthropic's shape.
	rs := h.exchange(t, post("/v1/messages/count_tokens", []byte(`{"model":"helexa/small"}`)))
	ir := rs[0].GetImmediateResponse()
	if ir.GetStatus().GetCode() != 404 || !bytes.Contains(ir.GetBody(), []byte(`"not_found_error"`)) || !bytes.Contains(ir.GetBody(), []byte("count_tokens is not offered")) {
		t.Errorf("count_tokens: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
	if len(cr.calls) != 0 {
		t.Errorf("router consulted for a request that is not forwarded: %q", cr.calls)
	}

	// The inference paths themselves still route (query strings ignored).
	body := []byte(`{"model":"helexa/small"}`)
	rs = h.exchange(t, post("/v1/chat/completions?stream=1", body), bodyMsg(body))
	if rs[1].GetRequestBody() == nil || len(cr.calls) != 1 {
		t.Errorf("inference request not routed: %v (router calls %q)", rs[1], cr.calls)
	}
}

// setMethod replaces :method in a request-headers message.
func setMethod(m *extprocv3.ProcessingRequest, method string) {
	for _, kv := range m.GetRequestHeaders().GetHeaders().GetHeaders() {
		if kv.GetKey() == ":method" {
			kv.RawValue = []byte(method)
		}
	}
}
