package metrics_test

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	"github.com/prometheus/common/expfmt"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

// logLines is a JSON log sink, safe for the concurrent Decided calls.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logLines) lines(t *testing.T) []map[string]any {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, s := range strings.Split(strings.TrimSpace(l.buf.String()), "\n") {
		if s == "" {
			continue
		}
		var e map[string]any
		if err := json.Unmarshal([]byte(s), &e); err != nil {
			t.Fatalf("log line %q: %v", s, err)
		}
		out = append(out, e)
	}
	return out
}

// clock is a settable time for the log rate limiter.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func loggedMetrics(t *testing.T) (*metrics.Metrics, *logLines, *clock) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	logs := &logLines{}
	m.SetLogger(slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	clk := &clock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	m.SetLogClock(clk.Now)
	return m, logs, clk
}

// 10,000 requests for unknown models write a bounded number of lines; the
// counter says how many were dropped, and the next line written for that
// reason says how many it stands for.
func TestRejectionLogsAreRateLimitedPerReason(t *testing.T) {
	m, logs, clk := loggedMetrics(t)
	const n = 10000
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 4 {
				id := "made/up-" + string(rune('a'+i%26))
				m.Decided("req", &routing.Target{Requested: id, Model: id}, apierr.ModelNotFound("model %q not found", id), time.Microsecond)
			}
		}()
	}
	wg.Wait()
	lines := logs.lines(t)
	if len(lines) != metrics.LogBurst {
		t.Fatalf("%d log lines for %d unknown-model requests at one instant, want the burst of %d", len(lines), n, metrics.LogBurst)
	}
	dropped := value(m.LogLinesDropped.WithLabelValues("unknown_model"))
	if dropped != n-metrics.LogBurst {
		t.Errorf("log_lines_dropped_total{unknown_model} = %v, want %d", dropped, n-metrics.LogBurst)
	}
	// Every request is still counted.
	if v := value(m.Errors.WithLabelValues(metrics.Other, metrics.Other, "", "404", apierr.CodeModelNotFound, "unknown_model")); v != n {
		t.Errorf("request_errors_total{unknown_model} = %v, want %d", v, n)
	}

	// Another reason has its own budget.
	m.Decided("other-reason", &routing.Target{Model: "Qwen/Qwen3-8B"}, apierr.Unavailable(5, "x").WithReason(apierr.ReasonNoHealthy), 0)
	if l := logs.lines(t); len(l) != metrics.LogBurst+1 || l[len(l)-1]["reason"] != "no_healthy" {
		t.Fatalf("a no_healthy rejection after the unknown-model flood was not logged: %v", l[len(l)-1])
	}

	// A second later one more unknown-model line, carrying the count.
	clk.Add(metrics.LogEvery)
	m.Decided("after", &routing.Target{Requested: "x/y", Model: "x/y"}, apierr.ModelNotFound("x"), 0)
	m.Decided("after-2", &routing.Target{Requested: "x/y", Model: "x/y"}, apierr.ModelNotFound("x"), 0)
	l := logs.lines(t)
	last := l[len(l)-1]
	if len(l) != metrics.LogBurst+2 || last["request_id"] != "after" || last["suppressed"] != float64(n-metrics.LogBurst) {
		t.Errorf("after a second: %d lines, last %v; want one more line with suppressed=%d", len(l), last, n-metrics.LogBurst)
	}
	if v := value(m.LogLinesDropped.WithLabelValues("unknown_model")); v != n-metrics.LogBurst+1 {
		t.Errorf("log_lines_dropped_total{unknown_model} = %v, want %d", v, n-metrics.LogBurst+1)
	}

	// Cold starts are limited the same way, under cold_start.
	for range 3 * metrics.LogBurst {
		m.Decided("cold", &routing.Target{Model: "Qwen/Qwen3-8B", Node: "beast", ColdStart: true}, nil, 0)
	}
	if v := value(m.LogLinesDropped.WithLabelValues(metrics.ReasonColdStart)); v != 2*metrics.LogBurst {
		t.Errorf("log_lines_dropped_total{cold_start} = %v, want %d", v, 2*metrics.LogBurst)
	}
}

