package routing

import (
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
	ft "github.com/helexa/cortex-extproc/routing/internal/fleettest"
)

func TestPlace(t *testing.T) {
	cat := ft.TieredCatalogue()
	cases := []struct {
		name  string
		model string
		fleet *fleet.Snapshot

		failed       []string       // nodes in cool-down for this model
		lastUse      map[string]int // resident → minutes after ft.Epoch of its last request (absent: never)
		ours         map[string]int // resident → requests in flight through us
		maxEvictions int

		wantNode    string
		wantFitsNow bool
		wantEvict   []string
		wantRanked  []string
		wantSpec    *neuron.LoadSpec

		wantCode  string // error code, "" for success
		wantRetry int
		wantMsg   []string // substrings of the error message
	}{
		{
			name:     "pinned_on keeps a model on its nodes even when another has more room",
			model:    "org/legacy",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 12000))), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 24000)))),
			wantNode: "beast", wantFitsNow: true, wantRanked: []string{"beast"},
		},
		{
			name:  "fits in free VRAM now beats fits after evictions, even with less free",
			model: "org/mid",
			fleet: ft.Snapshot(
				ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 17000))),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 15000), ft.Dev(ft.RTX4090, 15000)), ft.Res{ID: "r/a", VRAM: 8000})),
			wantNode: "beast", wantFitsNow: true, wantRanked: []string{"beast", "rig2"},
		},
		{
			name:  "fits after evictions beats no fit, even with less free",
			model: "org/mid",
			fleet: ft.Snapshot(
				ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 9000)), ft.Res{ID: "org/small", VRAM: 8000}),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 12000)), ft.Res{ID: "org/big", VRAM: 12000})),
			wantNode: "beast", wantEvict: []string{"org/small"}, wantRanked: []string{"beast", "rig2"},
		},
		{
			name:     "most free VRAM wins between nodes that both fit",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 10000))), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
			wantNode: "rig2", wantFitsNow: true, wantRanked: []string{"rig2", "beast"},
		},
		{
			name:     "node name breaks a full tie",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 20000))), ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
			wantNode: "beast", wantFitsNow: true, wantRanked: []string{"beast", "rig2"},
		},
		{
			name:  "k=2 fits only where two eligible devices each have vram_mb/2 free",
			model: "org/tp2",
			fleet: ft.Snapshot(
				// 64000 MB free in all, but only one device has 22500.
				ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 24000), ft.Dev(ft.RTX4090, 20000), ft.Dev(ft.RTX4090, 20000))),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 23000), ft.Dev(ft.RTX4090, 23000)))),
			wantNode: "rig2", wantFitsNow: true, wantRanked: []string{"rig2", "beast"},
		},
		{
			name:     "a node with cuda_unavailable_reason is never a candidate",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.CUDABroken(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 80000)))), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 10000)))),
			wantNode: "rig2", wantFitsNow: true, wantRanked: []string{"rig2"},
		},
		{
			name:     "CUDA unavailable everywhere: no_feasible_neuron with the neuron's reason",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.CUDABroken(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 80000))))),
			wantCode: apierr.CodeNoFeasibleNeuron,
			wantMsg:  []string{"beast: CUDA unavailable: driver/library version mismatch"},
		},
		{
			name:  "the only feasible node is unhealthy: 503 Retry-After 3",
			model: "org/small",
			fleet: ft.Snapshot(
				ft.Unhealthy(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
				ft.CUDABroken(ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 20000))))),
			wantCode: apierr.CodeServiceUnavailable, wantRetry: 3,
			wantMsg: []string{"beast: unhealthy (connection refused)", "rig2: CUDA unavailable"},
		},
		{
			name:  "no neuron has the devices: no_feasible_neuron names each node's constraint",
			model: "org/tp2",
			fleet: ft.Snapshot(
				ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000))),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 20000), ft.Dev(12288, 12000))),
				ft.Unhealthy(ft.Node("rig3", ft.GPUs(ft.Dev(ft.RTX4090, 20000))))),
			wantCode: apierr.CodeNoFeasibleNeuron,
			wantMsg: []string{`model "org/tp2" needs 2 devices with ≥24000 MB and 45000 MB of VRAM (22500 MB on each); no healthy neuron has them ` +
				`(beast: 1 device; rig2: 2 devices, 1 with ≥24000 MB; rig3: 1 device)`},
		},
		{
			name:     "pinned_on naming no configured neuron is a catalogue error",
			model:    "org/ghost",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
			wantCode: apierr.CodeNoFeasibleNeuron,
			wantMsg:  []string{"pinned_on [ghost] names no configured neuron"},
		},
		{
			name:  "a node whose discovery has not arrived might fit: 503 Retry-After 3",
			model: "org/tp2",
			fleet: ft.Snapshot(
				ft.NoDiscovery(ft.Node("beast", nil)),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
			wantCode: apierr.CodeServiceUnavailable, wantRetry: 3,
			wantMsg: []string{"beast: discovery not yet received", "rig2: 1 device"},
		},
		{
			name:     "a node in cool-down after a failed load is skipped",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000))), ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 10000)))),
			failed:   []string{"beast"},
			wantNode: "rig2", wantFitsNow: true, wantRanked: []string{"rig2"},
		},
		{
			name:     "every candidate in cool-down: 503 Retry-After 5",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000)))),
			failed:   []string{"beast"},
			wantCode: apierr.CodeServiceUnavailable, wantRetry: 5,
			wantMsg: []string{"beast: a cold load there failed recently"},
		},
		{
			name:  "evicts least recently used first; never used counts as oldest",
			model: "org/big",
			fleet: ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 5000)),
				ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}, ft.Res{ID: "r/d", VRAM: 20000})),
			lastUse:  map[string]int{"r/a": 30, "r/b": 10, "r/d": 20},
			wantNode: "beast", wantEvict: []string{"r/c", "r/b"}, wantRanked: []string{"beast"},
		},
		{
			name:  "never evicts a model with requests in flight through us",
			model: "org/big",
			fleet: ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 5000)),
				ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000}, ft.Res{ID: "r/d", VRAM: 20000})),
			lastUse:  map[string]int{"r/a": 30, "r/b": 10, "r/d": 20},
			ours:     map[string]int{"r/c": 1},
			wantNode: "beast", wantEvict: []string{"r/b", "r/d"}, wantRanked: []string{"beast"},
		},
		{
			name:  "never evicts a model the neuron reports in flight",
			model: "org/big",
			fleet: ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 5000)),
				ft.Res{ID: "r/a", VRAM: 20000}, ft.Res{ID: "r/b", VRAM: 20000}, ft.Res{ID: "r/c", VRAM: 20000, InFlight: 2}, ft.Res{ID: "r/d", VRAM: 20000})),
			lastUse:  map[string]int{"r/a": 30, "r/b": 10, "r/d": 20},
			wantNode: "beast", wantEvict: []string{"r/b", "r/d"}, wantRanked: []string{"beast"},
		},
		{
			name:  "never evicts a higher class; an unknown resident ranks 100 and swaps with a 100",
			model: "org/small",
			fleet: ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 2000)),
				ft.Res{ID: "org/mid", VRAM: 16000}, ft.Res{ID: "r/a", VRAM: 6000})),
			lastUse:  map[string]int{"r/a": 50},
			wantNode: "beast", wantEvict: []string{"r/a"}, wantRanked: []string{"beast"},
		},
		{
			name:     "only higher classes resident: 503 naming what blocked",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 2000)), ft.Res{ID: "org/mid", VRAM: 20000})),
			wantCode: apierr.CodeServiceUnavailable, wantRetry: 5,
			wantMsg: []string{"beast: needs 8000 MB free on one device, has 2000 MB",
				"remaining residents are in use or rank above 100: org/mid (priority 200)"},
		},
		{
			name:     "a legacy pinned profile (default 1000) is not displaced by a 300",
			model:    "org/big",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 10000)), ft.Res{ID: "org/legacy", VRAM: 60000})),
			wantCode: apierr.CodeServiceUnavailable, wantRetry: 5,
			wantMsg: []string{"org/legacy (priority 1000)"},
		},
		{
			name:     "a legacy pinned profile (default 1000) displaces a 300",
			model:    "org/legacy",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 2000)), ft.Res{ID: "org/big", VRAM: 40000})),
			wantNode: "beast", wantEvict: []string{"org/big"}, wantRanked: []string{"beast"},
		},
		{
			name:  "max_evictions bounds the evictions: 503 when more are needed",
			model: "org/big",
			fleet: ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 5000)),
				ft.Res{ID: "r/a", VRAM: 15000}, ft.Res{ID: "r/b", VRAM: 15000}, ft.Res{ID: "r/c", VRAM: 15000})),
			maxEvictions: 2,
			wantCode:     apierr.CodeServiceUnavailable, wantRetry: 5,
			wantMsg: []string{"has 35000 MB after evicting [r/a r/b]", "cold_load.max_evictions (2) reached"},
		},
		{
			name:  "a node that fits within max_evictions outranks one that would need more, despite less free",
			model: "org/big",
			fleet: ft.Snapshot(
				ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 5000), ft.Dev(ft.A100, 35000)),
					ft.Res{ID: "r/a", VRAM: 15000}, ft.Res{ID: "r/b", VRAM: 15000}, ft.Res{ID: "r/c", VRAM: 15000}),
				ft.Node("rig2", ft.GPUs(ft.Dev(ft.A100, 30000)), ft.Res{ID: "r/e", VRAM: 15000})),
			maxEvictions: 2,
			wantNode:     "rig2", wantEvict: []string{"r/e"}, wantRanked: []string{"rig2", "beast"},
		},
		{
			name:     "load spec: first min_devices devices meeting the floor, tensor_parallel, source prefix, quant",
			model:    "org/tp2",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(12288, 12000), ft.Dev(ft.RTX4090, 24000), ft.Dev(ft.RTX4090, 24000), ft.Dev(ft.RTX4090, 24000)))),
			wantNode: "beast", wantFitsNow: true, wantRanked: []string{"beast"},
			wantSpec: &neuron.LoadSpec{ModelID: "helexa:org/tp2", Harness: "candle", Quant: strp("q8_0"), TensorParallel: intp(2), Devices: []int{1, 2}},
		},
		{
			name:     "load spec for one device: no tensor_parallel, quant null, bare id",
			model:    "org/small",
			fleet:    ft.Snapshot(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 20000), ft.Dev(ft.RTX4090, 20000)))),
			wantNode: "beast", wantFitsNow: true, wantRanked: []string{"beast"},
			wantSpec: &neuron.LoadSpec{ModelID: "org/small", Harness: "candle", Devices: []int{0}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := PlacementState{
				Failed: func(node, model string) bool {
					for _, f := range tc.failed {
						if f == node && model == tc.model {
							return true
						}
					}
					return false
				},
				LastAccess: func(_, model string) time.Time {
					if m, ok := tc.lastUse[model]; ok {
						return ft.Epoch.Add(time.Duration(m) * time.Minute)
					}
					return time.Time{}
				},
				InFlight:     func(_, model string) int { return tc.ours[model] },
				MaxEvictions: tc.maxEvictions,
			}
			plan, err := Place(cat, tc.fleet, nil, cat.Profile(tc.model), st)
			if tc.wantCode != "" {
				if err == nil {
					t.Fatalf("Place = %+v, want error %s", plan, tc.wantCode)
				}
				if err.Code != tc.wantCode || err.Status != 503 || err.RetryAfter != tc.wantRetry {
					t.Fatalf("error = %d %s Retry-After %d, want 503 %s Retry-After %d (%s)", err.Status, err.Code, err.RetryAfter, tc.wantCode, tc.wantRetry, err.Message)
				}
				for _, s := range tc.wantMsg {
					if !strings.Contains(err.Message, s) {
						t.Errorf("message %q does not say %q", err.Message, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Place: %v", err)
			}
			if plan.Node != tc.wantNode || plan.FitsNow != tc.wantFitsNow {
				t.Errorf("placed on %s (fits now %v), want %s (fits now %v)", plan.Node, plan.FitsNow, tc.wantNode, tc.wantFitsNow)
			}
			if !reflect.DeepEqual(plan.Evict, tc.wantEvict) {
				t.Errorf("evict %v, want %v", plan.Evict, tc.wantEvict)
			}
			if !reflect.DeepEqual(plan.Ranked, tc.wantRanked) {
				t.Errorf("ranked %v, want %v", plan.Ranked, tc.wantRanked)
			}
			if tc.wantSpec != nil && !reflect.DeepEqual(plan.Spec, *tc.wantSpec) {
				t.Errorf("load spec %s, want %s", specString(plan.Spec), specString(*tc.wantSpec))
			}
		})
	}
}

