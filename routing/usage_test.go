package routing

import (
	"sync"
	"testing"
)

func TestUseLeasesAndTouches(t *testing.T) {
	u := NewUsage()
	var l Lease
	u.Use("beast", "m", &l)
	if u.InFlight("beast", "m") != 1 || u.LastAccess("beast", "m").IsZero() || !l.Held() {
		t.Fatalf("after Use: in flight %d, last access %v", u.InFlight("beast", "m"), u.LastAccess("beast", "m"))
	}
	l.Release()
	l.Release()
	if n := u.InFlight("beast", "m"); n != 0 {
		t.Fatalf("in flight %d after double release, want 0", n)
	}
	var zero Lease
	zero.Release() // a zero lease is a no-op
	var nilLease *Lease
	nilLease.Release()
	if allocs := testing.AllocsPerRun(100, func() { u.Use("beast", "m", &l); l.Release() }); allocs != 0 {
		t.Errorf("Use allocates %v times per call for an existing key", allocs)
	}
}

// A lease released from several goroutines at once (a stream's response
// headers and its end, say) counts down exactly once; a lease used again
// gives its previous target back first.
func TestLeaseReleaseIsExactlyOnce(t *testing.T) {
	u := NewUsage()
	for range 50 {
		var l Lease
		u.Use("beast", "m", &l)
		var wg sync.WaitGroup
		for range 8 {
			wg.Add(1)
			go func() { defer wg.Done(); l.Release() }()
		}
		wg.Wait()
		if n := u.InFlight("beast", "m"); n != 0 {
			t.Fatalf("in flight %d after concurrent releases, want 0", n)
		}
	}
	var l Lease
	u.Use("beast", "a", &l)
	u.Use("beast", "b", &l)
	if u.InFlight("beast", "a") != 0 || u.InFlight("beast", "b") != 1 {
		t.Fatalf("reused lease: a %d b %d, want 0 and 1", u.InFlight("beast", "a"), u.InFlight("beast", "b"))
	}
	l.Release()
}

func TestUsage(t *testing.T) {
	u := NewUsage()
	if !u.LastAccess("beast", "m").IsZero() || u.InFlight("beast", "m") != 0 {
		t.Fatal("fresh Usage reports activity")
	}
	u.Touch("beast", "m")
	if u.LastAccess("beast", "m").IsZero() || !u.LastAccess("rig2", "m").IsZero() {
		t.Error("Touch is not recorded per (node, model)")
	}
	var r1, r2 Lease
	u.Use("beast", "m", &r1)
	u.Use("beast", "m", &r2)
	if n := u.InFlight("beast", "m"); n != 2 {
		t.Errorf("in flight %d, want 2", n)
	}
	r1.Release()
	r1.Release() // a second release must not under-count the other request
	if n := u.InFlight("beast", "m"); n != 1 {
		t.Errorf("in flight %d after one release (twice), want 1", n)
	}
	r2.Release()
	if allocs := testing.AllocsPerRun(100, func() { u.Touch("beast", "m") }); allocs != 0 {
		t.Errorf("Touch on a known (node, model) allocates %v times per request", allocs)
	}
}
