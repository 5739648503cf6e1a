package xds

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/helexa/cortex-extproc/internal/fleet"
)

func TestPlanEdgeCases(t *testing.T) {
	logs := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	down := node("down", "neuron-down", "http://down.internal:13131", "m=http://down.internal:7000")
	down.Healthy = false
	p := planFor(&fleet.Snapshot{Nodes: []*fleet.Node{
		// A generated name that equals another neuron's configured one.
		node("a", "n", "http://a.internal:1", "m=http://h:2"),
		node("b", "n-h-2", "http://b.internal:1"),
		// Same cluster name configured twice: only the first gets it.
		node("c", "dup", "http://c.internal:1"),
		node("d", "dup", "http://d.internal:1"),
		// An endpoint Envoy cannot express.
		node("e", "neuron-e", "ftp://e.internal:1"),
		down,
	}}, log)

	names := map[string]bool{}
	for _, sp := range p.specs {
		if names[sp.name] {
			t.Fatalf("cluster %q served twice", sp.name)
		}
		names[sp.name] = true
	}
	if p.routes[routeKey("b", addr{"http", "b.internal", 1})] != "n-h-2" {
		t.Errorf("configured name lost to a generated one: %v", p.routes)
	}
	gen := p.routes[routeKey("a", addr{"http", "h", 2})]
	if !strings.HasPrefix(gen, "n-h-2-") {
		t.Errorf("colliding generated name = %q, want n-h-2-<hash>", gen)
	}
	if p.routes[routeKey("c", addr{"http", "c.internal", 1})] != "dup" {
		t.Errorf("first neuron with a duplicate cluster name lost it: %v", p.routes)
	}
	for k := range p.routes {
		if strings.HasPrefix(k, "d\x00") || strings.HasPrefix(k, "e\x00") {
			t.Errorf("route %q served for a neuron that cannot have a cluster", k)
		}
	}
	// An unhealthy neuron keeps its clusters: no churn while it flaps.
	if !names["neuron-down"] || !names["neuron-down-down.internal-7000"] {
		t.Errorf("unhealthy neuron's clusters dropped: %v", names)
	}
	out := logs.String()
	if !strings.Contains(out, "same Envoy cluster name") || !strings.Contains(out, "ftp://e.internal:1") {
		t.Errorf("problems not logged:\n%s", out)
	}
}
