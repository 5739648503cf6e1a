package routing

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/helexa/cortex-extproc/apierr"
	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/fleet"
	"github.com/helexa/cortex-extproc/neuron"
)

// Plan is where a cold load goes and what must make room for it.
type Plan struct {
	Node    string          // chosen node
	Spec    neuron.LoadSpec // body of POST /models/load
	FitsNow bool            // fits in the node's free VRAM without evicting
	// Evict lists the resident models to unload first, least recently used
	// first: the shortest such prefix that makes the model fit. Empty when
	// FitsNow.
	Evict []string
	// Ranked is every candidate node, best first (for logs and fallback).
	Ranked []string
}

// PlacementState is the live, non-snapshot input to placement. Nil funcs
// mean "nothing failed", "never accessed", "nothing in flight".
type PlacementState struct {
	Failed     func(node, model string) bool      // (node, model) in cool-down after a failed load
	LastAccess func(node, model string) time.Time // last request routed through us
	InFlight   func(node, model string) int       // requests in flight through us
	// MaxEvictions bounds Plan.Evict: 0 means no bound, negative means
	// never evict. A node that needs more evictions than this does not
	// count as "fits after evictions".
	MaxEvictions int
}

func (s PlacementState) failed(node, model string) bool {
	return s.Failed != nil && s.Failed(node, model)
}

func (s PlacementState) lastAccess(node, model string) time.Time {
	if s.LastAccess == nil {
		return time.Time{}
	}
	return s.LastAccess(node, model)
}

func (s PlacementState) inFlight(node, model string) int {
	if s.InFlight == nil {
		return 0
	}
	return s.InFlight(node, model)
}

// evictionBudget turns MaxEvictions into a count: -1 unbounded, else the bound.
func (s PlacementState) evictionBudget() int {
	switch {
	case s.MaxEvictions == 0:
		return -1
	case s.MaxEvictions < 0:
		return 0
	}
	return s.MaxEvictions
}

// Feasible is routing.md's feasible_on, plus the two facts placement needs
// before it can trust a node's topology: discovery has been received and the
// GPU stack works. The node is in pinned_on (when non-empty), has at least
// min_devices devices, and at least min_devices of them have vram_total_mb ≥
// min_device_vram_mb (when set). why names the constraint that failed, in
// words an operator can act on ("1 device", "CUDA unavailable: …").
func Feasible(p *catalogue.Profile, n *fleet.Node) (ok bool, why string) {
	if !p.AllowedOn(n.Name) {
		return false, fmt.Sprintf("not in pinned_on %v", p.PinnedOn)
	}
	if n.Discovery == nil {
		return false, "discovery not yet received"
	}
	if r := n.Discovery.CUDAUnavailableReason; r != nil {
		return false, "CUDA unavailable: " + *r
	}
	k := p.Devices()
	total := len(n.Discovery.Devices)
	if total < k {
		return false, plural(total, "device")
	}
	if p.MinDeviceVRAMMB > 0 {
		if e := len(eligibleDevices(p, n)); e < k {
			return false, fmt.Sprintf("%s, %d with ≥%d MB", plural(total, "device"), e, p.MinDeviceVRAMMB)
		}
	}
	return true, ""
}

// eligibleDevices are the node's device indices, in discovery order, whose
// total VRAM meets the profile's per-device floor.
func eligibleDevices(p *catalogue.Profile, n *fleet.Node) []int {
	if n.Discovery == nil {
		return nil
	}
	var out []int
	for _, d := range n.Discovery.Devices {
		if d.VRAMTotalMB >= p.MinDeviceVRAMMB {
			out = append(out, d.Index)
		}
	}
	return out
}

// LoadSpecFor is the POST /models/load body for p on n (neuron-api.md): the
// first min_devices eligible devices in discovery order, tensor_parallel only
// when more than one device, the source-prefixed id, quant null when unset.
func LoadSpecFor(p *catalogue.Profile, n *fleet.Node) neuron.LoadSpec {
	k := p.Devices()
	devs := eligibleDevices(p, n)
	if len(devs) > k {
		devs = devs[:k]
	}
	spec := neuron.LoadSpec{ModelID: p.LoadID(), Harness: p.Harness, Devices: devs}
	if p.Quant != "" {
		q := p.Quant
		spec.Quant = &q
	}
	if k > 1 {
		tp := k
		spec.TensorParallel = &tp
	}
	return spec
}

