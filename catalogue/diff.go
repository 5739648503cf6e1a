package catalogue

import (
	"fmt"
	"reflect"
	"sort"
)

// Changes is what a reload changed, as sorted names. The slices are never
// nil, so a JSON log shows [] rather than null.
type Changes struct {
	Added   []string // model ids new in the catalogue
	Removed []string // model ids no longer in it
	Changed []string // model ids whose profile differs
	// AliasesChanged names aliases added, removed, pointed elsewhere, or
	// hidden or shown.
	AliasesChanged []string
}

// Diff compares two catalogues; a nil one counts as empty.
func Diff(prev, next *Catalogue) Changes {
	if prev == nil {
		prev = emptyVersion.cat
	}
	if next == nil {
		next = emptyVersion.cat
	}
	d := Changes{Added: []string{}, Removed: []string{}, Changed: []string{}, AliasesChanged: []string{}}
	for _, p := range next.models {
		switch q := prev.byID[p.ID]; {
		case q == nil:
			d.Added = append(d.Added, p.ID)
		case !reflect.DeepEqual(p, q):
			d.Changed = append(d.Changed, p.ID)
		}
	}
	for _, p := range prev.models {
		if next.byID[p.ID] == nil {
			d.Removed = append(d.Removed, p.ID)
		}
	}
	for a, t := range next.aliases {
		// Moving an alias between [aliases] and [hidden_aliases] changes
		// what /v1/models lists, so it counts too.
		if ot, ok := prev.aliases[a]; !ok || ot != t || prev.hidden[a] != next.hidden[a] {
			d.AliasesChanged = append(d.AliasesChanged, a)
		}
	}
	for a := range prev.aliases {
		if _, ok := next.aliases[a]; !ok {
			d.AliasesChanged = append(d.AliasesChanged, a)
		}
	}
	// models are kept sorted by ID; aliases come from a map.
	sort.Strings(d.AliasesChanged)
	return d
}

// Empty reports whether nothing changed.
func (d Changes) Empty() bool {
	return len(d.Added)+len(d.Removed)+len(d.Changed)+len(d.AliasesChanged) == 0
}

// String is the one-line summary logged on reload:
// "added=[X] removed=[] changed=[Y] aliases_changed=[helexa/small]".
func (d Changes) String() string {
	return fmt.Sprintf("added=%v removed=%v changed=%v aliases_changed=%v", d.Added, d.Removed, d.Changed, d.AliasesChanged)
}