// Below the rate nothing is dropped, and lines the level filters out are
// not counted as dropped.
func TestRejectionLogsBelowTheRateAreAllWritten(t *testing.T) {
	m, logs, clk := loggedMetrics(t)
	for range 50 {
		clk.Add(metrics.LogEvery)
		m.Decided("r", nil, apierr.InvalidRequest("x"), 0)
	}
	if l := logs.lines(t); len(l) != 50 {
		t.Errorf("%d lines at one request per second, want 50", len(l))
	}
	m.SetLogger(slog.New(slog.NewJSONHandler(&bytes.Buffer{}, &slog.HandlerOptions{Level: slog.LevelWarn})))
	for range 1000 {
		m.Decided("r", nil, apierr.InvalidRequest("x"), 0)
	}
	if n := count(m.LogLinesDropped); n != 0 {
		t.Errorf("%d log_lines_dropped_total series: lines below the log level are not dropped, they are never made", n)
	}
}

// A 1 MiB x-request-id is logged cut, with a marker saying how long it was.
func TestLongRequestIDIsTruncated(t *testing.T) {
	m, logs, _ := loggedMetrics(t)
	id := strings.Repeat("é", 1<<19) // 1 MiB, two bytes a rune
	m.Decided(id, &routing.Target{Requested: "x/y", Model: "x/y"}, apierr.ModelNotFound("x"), 0)
	l := logs.lines(t)
	if len(l) != 1 {
		t.Fatalf("%d lines", len(l))
	}
	got, _ := l[0]["request_id"].(string)
	if len(got) > metrics.MaxLogValue+64 || !strings.HasSuffix(got, "…[truncated, 1048576 bytes]") || !strings.HasPrefix(got, "éé") {
		t.Errorf("request_id logged as %d bytes ending %q; want at most %d bytes of it and the truncation marker", len(got), got[max(0, len(got)-40):], metrics.MaxLogValue)
	}
	if !json.Valid([]byte(`"`+strings.TrimSuffix(got, "…[truncated, 1048576 bytes]")+`"`)) || strings.ContainsRune(got, '\uFFFD') {
		t.Errorf("the cut split a rune: %q", got)
	}
	for _, s := range []string{"", "req-1", strings.Repeat("x", metrics.MaxLogValue)} {
		if metrics.BoundLogValue(s) != s {
			t.Errorf("BoundLogValue changed a %d-byte value", len(s))
		}
	}
}

// An error made without a reason is counted under a visible value rather
// than hidden; so is its log line.
func TestErrorWithoutReasonIsUnclassified(t *testing.T) {
	m, logs, _ := loggedMetrics(t)
	m.Decided("r", &routing.Target{Model: "Qwen/Qwen3-8B"}, &apierr.Error{Status: 503, Code: "service_unavailable", Message: "x"}, 0)
	if v := value(m.Errors.WithLabelValues("Qwen/Qwen3-8B", "Qwen/Qwen3-8B", "", "503", "service_unavailable", "unclassified")); v != 1 {
		t.Errorf("request_errors_total{unclassified} = %v, want 1", v)
	}
	if l := logs.lines(t); len(l) != 1 || l[0]["reason"] != "unclassified" {
		t.Errorf("log %v, want reason=unclassified", l)
	}
}

