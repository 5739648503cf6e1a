package fleet

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"reflect"
	"slices"
	"testing"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// flatLayout returns l's refs by id, checking that each id sits in the
// shard it hashes to and that the id count is right.
func flatLayout(t *testing.T, l *layout) map[string][]ref {
	t.Helper()
	out := map[string][]ref{}
	for s, sh := range l.shards {
		for id, refs := range sh {
			if got := l.shardOf(id); got != s {
				t.Fatalf("id %q in shard %d, hashes to %d", id, s, got)
			}
			if len(refs) == 0 {
				t.Fatalf("id %q kept with no refs", id)
			}
			out[id] = slices.Clone(refs)
		}
	}
	if len(out) != l.models {
		t.Fatalf("layout counts %d ids, holds %d", l.models, len(out))
	}
	return out
}

// wantLocations is the index by definition: every node listing id, in
// node order.
func wantLocations(nodes []*Node, id string) []Location {
	var out []Location
	for _, n := range nodes {
		for _, m := range n.Models {
			if m.ID == id {
				out = append(out, Location{Node: n, Model: m})
			}
		}
	}
	return out
}

func checkLocations(t *testing.T, s *Snapshot, ids []string) {
	t.Helper()
	for _, id := range ids {
		want := wantLocations(s.Nodes, id)
		for pass := range 2 { // made, then kept
			got := s.Locations(id)
			if len(got) != len(want) {
				t.Fatalf("Locations(%q) pass %d: %d entries, want %d", id, pass, len(got), len(want))
			}
			for i := range got {
				if got[i] != want[i] {
					t.Fatalf("Locations(%q)[%d] pass %d = %s/%p, want %s/%p", id, i, pass, got[i].Node.Name, got[i].Model, want[i].Node.Name, want[i].Model)
				}
			}
		}
	}
}

// randomNode lists a random subset of ids, sorted, as the poller would.
func randomNode(r *rand.Rand, name string, ids []string) *Node {
	n := &Node{Name: name}
	for _, id := range ids {
		if r.IntN(3) == 0 {
			n.Models = append(n.Models, &Model{Model: neuron.Model{ID: id}})
		}
	}
	return n
}

// Deriving the layout from the previous one, over random fleets and
// changes, gives exactly what a rebuild gives, and never touches the
// previous layout (an older snapshot may still be read).
func TestNextLayoutMatchesRebuild(t *testing.T) {
	for seed := range uint64(8) {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 7))
			ids := make([]string, 10+r.IntN(150))
			for i := range ids {
				ids[i] = fmt.Sprintf("org/model-%03d", i)
			}
			var nodes []*Node
			// Few ids at first, so that the layout grows and reshards.
			for i := range 1 + r.IntN(40) {
				nodes = append(nodes, randomNode(r, fmt.Sprintf("n%03d", i), ids[:1+r.IntN(5)]))
			}
			l := buildLayout(nodes)
			for step := range 120 {
				next := slices.Clone(nodes)
				switch op := r.IntN(10); {
				case op == 0 && len(next) > 1: // a neuron removed
					i := r.IntN(len(next))
					next = slices.Delete(next, i, i+1)
				case op == 2 && len(next) > 1: // one neuron replaced by another
					i := r.IntN(len(next))
					next = slices.Delete(next, i, i+1)
					fallthrough
				case op <= 2: // a neuron added
					name := fmt.Sprintf("n%03d-%d", r.IntN(40), step)
					i, _ := slices.BinarySearchFunc(next, name, func(n *Node, name string) int { return cmp.Compare(n.Name, name) })
					next = slices.Insert(next, i, randomNode(r, name, ids))
				default: // a few neurons re-polled: same ids, or some changed
					for range 1 + r.IntN(3) {
						i := r.IntN(len(next))
						n := *next[i]
						if r.IntN(2) == 0 {
							n.Models = randomNode(r, n.Name, ids[:r.IntN(len(ids))+1]).Models
						} else {
							n.Models = slices.Clone(n.Models) // fresh *Node, same listing
						}
						next[i] = &n
					}
				}
				before := flatLayout(t, l)
				got := nextLayout(l, nodes, next)
				if !reflect.DeepEqual(flatLayout(t, l), before) {
					t.Fatalf("step %d: the previous layout was modified", step)
				}
				if want := flatLayout(t, buildLayout(next)); !reflect.DeepEqual(flatLayout(t, got), want) {
					t.Fatalf("step %d: derived layout differs from a rebuild", step)
				}
				s := &Snapshot{Nodes: next}
				s.layout.Store(got)
				checkLocations(t, s, ids[:20])
				nodes, l = next, got
			}
		})
	}
}

// A layout is shared while nobody's ids change, and a change re-indexes
// only its node's ids.
func TestNextLayoutSharesWhatDidNotChange(t *testing.T) {
	mk := func(name string, ids ...string) *Node {
		n := &Node{Name: name}
		for _, id := range ids {
			n.Models = append(n.Models, &Model{Model: neuron.Model{ID: id}})
		}
		return n
	}
	var nodes []*Node
	for i := range 100 {
		nodes = append(nodes, mk(fmt.Sprintf("n%03d", i), "shared", fmt.Sprintf("own-%03d", i)))
	}
	l := buildLayout(nodes)
	if len(l.shards) < 8 {
		t.Fatalf("%d ids in %d shards", l.models, len(l.shards))
	}
	again := slices.Clone(nodes)
	again[3] = mk("n003", "shared", "own-003") // re-polled, same listing
	if got := nextLayout(l, nodes, again); got != l {
		t.Fatal("an unchanged listing did not share the layout")
	}
	changed := slices.Clone(nodes)
	changed[3] = mk("n003", "new", "shared", "own-003")
	got := nextLayout(l, nodes, changed)
	shared := 0
	for i := range l.shards {
		if reflect.ValueOf(got.shards[i]).UnsafePointer() == reflect.ValueOf(l.shards[i]).UnsafePointer() {
			shared++
		}
	}
	if shared < len(l.shards)-3 {
		t.Errorf("one node's change copied %d of %d shards", len(l.shards)-shared, len(l.shards))
	}
	if refs := got.refs("shared"); len(refs) != 100 || refs[3] != (ref{node: 3, model: 1}) {
		t.Errorf("shared's refs after n003 listed a model before it: %v", refs[:5])
	}
}

// Looking a listed model up again in the same snapshot costs nothing, and
// looking up names nobody lists keeps nothing.
func TestLocationsKeptPerSnapshot(t *testing.T) {
	s := &Snapshot{Nodes: []*Node{{Name: "a", Models: []*Model{{Model: neuron.Model{ID: "m"}}}}}}
	if got := s.Locations("m"); len(got) != 1 || got[0].Node.Name != "a" {
		t.Fatalf("Locations(m) = %v", got)
	}
	if allocs := testing.AllocsPerRun(100, func() { _ = s.Locations("m") }); allocs != 0 {
		t.Errorf("a repeated lookup allocates %v times", allocs)
	}
	for i := range 100 {
		if s.Locations(fmt.Sprint("nobody/", i)) != nil {
			t.Fatal("an unlisted model has locations")
		}
	}
	kept := 0
	s.locations.Range(func(any, any) bool { kept++; return true })
	if kept != 1 {
		t.Errorf("%d lists kept, want 1 (unlisted names must not grow the snapshot)", kept)
	}
	var nilSnap *Snapshot
	if nilSnap.Locations("m") != nil {
		t.Error("nil snapshot has locations")
	}
}