// resident is a model on a node as eviction sees it.
type resident struct {
	id      string
	vram    int64
	devices []int
	last    time.Time
}

// nodeFit is one candidate node evaluated for one incoming model.
type nodeFit struct {
	node     *fleet.Node
	pinned   bool
	eligible []int
	k        int
	need     int64
	freeSum  int64 // free VRAM on eligible devices now
	fitsNow  bool
	// evict is the LRU prefix of the evictable residents, within the
	// eviction budget, that makes the model fit; when it cannot be made to
	// fit, every resident the budget allowed.
	evict     []string
	fitsAfter bool
	after     []int64  // the k largest eligible free figures after evict
	blockers  []string // residents that could not be evicted, and why
	capped    bool     // stopped at the eviction budget with evictable residents left
}

// evaluateNode decides whether p fits on n given per-device free VRAM, and
// which residents to evict (LRU first) if not. skip lists residents already
// unloaded (the snapshot may still show them). budget < 0 is unbounded.
//
// The eviction candidates exclude models in flight (through us, or queued or
// running on the neuron): they are never evicted, so counting their VRAM as
// reclaimable would rank a node first that cannot actually take the load.
func evaluateNode(cat *catalogue.Catalogue, p *catalogue.Profile, n *fleet.Node, free map[int]int64, st PlacementState, skip map[string]bool, budget int) nodeFit {
	f := nodeFit{
		node:     n,
		pinned:   p.PinnedTo(n.Name),
		eligible: eligibleDevices(p, n),
		k:        p.Devices(),
		need:     p.VRAMMB,
	}
	for _, d := range f.eligible {
		if v := free[d]; v > 0 {
			f.freeSum += v
		}
	}
	f.fitsNow = fits(free, f.eligible, f.k, f.need)

	var cands []resident
	for _, m := range n.Models {
		if m.ID == p.ID || !m.Status.Resident() || skip[m.ID] {
			continue
		}
		switch {
		case !cat.MayDisplace(p.ID, m.ID):
			f.blockers = append(f.blockers, fmt.Sprintf("%s (priority %d)", m.ID, cat.Priority(m.ID)))
		case st.inFlight(n.Name, m.ID) > 0:
			f.blockers = append(f.blockers, fmt.Sprintf("%s (%d requests in flight through cortex-extproc)", m.ID, st.inFlight(n.Name, m.ID)))
		case m.Busyness() > 0:
			f.blockers = append(f.blockers, fmt.Sprintf("%s (%d requests in flight or queued on the neuron)", m.ID, m.Busyness()))
		default:
			cands = append(cands, resident{id: m.ID, vram: residentVRAM(cat, &m.Model), devices: m.Devices, last: st.lastAccess(n.Name, m.ID)})
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		if !cands[i].last.Equal(cands[j].last) {
			return cands[i].last.Before(cands[j].last)
		}
		return cands[i].id < cands[j].id
	})

	after := make(map[int]int64, len(free))
	for d, v := range free {
		after[d] = v
	}
	for _, r := range cands {
		if fits(after, f.eligible, f.k, f.need) {
			break
		}
		if budget >= 0 && len(f.evict) >= budget {
			f.capped = true
			break
		}
		f.evict = append(f.evict, r.id)
		reclaim(after, r, n)
	}
	f.fitsAfter = fits(after, f.eligible, f.k, f.need)
	f.after = topFree(after, f.eligible, f.k)
	return f
}

// residentVRAM is what unloading m gives back: its reported use, else the
// catalogue's estimate, else nothing known.
func residentVRAM(cat *catalogue.Catalogue, m *neuron.Model) int64 {
	if m.VRAMUsedMB != nil {
		return *m.VRAMUsedMB
	}
	if p := cat.Profile(m.ID); p != nil {
		return p.VRAMMB
	}
	return 0
}

