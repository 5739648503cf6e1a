// Package modellist builds the unified model list (routing.md "The unified
// model list"): GET /v1/models and GET /v1/models/{id}, answered by
// cortex-extproc itself from the catalogue and fleet snapshots, in OpenAI's
// shape (List, Get) or, for Anthropic clients, in Anthropic's
// (AnthropicList, AnthropicGet).
package modellist

import (
	"encoding/json"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

// Entry is one model in the list (OpenAI's model object plus cortex fields).
type Entry struct {
	ID              string           `json:"id"`
	Object          string           `json:"object"`
	Created         int64            `json:"created"`
	OwnedBy         string           `json:"owned_by"`
	AliasOf         string           `json:"alias_of,omitempty"`
	Loaded          bool             `json:"loaded"`
	FeasibleOn      []string         `json:"feasible_on"`
	Locations       []Location       `json:"locations"`
	Capabilities    []string         `json:"capabilities"`
	Limit           *catalogue.Limit `json:"limit,omitempty"`
	Cost            *catalogue.Cost  `json:"cost,omitempty"`
	MaxModelLen     int64            `json:"max_model_len,omitempty"`
	MaxOutputTokens int64            `json:"max_output_tokens,omitempty"`
}

// StatusLoading is the location status of a model a neuron reports in its
// /health activation (pending or in progress): being pre-warmed there.
const StatusLoading = "loading"

// Location is where a model is: a node and its status there (loaded,
// unloaded, reloading, recovering, or loading while a neuron pre-warms it).
type Location struct {
	Node   string `json:"node"`
	Status string `json:"status"`
}

type listBody struct {
	Object string  `json:"object"`
	Data   []Entry `json:"data"`
}

// List serves the model list, rebuilt only when the catalogue or the fleet
// snapshot changed.
type List struct {
	catalogue func() *catalogue.Catalogue
	fleet     func() *fleet.Snapshot
	created   int64

	mu      sync.Mutex
	cat     *catalogue.Catalogue
	snap    *fleet.Snapshot
	entries []Entry
	list    []byte
	items   map[string][]byte
	// aList and aItems are the Anthropic-shaped bodies of entries, built
	// on first use (nil until then).
	aList  []byte
	aItems map[string][]byte
}

// New builds a List over the two snapshot sources.
func New(cat func() *catalogue.Catalogue, fl func() *fleet.Snapshot) *List {
	return &List{catalogue: cat, fleet: fl, created: time.Now().Unix()}
}

// List returns the JSON of GET /v1/models.
func (l *List) List() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refresh()
	return l.list
}

// Get returns the JSON of GET /v1/models/{id}, false when id is unknown.
func (l *List) Get(id string) ([]byte, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refresh()
	b, ok := l.items[id]
	return b, ok
}

func (l *List) refresh() {
	cat, snap := l.catalogue(), l.fleet()
	if l.list != nil && cat == l.cat && snap == l.snap {
		return
	}
	entries := Build(cat, snap, l.created)
	l.list, _ = json.Marshal(listBody{Object: "list", Data: entries})
	l.items = make(map[string][]byte, len(entries))
	for _, e := range entries {
		l.items[e.ID], _ = json.Marshal(e)
	}
	l.entries, l.aList, l.aItems = entries, nil, nil
	l.cat, l.snap = cat, snap
}

