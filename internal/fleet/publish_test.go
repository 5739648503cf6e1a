package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Publishing one neuron's answer rebuilds that neuron's *Node only: the
// others keep theirs, so a snapshot costs what changed.
func TestPublishRebuildsOnlyChangedNodes(t *testing.T) {
	apiA, apiB := newFakeAPI(loaded("m"), loaded("n")), newFakeAPI(loaded("m"))
	apiA.endpoints["fresh"] = "http://10.0.0.1:8002"
	apiA.health = &neuron.Health{UptimeSecs: 100, Models: []neuron.ModelHealth{{ID: "m", InFlight: 1}, {ID: "n"}}}
	h := start(t, PollerConfig{},
		Neuron{Name: "a", Endpoint: "http://a:1", API: apiA},
		Neuron{Name: "b", Endpoint: "http://b:1", API: apiB})
	s1 := h.poll(1)

	// A cold load finished on a: b is untouched.
	if err := h.p.MarkLoaded(h.ctx, "a", "fresh", []int{0}, 4000); err != nil {
		t.Fatal(err)
	}
	s2 := h.p.Snapshot()
	if s2.Node("b") != s1.Node("b") {
		t.Error("MarkLoaded on a rebuilt b")
	}
	if s2.Node("a") == s1.Node("a") || s2.Node("a").Model("fresh") == nil {
		t.Fatal("MarkLoaded did not publish a new view of a")
	}
	if s2.Node("a").Model("m") != s1.Node("a").Model("m") {
		t.Error("MarkLoaded rebuilt a's unchanged model entries")
	}

	// b hangs while a answers: a's answer is published, b keeps its *Node.
	gate, entered := make(chan struct{}), make(chan struct{}, 1)
	apiB.set(func(f *fakeAPI) { f.modelsGate, f.modelsEntered = gate, entered })
	pollDone := make(chan error, 1)
	go func() { pollDone <- h.p.PollNow(h.ctx) }()
	<-entered
	h.waitFor("a's answer", func(s *Snapshot) bool { return s.Node("a").LastPoll.After(s2.Node("a").LastPoll) })
	s3 := h.p.Snapshot()
	if s3.Node("b") != s2.Node("b") {
		t.Error("publishing a's answer rebuilt b")
	}
	// The poll came after the mark: fresh is gone, the rest is as listed
	// before, so those entries are reused while the node view is new (its
	// poll times moved).
	a2, a3 := s2.Node("a"), s3.Node("a")
	if !a3.ModelsAt.After(a2.ModelsAt) || !a3.HealthAt.After(a2.HealthAt) || a3.Model("fresh") != nil {
		t.Fatalf("a after its poll: %+v", a3)
	}
	if a3.Model("m") != a2.Model("m") || a3.Model("n") != a2.Model("n") {
		t.Error("identical /models entries were rebuilt")
	}
	apiB.set(func(f *fakeAPI) { f.modelsGate = nil })
	close(gate)
	if err := <-pollDone; err != nil {
		t.Fatal(err)
	}
	s4 := h.p.Snapshot()
	if s4.Node("b") == s3.Node("b") || !s4.Node("b").LastPoll.After(s3.Node("b").LastPoll) {
		t.Error("b's own answer did not give it a new view")
	}
	if s4.Node("a") != s3.Node("a") {
		t.Error("b's answer rebuilt a")
	}

	// Identical answers: the listing itself is shared, not just its entries.
	s5 := h.poll(1)
	if a4, a5 := s4.Node("a"), s5.Node("a"); a5 == a4 || &a5.Models[0] != &a4.Models[0] {
		t.Error("an identical listing was copied")
	}
	// One queue moved: that model's entry is new, the other is kept.
	apiA.set(func(f *fakeAPI) {
		f.health = &neuron.Health{UptimeSecs: 100, Models: []neuron.ModelHealth{{ID: "m", InFlight: 3}, {ID: "n"}}}
	})
	s6 := h.poll(1)
	if m := s6.Node("a").Model("m"); m == s5.Node("a").Model("m") || m.InFlight != 3 {
		t.Errorf("m after its in_flight changed: %+v", m)
	}
	if s6.Node("a").Model("n") != s5.Node("a").Model("n") {
		t.Error("n was rebuilt when only m's queue changed")
	}

	// A config reload adding c, and one changing a's cluster.
	apiC := newFakeAPI()
	h.p.SetNeurons([]Neuron{{Name: "a", Endpoint: "http://a:1", API: apiA}, {Name: "b", Endpoint: "http://b:1", API: apiB}, {Name: "c", Endpoint: "http://c:1", API: apiC}})
	h.waitFor("c added", func(s *Snapshot) bool { return s.Node("c") != nil })
	s7 := h.p.Snapshot()
	if s7.Node("a") != s6.Node("a") || s7.Node("b") != s6.Node("b") {
		t.Error("adding c rebuilt a or b")
	}
	h.p.SetNeurons([]Neuron{{Name: "a", Endpoint: "http://a:1", API: apiA, Cluster: "gpu-a"}, {Name: "b", Endpoint: "http://b:1", API: apiB}, {Name: "c", Endpoint: "http://c:1", API: apiC}})
	h.waitFor("a's new cluster", func(s *Snapshot) bool { return s.Node("a").Cluster == "gpu-a" })
	if s8 := h.p.Snapshot(); s8.Node("b") != s7.Node("b") || s8.Node("c") != s7.Node("c") {
		t.Error("changing a's cluster rebuilt b or c")
	}
	checkLocations(t, h.p.Snapshot(), []string{"m", "n", "fresh"})
}