func TestFeasibleNamesTheFailedConstraint(t *testing.T) {
	cat := ft.TieredCatalogue()
	cases := []struct {
		model string
		node  *fleet.Node
		ok    bool
		why   string
	}{
		{"org/tp2", ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 0), ft.Dev(ft.RTX4090, 0))), true, ""},
		{"org/tp2", ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 0))), false, "1 device"},
		{"org/tp2", ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 0), ft.Dev(12288, 0), ft.Dev(12288, 0))), false, "3 devices, 1 with ≥24000 MB"},
		{"org/legacy", ft.Node("rig2", ft.GPUs(ft.Dev(ft.RTX4090, 0))), false, "not in pinned_on [beast]"},
		{"org/small", ft.NoDiscovery(ft.Node("beast", nil)), false, "discovery not yet received"},
		{"org/small", ft.CUDABroken(ft.Node("beast", ft.GPUs(ft.Dev(ft.RTX4090, 0)))), false, "CUDA unavailable: driver/library version mismatch"},
	}
	for _, tc := range cases {
		ok, why := Feasible(cat.Profile(tc.model), tc.node)
		if ok != tc.ok || why != tc.why {
			t.Errorf("Feasible(%s, %s) = %v %q, want %v %q", tc.model, tc.node.Name, ok, why, tc.ok, tc.why)
		}
	}
}

