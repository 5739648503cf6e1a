package metrics

import (
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
)

// FleetSource is what the per-neuron gauges read at scrape time.
type FleetSource struct {
	Snapshot func() *fleet.Snapshot // required
	// Ledger is the VRAM ledger's view (coldload.Loader.Commitments);
	// nil leaves out neuron_device_vram_ledger_free_bytes.
	Ledger func() *routing.Commitments
	// Usage counts requests in flight through this cortex-extproc; nil
	// leaves out routed_in_flight.
	Usage *routing.Usage
}

// WatchFleet exports per-neuron VRAM and in-flight gauges from src. They
// are computed from the current snapshot when /metrics is scraped, so a
// poll costs nothing extra and a removed neuron's series go with it.
func (m *Metrics) WatchFleet(src FleetSource) { m.fleet.src.Store(&src) }

// mib is the neuron API's "MB" (nvidia-smi's MiB) in bytes.
const mib = 1 << 20

var (
	descVRAMTotal = prometheus.NewDesc(ns+"_neuron_device_vram_total_bytes",
		"VRAM of each neuron device, from /discovery.", []string{"node", "device"}, nil)
	descVRAMFree = prometheus.NewDesc(ns+"_neuron_device_vram_free_bytes",
		"Free VRAM of each neuron device as the neuron last reported it (/health).", []string{"node", "device"}, nil)
	descVRAMLedger = prometheus.NewDesc(ns+"_neuron_device_vram_ledger_free_bytes",
		"Free VRAM placement decides on: the last report, less cold loads in progress and finished since, plus evictions finished since.",
		[]string{"node", "device"}, nil)
	descNeuronInFlight = prometheus.NewDesc(ns+"_neuron_model_in_flight",
		"Requests a neuron reports in flight for a model (/health).", []string{"node", "model"}, nil)
	descNeuronQueue = prometheus.NewDesc(ns+"_neuron_model_queue_depth",
		"Requests a neuron reports queued for a model (/health).", []string{"node", "model"}, nil)
	descRoutedInFlight = prometheus.NewDesc(ns+"_routed_in_flight",
		"Requests this cortex-extproc routed to a model on a neuron whose response headers have not come back yet.",
		[]string{"node", "model"}, nil)
)

// fleetCollector is a prometheus.Collector over a FleetSource.
type fleetCollector struct {
	src   atomic.Pointer[FleetSource]
	label func(string) string // bounds model labels
}

func (c *fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descVRAMTotal, descVRAMFree, descVRAMLedger, descNeuronInFlight, descNeuronQueue, descRoutedInFlight} {
		ch <- d
	}
}

type nodeModel struct{ node, model string }

func (c *fleetCollector) Collect(ch chan<- prometheus.Metric) {
	src := c.src.Load()
	if src == nil || src.Snapshot == nil {
		return
	}
	var view *routing.Commitments
	if src.Ledger != nil {
		view = src.Ledger() // before the snapshot, as placement reads them
	}
	snap := src.Snapshot()
	if snap == nil {
		return
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, n := range snap.Nodes {
		if n.Discovery != nil {
			free := n.FreeVRAM()
			var ledger map[int]int64
			if src.Ledger != nil {
				ledger = view.Free(n)
			}
			seen := map[int]bool{}
			for _, d := range n.Discovery.Devices {
				if seen[d.Index] { // a neuron listing an index twice must not break the scrape
					continue
				}
				seen[d.Index] = true
				dev := strconv.Itoa(d.Index)
				gauge(descVRAMTotal, float64(d.VRAMTotalMB)*mib, n.Name, dev)
				gauge(descVRAMFree, float64(free[d.Index])*mib, n.Name, dev)
				if ledger != nil {
					gauge(descVRAMLedger, float64(ledger[d.Index])*mib, n.Name, dev)
				}
			}
		}
		// Models outside the catalogue share the "other" label: sum them.
		var order []nodeModel
		inFlight, queued, routed := map[nodeModel]int{}, map[nodeModel]int{}, map[nodeModel]int{}
		for _, m := range n.Models {
			k := nodeModel{n.Name, c.label(m.ID)}
			if _, ok := inFlight[k]; !ok {
				order = append(order, k)
			}
			inFlight[k] += m.InFlight
			queued[k] += m.QueueDepth
			if src.Usage != nil {
				routed[k] += src.Usage.InFlight(n.Name, m.ID)
			}
		}
		for _, k := range order {
			gauge(descNeuronInFlight, float64(inFlight[k]), k.node, k.model)
			gauge(descNeuronQueue, float64(queued[k]), k.node, k.model)
			if src.Usage != nil {
				gauge(descRoutedInFlight, float64(routed[k]), k.node, k.model)
			}
		}
	}
}
