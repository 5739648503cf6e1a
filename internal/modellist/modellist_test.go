package modellist_test

import (
	"encoding/json"
	"reflect"
	"slices"
	"sort"
	"testing"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// catalogueTOML is a catalogue in the operator's format: a priced-at-zero
// TP model pinned to beast, an unpriced model, a model with a partial limit,
// listed and hidden aliases, and an alias to a model nobody has.
const catalogueTOML = `
[[models]]
id = "Qwen/Qwen3.6-27B"
harness = "candle"
vram_mb = 45000
min_devices = 2
min_device_vram_mb = 24000
pinned_on = ["beast"]
capabilities = ["text", "reasoning"]
limit.context = 32768
limit.input = 28672
limit.output = 4096
cost.input = 0.0
cost.output = 0.0

[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"
vram_mb = 18000
min_device_vram_mb = 16000
limit.context = 16384

[[models]]
id = "unsloth/Qwen3-0.6B-GGUF"
harness = "candle"
vram_mb = 500
cost = { input = 0.1, output = 0.4, cache_read = 0.01 }

[aliases]
"helexa/balanced" = "Qwen/Qwen3-8B"
"helexa/large" = "Qwen/Qwen3.6-27B"
"helexa/ghost" = "Nobody/Has-This"

[hidden_aliases]
"helexa/internal" = "Qwen/Qwen3-8B"
`

func mustCatalogue(t *testing.T) *catalogue.Catalogue {
	t.Helper()
	c, err := catalogue.Parse([]byte(catalogueTOML))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func i64(v int64) *int64 { return &v }

// fleetFixture: beast (2×24 GB) holds 8B loaded and pre-warms the GGUF
// model; rig (1×24 GB) lists 8B unloaded and has a neuron-only model, and
// its activation reports the 8B as in progress; sick (unhealthy) has a
// model that must not be listed.
func fleetFixture() *fleet.Snapshot {
	two := &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24564}, {Index: 1, VRAMTotalMB: 24564}}}
	one := &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24564}}}
	return &fleet.Snapshot{Round: 3, Nodes: []*fleet.Node{
		{Name: "beast", Healthy: true, Discovery: two,
			Health: &neuron.Health{Activation: &neuron.Activation{State: "pre_warming", InProgress: neuron.IDList{"unsloth/Qwen3-0.6B-GGUF"}}},
			Models: []*fleet.Model{
				{Model: neuron.Model{ID: "Qwen/Qwen3-8B", Status: neuron.StatusLoaded, Devices: []int{0}, VRAMUsedMB: i64(17800),
					Capabilities: []string{"text", "tools"}, Limit: &neuron.Limit{Context: 40960, Input: 30000, Output: 8192}}},
			}},
		{Name: "rig", Healthy: true, Discovery: one,
			Health: &neuron.Health{Activation: &neuron.Activation{State: "pre_warming", Pending: neuron.IDList{"Qwen/Qwen3-8B"}}},
			Models: []*fleet.Model{
				{Model: neuron.Model{ID: "Qwen/Qwen3-8B", Status: neuron.StatusUnloaded}},
				{Model: neuron.Model{ID: "mistral/Local-7B", Status: neuron.StatusReloading, Capabilities: []string{"text", "vision"},
					Limit: &neuron.Limit{Context: 8192, Output: 1024}}},
			}},
		{Name: "sick", Healthy: false, Discovery: two,
			Models: []*fleet.Model{{Model: neuron.Model{ID: "sick/Only-Here", Status: neuron.StatusLoaded}}}},
	}}
}