// The requested name is a label only when the catalogue knows it.
func TestRequestedLabelIsBounded(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	for i := range 100 {
		req := "client/invented-" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		m.Decided("", &routing.Target{Requested: req, Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, 0)
	}
	m.Decided("", &routing.Target{Requested: "helexa/balanced", Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, 0)
	if n := count(m.Requests); n != 2 {
		t.Errorf("%d requests_total series, want 2 (other and helexa/balanced)", n)
	}
	if v := value(m.Requests.WithLabelValues("Qwen/Qwen3-8B", metrics.Other, "beast", metrics.OutcomeRouted)); v != 100 {
		t.Errorf("requests_total{requested=other} = %v, want 100", v)
	}
}

func TestBuildInfo(t *testing.T) {
	metrics.SetBuild("v1.2.3", "abc123")
	defer metrics.SetBuild("", "")
	m := metrics.New()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != "cortex_extproc_build_info" {
			continue
		}
		labels := map[string]string{}
		for _, l := range f.GetMetric()[0].GetLabel() {
			labels[l.GetName()] = l.GetValue()
		}
		if labels["version"] != "v1.2.3" || labels["revision"] != "abc123" || labels["goversion"] != runtime.Version() || f.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("build_info %v = %v", labels, f.GetMetric()[0].GetGauge().GetValue())
		}
		return
	}
	t.Error("cortex_extproc_build_info is not exposed")
}

// fleetSnapshot: beast has two 24 GiB devices with Qwen/Qwen3-8B resident
// and busy, plus two models outside the catalogue; rig has no discovery yet.
func fleetSnapshot() *fleet.Snapshot {
	used := int64(18000)
	return &fleet.Snapshot{Round: 1, Nodes: []*fleet.Node{
		{Name: "beast", Healthy: true,
			Discovery: &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24564}, {Index: 1, VRAMTotalMB: 24564}}},
			Models: []*fleet.Model{
				{Model: neuron.Model{ID: "Qwen/Qwen3-8B", Status: neuron.StatusLoaded, Devices: []int{0}, VRAMUsedMB: &used}, InFlight: 3, QueueDepth: 2},
				{Model: neuron.Model{ID: "x/one", Status: neuron.StatusLoaded}, InFlight: 1},
				{Model: neuron.Model{ID: "x/two", Status: neuron.StatusLoaded}, InFlight: 2, QueueDepth: 1},
			}},
		{Name: "rig", Healthy: false},
	}}
}

