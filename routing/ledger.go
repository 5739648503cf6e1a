package routing

import (
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/internal/fleet"
)

// Ledger is the one record of what cold loads and evictions have committed
// on each device of each node beyond what the neurons last reported
// (routing.md, "VRAM is reserved, not just observed"; docs/cold-loads.md).
// A node's free VRAM on device d is
//
//	last polled free − loads in progress − loads finished since that reading
//	+ evictions finished since that reading
//
// clamped to [0, device total]. A load reserves its devices when it is
// planned, so the next plan already sees them taken; an eviction claims its
// victim when it is planned, so no other plan counts or evicts it and no
// request is routed to it. Placement and eviction read only the ledger's
// immutable view, Commitments.
//
// Mutations come from the ColdLoader (plans, finished loads and unloads)
// and from Reconcile after each poll; they are rare, so each one publishes
// a fresh view. Requests read the view with one atomic load.
type Ledger struct {
	log *slog.Logger

	mu  sync.Mutex
	seq uint64
	all map[uint64]commitment

	view atomic.Pointer[Commitments]
}

type commitKind uint8

const (
	// commitLoading: POST /models/load planned or running; its devices
	// are reserved.
	commitLoading commitKind = iota + 1
	// commitLoaded: the neuron confirmed the load after the node's last
	// /health reading was requested.
	commitLoaded
	// commitClaimed: an eviction is planned or running; the model is not
	// routable and its VRAM is not yet free.
	commitClaimed
	// commitEvicted: the neuron confirmed the unload after the node's last
	// reading; its VRAM is free, and it is not routable until a /models
	// listing requested after the unload no longer shows it.
	commitEvicted
)

// commitment is one entry of the ledger.
type commitment struct {
	kind      commitKind
	node      string
	model     string
	devices   []int
	perDevice int64     // MB on each of devices
	at        time.Time // when the neuron confirmed (loaded, evicted)
}

// Commitments is an immutable view of the ledger.
type Commitments struct {
	byNode  map[string][]commitment
	blocked map[usageKey]time.Time // claimed: zero time; evicted: when
}

// NewLedger returns an empty ledger.
func NewLedger(log *slog.Logger) *Ledger {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Ledger{log: log, all: map[uint64]commitment{}}
	l.view.Store(&Commitments{})
	return l
}

// View returns the current commitments; never nil.
func (l *Ledger) View() *Commitments { return l.view.Load() }

// add records a commitment and returns its id.
func (l *Ledger) add(c commitment) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.seq++
	l.all[l.seq] = c
	l.publish()
	return l.seq
}

// done moves a load to "loaded" or a claim to "evicted", as of at.
func (l *Ledger) done(id uint64, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.all[id]
	if !ok {
		return
	}
	switch c.kind {
	case commitLoading:
		c.kind = commitLoaded
	case commitClaimed:
		c.kind = commitEvicted
	}
	c.at = at
	l.all[id] = c
	l.publish()
}

// drop removes a commitment: a load that failed or was called off, or an
// eviction that did not happen (the model was never touched, so it is
// simply routable again, exactly as the neuron last listed it).
func (l *Ledger) drop(ids ...uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := len(l.all)
	for _, id := range ids {
		delete(l.all, id)
	}
	if len(l.all) != n {
		l.publish()
	}
}

// publish builds the view; l.mu held.
func (l *Ledger) publish() {
	v := &Commitments{byNode: map[string][]commitment{}, blocked: map[usageKey]time.Time{}}
	ids := slices.Sorted(maps.Keys(l.all))
	for _, id := range ids {
		c := l.all[id]
		v.byNode[c.node] = append(v.byNode[c.node], c)
		// In the order they were planned: a model loaded again after its
		// eviction is routable again.
		switch c.kind {
		case commitClaimed:
			v.blocked[usageKey{c.node, c.model}] = time.Time{}
		case commitEvicted:
			v.blocked[usageKey{c.node, c.model}] = c.at
		case commitLoaded:
			delete(v.blocked, usageKey{c.node, c.model})
		}
	}
	l.view.Store(v)
}

