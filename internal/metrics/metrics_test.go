package metrics_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/routing"
)

func testCatalogue() *catalogue.Catalogue {
	return catalogue.New([]*catalogue.Profile{{ID: "Qwen/Qwen3-8B", Harness: "candle"}},
		map[string]string{"helexa/balanced": "Qwen/Qwen3-8B"}, "abc123")
}

// contractMetrics are the metrics contract.md and the README promise.
var contractMetrics = []string{
	"requests_total", "request_errors_total", "build_info", "request_decision_seconds", "cold_loads_total", "cold_load_seconds",
	"cold_load_wait_seconds", "cold_load_waiters", "evictions_total", "neuron_healthy",
	"neuron_poll_failures_total", "neuron_suspect_signals_total", "neuron_fast_unhealthy_total",
	"catalogue_reloads_total", "catalogue_models", "catalogue_info", "inflight_streams",
}

func TestEveryContractMetricIsExposed(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	// Vectors appear once they have a series; give each one.
	m.Decided("r", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, time.Millisecond)
	m.Decided("e", nil, apierr.InvalidRequest("x"), time.Millisecond)
	m.Waited("Qwen/Qwen3-8B", time.Second, nil)
	m.LoadFinished("Qwen/Qwen3-8B", "beast", true, time.Minute)
	m.Evicted("beast", "Qwen/Qwen3-8B")
	m.NeuronHealth("beast", true)
	m.PollResult("beast", false)
	m.SuspectSignal("beast", "envoy_local_reply")
	m.SuspectUnhealthy("beast")
	m.StreamStarted()

	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range fams {
		have[f.GetName()] = true
	}
	for _, name := range contractMetrics {
		if !have["cortex_extproc_"+name] {
			t.Errorf("cortex_extproc_%s is not exposed", name)
		}
	}
	for _, name := range []string{"go_goroutines", "process_cpu_seconds_total"} {
		if !have[name] {
			t.Errorf("%s missing: the Go and process collectors are not registered", name)
		}
	}
}

func TestModelLabelsAreBounded(t *testing.T) {
	m := metrics.New()
	if got := m.ModelLabel("Qwen/Qwen3-8B"); got != metrics.Other {
		t.Errorf("before any catalogue: %q, want other", got)
	}
	m.SetCatalogue(testCatalogue(), 1)
	for id, want := range map[string]string{
		"Qwen/Qwen3-8B":          "Qwen/Qwen3-8B",
		"helexa/balanced":        "helexa/balanced",
		"attacker/random-123456": metrics.Other,
		"":                       metrics.Other,
	} {
		if got := m.ModelLabel(id); got != want {
			t.Errorf("ModelLabel(%q) = %q, want %q", id, got, want)
		}
	}
	// A client inventing model names cannot grow the series count.
	for i := 0; i < 50; i++ {
		m.Decided("", &routing.Target{Model: "made/up-" + string(rune('a'+i%26))}, apierr.ModelNotFound("x"), 0)
	}
	if n := count(m.Requests); n != 1 {
		t.Errorf("%d requests_total series after 50 unknown models, want 1 (other)", n)
	}
	if v := value(m.Requests.WithLabelValues(metrics.Other, metrics.Other, "", apierr.CodeModelNotFound)); v != 50 {
		t.Errorf("requests_total{other,model_not_found} = %v, want 50", v)
	}
}

