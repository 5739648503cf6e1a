package routing

import "testing"

func TestUseLeasesAndTouches(t *testing.T) {
	u := NewUsage()
	l := u.Use("beast", "m")
	if u.InFlight("beast", "m") != 1 || u.LastAccess("beast", "m").IsZero() {
		t.Fatalf("after Use: in flight %d, last access %v", u.InFlight("beast", "m"), u.LastAccess("beast", "m"))
	}
	l.Release()
	l.Release()
	if n := u.InFlight("beast", "m"); n != 0 {
		t.Fatalf("in flight %d after double release, want 0", n)
	}
	var zero Lease
	zero.Release() // a zero lease is a no-op
	if allocs := testing.AllocsPerRun(100, func() { l := u.Use("beast", "m"); l.Release() }); allocs != 0 {
		t.Errorf("Use allocates %v times per call for an existing key", allocs)
	}
}