// The owner's state is changed at random, the way polls, loads and config
// reloads change it, publishing after one or several changes. Every
// snapshot must be exactly what a full rebuild from that state gives, with
// the nodes no change touched keeping their *Node, and its index exactly
// what its nodes list.
func TestIncrementalPublishMatchesFullRebuild(t *testing.T) {
	pool := []string{"a/one", "a/two", "b/three", "b/four", "c/five", "c/six"}
	for seed := range uint64(6) {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 11))
			apis := map[string]*fakeAPI{}
			neuronNamed := func(name, cluster string) Neuron {
				if apis[name] == nil {
					api := newFakeAPI()
					for _, id := range pool {
						api.endpoints[id] = "http://" + name + ":8000/" + id
					}
					api.endpointErr[pool[0]] = errors.New("503 from " + name)
					apis[name] = api
				}
				return Neuron{Name: name, Endpoint: "http://" + name + ":1", Cluster: cluster, API: apis[name]}
			}
			config := []Neuron{}
			for i := range 6 {
				config = append(config, neuronNamed(fmt.Sprint("n", i), ""))
			}
			p := NewPoller(PollerConfig{}, config, nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer func() { cancel(); p.wg.Wait() }()
			p.runCtx = ctx // the test goroutine is the owner: Run is not running

			prev := p.Snapshot()
			touched := map[string]bool{}
			for step := range 300 {
				name := fmt.Sprint("n", r.IntN(len(config)+1))
				ns := p.nodes[name]
				switch op := r.IntN(20); {
				case op < 12 && ns != nil: // a poll answer
					if r.IntN(3) == 0 {
						p.seq++ // a round started since the last mark
					}
					p.apply(ns, randomResult(r, ns, p.seq, pool))
					touched[name] = true
				case op < 15 && ns != nil: // a cold load finished
					p.seq++
					req := request{kind: reqMark, node: name, model: pool[r.IntN(len(pool))], devices: []int{r.IntN(2)}, vramMB: int64(r.IntN(3)) * 1000, reply: make(chan error, 1)}
					p.mark(req)
					select {
					case <-req.reply:
					default: // the endpoint is being resolved
						p.finishResolve(<-p.resolved)
						<-req.reply
					}
					touched[name] = true
				case op < 17: // config reload: add, drop, or re-cluster a neuron
					next := slices.Clone(config)
					switch i := r.IntN(len(next)); {
					case r.IntN(3) == 0 && len(next) > 1:
						next = slices.Delete(next, i, i+1)
					case r.IntN(2) == 0:
						next = append(next, neuronNamed(fmt.Sprint("n", len(apis)), ""))
					default:
						next[i] = neuronNamed(next[i].Name, fmt.Sprint("cluster-", step))
						touched[next[i].Name] = true
					}
					config = next
					p.applyNeurons(config, true)
				}
				if r.IntN(3) > 0 {
					continue // several changes in one publish
				}
				p.publish()
				s := p.Snapshot()
				checkPublished(t, p, s, prev, touched, pool)
				prev, touched = s, map[string]bool{}
			}
		})
	}
}