func TestDecidedOutcomes(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.Decided("a", &routing.Target{Requested: "helexa/balanced", Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, 100*time.Microsecond)
	m.Decided("b", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "beast", ColdStart: true}, nil, 200*time.Microsecond)
	m.Decided("c", nil, apierr.InvalidRequest("not JSON"), 50*time.Microsecond)
	m.Decided("d", &routing.Target{Model: "Qwen/Qwen3-8B"}, apierr.Unavailable(5, "no healthy node").WithReason(apierr.ReasonNoHealthy), time.Millisecond)

	for _, c := range []struct {
		model, requested, node, outcome string
		want                            float64
	}{
		{"Qwen/Qwen3-8B", "helexa/balanced", "beast", metrics.OutcomeRouted, 1},
		{"Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "beast", metrics.OutcomeColdStart, 1},
		{metrics.Other, metrics.Other, "", apierr.CodeInvalidRequest, 1},
		{"Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "", apierr.CodeServiceUnavailable, 1},
	} {
		if got := value(m.Requests.WithLabelValues(c.model, c.requested, c.node, c.outcome)); got != c.want {
			t.Errorf("requests_total{%s,%s,%s,%s} = %v, want %v", c.model, c.requested, c.node, c.outcome, got, c.want)
		}
	}
	if n := count(m.Errors); n != 2 {
		t.Errorf("%d request_errors_total series, want 2 (the two errors)", n)
	}
	if v := value(m.Errors.WithLabelValues(metrics.Other, metrics.Other, "", "400", apierr.CodeInvalidRequest, "invalid_body")); v != 1 {
		t.Errorf("request_errors_total{400,invalid_body} = %v, want 1", v)
	}
	if v := value(m.Errors.WithLabelValues("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "", "503", apierr.CodeServiceUnavailable, "no_healthy")); v != 1 {
		t.Errorf("request_errors_total{503,no_healthy} = %v, want 1", v)
	}
	if n := histogramCount(t, m, "cortex_extproc_request_decision_seconds"); n != 4 {
		t.Errorf("decision histogram count %d, want 4", n)
	}
}

func TestCatalogueInfoFollowsReloads(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.CatalogueReload(true)
	next := catalogue.New(nil, nil, "def456")
	m.SetCatalogue(next, 2)
	m.CatalogueReload(false)

	if v := value(m.CatalogueModels); v != 0 {
		t.Errorf("catalogue_models = %v, want 0 after the empty catalogue", v)
	}
	if n := count(m.CatalogueInfo); n != 1 {
		t.Errorf("%d catalogue_info series, want only the one in force", n)
	}
	if v := value(m.CatalogueInfo.WithLabelValues("def456", "2")); v != 1 {
		t.Errorf("catalogue_info{def456,2} = %v, want 1", v)
	}
	if ok, bad := value(m.CatalogueReloads.WithLabelValues("ok")), value(m.CatalogueReloads.WithLabelValues("error")); ok != 1 || bad != 1 {
		t.Errorf("catalogue_reloads_total ok=%v error=%v, want 1 and 1", ok, bad)
	}
}

func TestCatalogueReloadSeriesExistBeforeAnyReload(t *testing.T) {
	m := metrics.New()
	if n := count(m.CatalogueReloads); n != 2 {
		t.Errorf("%d catalogue_reloads_total series at start, want ok and error at 0", n)
	}
}

func TestColdLoadAndNeuronMetrics(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.LoadFinished("Qwen/Qwen3-8B", "beast", true, 90*time.Second)
	m.LoadFinished("Qwen/Qwen3-8B", "rig", false, 2*time.Second)
	m.Evicted("beast", "neuron/only-model")
	m.WaitersChanged(3)
	m.WaitersChanged(0)
	m.NeuronHealth("beast", true)
	m.NeuronHealth("rig", false)
	m.PollResult("beast", true)
	m.PollResult("rig", false)
	m.PollResult("rig", false)

	checks := []struct {
		name string
		got  float64
		want float64
	}{
		{"cold_loads_total{success}", value(m.ColdLoads.WithLabelValues("Qwen/Qwen3-8B", "beast", "success")), 1},
		{"cold_loads_total{failure}", value(m.ColdLoads.WithLabelValues("Qwen/Qwen3-8B", "rig", "failure")), 1},
		{"evictions_total{beast,other}", value(m.Evictions.WithLabelValues("beast", metrics.Other)), 1},
		{"cold_load_waiters", value(m.ColdLoadWaiters), 0},
		{"neuron_healthy{beast}", value(m.NeuronHealthy.WithLabelValues("beast")), 1},
		{"neuron_healthy{rig}", value(m.NeuronHealthy.WithLabelValues("rig")), 0},
		{"neuron_poll_failures_total{beast}", value(m.NeuronPollFailure.WithLabelValues("beast")), 0},
		{"neuron_poll_failures_total{rig}", value(m.NeuronPollFailure.WithLabelValues("rig")), 2},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if n := histogramCount(t, m, "cortex_extproc_cold_load_seconds"); n != 2 {
		t.Errorf("cold_load_seconds count %d, want 2", n)
	}
	m.NeuronRemoved("rig")
	if n := count(m.NeuronHealthy); n != 1 {
		t.Errorf("%d neuron_healthy series after removing rig, want 1", n)
	}
}

// Buckets must resolve a 20 µs decision and a 25-minute cold load alike.
func TestBucketsSpanDecisionsAndLoads(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.Decided("", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "n"}, nil, 20*time.Microsecond)
	m.LoadFinished("Qwen/Qwen3-8B", "n", true, 25*time.Minute)
	fams, _ := m.Registry.Gather()
	for _, f := range fams {
		switch f.GetName() {
		case "cortex_extproc_request_decision_seconds":
			if upperOfFirstNonEmpty(f.GetMetric()[0].GetHistogram().GetBucket()) > 0.000025 {
				t.Error("a 20 µs decision lands in a bucket above 25 µs")
			}
		case "cortex_extproc_cold_load_seconds":
			if upperOfFirstNonEmpty(f.GetMetric()[0].GetHistogram().GetBucket()) > 1800 {
				t.Error("a 25-minute load lands above the 30-minute bucket")
			}
		}
	}
}

func TestDecisionLogLines(t *testing.T) {
	var buf bytes.Buffer
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	m.SetLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))

	m.Decided("req-1", &routing.Target{Requested: "helexa/balanced", Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, 1500*time.Microsecond)
	m.Decided("req-2", &routing.Target{Requested: "x/y", Model: "x/y"}, apierr.ModelNotFound("model %q not found", "x/y"), time.Millisecond)
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("%d log lines, want 2:\n%s", len(lines), buf.String())
	}
	var routed, rejected map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &routed); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &rejected); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{"level": "DEBUG", "request_id": "req-1", "model": "helexa/balanced", "resolved": "Qwen/Qwen3-8B",
		"node": "beast", "cold_start": false, "decision_ms": 1.5} {
		if routed[k] != v {
			t.Errorf("routed line %s = %v, want %v (%s)", k, routed[k], v, lines[0])
		}
	}
	for k, v := range map[string]any{"level": "INFO", "request_id": "req-2", "model": "x/y", "status": 404.0, "code": "model_not_found"} {
		if rejected[k] != v {
			t.Errorf("rejected line %s = %v, want %v (%s)", k, rejected[k], v, lines[1])
		}
	}

	// At info, routed requests are silent and cold starts still logged.
	buf.Reset()
	m.SetLogger(slog.New(slog.NewJSONHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	m.Decided("req-3", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, time.Millisecond)
	m.Decided("req-4", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "beast", ColdStart: true}, nil, time.Millisecond)
	if out := buf.String(); strings.Contains(out, "req-3") || !strings.Contains(out, `"request_id":"req-4"`) || !strings.Contains(out, `"cold_start":true`) {
		t.Errorf("at info level got:\n%s\nwant only the cold start", out)
	}
}

func histogramCount(t *testing.T, m *metrics.Metrics, name string) uint64 {
	t.Helper()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, f := range fams {
		if f.GetName() == name {
			for _, mt := range f.GetMetric() {
				n += mt.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

func upperOfFirstNonEmpty(bs []*dto.Bucket) float64 {
	for _, b := range bs {
		if b.GetCumulativeCount() > 0 {
			return b.GetUpperBound()
		}
	}
	return 0
}

// value reads a counter's or gauge's current value (client_golang's
// testutil would pull in another module for the same few lines).
func value(m prometheus.Metric) float64 {
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		panic(err)
	}
	switch {
	case d.Counter != nil:
		return d.GetCounter().GetValue()
	case d.Gauge != nil:
		return d.GetGauge().GetValue()
	}
	panic("not a counter or gauge")
}

// count is the number of series a collector exposes.
func count(c prometheus.Collector) int {
	ch := make(chan prometheus.Metric, 1024)
	c.Collect(ch)
	close(ch)
	return len(ch)
}
