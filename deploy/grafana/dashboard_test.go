package grafana_test

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

type panel struct {
	ID      int    `json:"id"`
	Type    string `json:"type"`
	Title   string `json:"title"`
	GridPos struct {
		H, W, X, Y int
	} `json:"gridPos"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
}

func load(t *testing.T) (dash struct {
	UID    string  `json:"uid"`
	Title  string  `json:"title"`
	Panels []panel `json:"panels"`
}) {
	t.Helper()
	b, err := os.ReadFile("cortex-extproc.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("cortex-extproc.json is not valid JSON: %v", err)
	}
	return dash
}

// sampleMetrics is the service's registry after a little of everything:
// two routed requests, a 400, twelve 404s (more than the log lets through
// at once, so log lines are dropped), a 413 and two 503s; a cold load, an
// eviction, a neuron with a device and a model.
func sampleMetrics(t *testing.T) []*dto.MetricFamily {
	t.Helper()
	m := metrics.New()
	m.SetCatalogue(catalogue.New([]*catalogue.Profile{{ID: "a"}}, nil, "h"), 1)
	m.SetLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))
	m.Decided("", &routing.Target{Model: "a", Node: "n"}, nil, time.Millisecond)
	m.Decided("", &routing.Target{Model: "a", Node: "n", ColdStart: true}, nil, time.Millisecond)
	m.Decided("", nil, apierr.InvalidRequest("x"), time.Millisecond)
	for range metrics.LogBurst + 2 {
		m.Decided("", &routing.Target{Model: "b"}, apierr.ModelNotFound("x"), time.Millisecond)
	}
	m.Decided("", nil, apierr.TooLarge("x"), time.Millisecond)
	m.Decided("", &routing.Target{Model: "a"}, apierr.Unavailable(5, "x").WithReason(apierr.ReasonNoHealthy), time.Millisecond)
	m.Decided("", &routing.Target{Model: "a"}, apierr.NoFeasible("x"), time.Millisecond)
	m.Waited("a", time.Second, nil)
	m.LoadFinished("a", "n", true, time.Minute)
	m.Evicted("n", "a")
	m.NeuronHealth("n", true)
	m.PollResult("n", false)
	snap := &fleet.Snapshot{Nodes: []*fleet.Node{{Name: "n", Healthy: true,
		Discovery: &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}}},
		Models:    []*fleet.Model{{Model: neuron.Model{ID: "a", Status: neuron.StatusLoaded}, InFlight: 1}}}}}
	m.WatchFleet(metrics.FleetSource{Snapshot: func() *fleet.Snapshot { return snap },
		Ledger: func() *routing.Commitments { return nil }, Usage: routing.NewUsage()})
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// exported lists the metric names the service exposes, every vector given
// a series first.
func exported(t *testing.T) map[string]bool {
	names := map[string]bool{}
	for _, f := range sampleMetrics(t) {
		names[f.GetName()] = true
	}
	return names
}

var metricName = regexp.MustCompile(`cortex_extproc_[a-z_]+`)

func TestEveryQueryUsesAnExportedMetric(t *testing.T) {
	dash := load(t)
	have := exported(t)
	used := map[string]bool{}
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			names := metricName.FindAllString(tg.Expr, -1)
			if len(names) == 0 {
				t.Errorf("panel %q: query %q names no cortex_extproc metric", p.Title, tg.Expr)
			}
			for _, n := range names {
				base := n
				for _, suf := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(n, suf); ok && have[b] {
						base = b
					}
				}
				if !have[base] {
					t.Errorf("panel %q queries %s, which cortex-extproc does not export", p.Title, n)
				}
				used[base] = true
			}
		}
	}
	// The core panels of issue 6: requests by outcome, decision latency,
	// cold loads and their duration, waiters, neuron health, poll failures,
	// catalogue reloads.
	for _, n := range []string{"requests_total", "request_decision_seconds", "cold_loads_total", "cold_load_seconds",
		"cold_load_waiters", "evictions_total", "neuron_healthy", "neuron_poll_failures_total", "catalogue_reloads_total",
		"request_errors_total", "neuron_device_vram_ledger_free_bytes", "neuron_model_in_flight", "routed_in_flight",
		"log_lines_dropped_total", "build_info"} {
		if !used["cortex_extproc_"+n] {
			t.Errorf("no panel shows cortex_extproc_%s", n)
		}
	}
}

var (
	selector = regexp.MustCompile(`(cortex_extproc_[a-z_]+)\{([^}]*)\}`)
	matcher  = regexp.MustCompile(`(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"`)
)

