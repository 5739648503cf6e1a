package coldload

import (
	"log/slog"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
)

// Ledger is the one record of what cold loads and evictions have committed
// on each device of each node beyond what the neurons last reported
// (routing.md, "VRAM is reserved, not just observed"; docs/cold-loads.md).
// Placement, eviction and routing read only its immutable view,
// routing.Commitments, which says how the commitments count.
//
// Mutations come from the Loader (plans, finished loads and unloads)
// and from Reconcile after each poll; they are rare, so each one publishes
// a fresh view. Requests read the view with one atomic load.
type Ledger struct {
	log *slog.Logger

	mu  sync.Mutex
	seq uint64
	all map[uint64]routing.Commitment

	view atomic.Pointer[routing.Commitments]
}

// NewLedger returns an empty ledger.
func NewLedger(log *slog.Logger) *Ledger {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Ledger{log: log, all: map[uint64]routing.Commitment{}}
	l.view.Store(routing.NewCommitments(nil))
	return l
}

// View returns the current commitments; never nil.
func (l *Ledger) View() *routing.Commitments { return l.view.Load() }

// add records a commitment and returns its id.
func (l *Ledger) add(c routing.Commitment) uint64 {
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
	switch c.Kind {
	case routing.CommitLoading:
		c.Kind = routing.CommitLoaded
	case routing.CommitClaimed:
		c.Kind = routing.CommitEvicted
	}
	c.At = at
	l.all[id] = c
	l.publish()
}

// unconfirmed turns an eviction's claim into CommitUnconfirmed as of at:
// the unload failed without saying whether the model is gone, so it stays
// unroutable until a /models listing requested after at.
func (l *Ledger) unconfirmed(id uint64, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	c, ok := l.all[id]
	if !ok || c.Kind != routing.CommitClaimed {
		return
	}
	c.Kind, c.At = routing.CommitUnconfirmed, at
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

// publish builds the view, in the order the commitments were made; l.mu
// held.
func (l *Ledger) publish() {
	cs := make([]routing.Commitment, 0, len(l.all))
	for _, id := range slices.Sorted(maps.Keys(l.all)) {
		cs = append(cs, l.all[id])
	}
	l.view.Store(routing.NewCommitments(cs))
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
		n := snap.Node(c.Node)
		switch {
		case n == nil:
			// The neuron left the config: nothing of it is placed on.
			delete(l.all, id)
			changed = true
		case c.Kind == routing.CommitLoaded && n.HealthAt.After(c.At):
			l.compareLoaded(n, c)
			delete(l.all, id)
			changed = true
		case c.Kind == routing.CommitEvicted && n.HealthAt.After(c.At) && n.ModelsAt.After(c.At),
			c.Kind == routing.CommitUnconfirmed && n.ModelsAt.After(c.At):
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
func (l *Ledger) compareLoaded(n *fleet.Node, c routing.Commitment) {
	m := n.Model(c.Model)
	if m == nil || !m.Status.Resident() {
		l.log.Info("VRAM ledger: a model loaded by cortex-extproc is no longer resident at the next poll; it was unloaded since",
			"node", c.Node, "model", c.Model)
		return
	}
	want := c.PerDeviceMB * int64(len(c.Devices))
	if m.VRAMUsedMB != nil {
		got := *m.VRAMUsedMB
		if diff := got - want; diff > want/5 || -diff > want/5 {
			l.log.Info("VRAM ledger disagrees with the neuron: the catalogue's vram_mb for this model is off; placement reserves vram_mb for loads in progress, so correct it in the catalogue",
				"node", c.Node, "model", c.Model, "reserved_mb", want, "neuron_reports_mb", got)
		}
	}
	if len(m.Devices) > 0 && !slices.Equal(m.Devices, c.Devices) {
		l.log.Warn("VRAM ledger disagrees with the neuron: the model sits on other devices than the load asked for",
			"node", c.Node, "model", c.Model, "requested_devices", c.Devices, "neuron_reports_devices", m.Devices)
	}
}
