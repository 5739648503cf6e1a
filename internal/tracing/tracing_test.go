package tracing_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/tracing"
)

const (
	traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	traceID     = "4bf92f3577b34da6a3ce929d0e0e4736"
	parentSpan  = "00f067aa0ba902b7"
)

// clearEnv makes the test independent of the OTEL_* variables of the shell
// that runs it.
func clearEnv(t *testing.T) {
	for _, k := range []string{"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
		"OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_TRACES_SAMPLER"} {
		t.Setenv(k, "")
	}
}

func record(t *testing.T) *tracetest.SpanRecorder {
	t.Helper()
	rec := tracetest.NewSpanRecorder()
	tracing.Use(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec)))
	t.Cleanup(func() { tracing.Use(nil) })
	return rec
}

func TestOffWithoutEndpoint(t *testing.T) {
	clearEnv(t)
	shutdown, err := tracing.Setup(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer shutdown(context.Background())
	if tracing.Enabled() {
		t.Fatal("tracing on without OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	if ok, why := tracing.Configured(); ok || why == "" {
		t.Errorf("Configured() = %v, %q; want false with a reason", ok, why)
	}
	ctx := context.Background()
	// Off, the per-request helpers cost no allocation at all.
	allocs := testing.AllocsPerRun(100, func() {
		c, span := tracing.StartDecision(ctx, traceparent, "", "req-1")
		_, w := tracing.StartWait(c, "m")
		tracing.EndWait(w, nil)
		tracing.EndDecision(span, "a", "b", "n", false, nil, time.Millisecond)
	})
	if allocs != 0 {
		t.Errorf("tracing off allocates %v times per request, want 0", allocs)
	}
}

func TestDecisionSpanJoinsTheRequestTrace(t *testing.T) {
	rec := record(t)
	ctx, span := tracing.StartDecision(context.Background(), traceparent, "vendor=x", "req-42")
	_, wait := tracing.StartWait(ctx, "Qwen/Qwen3-8B")
	tracing.EndWait(wait, nil)
	tracing.EndDecision(span, "helexa/balanced", "Qwen/Qwen3-8B", "beast", true, nil, 1500*time.Microsecond)

	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d spans ended, want wait and decision", len(spans))
	}
	w, d := spans[0], spans[1]
	if d.Name() != tracing.SpanDecision || w.Name() != tracing.SpanWait {
		t.Fatalf("span names %q, %q", w.Name(), d.Name())
	}
	if got := d.SpanContext().TraceID().String(); got != traceID {
		t.Errorf("decision trace id %s, want the traceparent's %s", got, traceID)
	}
	if got := d.Parent().SpanID().String(); got != parentSpan || !d.Parent().IsRemote() {
		t.Errorf("decision parent %s (remote %v), want the traceparent's span %s", got, d.Parent().IsRemote(), parentSpan)
	}
	if got := d.SpanContext().TraceState().Get("vendor"); got != "x" {
		t.Errorf("tracestate vendor = %q, want x", got)
	}
	if w.Parent().SpanID() != d.SpanContext().SpanID() {
		t.Error("the wait span is not a child of the decision span")
	}
	attrs := map[string]any{}
	for _, kv := range d.Attributes() {
		attrs[string(kv.Key)] = kv.Value.AsInterface()
	}
	want := map[string]any{"cortex.request_id": "req-42", "cortex.model": "helexa/balanced", "cortex.resolved": "Qwen/Qwen3-8B",
		"cortex.node": "beast", "cortex.cold_start": true, "cortex.decision_ms": 1.5}
	for k, v := range want {
		if attrs[k] != v {
			t.Errorf("attribute %s = %v, want %v", k, attrs[k], v)
		}
	}
	if d.SpanKind() != trace.SpanKindServer {
		t.Errorf("decision span kind %v, want server", d.SpanKind())
	}
}

func TestDecisionWithoutTraceparentStartsATrace(t *testing.T) {
	rec := record(t)
	_, span := tracing.StartDecision(context.Background(), "", "", "")
	tracing.EndDecision(span, "x", "x", "", false, apierr.ModelNotFound("no"), 0)
	s := rec.Ended()[0]
	if s.Parent().IsValid() || !s.SpanContext().TraceID().IsValid() {
		t.Errorf("want a new root span, got parent %v", s.Parent())
	}
	// A client's 404 is not our failure.
	if s.Status().Code.String() == "Error" {
		t.Error("a 4xx marked the span failed")
	}
}

func TestColdLoadAndEvictionSpans(t *testing.T) {
	rec := record(t)
	ctx, load := tracing.StartColdLoad(context.Background(), "Qwen/Qwen3.6-27B", "beast")
	_, ev := tracing.StartEviction(ctx, "beast", "Qwen/Qwen3-8B", "Qwen/Qwen3.6-27B")
	tracing.End(ev, nil)
	tracing.End(load, errors.New("422 quant not found"))
	spans := rec.Ended()
	if len(spans) != 2 || spans[0].Name() != tracing.SpanEvict || spans[1].Name() != tracing.SpanColdLoad {
		t.Fatalf("spans %v", spans)
	}
	if spans[0].Parent().SpanID() != spans[1].SpanContext().SpanID() {
		t.Error("eviction is not a child of its cold load")
	}
	if spans[1].Status().Description != "422 quant not found" || len(spans[1].Events()) == 0 {
		t.Errorf("failed load: status %+v, events %v; want the error recorded", spans[1].Status(), spans[1].Events())
	}
}

// The OTLP exporters are really wired: spans reach a collector over
// OTLP/HTTP (the default protocol) and OTLP/gRPC.
func TestSetupExportsOverOTLPHTTP(t *testing.T) {
	clearEnv(t)
	got := make(chan *coltracepb.ExportTraceServiceRequest, 4)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		req := &coltracepb.ExportTraceServiceRequest{}
		if r.URL.Path != "/v1/traces" || proto.Unmarshal(body, req) != nil {
			http.Error(w, "bad export", http.StatusBadRequest)
			return
		}
		got <- req
		w.Header().Set("Content-Type", "application/x-protobuf")
		b, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
		w.Write(b)
	}))
	defer srv.Close()
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", srv.URL)
	exportOne(t, got)
}

