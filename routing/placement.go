package routing

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Plan is where a cold load goes and what must make room for it.
type Plan struct {
	Node string // chosen node
	// Spec is the body of POST /models/load; Spec.Devices are exactly the
	// devices the fit test chose.
	Spec neuron.LoadSpec
	// PerDeviceMB is the VRAM the load takes on each of Spec.Devices.
	PerDeviceMB int64
	FitsNow     bool // fits in the node's free VRAM without evicting
	// Evict lists the resident models to unload first, least recently used
	// first: the shortest such prefix that frees room on Spec.Devices.
	// Empty when FitsNow.
	Evict []string
	// Ranked is every candidate node, best first (for logs and fallback).
	Ranked []string
	// Victims are Evict with the devices and VRAM each gives back: what
	// the cold-load ledger claims.
	Victims []Victim
}

// Victim is a resident model an eviction would unload, and the VRAM it
// gives back on each of its devices.
type Victim struct {
	Model       string
	Devices     []int
	PerDeviceMB int64
}

// victims are rs as eviction claims them on n.
func victims(n *fleet.Node, rs []resident) []Victim {
	out := make([]Victim, 0, len(rs))
	for _, r := range rs {
		devs, share := r.shares(n)
		out = append(out, Victim{Model: r.id, Devices: devs, PerDeviceMB: share})
	}
	return out
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
	// Even with every model there gone, the k largest eligible devices
	// cannot hold the declared size: no retry will change that.
	if p.VRAMMB > 0 {
		totals := map[int]int64{}
		for _, d := range n.Discovery.Devices {
			totals[d.Index] = d.VRAMTotalMB
		}
		if top := topFree(totals, eligibleDevices(p, n), k); len(top) < k || top[k-1] < ceilDiv(p.VRAMMB, int64(k)) {
			if k == 1 && len(top) == 1 {
				return false, fmt.Sprintf("can never fit: needs %d MB on one device, its largest holds %d MB in all", p.VRAMMB, top[0])
			}
			return false, fmt.Sprintf("can never fit: needs %d MB on each of %d devices, its largest hold %v MB in all", ceilDiv(p.VRAMMB, int64(k)), k, top)
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

// LoadSpecFor is the POST /models/load body for p on the devices placement
// chose (neuron-api.md): tensor_parallel only when more than one device,
// the source-prefixed id, quant null when unset.
func LoadSpecFor(p *catalogue.Profile, devices []int) neuron.LoadSpec {
	k := p.Devices()
	spec := neuron.LoadSpec{ModelID: p.LoadID(), Harness: p.Harness, Devices: slices.Clone(devices)}
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
	perDev   int64 // need on each of the k devices
	freeSum  int64 // free VRAM on eligible devices now
	fitsNow  bool
	// devices are the k devices the load goes to: those with the most free
	// VRAM when it fits now, else those the evictions free room on.
	devices []int
	// evict is the LRU prefix of the evictable residents on devices, within
	// the eviction budget, that makes the model fit; when it cannot be made
	// to fit, every resident the budget allowed.
	evict     []resident
	fitsAfter bool
	after     []int64  // free VRAM on devices after evict
	blockers  []string // residents that could not be evicted, and why
	capped    bool     // stopped at the eviction budget with evictable residents left
}

// evaluateNode decides whether p fits on n given per-device free VRAM (the
// ledger's view), on which devices, and which residents to evict (LRU
// first) if not. budget < 0 is unbounded.
//
// The eviction candidates exclude models in flight (through us, or queued or
// running on the neuron), models being evicted or loaded already, and
// models the neuron is reloading: they are never evicted, so counting their
// VRAM as reclaimable would rank a node first that cannot actually take the
// load.
func evaluateNode(cat *catalogue.Catalogue, p *catalogue.Profile, n *fleet.Node, eligible []int, free map[int]int64, view *Commitments, st PlacementState, budget int) nodeFit {
	f := nodeFit{
		node:     n,
		pinned:   p.PinnedTo(n.Name),
		eligible: eligible,
		k:        p.Devices(),
		need:     p.VRAMMB,
	}
	f.perDev = ceilDiv(f.need, int64(f.k))
	for _, d := range f.eligible {
		if v := free[d]; v > 0 {
			f.freeSum += v
		}
	}
	f.fitsNow = fits(free, f.eligible, f.k, f.need)
	if f.fitsNow {
		f.devices = topDevices(free, f.eligible, f.k)
		f.fitsAfter = true
		f.after = pick(free, f.devices)
		return f
	}

	var cands []resident
	for _, m := range n.Models {
		if m.ID == p.ID || !m.Status.Resident() || view.Blocked(n, m.ID) {
			continue
		}
		switch {
		case m.Status != neuron.StatusLoaded:
			f.blockers = append(f.blockers, fmt.Sprintf("%s (%s)", m.ID, m.Status))
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

	// The target devices are those with the most room once everything
	// evictable there is gone; only residents on them are worth evicting.
	potential := maps.Clone(free)
	for _, r := range cands {
		reclaim(potential, r, n)
	}
	f.devices = topDevices(potential, f.eligible, f.k)
	roomOn := func(m map[int]int64) bool {
		for _, d := range f.devices {
			if m[d] < f.perDev {
				return false
			}
		}
		return len(f.devices) == f.k
	}
	after := maps.Clone(free)
	for _, r := range cands {
		if roomOn(after) {
			break
		}
		if !r.on(f.devices) {
			continue
		}
		if budget >= 0 && len(f.evict) >= budget {
			f.capped = true
			break
		}
		f.evict = append(f.evict, r)
		reclaim(after, r, n)
	}
	f.fitsAfter = roomOn(after)
	f.after = pick(after, f.devices)
	return f
}

// on reports whether r occupies any of devices (a resident whose devices
// the neuron did not report may occupy any).
func (r resident) on(devices []int) bool {
	if len(r.devices) == 0 {
		return true
	}
	for _, d := range r.devices {
		if slices.Contains(devices, d) {
			return true
		}
	}
	return false
}

// topDevices is the k eligible devices with the most free VRAM, most first,
// ties by index.
func topDevices(free map[int]int64, eligible []int, k int) []int {
	devs := slices.Clone(eligible)
	slices.SortStableFunc(devs, func(a, b int) int {
		if free[a] != free[b] {
			return cmp.Compare(free[b], free[a])
		}
		return cmp.Compare(a, b)
	})
	if len(devs) > k {
		devs = devs[:k]
	}
	return devs
}

// pick is free VRAM on devices, in their order.
func pick(free map[int]int64, devices []int) []int64 {
	out := make([]int64, len(devices))
	for i, d := range devices {
		out[i] = free[d]
	}
	return out
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

// reclaim credits r's VRAM back to its devices, split evenly, never above
// a device's total.
func reclaim(free map[int]int64, r resident, n *fleet.Node) {
	devs, share := r.shares(n)
	for _, d := range devs {
		free[d] += share
		if t, ok := deviceTotal(n, d); ok && free[d] > t {
			free[d] = t
		}
	}
}

// shares is where r's VRAM is, split evenly: a model whose devices the
// neuron did not report is spread over all of the node's devices.
func (r resident) shares(n *fleet.Node) ([]int, int64) {
	devs := r.devices
	if len(devs) == 0 && n.Discovery != nil {
		for _, d := range n.Discovery.Devices {
			devs = append(devs, d.Index)
		}
	}
	if len(devs) == 0 {
		return nil, 0
	}
	return devs, r.vram / int64(len(devs))
}

func deviceTotal(n *fleet.Node, index int) (int64, bool) {
	if n.Discovery == nil {
		return 0, false
	}
	for _, d := range n.Discovery.Devices {
		if d.Index == index {
			return d.VRAMTotalMB, true
		}
	}
	return 0, false
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
//
// Free VRAM is the ledger's (view): loads in progress and finished since
// the last poll are taken, evictions finished since are given back. Read
// view before snap, so that the snapshot is at least as new as the poll the
// view was reconciled with.
func Place(cat *catalogue.Catalogue, snap *fleet.Snapshot, view *Commitments, p *catalogue.Profile, st PlacementState) (Plan, *apierr.Error) {
	var nodes []*fleet.Node
	if snap != nil {
		nodes = snap.Nodes
	}
	if len(nodes) == 0 {
		return Plan{}, apierr.Unavailable(5, "model %q: no neuron has been polled yet; retry shortly, and check the [[neurons]] config if this persists", p.ID).WithReason(apierr.ReasonNotPolled)
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
			f := evaluateNode(cat, p, n, eligibleDevices(p, n), view.Free(n), view, st, st.evictionBudget())
			cands = append(cands, &f)
		}
	}

	if len(cands) == 0 {
		detail := strings.Join(notes, "; ")
		switch {
		case cooldown:
			return Plan{}, apierr.Unavailable(5, "model %q needs %s; no neuron can take it now (%s); retry shortly, and check the neuron's logs for why the load failed", p.ID, requirement(p), detail).WithReason(apierr.ReasonCooldown)
		case transient:
			return Plan{}, apierr.Unavailable(3, "model %q needs %s; no healthy neuron can take it now (%s); retry shortly", p.ID, requirement(p), detail).WithReason(apierr.ReasonFeasibleUnhealthy)
		}
		return Plan{}, apierr.NoFeasible("model %q needs %s; no healthy neuron has them (%s); change the profile's min_devices, min_device_vram_mb or pinned_on, or add a neuron that meets them", p.ID, requirement(p), detail)
	}

	sort.SliceStable(cands, func(i, j int) bool { return better(cands[i], cands[j]) })
	ranked := make([]string, len(cands))
	for i, c := range cands {
		ranked[i] = c.node.Name
	}
	top := cands[0]
	plan := Plan{Node: top.node.Name, Spec: LoadSpecFor(p, top.devices), PerDeviceMB: top.perDev, FitsNow: top.fitsNow, Ranked: ranked}
	if top.fitsNow {
		return plan, nil
	}
	if !top.fitsAfter {
		return plan, apierr.Unavailable(5, "model %q: %s; retry later, or unload a model there", p.ID, noRoom(p, top, st.MaxEvictions)).WithReason(apierr.ReasonNoRoom)
	}
	plan.Victims = victims(top.node, top.evict)
	for _, r := range top.evict {
		plan.Evict = append(plan.Evict, r.id)
	}
	return plan, nil
}

// MakeRoom is the eviction step of placement for a plan already made on
// node n, when the neuron reports less free VRAM on the plan's devices
// than placement counted: which further residents to evict so that p fits
// on devices given free (MB per device), within budget evictions (< 0:
// unbounded), LRU first, never a model in flight or already claimed. An
// error says what it would need and what blocked.
func MakeRoom(cat *catalogue.Catalogue, p *catalogue.Profile, n *fleet.Node, devices []int, free map[int]int64, view *Commitments, st PlacementState, budget int) ([]Victim, error) {
	fit := evaluateNode(cat, p, n, devices, free, view, st, budget)
	if !fit.fitsAfter {
		return nil, errors.New(noRoom(p, &fit, st.MaxEvictions))
	}
	return victims(n, fit.evict), nil
}

// noRoom explains why f cannot take p: what it needs, what it has after the
// evictions considered, and what blocked.
func noRoom(p *catalogue.Profile, f *nodeFit, maxEvictions int) string {
	var b strings.Builder
	var evicted []string
	for _, r := range f.evict {
		evicted = append(evicted, r.id)
	}
	// Free VRAM less the loads in progress there can be below zero (they
	// were placed on the ledger's estimate); shown as 0, it still reads
	// as "full".
	has := make([]int64, len(f.after))
	for i, v := range f.after {
		has[i] = max(v, 0)
	}
	if f.k == 1 {
		first := int64(0)
		if len(has) > 0 {
			first = has[0]
		}
		fmt.Fprintf(&b, "%s: needs %d MB free on one device, has %d MB", f.node.Name, f.need, first)
	} else {
		fmt.Fprintf(&b, "%s: needs %d MB free on each of %d devices, has %v MB on devices %v", f.node.Name, f.perDev, f.k, has, f.devices)
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
	if p.VRAMMB > 0 {
		if p.Devices() == 1 {
			s += fmt.Sprintf(" and %d MB of VRAM", p.VRAMMB)
		} else {
			s += fmt.Sprintf(" and %d MB of VRAM (%d MB on each)", p.VRAMMB, ceilDiv(p.VRAMMB, int64(p.Devices())))
		}
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
