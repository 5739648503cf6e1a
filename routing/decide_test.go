package routing

import (
	"strings"
	"testing"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// m builds a model on a node: status, busyness (in_flight, queue), servable.
func m(id string, st neuron.Status, inflight, queue int, servable bool) *fleet.Model {
	fm := &fleet.Model{Model: neuron.Model{ID: id, Status: st}, InFlight: inflight, QueueDepth: queue, Endpoint: "http://x:13131"}
	if !servable {
		fm.Servable = &neuron.Servable{OK: false, Reason: "insufficient_vram"}
	}
	return fm
}

func dnode(name string, healthy bool, models ...*fleet.Model) *fleet.Node {
	return &fleet.Node{Name: name, Cluster: "neuron-" + name, Healthy: healthy, Models: models}
}

// suspect marks n as Poller.Suspect does after a request Envoy could not
// deliver there.
func suspect(n *fleet.Node) *fleet.Node {
	n.Suspect = true
	return n
}

func TestDecideOrder(t *testing.T) {
	cat := catalogue.New([]*catalogue.Profile{
		{ID: "Cat/Only", Harness: "candle"},
		{ID: "Qwen/Qwen3-8B", Harness: "candle"},
	}, map[string]string{"helexa/small": "Qwen/Qwen3-1.7B", "helexa/cat": "Cat/Only"}, "")

	cases := []struct {
		name      string
		nodes     []*fleet.Node
		model     string
		wantNode  string
		wantStep  Step
		wantCold  bool
		wantModel string
		status    int
		retry     int
		errHas    string
	}{
		{name: "0+2 alias resolves, least busy loaded replica",
			nodes: []*fleet.Node{
				dnode("a", true, m("Qwen/Qwen3-1.7B", neuron.StatusLoaded, 2, 2, true)),
				dnode("b", true, m("Qwen/Qwen3-1.7B", neuron.StatusLoaded, 1, 0, true)),
			}, model: "helexa/small", wantNode: "b", wantStep: StepLoaded, wantModel: "Qwen/Qwen3-1.7B"},
		{name: "2 ties go to the first name",
			nodes: []*fleet.Node{
				dnode("alpha", true, m("X", neuron.StatusLoaded, 1, 1, true)),
				dnode("beta", true, m("X", neuron.StatusLoaded, 0, 2, true)),
			}, model: "X", wantNode: "alpha", wantStep: StepLoaded},
		{name: "2 a replica on a suspect node (a request just failed there) only when no other is loaded",
			nodes: []*fleet.Node{
				suspect(dnode("a", true, m("X", neuron.StatusLoaded, 0, 0, true))),
				dnode("b", true, m("X", neuron.StatusLoaded, 7, 3, true)),
			}, model: "X", wantNode: "b", wantStep: StepLoaded},
		{name: "2 the only loaded replica is used while its node is suspect",
			nodes: []*fleet.Node{
				suspect(dnode("a", true, m("X", neuron.StatusLoaded, 0, 0, true))),
				dnode("b", true, m("X", neuron.StatusUnloaded, 0, 0, true)),
			}, model: "X", wantNode: "a", wantStep: StepLoaded},
		{name: "4 a lazy reload avoids a suspect node too",
			nodes: []*fleet.Node{
				suspect(dnode("a", true, m("X", neuron.StatusUnloaded, 0, 0, true))),
				dnode("b", true, m("X", neuron.StatusUnloaded, 4, 0, true)),
			}, model: "X", wantNode: "b", wantStep: StepUnloaded, wantCold: true},
		{name: "2 reloading counts as loaded",
			nodes: []*fleet.Node{dnode("a", true, m("X", neuron.StatusReloading, 0, 0, true))},
			model: "X", wantNode: "a", wantStep: StepLoaded},
		{name: "2 skips servable=false and unhealthy nodes",
			nodes: []*fleet.Node{
				dnode("a", true, m("X", neuron.StatusLoaded, 0, 0, false)),
				dnode("b", false, m("X", neuron.StatusLoaded, 0, 0, true)),
				dnode("c", true, m("X", neuron.StatusLoaded, 9, 9, true)),
			}, model: "X", wantNode: "c", wantStep: StepLoaded},
		{name: "1 no healthy node at all",
			nodes: []*fleet.Node{dnode("a", false, m("X", neuron.StatusLoaded, 0, 0, true))},
			model: "X", status: 503, retry: 5, errHas: "no healthy neuron"},
		{name: "1 no neurons configured",
			model: "X", status: 503, retry: 5, errHas: "no neurons are configured"},
		{name: "3 recovering beats unloaded elsewhere",
			nodes: []*fleet.Node{
				dnode("a", true, m("X", neuron.StatusRecovering, 0, 0, true)),
				dnode("b", true, m("X", neuron.StatusUnloaded, 0, 0, true)),
			}, model: "X", status: 503, retry: 2, errHas: "recovering on a"},
		{name: "2 loaded beats recovering",
			nodes: []*fleet.Node{
				dnode("a", true, m("X", neuron.StatusRecovering, 0, 0, true)),
				dnode("b", true, m("X", neuron.StatusLoaded, 0, 0, true)),
			}, model: "X", wantNode: "b", wantStep: StepLoaded},
		{name: "4 unloaded routes there as a cold start",
			nodes: []*fleet.Node{dnode("a", true), dnode("b", true, m("Qwen/Qwen3-8B", neuron.StatusUnloaded, 0, 0, true))},
			model: "Qwen/Qwen3-8B", wantNode: "b", wantStep: StepUnloaded, wantCold: true},
		{name: "5 catalogue only asks for a cold load",
			nodes: []*fleet.Node{dnode("a", true)},
			model: "helexa/cat", wantStep: StepColdLoad, wantCold: true, wantModel: "Cat/Only"},
		{name: "6 unknown is 404",
			nodes: []*fleet.Node{dnode("a", true)},
			model: "Nope", status: 404, errHas: "not found on any node and not in the catalogue"},
		{name: "6 alias to a model known nowhere names both",
			nodes: []*fleet.Node{dnode("a", true)},
			model: "helexa/small", status: 404, errHas: `"Qwen/Qwen3-1.7B" (alias "helexa/small")`},
		{name: "unknown status is not routable",
			nodes: []*fleet.Node{dnode("a", true, m("X", neuron.Status("exploding"), 0, 0, true))},
			model: "X", status: 404},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d, err := Decide(cat, &fleet.Snapshot{Nodes: c.nodes}, nil, c.model)
			if c.status != 0 {
				if err == nil {
					t.Fatalf("decision %+v, want error %d", d, c.status)
				}
				if err.Status != c.status || err.RetryAfter != c.retry || !strings.Contains(err.Message, c.errHas) {
					t.Fatalf("error %+v, want %d retry %d containing %q", err, c.status, c.retry, c.errHas)
				}
				return
			}
			if err != nil {
				t.Fatalf("error %v", err)
			}
			if d.Node != c.wantNode || d.Step != c.wantStep || d.ColdStart != c.wantCold {
				t.Fatalf("decision %+v, want node %q step %d cold %v", d, c.wantNode, c.wantStep, c.wantCold)
			}
			if c.wantNode != "" && d.Cluster != "neuron-"+c.wantNode {
				t.Errorf("cluster %q", d.Cluster)
			}
			if c.wantModel != "" && d.Model != c.wantModel {
				t.Errorf("model %q, want %q", d.Model, c.wantModel)
			}
		})
	}
}