// selected sums the counter samples of fams that a PromQL selector such as
// name{status=~"5..", instance=~"$instance"} picks (instance ignored).
func selected(t *testing.T, fams []*dto.MetricFamily, sel string) float64 {
	t.Helper()
	m := selector.FindStringSubmatch(sel)
	if m == nil {
		t.Fatalf("no selector in %q", sel)
	}
	sum := 0.0
	for _, f := range fams {
		if f.GetName() != m[1] {
			continue
		}
	series:
		for _, s := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			for _, mm := range matcher.FindAllStringSubmatch(m[2], -1) {
				name, op, val := mm[1], mm[2], mm[3]
				if name == "instance" {
					continue
				}
				re := regexp.MustCompile("^(?:" + val + ")$")
				v := labels[name]
				if ok := map[string]bool{"=": v == val, "!=": v != val, "=~": re.MatchString(v), "!~": !re.MatchString(v)}[op]; !ok {
					continue series
				}
			}
			sum += s.GetCounter().GetValue()
		}
	}
	return sum
}

// The error ratio counts 5xx answers only: a client sending bad bodies or
// unknown models (4xx) is not an outage. The selectors are evaluated on the
// service's own metrics (sampleMetrics): the two 503s of 18 requests.
func TestErrorRatioCountsOnly5xx(t *testing.T) {
	fams := sampleMetrics(t)
	var expr string
	for _, p := range load(t).Panels {
		if strings.HasPrefix(p.Title, "Error ratio") {
			if len(p.Targets) != 1 {
				t.Fatalf("panel %q has %d queries, want 1", p.Title, len(p.Targets))
			}
			expr = p.Targets[0].Expr
		}
	}
	num, den, ok := strings.Cut(expr, " / ")
	if !ok {
		t.Fatalf("error ratio %q is not errors / requests", expr)
	}
	if !strings.Contains(num, "cortex_extproc_request_errors_total") || !strings.Contains(den, "cortex_extproc_requests_total") {
		t.Errorf("error ratio %q: want request_errors_total over requests_total", expr)
	}
	errs, all := selected(t, fams, num), selected(t, fams, den)
	if errs != 2 || all != 18 {
		t.Errorf("error ratio selects %v errors of %v requests, want the 2 5xx of 18 (%s)", errs, all, expr)
	}
}

// The errors panels break errors down by reason and by requested name.
func TestErrorsByReasonAndRequestedName(t *testing.T) {
	found := map[string]bool{}
	for _, p := range load(t).Panels {
		for _, tg := range p.Targets {
			if strings.Contains(tg.Expr, "cortex_extproc_request_errors_total") {
				for _, by := range []string{"reason", "requested"} {
					if strings.Contains(tg.Expr, "sum by (") && strings.Contains(tg.Expr[:strings.Index(tg.Expr, ")")], by) {
						found[by] = true
					}
				}
			}
		}
	}
	if !found["reason"] || !found["requested"] {
		t.Errorf("errors broken down by %v, want reason and requested", found)
	}
}

func TestDecisionLatencyShowsP50AndP99(t *testing.T) {
	found := map[string]bool{}
	for _, p := range load(t).Panels {
		for _, tg := range p.Targets {
			if strings.Contains(tg.Expr, "request_decision_seconds_bucket") {
				for _, q := range []string{"0.5", "0.99"} {
					if strings.Contains(tg.Expr, "histogram_quantile("+q+",") {
						found[q] = true
					}
				}
			}
		}
	}
	if !found["0.5"] || !found["0.99"] {
		t.Errorf("decision latency quantiles on the dashboard: %v, want p50 and p99", found)
	}
}

func TestLayout(t *testing.T) {
	dash := load(t)
	if dash.UID == "" || dash.Title == "" {
		t.Error("dashboard needs a uid and a title to import")
	}
	ids := map[int]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if g := p.GridPos; g.W <= 0 || g.H <= 0 || g.X < 0 || g.X+g.W > 24 {
			t.Errorf("panel %q gridPos %+v outside Grafana's 24-column grid", p.Title, g)
		}
	}
}