// Per-neuron VRAM and in-flight gauges are read from the snapshot at scrape
// time; a neuron that leaves the snapshot leaves /metrics.
func TestFleetGauges(t *testing.T) {
	m := metrics.New()
	m.SetCatalogue(testCatalogue(), 1)
	snap := fleetSnapshot()
	var cur sync.Mutex
	get := func() *fleet.Snapshot { cur.Lock(); defer cur.Unlock(); return snap }
	usage := routing.NewUsage()
	var a, b routing.Lease
	usage.Use("beast", "Qwen/Qwen3-8B", &a)
	usage.Use("beast", "Qwen/Qwen3-8B", &b)
	m.WatchFleet(metrics.FleetSource{Snapshot: get, Ledger: func() *routing.Commitments { return nil }, Usage: usage})

	g := gather(t, m)
	for _, c := range []struct {
		name   string
		labels string
		want   float64
	}{
		{"neuron_device_vram_total_bytes", `device="0",node="beast"`, 24564 << 20},
		{"neuron_device_vram_total_bytes", `device="1",node="beast"`, 24564 << 20},
		{"neuron_device_vram_free_bytes", `device="0",node="beast"`, (24564 - 18000) << 20},
		{"neuron_device_vram_free_bytes", `device="1",node="beast"`, 24564 << 20},
		{"neuron_device_vram_ledger_free_bytes", `device="0",node="beast"`, (24564 - 18000) << 20},
		{"neuron_model_in_flight", `model="Qwen/Qwen3-8B",node="beast"`, 3},
		{"neuron_model_queue_depth", `model="Qwen/Qwen3-8B",node="beast"`, 2},
		{"neuron_model_in_flight", `model="other",node="beast"`, 3}, // x/one + x/two
		{"neuron_model_queue_depth", `model="other",node="beast"`, 1},
		{"routed_in_flight", `model="Qwen/Qwen3-8B",node="beast"`, 2},
		{"routed_in_flight", `model="other",node="beast"`, 0},
	} {
		if got, ok := g["cortex_extproc_"+c.name+"{"+c.labels+"}"]; !ok || got != c.want {
			t.Errorf("%s{%s} = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	for k := range g {
		if strings.Contains(k, `node="rig"`) && strings.Contains(k, "vram") {
			t.Errorf("%s: rig has no discovery, so no devices", k)
		}
	}
	a.Release()
	if got := gather(t, m)[`cortex_extproc_routed_in_flight{model="Qwen/Qwen3-8B",node="beast"}`]; got != 1 {
		t.Errorf("routed_in_flight after one release = %v, want 1", got)
	}
	b.Release()

	cur.Lock()
	snap = &fleet.Snapshot{Round: 2}
	cur.Unlock()
	for k := range gather(t, m) {
		if strings.Contains(k, `node="beast"`) {
			t.Errorf("%s still exported after beast left the fleet", k)
		}
	}
}

// gather renders every gauge and counter sample as name{labels} → value.
func gather(t *testing.T, m *metrics.Metrics) map[string]float64 {
	t.Helper()
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]float64{}
	for _, f := range fams {
		for _, mt := range f.GetMetric() {
			var ls []string
			for _, l := range mt.GetLabel() {
				ls = append(ls, l.GetName()+`="`+l.GetValue()+`"`)
			}
			k := f.GetName() + "{" + strings.Join(ls, ",") + "}"
			switch {
			case mt.Gauge != nil:
				out[k] = mt.GetGauge().GetValue()
			case mt.Counter != nil:
				out[k] = mt.GetCounter().GetValue()
			}
		}
	}
	return out
}

// Every metric family, each vector given a series, passes client_golang's
// promlint (the checks of `promtool check metrics`), and promtool itself
// when it is installed.
func TestMetricsPassPromlint(t *testing.T) {
	m, _, _ := loggedMetrics(t)
	m.Decided("r", &routing.Target{Requested: "helexa/balanced", Model: "Qwen/Qwen3-8B", Node: "beast"}, nil, time.Millisecond)
	for range metrics.LogBurst + 1 {
		m.Decided("e", &routing.Target{Model: "Qwen/Qwen3-8B"}, apierr.Unavailable(5, "x").WithReason(apierr.ReasonNoHealthy), time.Millisecond)
	}
	m.Waited("Qwen/Qwen3-8B", time.Second, nil)
	m.LoadFinished("Qwen/Qwen3-8B", "beast", true, time.Minute)
	m.Evicted("beast", "Qwen/Qwen3-8B")
	m.NeuronHealth("beast", true)
	m.PollResult("beast", false)
	m.StreamStarted()
	usage := routing.NewUsage()
	m.WatchFleet(metrics.FleetSource{Snapshot: fleetSnapshot, Ledger: func() *routing.Commitments { return nil }, Usage: usage})

	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, f := range fams {
		have[f.GetName()] = true
	}
	for _, name := range []string{"request_errors_total", "log_lines_dropped_total", "build_info", "neuron_device_vram_total_bytes",
		"neuron_device_vram_free_bytes", "neuron_device_vram_ledger_free_bytes", "neuron_model_in_flight", "neuron_model_queue_depth", "routed_in_flight"} {
		if !have["cortex_extproc_"+name] {
			t.Errorf("cortex_extproc_%s not exposed", name)
		}
	}
	problems, err := promlint.NewWithMetricFamilies(fams).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not installed (Debian: apt-get install prometheus); promlint's checks ran")
		return
	}
	var text bytes.Buffer
	for _, f := range fams {
		if _, err := expfmt.MetricFamilyToText(&text, f); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = &text
	cmd.Env = append(os.Environ(), "LANG=C")
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}
