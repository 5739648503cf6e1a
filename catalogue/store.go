package catalogue

import (
	"sync"
	"sync/atomic"
)

// Store publishes the catalogue in force. Requests Load it once and use that
// snapshot to the end; the reloader Swaps in a new one. The zero Store holds
// an empty catalogue at generation 0.
type Store struct {
	mu  sync.Mutex // serialises Swap so generations only grow
	cur atomic.Pointer[version]
}

// version pairs a catalogue with its generation so the two are published
// together.
type version struct {
	cat *Catalogue
	gen uint64
}

var emptyVersion = &version{cat: Empty()}

// NewStore returns a store holding c at generation 1, or an empty catalogue
// at generation 0 when c is nil.
func NewStore(c *Catalogue) *Store {
	s := &Store{}
	if c != nil {
		s.cur.Store(&version{cat: c, gen: 1})
	}
	return s
}

func (s *Store) load() *version {
	if v := s.cur.Load(); v != nil {
		return v
	}
	return emptyVersion
}

// Load returns the catalogue in force. It does not allocate: it sits on the
// per-request path.
func (s *Store) Load() *Catalogue { return s.load().cat }

// Generation counts the catalogues swapped in: 1 for NewStore's, plus one per
// Swap.
func (s *Store) Generation() uint64 { return s.load().gen }

// Swap puts c in force and returns its generation. c must not be nil.
func (s *Store) Swap(c *Catalogue) uint64 {
	if c == nil {
		panic("catalogue: Store.Swap(nil); swap in Empty() to clear the catalogue")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	gen := s.load().gen + 1
	s.cur.Store(&version{cat: c, gen: gen})
	return gen
}