// reclaim credits r's VRAM back to its devices, split evenly; a model whose
// devices the neuron did not report is spread over all of the node's devices.
func reclaim(free map[int]int64, r resident, n *fleet.Node) {
	devs := r.devices
	if len(devs) == 0 && n.Discovery != nil {
		for _, d := range n.Discovery.Devices {
			devs = append(devs, d.Index)
		}
	}
	if len(devs) == 0 {
		return
	}
	share := r.vram / int64(len(devs))
	for _, d := range devs {
		free[d] += share
	}
}

// fits is routing.md's "fits in free VRAM": k of the eligible devices each
// have at least need/k free (for k = 1, the largest free device ≥ need).
func fits(free map[int]int64, eligible []int, k int, need int64) bool {
	top := topFree(free, eligible, k)
	if len(top) < k {
		return false
	}
	return top[k-1]*int64(k) >= need
}

// topFree is the k largest free figures among the eligible devices, largest first.
func topFree(free map[int]int64, eligible []int, k int) []int64 {
	vals := make([]int64, 0, len(eligible))
	for _, d := range eligible {
		vals = append(vals, free[d])
	}
	sort.Slice(vals, func(i, j int) bool { return vals[i] > vals[j] })
	if len(vals) > k {
		vals = vals[:k]
	}
	return vals
}

// better is routing.md's ranking: pinned, fits now, fits after evictions,
// most free VRAM, node name.
func better(a, b *nodeFit) bool {
	if a.pinned != b.pinned {
		return a.pinned
	}
	if a.fitsNow != b.fitsNow {
		return a.fitsNow
	}
	if a.fitsAfter != b.fitsAfter {
		return a.fitsAfter
	}
	if a.freeSum != b.freeSum {
		return a.freeSum > b.freeSum
	}
	return a.node.Name < b.node.Name
}

// residentUnservable is the neuron's reason when n holds model resident but
// says it cannot serve it now; "" otherwise.
func residentUnservable(n *fleet.Node, model string) string {
	m := n.Model(model)
	if m == nil || !m.Status.Resident() || m.IsServable() {
		return ""
	}
	if m.Servable.Reason != "" {
		return m.Servable.Reason
	}
	return "servable: false"
}

// Place chooses the node for a cold load of p (routing.md "Placement for a
// cold load") and what to evict there. It is pure: no I/O, no clock.
//
// Errors: no candidate and some node might take the model once it is healthy
// (or has sent discovery) → 503 Retry-After 3; a candidate excluded only by
// a recent failed load → 503 Retry-After 5; no node can ever hold it with
// this catalogue → no_feasible_neuron naming each node's failed constraint;
// the best candidate cannot be made to fit within the eviction bound → 503
// Retry-After 5 naming what blocked.
func Place(cat *catalogue.Catalogue, snap *fleet.Snapshot, p *catalogue.Profile, st PlacementState) (Plan, *apierr.Error) {
	var nodes []*fleet.Node
	if snap != nil {
		nodes = snap.Nodes
	}
	if len(nodes) == 0 {
		return Plan{}, apierr.Unavailable(5, "model %q: no neuron has been polled yet; retry shortly, and check the [[neurons]] config if this persists", p.ID)
	}
	if len(p.PinnedOn) > 0 && !pinnedToAny(p, nodes) {
		return Plan{}, apierr.NoFeasible("model %q: pinned_on %v names no configured neuron; fix pinned_on in the catalogue or configure that neuron", p.ID, p.PinnedOn)
	}

	var (
		cands               []*nodeFit
		notes               []string // one "node: why" per non-candidate
		transient, cooldown bool
	)
	for _, n := range nodes {
		ok, why := Feasible(p, n)
		// A node whose topology we have not seen yet might be the one that
		// fits: say "not now" rather than "never".
		maybe := ok || (n.Discovery == nil && p.AllowedOn(n.Name))
		switch {
		case !n.Healthy && maybe:
			transient = true
			notes = append(notes, n.Name+": unhealthy"+lastError(n))
		case !ok:
			if maybe {
				transient = true
			}
			notes = append(notes, n.Name+": "+why)
		case residentUnservable(n, p.ID) != "":
			// Loading it again there would answer "already loaded" and
			// route to a copy that cannot serve: wait for it instead.
			transient = true
			notes = append(notes, n.Name+": holds it but reports it not servable ("+residentUnservable(n, p.ID)+")")
		case st.failed(n.Name, p.ID):
			cooldown = true
			notes = append(notes, n.Name+": a cold load there failed recently (cool-down)")
		default:
			f := evaluateNode(cat, p, n, n.FreeVRAM(), st, nil, st.evictionBudget())
			cands = append(cands, &f)
		}
	}

	if len(cands) == 0 {
		detail := strings.Join(notes, "; ")
		switch {
		case cooldown:
			return Plan{}, apierr.Unavailable(5, "model %q needs %s; no neuron can take it now (%s); retry shortly, and check the neuron's logs for why the load failed", p.ID, requirement(p), detail)
		case transient:
			return Plan{}, apierr.Unavailable(3, "model %q needs %s; no healthy neuron can take it now (%s); retry shortly", p.ID, requirement(p), detail)
		}
		return Plan{}, apierr.NoFeasible("model %q needs %s; no healthy neuron has them (%s); change the profile's min_devices, min_device_vram_mb or pinned_on, or add a neuron that meets them", p.ID, requirement(p), detail)
	}

	sort.SliceStable(cands, func(i, j int) bool { return better(cands[i], cands[j]) })
	ranked := make([]string, len(cands))
	for i, c := range cands {
		ranked[i] = c.node.Name
	}
	top := cands[0]
	plan := Plan{Node: top.node.Name, Spec: LoadSpecFor(p, top.node), FitsNow: top.fitsNow, Ranked: ranked}
	if top.fitsNow {
		return plan, nil
	}
	if !top.fitsAfter {
		return plan, apierr.Unavailable(5, "model %q: %s; retry later, or unload a model there", p.ID, noRoom(p, top, nil, st.MaxEvictions))
	}
	plan.Evict = top.evict
	return plan, nil
}

