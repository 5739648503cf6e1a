package service

import (
	"context"
	"time"

	"github.com/helexa/cortex-extproc/internal/tracing"
)

// startTracing turns OpenTelemetry tracing on when OTEL_EXPORTER_OTLP_*
// asks for it. Tracing is an aid, not a duty: a bad setting is logged and
// the service routes without it. The returned func flushes what is left.
func (s *Service) startTracing(ctx context.Context) (stop func()) {
	shutdown, err := tracing.Setup(ctx)
	switch {
	case err != nil:
		s.log.Error("tracing off: the OTLP trace exporter could not be set up; fix the OTEL_EXPORTER_OTLP_* variables", "error", err)
	case tracing.Enabled():
		s.log.Info("tracing on: exporting spans over OTLP", "protocol", tracing.Protocol())
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := shutdown(ctx); err != nil {
			s.log.Warn("tracing: could not flush the last spans to the OTLP endpoint", "error", err)
		}
	}
}