// entries decodes the wire JSON of /v1/models into id → object.
func entries(t *testing.T, body []byte) (ids []string, byID map[string]map[string]any) {
	t.Helper()
	var list struct {
		Object string           `json:"object"`
		Data   []map[string]any `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		t.Fatalf("list is not JSON: %v\n%s", err, body)
	}
	if list.Object != "list" {
		t.Errorf("object = %q, want list", list.Object)
	}
	byID = map[string]map[string]any{}
	for _, e := range list.Data {
		id := e["id"].(string)
		ids = append(ids, id)
		byID[id] = e
	}
	return ids, byID
}

func TestListEntries(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	ids, byID := entries(t, l.List())

	// The alias target nobody has is not invented as a model of its own.
	wantIDs := []string{"Qwen/Qwen3-8B", "Qwen/Qwen3.6-27B", "helexa/balanced", "helexa/ghost",
		"helexa/large", "mistral/Local-7B", "unsloth/Qwen3-0.6B-GGUF"}
	if !reflect.DeepEqual(ids, wantIDs) {
		t.Fatalf("ids = %v\nwant  %v (sorted; hidden alias and unhealthy node's model absent)", ids, wantIDs)
	}
	if !sort.StringsAreSorted(ids) {
		t.Errorf("ids not sorted: %v", ids)
	}

	type want struct {
		loaded       bool
		feasibleOn   []any
		locations    []any
		capabilities []any
		limit        any // nil: key absent
		cost         any // nil: key absent
		maxModelLen  any
		maxOutput    any
		ownedBy      string
		aliasOf      any
	}
	loc := func(node, status string) any { return map[string]any{"node": node, "status": status} }
	cases := map[string]want{
		"Qwen/Qwen3.6-27B": { // catalogue only, pinned to beast, priced at zero
			feasibleOn: []any{"beast"}, locations: []any{}, capabilities: []any{"text", "reasoning"},
			limit: map[string]any{"context": 32768.0, "input": 28672.0, "output": 4096.0},
			cost:  map[string]any{"input": 0.0, "output": 0.0}, maxModelLen: 32768.0, maxOutput: 4096.0, ownedBy: "Qwen",
		},
		"Qwen/Qwen3-8B": { // loaded on beast, unloaded-but-pre-warming on rig; unpriced
			loaded: true, feasibleOn: []any{"beast", "rig"},
			locations:    []any{loc("beast", "loaded"), loc("rig", "loading")},
			capabilities: []any{"text", "tools"},
			// The operator's context wins; the neuron fills input and output.
			limit:       map[string]any{"context": 16384.0, "input": 30000.0, "output": 8192.0},
			maxModelLen: 16384.0, maxOutput: 8192.0, ownedBy: "Qwen",
		},
		"helexa/balanced": { // mirrors its target
			loaded: true, feasibleOn: []any{"beast", "rig"},
			locations:    []any{loc("beast", "loaded"), loc("rig", "loading")},
			capabilities: []any{"text", "tools"},
			limit:        map[string]any{"context": 16384.0, "input": 30000.0, "output": 8192.0},
			maxModelLen:  16384.0, maxOutput: 8192.0, ownedBy: "helexa", aliasOf: "Qwen/Qwen3-8B",
		},
		"helexa/large": {
			feasibleOn: []any{"beast"}, locations: []any{}, capabilities: []any{"text", "reasoning"},
			limit: map[string]any{"context": 32768.0, "input": 28672.0, "output": 4096.0},
			cost:  map[string]any{"input": 0.0, "output": 0.0}, maxModelLen: 32768.0, maxOutput: 4096.0,
			ownedBy: "helexa", aliasOf: "Qwen/Qwen3.6-27B",
		},
		"helexa/ghost": { // target known nowhere: listed, empty
			feasibleOn: []any{}, locations: []any{}, capabilities: []any{}, ownedBy: "helexa", aliasOf: "Nobody/Has-This",
		},
		"mistral/Local-7B": { // neuron-only, reloading counts as loaded
			loaded: true, feasibleOn: []any{}, locations: []any{loc("rig", "reloading")},
			capabilities: []any{"text", "vision"}, limit: map[string]any{"context": 8192.0, "output": 1024.0},
			maxModelLen: 8192.0, maxOutput: 1024.0, ownedBy: "mistral",
		},
		"unsloth/Qwen3-0.6B-GGUF": { // pre-warming on beast, no /models entry yet
			feasibleOn: []any{"beast", "rig"}, locations: []any{loc("beast", "loading")}, capabilities: []any{},
			cost:    map[string]any{"input": 0.1, "output": 0.4, "cache_read": 0.01},
			ownedBy: "unsloth",
		},
	}
	for id, w := range cases {
		t.Run(id, func(t *testing.T) {
			e := byID[id]
			if e["object"] != "model" {
				t.Errorf("object = %v, want model", e["object"])
			}
			if c, ok := e["created"].(float64); !ok || c <= 0 {
				t.Errorf("created = %v, want a positive unix time", e["created"])
			}
			check := func(key string, want any) {
				t.Helper()
				got, present := e[key]
				if want == nil {
					if present {
						t.Errorf("%s = %v, want the key absent", key, got)
					}
					return
				}
				if !reflect.DeepEqual(got, want) {
					t.Errorf("%s = %#v, want %#v", key, got, want)
				}
			}
			check("loaded", w.loaded)
			check("feasible_on", w.feasibleOn)
			check("locations", w.locations)
			check("capabilities", w.capabilities)
			check("limit", w.limit)
			check("cost", w.cost)
			check("max_model_len", w.maxModelLen)
			check("max_output_tokens", w.maxOutput)
			check("owned_by", w.ownedBy)
			check("alias_of", w.aliasOf)
		})
	}
}

func TestGetByIDAndUnknown(t *testing.T) {
	l := modellist.New(func() *catalogue.Catalogue { return mustCatalogue(t) }, fleetFixture)
	for _, id := range []string{"Qwen/Qwen3-8B", "helexa/balanced"} {
		b, ok := l.Get(id)
		if !ok {
			t.Fatalf("Get(%q) not found", id)
		}
		var e modellist.Entry
		if err := json.Unmarshal(b, &e); err != nil || e.ID != id || !e.Loaded {
			t.Errorf("Get(%q) = %s (%v), want the loaded entry", id, b, err)
		}
	}
	// A hidden alias routes but is not advertised, neither listed nor got.
	for _, id := range []string{"helexa/internal", "Nobody/Has-This", "sick/Only-Here", "nope"} {
		if b, ok := l.Get(id); ok {
			t.Errorf("Get(%q) = %s, want not found", id, b)
		}
	}
}

func TestListFollowsSnapshotChanges(t *testing.T) {
	cat := mustCatalogue(t)
	snap := fleetFixture()
	l := modellist.New(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap })
	if b, _ := l.Get("Qwen/Qwen3.6-27B"); json.Valid(b) && containsLoaded(t, b) {
		t.Fatal("27B loaded before it is")
	}
	// The poller publishes a new snapshot: 27B is now resident on beast.
	beast := *snap.Nodes[0]
	beast.Models = append([]*fleet.Model{{Model: neuron.Model{ID: "Qwen/Qwen3.6-27B", Status: neuron.StatusLoaded}}}, beast.Models...)
	snap = &fleet.Snapshot{Round: snap.Round + 1, Taken: snap.Taken, Nodes: []*fleet.Node{&beast, snap.Nodes[1], snap.Nodes[2]}}
	b, ok := l.Get("Qwen/Qwen3.6-27B")
	if !ok || !containsLoaded(t, b) {
		t.Errorf("after the snapshot changed, Get = %s, want loaded", b)
	}
	if b, _ := l.Get("helexa/large"); !containsLoaded(t, b) {
		t.Errorf("alias did not follow its target: %s", b)
	}
}

func containsLoaded(t *testing.T, b []byte) bool {
	t.Helper()
	var e modellist.Entry
	if err := json.Unmarshal(b, &e); err != nil {
		t.Fatalf("entry is not JSON: %v", err)
	}
	return e.Loaded
}

func TestEmptyFleetAndCatalogue(t *testing.T) {
	l := modellist.New(catalogue.Empty, func() *fleet.Snapshot { return &fleet.Snapshot{} })
	// An empty list is [] not null: clients iterate data unconditionally.
	if got := string(l.List()); got != `{"object":"list","data":[]}` {
		t.Errorf("empty list = %s", got)
	}
}

// feasible_on leaves out a node whose devices can never hold the model's
// declared size, even with everything there evicted.
func TestFeasibleOnLeavesOutNodesTooSmallForTheModel(t *testing.T) {
	cat, err := catalogue.Parse([]byte(`
[[models]]
id = "Big/One"
harness = "candle"
vram_mb = 18000

[[models]]
id = "Small/One"
harness = "candle"
vram_mb = 4000
`))
	if err != nil {
		t.Fatal(err)
	}
	dev := func(mb int64) *neuron.Discovery {
		return &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: mb}}}
	}
	snap := &fleet.Snapshot{Round: 1, Nodes: []*fleet.Node{
		{Name: "big", Healthy: true, Discovery: dev(24564)},
		{Name: "small", Healthy: true, Discovery: dev(16384)},
	}}
	got := map[string][]string{}
	for _, e := range modellist.Build(cat, snap, 0) {
		got[e.ID] = e.FeasibleOn
	}
	if !slices.Equal(got["Big/One"], []string{"big"}) || !slices.Equal(got["Small/One"], []string{"big", "small"}) {
		t.Fatalf("feasible_on %v; want Big/One only on big, Small/One on both", got)
	}
}
