// Package tracing is cortex-extproc's OpenTelemetry tracing: spans for the
// routing decision, the wait for a cold load, the cold load itself and each
// eviction. It is off unless the standard OTEL_EXPORTER_OTLP_ENDPOINT (or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set; off, every helper here returns
// at once without allocating, so the per-request path pays nothing.
//
// The request's trace context comes from its W3C traceparent/tracestate
// headers, so the decision span joins the trace Envoy or the client started.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/helexa/cortex-extproc/internal/apierr"
)

// ServiceName is the default service.name resource attribute
// (OTEL_SERVICE_NAME overrides it).
const ServiceName = "cortex-extproc"

// instrumentation names the tracer, as OpenTelemetry expects: the module path.
const instrumentation = "github.com/helexa/cortex-extproc"

// Span names.
const (
	SpanDecision = "cortex.decision"
	SpanWait     = "cortex.cold_load.wait"
	SpanColdLoad = "cortex.cold_load"
	SpanEvict    = "cortex.evict"
)

// Attribute keys on the spans (the log keys, prefixed).
const (
	AttrRequestID  = attribute.Key("cortex.request_id")
	AttrModel      = attribute.Key("cortex.model")    // as requested
	AttrResolved   = attribute.Key("cortex.resolved") // concrete id
	AttrNode       = attribute.Key("cortex.node")
	AttrColdStart  = attribute.Key("cortex.cold_start")
	AttrDecisionMS = attribute.Key("cortex.decision_ms")
	AttrErrorCode  = attribute.Key("cortex.error_code")
	AttrStatus     = attribute.Key("http.response.status_code")
	AttrIncoming   = attribute.Key("cortex.incoming") // the model an eviction makes room for
)

// state is what Use installs; nil while tracing is off.
type state struct {
	tracer trace.Tracer
}

var current atomic.Pointer[state]

// off is the span handed out while tracing is off: a no-op, never the span
// already in ctx (ending that would end someone else's span).
var off = trace.SpanFromContext(context.Background())

// w3c reads traceparent and tracestate.
var w3c = propagation.TraceContext{}

// Enabled reports whether spans are being recorded.
func Enabled() bool { return current.Load() != nil }

// Use installs tp as the tracer provider for cortex-extproc's spans (and as
// the global one) and turns tracing on. Setup calls it; tests call it with
// an in-memory exporter. A nil tp turns tracing off.
func Use(tp trace.TracerProvider) {
	if tp == nil {
		current.Store(nil)
		otel.SetTracerProvider(noop.NewTracerProvider())
		return
	}
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	current.Store(&state{tracer: tp.Tracer(instrumentation)})
}

// Configured reports whether the environment asks for OTLP trace export,
// and why not when it does not.
func Configured() (bool, string) {
	if strings.EqualFold(os.Getenv("OTEL_SDK_DISABLED"), "true") {
		return false, "OTEL_SDK_DISABLED=true"
	}
	if strings.EqualFold(os.Getenv("OTEL_TRACES_EXPORTER"), "none") {
		return false, "OTEL_TRACES_EXPORTER=none"
	}
	if os.Getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") == "" && os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") == "" {
		return false, "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
	}
	return true, ""
}

