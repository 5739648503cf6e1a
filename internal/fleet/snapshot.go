// Package fleet holds the view of the neurons that routing decides on: an
// immutable Snapshot, published atomically by the Poller, its only writer.
package fleet

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Snapshot is the whole fleet at one instant. Never mutated after it is
// published: a request reads one snapshot from start to end. Consecutive
// snapshots from the Poller share what did not change: a node nothing
// happened to keeps its *Node, and an unchanged model entry its *Model.
type Snapshot struct {
	// Nodes sorted by Name.
	Nodes []*Node
	// Round counts completed poll rounds; 0 until the first one finished.
	Round uint64
	// Taken is when this snapshot was published.
	Taken time.Time

	// layout and locations are the model index (index.go): a decision
	// looks at the few nodes that list its model instead of every model of
	// every node. The poller sets layout at publish, derived from the
	// previous snapshot's; a snapshot built elsewhere gets one on first
	// use. locations holds this snapshot's Location lists (model id ->
	// *[]Location), each made on its model's first lookup.
	layout    atomic.Pointer[layout]
	locations sync.Map
}

// Location is one node's listing of a model.
type Location struct {
	Node  *Node
	Model *Model
}

// Locations returns every node that lists model, in node-name order.
// Callers must not modify the result.
func (s *Snapshot) Locations(model string) []Location {
	if s == nil {
		return nil
	}
	if v, ok := s.locations.Load(model); ok {
		return *v.(*[]Location)
	}
	l := s.layout.Load()
	if l == nil {
		s.layout.CompareAndSwap(nil, buildLayout(s.Nodes))
		l = s.layout.Load()
	}
	refs := l.refs(model)
	if len(refs) == 0 {
		// Not kept: a client naming models nobody lists must not grow the
		// snapshot.
		return nil
	}
	locs := make([]Location, len(refs))
	for i, r := range refs {
		n := s.Nodes[r.node]
		locs[i] = Location{Node: n, Model: n.Models[r.model]}
	}
	v, _ := s.locations.LoadOrStore(model, &locs)
	return *v.(*[]Location)
}

// Node returns the node with that name, or nil.
func (s *Snapshot) Node(name string) *Node {
	if s == nil {
		return nil
	}
	for _, n := range s.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// AnyHealthy reports whether at least one node is healthy.
func (s *Snapshot) AnyHealthy() bool {
	if s == nil {
		return false
	}
	for _, n := range s.Nodes {
		if n.Healthy {
			return true
		}
	}
	return false
}

// Node is one neuron as last polled.
type Node struct {
	Name     string // from config
	Cluster  string // Envoy cluster name, default "neuron-<name>"
	Endpoint string // configured management endpoint, e.g. http://beast:13131

	// Healthy turns false after failure_threshold consecutive failed
	// /models polls and true again on the first success.
	Healthy bool
	// Suspect: a request routed here failed as if the neuron were gone,
	// and the re-poll that decides it has not answered yet (Poller.Suspect).
	Suspect             bool
	ConsecutiveFailures int
	LastPoll            time.Time // last attempt
	LastSuccess         time.Time // last successful /models poll
	LastError           string    // last poll error, "" after a success

	// Discovery is nil until the neuron answered /discovery once.
	Discovery *neuron.Discovery
	// Health is the last good /health reading (a failed /health poll keeps
	// the previous one), nil if none yet.
	Health *neuron.Health
	// HealthAt and ModelsAt are when the requests that produced Health and
	// the Models listing were sent: a load or unload that the neuron
	// confirmed before that instant is reflected in them. The VRAM ledger
	// (routing) reconciles its commitments against these.
	HealthAt time.Time
	ModelsAt time.Time
	// Models as the neuron last listed them, sorted by ID.
	Models []*Model
}

// Model returns the model with that id on this node, or nil.
func (n *Node) Model(id string) *Model {
	for _, m := range n.Models {
		if m.ID == id {
			return m
		}
	}
	return nil
}

// FreeVRAM returns each device's free VRAM in MB, keyed by device index,
// from the last /health reading; with no reading, a device counts its total
// minus the reported use of resident models on it.
func (n *Node) FreeVRAM() map[int]int64 {
	free := map[int]int64{}
	if n.Discovery == nil {
		return free
	}
	if n.Health != nil && len(n.Health.Devices) > 0 {
		for _, d := range n.Health.Devices {
			free[d.Index] = d.VRAMFreeMB
		}
		return free
	}
	for _, d := range n.Discovery.Devices {
		free[d.Index] = d.VRAMTotalMB
	}
	for _, m := range n.Models {
		if !m.Status.Resident() || m.VRAMUsedMB == nil || len(m.Devices) == 0 {
			continue
		}
		share := *m.VRAMUsedMB / int64(len(m.Devices))
		for _, i := range m.Devices {
			free[i] -= share
		}
	}
	return free
}

// Model is one model on one node: the neuron's /models entry, its live queue
// from /health, and its resolved inference endpoint.
type Model struct {
	neuron.Model
	// InFlight and QueueDepth from /health; 0 when unknown.
	InFlight   int
	QueueDepth int
	// Endpoint is the inference base URL from /models/{id}/endpoint, with a
	// loopback host rewritten; "" when it could not be resolved.
	Endpoint string
}

// Busyness is in_flight + queue_depth, the replica-choice key.
func (m *Model) Busyness() int { return m.InFlight + m.QueueDepth }