// Reconcile drops what snap's readings now reflect: a finished load once
// the node's /health was requested after it, a finished eviction once both
// /health and /models were. Where a reading that covers a finished load
// disagrees with what the ledger expected, it logs the difference: it
// usually means a catalogue vram_mb that does not match the model.
func (l *Ledger) Reconcile(snap *fleet.Snapshot) {
	if snap == nil {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	changed := false
	for id, c := range l.all {
		n := snap.Node(c.node)
		switch {
		case n == nil:
			// The neuron left the config: nothing of it is placed on.
			delete(l.all, id)
			changed = true
		case c.kind == commitLoaded && n.HealthAt.After(c.at):
			l.compareLoaded(n, c)
			delete(l.all, id)
			changed = true
		case c.kind == commitEvicted && n.HealthAt.After(c.at) && n.ModelsAt.After(c.at):
			delete(l.all, id)
			changed = true
		}
	}
	if changed {
		l.publish()
	}
}

// compareLoaded logs when the neuron's report of a freshly loaded model
// differs from what the ledger reserved for it. l.mu held.
func (l *Ledger) compareLoaded(n *fleet.Node, c commitment) {
	m := n.Model(c.model)
	if m == nil || !m.Status.Resident() {
		l.log.Info("VRAM ledger: a model loaded by cortex-extproc is no longer resident at the next poll; it was unloaded since",
			"node", c.node, "model", c.model)
		return
	}
	want := c.perDevice * int64(len(c.devices))
	if m.VRAMUsedMB != nil {
		got := *m.VRAMUsedMB
		if diff := got - want; diff > want/5 || -diff > want/5 {
			l.log.Info("VRAM ledger disagrees with the neuron: the catalogue's vram_mb for this model is off; placement reserves vram_mb for loads in progress, so correct it in the catalogue",
				"node", c.node, "model", c.model, "reserved_mb", want, "neuron_reports_mb", got)
		}
	}
	if len(m.Devices) > 0 && !slices.Equal(m.Devices, c.devices) {
		l.log.Warn("VRAM ledger disagrees with the neuron: the model sits on other devices than the load asked for",
			"node", c.node, "model", c.model, "requested_devices", c.devices, "neuron_reports_devices", m.Devices)
	}
}

// Free is n's free VRAM per device, in MB, with the ledger's commitments
// applied: what placement and eviction decide on.
func (c *Commitments) Free(n *fleet.Node) map[int]int64 {
	free := n.FreeVRAM()
	if c != nil {
		for _, cm := range c.byNode[n.Name] {
			var sign int64
			switch cm.kind {
			case commitLoading:
				sign = -1
			case commitLoaded:
				// Without a /health reading, FreeVRAM is computed from the
				// listing, which shows the load already (MarkLoaded).
				if n.Health != nil && !n.HealthAt.After(cm.at) {
					sign = -1
				}
			case commitEvicted:
				if !n.HealthAt.After(cm.at) {
					sign = 1
				}
			}
			for _, d := range cm.devices {
				if _, ok := free[d]; ok {
					free[d] += sign * cm.perDevice
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

// Loading lists the models with a load in progress on node.
func (c *Commitments) Loading(node string) []string {
	if c == nil {
		return nil
	}
	var out []string
	for _, cm := range c.byNode[node] {
		if cm.kind == commitLoading {
			out = append(out, cm.model)
		}
	}
	return out
}

// LedgerEntry is one commitment as /debug/fleet shows it.
type LedgerEntry struct {
	Node        string    `json:"node"`
	Model       string    `json:"model"`
	State       string    `json:"state"` // loading | loaded | evicting | evicted
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
	names := map[commitKind]string{commitLoading: "loading", commitLoaded: "loaded", commitClaimed: "evicting", commitEvicted: "evicted"}
	for _, node := range slices.Sorted(maps.Keys(c.byNode)) {
		for _, cm := range c.byNode[node] {
			out = append(out, LedgerEntry{Node: cm.node, Model: cm.model, State: names[cm.kind], Devices: cm.devices, PerDeviceMB: cm.perDevice, At: cm.at})
		}
	}
	return out
}
