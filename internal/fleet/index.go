package fleet

import (
	"cmp"
	"hash/maphash"
	"math/bits"
	"slices"
)

// A snapshot's model index has two parts:
//
//   - a layout: for each model id, the positions (node, model within the
//     node) where it is listed. It holds no pointers into the snapshot, so
//     consecutive snapshots share it for as long as every node lists the
//     same ids; the poller derives a changed one from the previous one,
//     re-indexing only the nodes whose listing changed.
//   - each snapshot's Location lists, made from the layout on a model's
//     first lookup in that snapshot and kept for the next ones.
//
// Publishing a snapshot after each neuron's answer therefore costs nothing
// here while the fleet's listings stay put, and what a request pays is in
// proportion to the nodes listing its model, which it then looks at anyway.
// (Location lists built at publish would have to be copied whenever one of
// their nodes was re-polled: a model listed by most of N neurons costs N
// per answer, N² per round.)

// ref is one listing of a model: Nodes[node].Models[model].
type ref struct {
	node, model int32
}

// layout maps a model id to its refs, sorted by node position. It is
// immutable once a snapshot carries it. The ids are spread over shards
// (about entriesPerShard each) so that a change copies the few shards and
// ref lists it touches, not the whole map.
type layout struct {
	shards []map[string][]ref // len is a power of two
	models int                // distinct ids
}

const (
	entriesPerShard = 8
	// An incremental update that leaves more than maxEntriesPerShard ids
	// per shard on average rebuilds with more shards instead.
	maxEntriesPerShard = 4 * entriesPerShard
)

var layoutSeed = maphash.MakeSeed()

func (l *layout) shardOf(id string) int {
	if len(l.shards) == 1 {
		return 0
	}
	return int(maphash.String(layoutSeed, id) & uint64(len(l.shards)-1))
}

func (l *layout) refs(id string) []ref {
	return l.shards[l.shardOf(id)][id]
}

// buildLayout indexes nodes from scratch, in node order (a node listing an
// id twice is there twice).
func buildLayout(nodes []*Node) *layout {
	all := make(map[string][]ref)
	for i, n := range nodes {
		for j, m := range n.Models {
			all[m.ID] = append(all[m.ID], ref{node: int32(i), model: int32(j)})
		}
	}
	shards := 1
	if len(all) > entriesPerShard {
		shards = 1 << bits.Len(uint(len(all)/entriesPerShard))
	}
	l := &layout{shards: make([]map[string][]ref, shards), models: len(all)}
	if shards == 1 {
		l.shards[0] = all
		return l
	}
	for i := range l.shards {
		l.shards[i] = make(map[string][]ref, 2*len(all)/shards)
	}
	for id, refs := range all {
		l.shards[l.shardOf(id)][id] = refs
	}
	return l
}

// nextLayout returns the layout of nodes, given prev, the layout of
// prevNodes (nil if none). Both node lists come from the poller: the same
// node keeps its position while the set of nodes is unchanged, and each
// node's Models are sorted by unique ID. When the same nodes are listed,
// only those whose ids changed are re-indexed, copying the shards and ref
// lists they appear in; prev is shared or left as it is. Otherwise, or
// when most nodes changed their ids, the layout is rebuilt.
func nextLayout(prev *layout, prevNodes, nodes []*Node) *layout {
	if prev == nil || len(prevNodes) != len(nodes) {
		return buildLayout(nodes)
	}
	var changed []int
	for i, n := range nodes {
		was := prevNodes[i]
		if n == was {
			continue
		}
		if n.Name != was.Name {
			return buildLayout(nodes)
		}
		if !sameIDs(was.Models, n.Models) {
			changed = append(changed, i)
		}
	}
	if len(changed) == 0 {
		return prev
	}
	if 2*len(changed) > len(nodes) {
		return buildLayout(nodes)
	}
	u := layoutUpdate{l: &layout{shards: slices.Clone(prev.shards), models: prev.models}}
	if len(changed) > 1 {
		u.fresh = map[string]bool{}
	}
	for _, i := range changed {
		u.replaceNode(int32(i), prevNodes[i].Models, nodes[i].Models)
	}
	if u.l.models > maxEntriesPerShard*len(u.l.shards) {
		return buildLayout(nodes)
	}
	return u.l
}

func sameIDs(a, b []*Model) bool {
	if len(a) != len(b) {
		return false
	}
	if len(a) == 0 || &a[0] == &b[0] {
		return true
	}
	for i := range a {
		if a[i].ID != b[i].ID {
			return false
		}
	}
	return true
}

// layoutUpdate is one nextLayout in progress: l's shard slice is its own,
// the shard maps in owned and the lists in fresh were made by this update
// and may be written in place; all else belongs to the previous layout.
type layoutUpdate struct {
	l     *layout
	owned []int           // shards already copied
	fresh map[string]bool // lists already copied (only with several changed nodes)
}

// replaceNode swaps node's refs for old's ids for refs to nw's.
func (u *layoutUpdate) replaceNode(node int32, old, nw []*Model) {
	i, j := 0, 0
	for i < len(old) || j < len(nw) {
		switch {
		case j == len(nw) || (i < len(old) && old[i].ID < nw[j].ID):
			u.remove(old[i].ID, node)
			i++
		case i == len(old) || nw[j].ID < old[i].ID:
			u.set(nw[j].ID, ref{node: node, model: int32(j)})
			j++
		default:
			u.set(nw[j].ID, ref{node: node, model: int32(j)})
			i++
			j++
		}
	}
}

// shard returns the writable shard map holding id.
func (u *layoutUpdate) shard(id string) map[string][]ref {
	s := u.l.shardOf(id)
	if !slices.Contains(u.owned, s) {
		u.owned = append(u.owned, s)
		c := make(map[string][]ref, len(u.l.shards[s])+1)
		for k, v := range u.l.shards[s] {
			c[k] = v
		}
		u.l.shards[s] = c
	}
	return u.l.shards[s]
}

func locate(refs []ref, node int32) (int, bool) {
	return slices.BinarySearchFunc(refs, node, func(r ref, node int32) int { return cmp.Compare(r.node, node) })
}

// set makes r id's ref on r.node, adding it if that node did not list id.
func (u *layoutUpdate) set(id string, r ref) {
	sh := u.shard(id)
	refs, listed := sh[id]
	if !listed {
		u.l.models++
	}
	k, found := locate(refs, r.node)
	switch {
	case found && refs[k] == r:
		return
	case found && u.fresh[id]:
		refs[k] = r
	case found:
		refs = slices.Clone(refs)
		refs[k] = r
	default:
		c := make([]ref, len(refs)+1)
		copy(c, refs[:k])
		c[k] = r
		copy(c[k+1:], refs[k:])
		refs = c
	}
	sh[id] = refs
	if u.fresh != nil {
		u.fresh[id] = true
	}
}

// remove drops node's ref for id.
func (u *layoutUpdate) remove(id string, node int32) {
	sh := u.shard(id)
	refs := sh[id]
	k, found := locate(refs, node)
	if !found {
		return
	}
	if len(refs) == 1 {
		delete(sh, id)
		u.l.models--
		return
	}
	c := make([]ref, 0, len(refs)-1)
	sh[id] = append(append(c, refs[:k]...), refs[k+1:]...)
	if u.fresh != nil {
		u.fresh[id] = true
	}
}
