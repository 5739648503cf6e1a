package catalogue

import (
	"testing"
)

func TestStoreGenerations(t *testing.T) {
	var zero Store
	if c := zero.Load(); c == nil || len(c.Models()) != 0 || zero.Generation() != 0 {
		t.Fatalf("zero Store: %v generation %d", c, zero.Generation())
	}

	a := mustParse(t, "[[models]]\nid = \"a\"\nharness = \"candle\"\n")
	b := mustParse(t, "[[models]]\nid = \"b\"\nharness = \"candle\"\n")
	s := NewStore(a)
	if s.Load() != a || s.Generation() != 1 {
		t.Fatalf("NewStore: generation %d", s.Generation())
	}
	if gen := s.Swap(b); gen != 2 || s.Generation() != 2 || s.Load() != b {
		t.Fatalf("after Swap: generation %d (returned %d)", s.Generation(), gen)
	}
	if gen := s.Swap(a); gen != 3 || s.Load().Profile("a") == nil {
		t.Fatalf("second Swap: generation %d", gen)
	}
	if NewStore(nil).Generation() != 0 {
		t.Error("NewStore(nil) should be the empty catalogue at generation 0")
	}
}

// Load sits on the per-request path.
func TestStoreLoadDoesNotAllocate(t *testing.T) {
	s := NewStore(mustParse(t, "[[models]]\nid = \"a\"\nharness = \"candle\"\n"))
	var zero Store
	if n := testing.AllocsPerRun(1000, func() {
		_ = s.Load()
		_ = zero.Load()
		_ = s.Generation()
	}); n != 0 {
		t.Fatalf("Load allocates %v times per call", n)
	}
}