func TestSetupExportsOverOTLPGRPC(t *testing.T) {
	clearEnv(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *coltracepb.ExportTraceServiceRequest, 4)
	gs := grpc.NewServer()
	coltracepb.RegisterTraceServiceServer(gs, &collector{got: got})
	go gs.Serve(lis)
	defer gs.Stop()
	t.Setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://"+lis.Addr().String())
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
	exportOne(t, got)
}

func TestSetupRejectsUnknownProtocol(t *testing.T) {
	clearEnv(t)
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
	t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
	if _, err := tracing.Setup(context.Background()); err == nil || tracing.Enabled() {
		t.Errorf("Setup with protocol http/json: err %v, enabled %v; want an error and tracing off", err, tracing.Enabled())
	}
}

func exportOne(t *testing.T, got <-chan *coltracepb.ExportTraceServiceRequest) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	shutdown, err := tracing.Setup(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !tracing.Enabled() {
		t.Fatal("Setup with an endpoint left tracing off")
	}
	_, span := tracing.StartDecision(ctx, traceparent, "", "req-7")
	tracing.EndDecision(span, "m", "m", "n", false, nil, 0)
	if err := shutdown(ctx); err != nil { // flushes the batch
		t.Fatalf("shutdown: %v", err)
	}
	if tracing.Enabled() {
		t.Error("tracing still on after shutdown")
	}
	select {
	case req := <-got:
		rs := req.GetResourceSpans()
		if len(rs) == 0 || len(rs[0].GetScopeSpans()) == 0 || len(rs[0].GetScopeSpans()[0].GetSpans()) == 0 {
			t.Fatalf("export without spans: %v", req)
		}
		s := rs[0].GetScopeSpans()[0].GetSpans()[0]
		if s.GetName() != tracing.SpanDecision || trace.TraceID(s.GetTraceId()).String() != traceID {
			t.Errorf("exported span %q trace %x", s.GetName(), s.GetTraceId())
		}
		var service string
		for _, a := range rs[0].GetResource().GetAttributes() {
			if a.GetKey() == "service.name" {
				service = a.GetValue().GetStringValue()
			}
		}
		if service != tracing.ServiceName {
			t.Errorf("service.name = %q, want %q", service, tracing.ServiceName)
		}
	case <-ctx.Done():
		t.Fatal("no span reached the collector")
	}
}

type collector struct {
	coltracepb.UnimplementedTraceServiceServer
	got chan<- *coltracepb.ExportTraceServiceRequest
}

func (c *collector) Export(_ context.Context, req *coltracepb.ExportTraceServiceRequest) (*coltracepb.ExportTraceServiceResponse, error) {
	c.got <- req
	return &coltracepb.ExportTraceServiceResponse{}, nil
}
