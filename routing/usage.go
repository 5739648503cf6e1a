package routing

import (
	"sync"
	"sync/atomic"
	"time"
)

// Usage is the per-(node, model) bookkeeping every routed request touches:
// when a model was last used through us (LRU eviction reads it) and how many
// requests are in flight on it through us (eviction never unloads those).
//
// It sits on the per-request hot path, so it is a sync.Map of pointers to
// atomic counters: after the first request for a (node, model), Touch and
// Acquire neither lock nor allocate for the key.
type Usage struct {
	m sync.Map // usageKey → *usageEntry
}

type usageKey struct{ node, model string }

type usageEntry struct {
	lastAccess atomic.Int64 // unix nanoseconds; 0 = never
	inFlight   atomic.Int64
}

// NewUsage returns empty bookkeeping.
func NewUsage() *Usage { return &Usage{} }

func (u *Usage) entry(node, model string) *usageEntry {
	k := usageKey{node, model}
	if v, ok := u.m.Load(k); ok {
		return v.(*usageEntry)
	}
	v, _ := u.m.LoadOrStore(k, &usageEntry{})
	return v.(*usageEntry)
}

// Touch records that a request was routed to model on node now.
func (u *Usage) Touch(node, model string) {
	u.entry(node, model).lastAccess.Store(time.Now().UnixNano())
}

// LastAccess is when model on node was last routed to through us; the zero
// time if never (such a model counts as least recently used).
func (u *Usage) LastAccess(node, model string) time.Time {
	v, ok := u.m.Load(usageKey{node, model})
	if !ok {
		return time.Time{}
	}
	ns := v.(*usageEntry).lastAccess.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// Acquire counts a request in flight on model at node until the returned
// release is called. Release is idempotent, so a deferred release and an
// early one cannot double-count.
func (u *Usage) Acquire(node, model string) (release func()) {
	e := u.entry(node, model)
	e.inFlight.Add(1)
	var done atomic.Bool
	return func() {
		if done.CompareAndSwap(false, true) {
			e.inFlight.Add(-1)
		}
	}
}

// Lease is one request in flight through us on a (node, model), from
// Usage.Use until Release.
type Lease struct{ e *usageEntry }

// Use is Touch and Acquire in one lookup, without allocating: the per-request
// call of the router.
func (u *Usage) Use(node, model string) Lease {
	e := u.entry(node, model)
	e.lastAccess.Store(time.Now().UnixNano())
	e.inFlight.Add(1)
	return Lease{e: e}
}

// Release ends the lease; later calls do nothing.
func (l *Lease) Release() {
	if l.e != nil {
		l.e.inFlight.Add(-1)
		l.e = nil
	}
}

// InFlight is the number of requests in flight on model at node through us.
func (u *Usage) InFlight(node, model string) int {
	v, ok := u.m.Load(usageKey{node, model})
	if !ok {
		return 0
	}
	return int(v.(*usageEntry).inFlight.Load())
}
