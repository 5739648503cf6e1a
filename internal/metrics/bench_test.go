package metrics_test

import (
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/routing"
)

// BenchmarkDecided is the observer's per-request cost (ext_proc calls it
// once per decided request), logging at info as in production: a routed
// request by alias, and a rejected one whose log line the rate limit drops.
func BenchmarkDecided(b *testing.B) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.SetLogger(slog.New(slog.NewJSONHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelInfo})))
	routed := &routing.Target{Requested: "helexa/balanced", Model: "Qwen/Qwen3-8B", Node: "beast"}
	unknown := &routing.Target{Requested: "made/up", Model: "made/up"}
	notFound := apierr.ModelNotFound("model %q not found", "made/up")
	b.Run("routed", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.Decided("0b7d3c1e-9c1f-4f57-8a53-7f3f7f0e2a11", routed, nil, 20*time.Microsecond)
		}
	})
	b.Run("rejected", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			m.Decided("0b7d3c1e-9c1f-4f57-8a53-7f3f7f0e2a11", unknown, notFound, 20*time.Microsecond)
		}
	})
}
