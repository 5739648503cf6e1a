// Package fleettest builds the small fleets and catalogues the routing
// tests decide, place and load on: neurons with devices, free VRAM and
// resident models, and a catalogue with one model per residency class.
package fleettest

import (
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// Device sizes used by the test fleets, in MB.
const (
	RTX4090 = 24564
	A100    = 81920
)

// Prio is a residency_priority value.
func Prio(n int) *int { return &n }

// TieredCatalogue has one model per residency class: 300, 200, 100 (unset),
// a legacy pinned profile (default 1000), and a 2-device profile. Residents
// named "r/…" are unknown to it and rank 100.
func TieredCatalogue() *catalogue.Catalogue {
	return catalogue.New([]*catalogue.Profile{
		{ID: "org/big", Harness: "candle", VRAMMB: 40000, ResidencyPriority: Prio(300)},
		{ID: "org/rival", Harness: "candle", VRAMMB: 40000, ResidencyPriority: Prio(300)},
		{ID: "org/mid", Harness: "candle", VRAMMB: 16000, ResidencyPriority: Prio(200)},
		{ID: "org/small", Harness: "candle", VRAMMB: 8000},
		{ID: "org/legacy", Harness: "candle", VRAMMB: 10000, PinnedOn: []string{"beast"}},
		{ID: "org/ghost", Harness: "candle", VRAMMB: 1000, PinnedOn: []string{"ghost"}},
		{ID: "org/tp2", Harness: "candle", Quant: "q8_0", Source: "helexa", VRAMMB: 45000,
			MinDevices: 2, MinDeviceVRAMMB: 24000, ResidencyPriority: Prio(300)},
	}, nil, "")
}

// Device is one GPU: its total and free VRAM in MB.
type Device struct{ Total, Free int64 }

// Dev is a Device of total MB with free MB free.
func Dev(total, free int64) Device { return Device{Total: total, Free: free} }

// Res is a model resident on a neuron.
type Res struct {
	ID       string
	VRAM     int64
	Devs     []int // default: device 0
	InFlight int   // reported by the neuron
	Status   neuron.Status
}

// GPUs lists a node's devices, index 0 first.
func GPUs(devs ...Device) []Device { return devs }

// Node is a healthy neuron with discovery and a /health reading.
func Node(name string, devs []Device, models ...Res) *fleet.Node {
	n := &fleet.Node{Name: name, Cluster: "neuron-" + name, Healthy: true,
		Discovery: &neuron.Discovery{Hostname: name}, Health: &neuron.Health{UptimeSecs: 100}}
	for i, d := range devs {
		n.Discovery.Devices = append(n.Discovery.Devices, neuron.Device{Index: i, Name: "gpu", VRAMTotalMB: d.Total})
		n.Health.Devices = append(n.Health.Devices, neuron.DeviceHealth{Index: i, VRAMFreeMB: d.Free, VRAMUsedMB: d.Total - d.Free})
	}
	for _, r := range models {
		st := r.Status
		if st == "" {
			st = neuron.StatusLoaded
		}
		v := r.VRAM
		devs := r.Devs
		if devs == nil {
			devs = []int{0}
		}
		n.Models = append(n.Models, &fleet.Model{
			Model:    neuron.Model{ID: r.ID, Harness: "candle", Status: st, Devices: devs, VRAMUsedMB: &v},
			InFlight: r.InFlight,
		})
	}
	return n
}

// Unhealthy marks n as failing its polls.
func Unhealthy(n *fleet.Node) *fleet.Node {
	n.Healthy, n.LastError = false, "connection refused"
	return n
}

// CUDABroken makes n report CUDA unavailable.
func CUDABroken(n *fleet.Node) *fleet.Node {
	r := "driver/library version mismatch"
	n.Discovery.CUDAUnavailableReason = &r
	return n
}

// NoDiscovery drops n's discovery reading.
func NoDiscovery(n *fleet.Node) *fleet.Node {
	n.Discovery = nil
	return n
}

// Snapshot is a fleet snapshot of nodes, as after the first poll round.
func Snapshot(nodes ...*fleet.Node) *fleet.Snapshot {
	return &fleet.Snapshot{Nodes: nodes, Round: 1}
}

// Epoch is the fixed time the tests' clocks and last-access times count
// from.
var Epoch = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