// checkPublished compares s with a full rebuild of the owner's state.
func checkPublished(t *testing.T, p *Poller, s, prev *Snapshot, touched map[string]bool, pool []string) {
	t.Helper()
	if len(s.Nodes) != len(p.nodes) {
		t.Fatalf("snapshot has %d nodes, owner %d", len(s.Nodes), len(p.nodes))
	}
	for i, n := range s.Nodes {
		ns := p.nodes[n.Name]
		if ns == nil || (i > 0 && s.Nodes[i-1].Name >= n.Name) {
			t.Fatalf("snapshot node %d %q: unknown or out of order", i, n.Name)
		}
		if want := ns.node(nil); !reflect.DeepEqual(n, want) {
			t.Fatalf("node %q differs from a full rebuild:\n got  %s\n want %s", n.Name, dump(n), dump(want))
		}
		if was := prev.Node(n.Name); was != nil && !touched[n.Name] && was != n {
			t.Fatalf("node %q was rebuilt though nothing changed it", n.Name)
		}
	}
	if want := flatLayout(t, buildLayout(s.Nodes)); !reflect.DeepEqual(flatLayout(t, s.layout.Load()), want) {
		t.Fatal("derived layout differs from a rebuild")
	}
	checkLocations(t, s, pool)
}

func dump(n *Node) string {
	b, _ := json.Marshal(n)
	return string(b)
}

// randomResult is a poll answer drawn from few values, so that entries
// often repeat (and are reused) and sometimes change.
func randomResult(r *rand.Rand, ns *nodeState, seq uint64, pool []string) pollResult {
	now := time.Now()
	res := pollResult{key: ns, seq: seq, healthAt: now, modelsAt: now}
	if r.IntN(5) == 0 {
		res.healthErr = fmt.Errorf("health error %d", r.IntN(2))
	} else {
		res.health = &neuron.Health{UptimeSecs: 100}
		for _, id := range pool {
			if r.IntN(2) == 0 {
				res.health.Models = append(res.health.Models, neuron.ModelHealth{ID: id, InFlight: r.IntN(3) / 2, QueueDepth: r.IntN(4) / 3})
			}
		}
		if ns.health != nil && r.IntN(8) == 0 {
			res.restarted = true
		}
	}
	switch r.IntN(8) {
	case 0:
		res.disc = &neuron.Discovery{Hostname: ns.cfg.Name, MaxPromptTokens: 4096}
	case 1:
		res.discErr = errors.New("discovery refused")
	}
	if r.IntN(6) == 0 {
		res.modelsErr = fmt.Errorf("models error %d", r.IntN(2))
		return res
	}
	var ms []neuron.Model
	for _, id := range pool {
		if r.IntN(4) == 0 {
			continue
		}
		m := neuron.Model{ID: id, Harness: "candle", Status: neuron.StatusLoaded, Devices: []int{0}}
		switch r.IntN(6) {
		case 0:
			m.Status = neuron.StatusUnloaded
		case 1:
			m.Status = "quantizing"
		case 2:
			m.Devices = []int{0, 1}
		case 3:
			v := int64(4000)
			m.VRAMUsedMB = &v
		case 4:
			m.Servable = &neuron.Servable{OK: false, Reason: "insufficient_vram"}
		}
		ms = append(ms, m)
	}
	r.Shuffle(len(ms), func(i, j int) { ms[i], ms[j] = ms[j], ms[i] })
	res.models = normalizeModels(ms)
	res.endpoints = map[string]endpointAnswer{}
	for _, m := range res.models {
		switch r.IntN(4) {
		case 0:
			res.endpoints[m.ID] = endpointAnswer{url: "http://" + ns.cfg.Name + ":800" + fmt.Sprint(r.IntN(2))}
		case 1:
			res.endpoints[m.ID] = endpointAnswer{err: errors.New("404")}
		}
	}
	return res
}

