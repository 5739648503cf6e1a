package routing

import (
	"maps"
	"slices"
	"time"

	"github.com/helexa/cortex-extproc/internal/fleet"
)

// CommitKind is what a commitment of the cold-load ledger records.
type CommitKind uint8

const (
	// CommitLoading: POST /models/load planned or running; its devices
	// are reserved.
	CommitLoading CommitKind = iota + 1
	// CommitLoaded: the neuron confirmed the load after the node's last
	// /health reading was requested.
	CommitLoaded
	// CommitClaimed: an eviction is planned or running; the model is not
	// routable and its VRAM is not yet free.
	CommitClaimed
	// CommitEvicted: the neuron confirmed the unload after the node's last
	// reading; its VRAM is free, and it is not routable until a /models
	// listing requested after the unload no longer shows it.
	CommitEvicted
	// CommitUnconfirmed: an unload whose outcome is unknown (the neuron
	// timed out, answered garbage or a 5xx): the model may be gone, so it
	// is not routable until a /models listing requested after At shows
	// it; its VRAM is counted as still taken.
	CommitUnconfirmed
)

// Commitment is one entry of the cold-load ledger (routing/coldload): what
// a load or an eviction has committed on a node's devices beyond what the
// neuron last reported.
type Commitment struct {
	Kind        CommitKind
	Node        string
	Model       string
	Devices     []int
	PerDeviceMB int64     // MB on each of Devices
	At          time.Time // when the neuron confirmed (loaded, evicted) or the unload failed (unconfirmed)
}

// Commitments is an immutable view of the cold-load ledger: what placement,
// eviction and Decide read (docs/cold-loads.md). A node's free VRAM on
// device d is
//
//	last polled free − loads in progress − loads finished since that reading
//	+ evictions finished since that reading
//
// clamped to [0, device total]. A load reserves its devices when it is
// planned, so the next plan already sees them taken; an eviction claims its
// victim when it is planned, so no other plan counts or evicts it and no
// request is routed to it.
type Commitments struct {
	byNode  map[string][]Commitment
	blocked map[usageKey]time.Time // claimed: zero time; evicted, unconfirmed: when
}

// NewCommitments builds the view of cs, given in the order they were made.
func NewCommitments(cs []Commitment) *Commitments {
	v := &Commitments{byNode: map[string][]Commitment{}, blocked: map[usageKey]time.Time{}}
	for _, c := range cs {
		v.byNode[c.Node] = append(v.byNode[c.Node], c)
		// In the order they were made: a model loaded again after its
		// eviction is routable again.
		switch c.Kind {
		case CommitClaimed:
			v.blocked[usageKey{c.Node, c.Model}] = time.Time{}
		case CommitEvicted, CommitUnconfirmed:
			v.blocked[usageKey{c.Node, c.Model}] = c.At
		case CommitLoaded:
			delete(v.blocked, usageKey{c.Node, c.Model})
		}
	}
	return v
}

// Free is n's free VRAM per device, in MB, with the ledger's commitments
// applied: what placement and eviction decide on.
func (c *Commitments) Free(n *fleet.Node) map[int]int64 {
	free := n.FreeVRAM()
	if c != nil {
		for _, cm := range c.byNode[n.Name] {
			var sign int64
			switch cm.Kind {
			case CommitLoading:
				sign = -1
			case CommitLoaded:
				// Without a /health reading, FreeVRAM is computed from the
				// listing, which shows the load already (MarkLoaded).
				if n.Health != nil && !n.HealthAt.After(cm.At) {
					sign = -1
				}
			case CommitEvicted:
				if !n.HealthAt.After(cm.At) {
					sign = 1
				}
			}
			for _, d := range cm.Devices {
				if _, ok := free[d]; ok {
					free[d] += sign * cm.PerDeviceMB
				}
			}
		}
	}
	if n.Discovery != nil {
		for _, d := range n.Discovery.Devices {
			free[d.Index] = min(max(free[d.Index], 0), d.VRAMTotalMB)
		}
	}
	return free
}

// Blocked reports whether model on n is being evicted or was evicted after
// n's /models listing was requested: it must not be routed to, and no
// other plan may count or evict it.
func (c *Commitments) Blocked(n *fleet.Node, model string) bool {
	if c == nil || len(c.blocked) == 0 {
		return false
	}
	at, ok := c.blocked[usageKey{n.Name, model}]
	if !ok {
		return false
	}
	return at.IsZero() || !n.ModelsAt.After(at)
}

// On lists the commitments on node, in the order they were made. The
// slice is the view's own: read it, never modify it.
func (c *Commitments) On(node string) []Commitment {
	if c == nil {
		return nil
	}
	return c.byNode[node]
}

// LedgerEntry is one commitment as /debug/fleet shows it.
type LedgerEntry struct {
	Node        string    `json:"node"`
	Model       string    `json:"model"`
	State       string    `json:"state"` // loading | loaded | evicting | evicted | unload_unconfirmed
	Devices     []int     `json:"devices"`
	PerDeviceMB int64     `json:"per_device_mb"`
	At          time.Time `json:"at,omitzero"`
}

// Entries lists the commitments, by node then model.
func (c *Commitments) Entries() []LedgerEntry {
	out := []LedgerEntry{}
	if c == nil {
		return out
	}
	names := map[CommitKind]string{CommitLoading: "loading", CommitLoaded: "loaded", CommitClaimed: "evicting", CommitEvicted: "evicted", CommitUnconfirmed: "unload_unconfirmed"}
	for _, node := range slices.Sorted(maps.Keys(c.byNode)) {
		for _, cm := range c.byNode[node] {
			out = append(out, LedgerEntry{Node: cm.Node, Model: cm.Model, State: names[cm.Kind], Devices: cm.Devices, PerDeviceMB: cm.PerDeviceMB, At: cm.At})
		}
	}
	return out
}