// noRoom explains why f cannot take p: what it needs, what it has after the
// evictions considered (plus already, those already done), and what blocked.
func noRoom(p *catalogue.Profile, f *nodeFit, already []string, maxEvictions int) string {
	var b strings.Builder
	evicted := append(append([]string(nil), already...), f.evict...)
	if f.k == 1 {
		has := int64(0)
		if len(f.after) > 0 {
			has = f.after[0]
		}
		fmt.Fprintf(&b, "%s: needs %d MB free on one device, has %d MB", f.node.Name, f.need, has)
	} else {
		fmt.Fprintf(&b, "%s: needs %d MB free on each of %d devices, has %v MB", f.node.Name, ceilDiv(f.need, int64(f.k)), f.k, f.after)
	}
	if len(evicted) > 0 {
		fmt.Fprintf(&b, " after evicting %v", evicted)
	}
	switch {
	case f.capped && maxEvictions < 0:
		b.WriteString("; eviction is disabled (cold_load.max_evictions < 0)")
	case f.capped:
		fmt.Fprintf(&b, "; cold_load.max_evictions (%d) reached", maxEvictions)
	}
	if len(f.blockers) > 0 {
		fmt.Fprintf(&b, "; remaining residents are in use or rank above %d: %s", p.Priority(), strings.Join(f.blockers, ", "))
	} else if !f.capped {
		b.WriteString("; nothing else there may be evicted")
	}
	return b.String()
}

// requirement is the profile's placement constraint in words.
func requirement(p *catalogue.Profile) string {
	s := plural(p.Devices(), "device")
	if p.MinDeviceVRAMMB > 0 {
		s += fmt.Sprintf(" with ≥%d MB", p.MinDeviceVRAMMB)
	}
	if len(p.PinnedOn) > 0 {
		s += fmt.Sprintf(" on one of pinned_on %v", p.PinnedOn)
	}
	return s
}

func pinnedToAny(p *catalogue.Profile, nodes []*fleet.Node) bool {
	for _, n := range nodes {
		if p.PinnedTo(n.Name) {
			return true
		}
	}
	return false
}

func lastError(n *fleet.Node) string {
	if n.LastError == "" {
		return ""
	}
	return " (" + n.LastError + ")"
}

func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func ceilDiv(a, b int64) int64 { return (a + b - 1) / b }
