package grafana_test

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/metrics"
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

// exported lists the metric names the service exposes, every vector given
// a series first.
func exported(t *testing.T) map[string]bool {
	m := metrics.New()
	m.SetCatalogue(catalogue.New([]*catalogue.Profile{{ID: "a"}}, nil, "h"), 1)
	m.Decided("", &routing.Target{Model: "a", Node: "n"}, nil, time.Millisecond)
	m.Waited("a", time.Second, nil)
	m.LoadFinished("a", "n", true, time.Minute)
	m.Evicted("n", "a")
	m.NeuronHealth("n", true)
	m.PollResult("n", false)
	fams, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, f := range fams {
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
		"cold_load_waiters", "evictions_total", "neuron_healthy", "neuron_poll_failures_total", "catalogue_reloads_total"} {
		if !used["cortex_extproc_"+n] {
			t.Errorf("no panel shows cortex_extproc_%s", n)
		}
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