// Setup turns tracing on when the environment configures an OTLP endpoint
// (Configured) and returns the function that flushes and stops it; with
// none configured it does nothing and shutdown is a no-op. The exporter
// reads the standard OTEL_EXPORTER_OTLP_* variables (endpoint, headers,
// timeout, certificates); OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or
// OTEL_EXPORTER_OTLP_PROTOCOL picks "grpc" or "http/protobuf" (the
// default, as the OpenTelemetry specification says); sampling follows
// OTEL_TRACES_SAMPLER (default: parent-based, always on); the resource
// follows OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
func Setup(ctx context.Context) (shutdown func(context.Context) error, err error) {
	noop := func(context.Context) error { return nil }
	if ok, _ := Configured(); !ok {
		return noop, nil
	}
	exp, err := exporter(ctx)
	if err != nil {
		return noop, err
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", ServiceName)),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
		resource.WithTelemetrySDK(),
	)
	if err != nil && res == nil {
		_ = exp.Shutdown(ctx)
		return noop, fmt.Errorf("tracing: OTEL_RESOURCE_ATTRIBUTES or OTEL_SERVICE_NAME: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	Use(tp)
	return func(ctx context.Context) error {
		Use(nil)
		return tp.Shutdown(ctx)
	}, nil
}

// Protocol is the OTLP protocol Setup uses: "grpc" or "http/protobuf".
func Protocol() string {
	p := os.Getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if p == "" {
		p = os.Getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	if p == "" {
		return "http/protobuf"
	}
	return p
}

func exporter(ctx context.Context) (sdktrace.SpanExporter, error) {
	// Both exporters read OTEL_EXPORTER_OTLP_* themselves.
	switch p := Protocol(); p {
	case "grpc":
		return otlptracegrpc.New(ctx)
	case "http/protobuf":
		return otlptracehttp.New(ctx)
	default:
		return nil, errors.New("tracing: OTLP protocol " + p + " is not supported; set OTEL_EXPORTER_OTLP_PROTOCOL to grpc or http/protobuf")
	}
}

// StartDecision starts the span of one request's routing decision, as a
// child of the trace in its traceparent/tracestate headers (a new trace
// when there is none). Off, it returns ctx and a no-op span.
func StartDecision(ctx context.Context, traceparent, tracestate, requestID string) (context.Context, trace.Span) {
	s := current.Load()
	if s == nil {
		return ctx, off
	}
	if traceparent != "" {
		ctx = w3c.Extract(ctx, headers{traceparent: traceparent, tracestate: tracestate})
	}
	ctx, span := s.tracer.Start(ctx, SpanDecision, trace.WithSpanKind(trace.SpanKindServer))
	if requestID != "" {
		span.SetAttributes(AttrRequestID.String(requestID))
	}
	return ctx, span
}

// EndDecision records the outcome of a decision on its span and ends it:
// the model as requested, the concrete id it resolved to, the node, whether
// it was a cold start, the client-visible error (nil when routed) and the
// decision time without cold-load waits. (Plain values, not a
// routing.Target: routing imports this package.)
func EndDecision(span trace.Span, requested, resolved, node string, coldStart bool, err *apierr.Error, took time.Duration) {
	if !span.IsRecording() {
		return
	}
	attrs := make([]attribute.KeyValue, 0, 8)
	if requested != "" {
		attrs = append(attrs, AttrModel.String(requested))
	}
	if resolved != "" {
		attrs = append(attrs, AttrResolved.String(resolved))
	}
	if node != "" {
		attrs = append(attrs, AttrNode.String(node))
	}
	attrs = append(attrs, AttrColdStart.Bool(coldStart), AttrDecisionMS.Float64(ms(took)))
	if err != nil {
		attrs = append(attrs, AttrStatus.Int(err.Status), AttrErrorCode.String(err.Code))
		// 4xx are the client's; only our own failures mark the span failed.
		if err.Status >= 500 {
			span.SetStatus(codes.Error, err.Message)
		}
	}
	span.SetAttributes(attrs...)
	span.End()
}

// EndWait ends a wait span, marking it failed when the wait ended in err.
func EndWait(span trace.Span, err *apierr.Error) {
	if err == nil {
		End(span, nil) // a nil *apierr.Error is not a nil error
		return
	}
	End(span, err)
}

// StartWait starts the span of a request held for a cold load of model.
func StartWait(ctx context.Context, model string) (context.Context, trace.Span) {
	if !Enabled() {
		return ctx, off // before building the attribute list: no allocation
	}
	return start(ctx, SpanWait, AttrResolved.String(model))
}

// StartColdLoad starts the span of one cold-load attempt of model on node.
// A load outlives and is shared by the requests that wait for it, so it is
// usually a trace of its own; each waiting request has a wait span.
func StartColdLoad(ctx context.Context, model, node string) (context.Context, trace.Span) {
	if !Enabled() {
		return ctx, off
	}
	return start(ctx, SpanColdLoad, AttrResolved.String(model), AttrNode.String(node))
}

// StartEviction starts the span of unloading model from node to make room
// for incoming.
func StartEviction(ctx context.Context, node, model, incoming string) (context.Context, trace.Span) {
	if !Enabled() {
		return ctx, off
	}
	return start(ctx, SpanEvict, AttrNode.String(node), AttrResolved.String(model), AttrIncoming.String(incoming))
}

func start(ctx context.Context, name string, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	s := current.Load()
	if s == nil {
		return ctx, off
	}
	return s.tracer.Start(ctx, name, trace.WithAttributes(attrs...))
}

// End ends span, marking it failed with err when err is not nil.
func End(span trace.Span, err error) {
	if !span.IsRecording() {
		return
	}
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// headers is a propagation carrier over the two W3C headers.
type headers struct{ traceparent, tracestate string }

func (h headers) Get(key string) string {
	switch key {
	case "traceparent":
		return h.traceparent
	case "tracestate":
		return h.tracestate
	}
	return ""
}

func (h headers) Set(string, string) {}

func (h headers) Keys() []string { return []string{"traceparent", "tracestate"} }
