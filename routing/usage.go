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

// Lease is one request in flight through us on a (node, model), from
// Usage.Use until Release. It is owned by whoever holds the request (the
// ext_proc stream, a cold-load flight): it cannot be copied (go vet says
// so), and Release is safe to call more than once and from several
// goroutines, so the count can neither leak nor go negative.
type Lease struct{ e atomic.Pointer[usageEntry] }

// Use touches (node, model) and counts a request in flight on it into l,
// without allocating: the per-request call of the router. A lease l
// already held is released first.
func (u *Usage) Use(node, model string, l *Lease) {
	e := u.entry(node, model)
	e.lastAccess.Store(time.Now().UnixNano())
	e.inFlight.Add(1)
	if old := l.e.Swap(e); old != nil {
		old.inFlight.Add(-1)
	}
}

// Release ends the lease; later calls do nothing. Nil-safe.
func (l *Lease) Release() {
	if l == nil {
		return
	}
	if e := l.e.Swap(nil); e != nil {
		e.inFlight.Add(-1)
	}
}

// Held reports whether the lease counts a request in flight.
func (l *Lease) Held() bool { return l != nil && l.e.Load() != nil }

// InFlight is the number of requests in flight on model at node through us.
func (u *Usage) InFlight(node, model string) int {
	v, ok := u.m.Load(usageKey{node, model})
	if !ok {
		return 0
	}
	return int(v.(*usageEntry).inFlight.Load())
}