// sameModel decides whether a model entry is reused, so a field it did not
// compare would publish stale data: every field of neuron.Model, and
// every value behind a pointer, must make a difference.
func TestSameModelSeesEveryField(t *testing.T) {
	yes, vram := true, int64(4000)
	base := neuron.Model{ID: "m", Harness: "candle", Status: neuron.StatusLoaded, Devices: []int{0}, VRAMUsedMB: &vram,
		Capabilities: []string{"chat"}, ToolCall: &yes, Reasoning: &yes, Limit: &neuron.Limit{Context: 1, Input: 2, Output: 3},
		Servable: &neuron.Servable{OK: true, Reason: "r"}}
	typ := reflect.TypeFor[neuron.Model]()
	for i := range typ.NumField() {
		if reflect.ValueOf(base).Field(i).IsZero() {
			t.Fatalf("the base model leaves %s zero: set it so that this test covers it", typ.Field(i).Name)
		}
	}
	deepCopy := func(m neuron.Model) neuron.Model {
		var c neuron.Model
		b, _ := json.Marshal(m)
		if err := json.Unmarshal(b, &c); err != nil {
			t.Fatal(err)
		}
		return c
	}
	if c := deepCopy(base); !sameModel(&base, &c) {
		t.Fatal("a deep copy is not the same model")
	}
	for i := range typ.NumField() {
		for _, variant := range variants(t, reflect.ValueOf(base).Field(i)) {
			m := deepCopy(base)
			reflect.ValueOf(&m).Elem().Field(i).Set(variant)
			if sameModel(&base, &m) {
				t.Errorf("sameModel misses a change of %s to %v", typ.Field(i).Name, variant)
			}
		}
	}
	// nil and empty lists are told apart: /debug/fleet shows null and [].
	a, b := base, base
	a.Devices, b.Devices = nil, []int{}
	if sameModel(&a, &b) {
		t.Error("nil and empty devices are the same model")
	}
}

// variants returns values differing from v: for a pointer, nil and one
// pointing to a different value; for a struct, each field changed.
func variants(t *testing.T, v reflect.Value) []reflect.Value {
	t.Helper()
	var out []reflect.Value
	switch v.Kind() {
	case reflect.String:
		out = append(out, reflect.ValueOf(v.String()+"x").Convert(v.Type()))
	case reflect.Bool:
		out = append(out, reflect.ValueOf(!v.Bool()))
	case reflect.Int, reflect.Int64:
		c := reflect.New(v.Type()).Elem()
		c.SetInt(v.Int() + 1)
		out = append(out, c)
	case reflect.Slice:
		out = append(out, reflect.Append(v, reflect.Zero(v.Type().Elem())))
		c := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
		reflect.Copy(c, v)
		for _, e := range variants(t, c.Index(0)) {
			c2 := reflect.MakeSlice(v.Type(), v.Len(), v.Len())
			reflect.Copy(c2, v)
			c2.Index(0).Set(e)
			out = append(out, c2)
		}
	case reflect.Pointer:
		out = append(out, reflect.Zero(v.Type()))
		for _, e := range variants(t, v.Elem()) {
			p := reflect.New(v.Type().Elem())
			p.Elem().Set(e)
			out = append(out, p)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			for _, e := range variants(t, v.Field(i)) {
				c := reflect.New(v.Type()).Elem()
				c.Set(v)
				c.Field(i).Set(e)
				out = append(out, c)
			}
		}
	default:
		t.Fatalf("a field of kind %s: teach sameModel and this test about it", v.Kind())
	}
	return out
}
