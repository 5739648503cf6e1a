package service

import (
	"encoding/json"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/routing"
	"github.com/helexa/cortex-extproc/routing/coldload"
)

func (s *Service) adminMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.Handle("GET /readyz", s.readiness) // ready.go
	mux.HandleFunc("GET /debug/fleet", s.debugFleet)
	return mux
}

// fleetView is /debug/fleet: what the router sees now.
type fleetView struct {
	Catalogue catalogueView         `json:"catalogue"`
	PollRound uint64                `json:"poll_round"`
	Taken     time.Time             `json:"taken"`
	Nodes     []nodeView            `json:"nodes"`
	Loads     []coldload.FlightInfo `json:"loads_in_progress"`
	// Ledger lists what loads and evictions committed beyond the last
	// poll (docs/cold-loads.md).
	Ledger []routing.LedgerEntry `json:"ledger"`
}

type catalogueView struct {
	Generation uint64 `json:"generation"`
	Hash       string `json:"hash"`
	Models     int    `json:"models"`
	Aliases    int    `json:"aliases"`
}

type nodeView struct {
	Name                string          `json:"name"`
	Cluster             string          `json:"cluster"`
	Endpoint            string          `json:"endpoint"`
	Healthy             bool            `json:"healthy"`
	Suspect             bool            `json:"suspect"`
	ConsecutiveFailures int             `json:"consecutive_failures"`
	LastPoll            *time.Time      `json:"last_poll"`    // null before the first poll
	LastSuccess         *time.Time      `json:"last_success"` // null until a /models poll succeeded
	LastError           string          `json:"last_error,omitempty"`
	UptimeSecs          *int64          `json:"uptime_secs,omitempty"` // from /health; a drop means the neuron restarted
	Activation          string          `json:"activation,omitempty"`  // pre_warming | ready
	Devices             []deviceView    `json:"devices"`
	CUDAUnavailable     *string         `json:"cuda_unavailable_reason,omitempty"`
	Loading             []string        `json:"loading,omitempty"`
	Models              []nodeModelView `json:"models"`
}

type deviceView struct {
	Index       int    `json:"index"`
	Name        string `json:"name"`
	VRAMTotalMB int64  `json:"vram_total_mb"`
	VRAMFreeMB  int64  `json:"vram_free_mb"` // as the neuron last reported
	// LedgerFreeMB is what placement decides on: the report, less loads in
	// progress and finished since, plus evictions finished since.
	LedgerFreeMB int64 `json:"ledger_free_mb"`
}

type nodeModelView struct {
	ID       string `json:"id"`
	Status   string `json:"status"`
	Servable bool   `json:"servable"`
	// NotServableReason is the neuron's reason when servable is false.
	NotServableReason string     `json:"not_servable_reason,omitempty"`
	Devices           []int      `json:"devices"`
	VRAMUsedMB        *int64     `json:"vram_used_mb"`
	InFlight          int        `json:"in_flight"`
	QueueDepth        int        `json:"queue_depth"`
	Endpoint          string     `json:"endpoint"`
	LastAccess        *time.Time `json:"last_access,omitempty"`
}

func (s *Service) debugFleet(w http.ResponseWriter, _ *http.Request) {
	cat := s.store.Load()
	view := s.loader.Commitments()
	snap := s.poller.Snapshot()
	v := fleetView{
		Catalogue: catalogueView{Generation: s.store.Generation(), Hash: cat.Hash, Models: len(cat.Models()), Aliases: len(cat.Aliases())},
		PollRound: snap.Round,
		Taken:     snap.Taken,
		Nodes:     make([]nodeView, 0, len(snap.Nodes)),
		Loads:     s.loader.InProgress(),
		Ledger:    view.Entries(),
	}
	for _, n := range snap.Nodes {
		v.Nodes = append(v.Nodes, s.nodeView(n, view))
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func (s *Service) nodeView(n *fleet.Node, view *routing.Commitments) nodeView {
	nv := nodeView{
		Name: n.Name, Cluster: n.Cluster, Endpoint: n.Endpoint, Healthy: n.Healthy, Suspect: n.Suspect,
		ConsecutiveFailures: n.ConsecutiveFailures, LastPoll: timeOrNil(n.LastPoll), LastSuccess: timeOrNil(n.LastSuccess),
		LastError: n.LastError, Devices: []deviceView{}, Models: []nodeModelView{},
	}
	if n.Discovery != nil {
		free, ledger := n.FreeVRAM(), view.Free(n)
		nv.CUDAUnavailable = n.Discovery.CUDAUnavailableReason
		for _, d := range n.Discovery.Devices {
			nv.Devices = append(nv.Devices, deviceView{Index: d.Index, Name: d.Name, VRAMTotalMB: d.VRAMTotalMB,
				VRAMFreeMB: free[d.Index], LedgerFreeMB: ledger[d.Index]})
		}
	}
	if n.Health != nil {
		up := n.Health.UptimeSecs
		nv.UptimeSecs = &up
		nv.Loading = n.Health.Activation.Loading()
		if a := n.Health.Activation; a != nil {
			nv.Activation = a.State
		}
	}
	for _, m := range n.Models {
		mv := nodeModelView{ID: m.ID, Status: string(m.Status), Servable: m.IsServable(), VRAMUsedMB: m.VRAMUsedMB,
			InFlight: m.InFlight, QueueDepth: m.QueueDepth, Endpoint: m.Endpoint, Devices: m.Devices}
		if mv.Devices == nil {
			mv.Devices = []int{}
		}
		if !mv.Servable {
			mv.NotServableReason = m.Servable.Reason
		}
		if t := s.router.LastAccess(n.Name, m.ID); !t.IsZero() {
			mv.LastAccess = &t
		}
		nv.Models = append(nv.Models, mv)
	}
	return nv
}

// timeOrNil shows a zero time (never happened) as JSON null.
func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}