func TestDecideEndpointNotResolvable(t *testing.T) {
	fm := m("X", neuron.StatusLoaded, 0, 0, true)
	fm.Endpoint = ""
	_, err := Decide(catalogue.Empty(), &fleet.Snapshot{Nodes: []*fleet.Node{dnode("a", true, fm)}}, nil, "X")
	if err == nil || err.Status != 503 || err.RetryAfter != 2 || !strings.Contains(err.Message, "endpoint") {
		t.Fatalf("got %v, want 503 Retry-After 2 about the endpoint", err)
	}
	// A replica with an endpoint elsewhere is preferred to failing.
	d, err := Decide(catalogue.Empty(), &fleet.Snapshot{Nodes: []*fleet.Node{
		dnode("a", true, fm), dnode("b", true, m("X", neuron.StatusLoaded, 5, 5, true))}}, nil, "X")
	if err != nil || d.Node != "b" {
		t.Fatalf("got %+v %v, want b", d, err)
	}
}

func TestColdLoadSkipsANodeHoldingAnUnservableCopy(t *testing.T) {
	cat := catalogue.New([]*catalogue.Profile{{ID: "M", Harness: "candle", VRAMMB: 1000}}, nil, "")
	disc := &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}}}
	sick := dnode("a", true, m("M", neuron.StatusLoaded, 0, 0, false))
	sick.Discovery = disc
	free := dnode("b", true)
	free.Discovery = disc
	snap := &fleet.Snapshot{Nodes: []*fleet.Node{sick, free}}
	d, err := Decide(cat, snap, nil, "M")
	if err != nil || d.Step != StepColdLoad {
		t.Fatalf("decision %+v %v, want a cold load", d, err)
	}
	plan, perr := Place(cat, snap, nil, cat.Profile("M"), PlacementState{})
	if perr != nil || plan.Node != "b" {
		t.Fatalf("plan %+v %v, want node b", plan, perr)
	}
	// With only the unservable copy, wait (Retry-After 3) and say why.
	_, perr = Place(cat, &fleet.Snapshot{Nodes: []*fleet.Node{sick}}, nil, cat.Profile("M"), PlacementState{})
	if perr == nil || perr.RetryAfter != 3 || !strings.Contains(perr.Message, "insufficient_vram") {
		t.Fatalf("got %v, want 503 Retry-After 3 naming the neuron's reason", perr)
	}
}