func strp(s string) *string { return &s }
func intp(i int) *int       { return &i }

func specString(s neuron.LoadSpec) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// MakeRoom is placement's eviction step for a plan already made, on the
// free VRAM the neuron itself reports right before the load: which further
// residents to evict, least recently used first, or why there is no room.
// A device the loads in progress overcommitted reads as full, not negative.
func TestMakeRoom(t *testing.T) {
	cat := ft.TieredCatalogue()
	n := ft.Node("beast", ft.GPUs(ft.Dev(ft.A100, 1000)),
		ft.Res{ID: "r/old", VRAM: 20000}, ft.Res{ID: "r/new", VRAM: 30000}, ft.Res{ID: "org/big", VRAM: 30000})
	last := map[string]time.Time{"r/old": ft.Epoch, "r/new": ft.Epoch.Add(time.Minute)}
	st := PlacementState{LastAccess: func(_, model string) time.Time { return last[model] }}

	victims, err := MakeRoom(cat, cat.Profile("org/small"), n, []int{0}, map[int]int64{0: 1000}, nil, st, -1)
	if err != nil || len(victims) != 1 || victims[0].Model != "r/old" || victims[0].PerDeviceMB != 20000 || !slices.Equal(victims[0].Devices, []int{0}) {
		t.Fatalf("MakeRoom = %+v, %v; want r/old (least recently used), 20000 MB on device 0", victims, err)
	}

	noEvictions := st
	noEvictions.MaxEvictions = -1
	_, err = MakeRoom(cat, cat.Profile("org/small"), n, []int{0}, map[int]int64{0: -12000}, nil, noEvictions, 0)
	if err == nil || !strings.Contains(err.Error(), "has 0 MB") || strings.Contains(err.Error(), "-12000") {
		t.Fatalf("MakeRoom on an overcommitted device: %v; want an error saying it has 0 MB", err)
	}
	if !strings.Contains(err.Error(), "eviction is disabled") {
		t.Errorf("the error should say what stopped it: %v", err)
	}
}