// Build lists every catalogue model, every model resident or known on a
// healthy node (or being pre-warmed by one), and every alias except the
// hidden ones (mirroring its target), sorted by id. Unhealthy nodes count
// neither as locations nor in feasible_on: routing would not use them.
func Build(cat *catalogue.Catalogue, snap *fleet.Snapshot, created int64) []Entry {
	if cat == nil {
		cat = catalogue.Empty()
	}
	if snap == nil {
		snap = &fleet.Snapshot{}
	}
	byID := map[string]*Entry{}
	get := func(id string) *Entry {
		if e, ok := byID[id]; ok {
			return e
		}
		e := &Entry{ID: id, Object: "model", Created: created, OwnedBy: owner(id),
			FeasibleOn: []string{}, Locations: []Location{}, Capabilities: []string{}}
		byID[id] = e
		return e
	}
	for _, p := range cat.Models() {
		e := get(p.ID)
		e.Capabilities = union(e.Capabilities, p.Capabilities)
		if p.Limit != nil {
			l := *p.Limit
			e.Limit = &l
		}
		// Absent vs zero cost is meaningful (not priced vs free), so the
		// pointer is passed through as is, never defaulted.
		e.Cost = p.Cost
		for _, n := range snap.Nodes {
			if ok, _ := routing.Feasible(p, n); ok && n.Healthy {
				e.FeasibleOn = append(e.FeasibleOn, n.Name)
			}
		}
	}
	for _, n := range snap.Nodes {
		if !n.Healthy {
			continue
		}
		for _, m := range n.Models {
			e := get(m.ID)
			e.Locations = append(e.Locations, Location{Node: n.Name, Status: string(m.Status)})
			if m.Status.Resident() {
				e.Loaded = true
			}
			e.Capabilities = union(e.Capabilities, m.Capabilities)
			e.Limit = fillLimit(e.Limit, m.Limit)
		}
		if n.Health != nil {
			for _, id := range n.Health.Activation.Loading() {
				e := get(id)
				switch i := locationIndex(e, n.Name); {
				case i < 0:
					e.Locations = append(e.Locations, Location{Node: n.Name, Status: StatusLoading})
				case !neuron.Status(e.Locations[i].Status).Resident():
					// /models may still say unloaded while the neuron
					// pre-warms it; loading is the more useful truth.
					e.Locations[i].Status = StatusLoading
				}
			}
		}
	}
	for alias, target := range cat.Aliases() {
		if cat.Hidden(alias) {
			continue // [hidden_aliases] route but are not advertised
		}
		// An alias whose target is known nowhere is still listed (it routes
		// to a 404 that names the target), but does not invent the target.
		a := Entry{ID: target, Object: "model", Created: created,
			FeasibleOn: []string{}, Locations: []Location{}, Capabilities: []string{}}
		if t, ok := byID[target]; ok {
			a = *t
		}
		a.ID, a.AliasOf, a.OwnedBy = alias, target, owner(alias)
		byID[alias] = &a
	}
	out := make([]Entry, 0, len(byID))
	for _, e := range byID {
		if e.Limit != nil {
			e.MaxModelLen, e.MaxOutputTokens = e.Limit.Context, e.Limit.Output
		}
		out = append(out, *e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func locationIndex(e *Entry, node string) int {
	for i, l := range e.Locations {
		if l.Node == node {
			return i
		}
	}
	return -1
}

// fillLimit completes the catalogue's limit with what a neuron reports: the
// operator's numbers win, the neuron's fill the ones the operator left out.
func fillLimit(l *catalogue.Limit, n *neuron.Limit) *catalogue.Limit {
	if n == nil {
		return l
	}
	if l == nil {
		return &catalogue.Limit{Context: n.Context, Input: n.Input, Output: n.Output}
	}
	if l.Context == 0 {
		l.Context = n.Context
	}
	if l.Input == 0 {
		l.Input = n.Input
	}
	if l.Output == 0 {
		l.Output = n.Output
	}
	return l
}

// owner is the organisation part of a repo id ("Qwen/Qwen3-8B" → "Qwen").
func owner(id string) string {
	if i := strings.IndexByte(id, '/'); i > 0 {
		return id[:i]
	}
	return "cortex"
}

func union(a, b []string) []string {
	for _, x := range b {
		found := false
		for _, y := range a {
			if x == y {
				found = true
				break
			}
		}
		if !found {
			a = append(a, x)
		}
	}
	return a
}
