// Package neuron speaks the neuron management API (shared/docs/neuron-api.md):
// the wire types and an HTTP client. Unknown JSON fields are ignored, missing
// optional fields take the documented defaults.
package neuron

import (
	"context"
	"encoding/json"
)

// DefaultPort is the neuron's default HTTP port.
const DefaultPort = 13131

// Discovery is GET /discovery: the device topology, invariant for a neuron process.
type Discovery struct {
	Hostname      string   `json:"hostname"`
	OS            string   `json:"os"`
	Kernel        string   `json:"kernel"`
	CUDAVersion   string   `json:"cuda_version"`
	DriverVersion string   `json:"driver_version"`
	Devices       []Device `json:"devices"`
	Harnesses     []string `json:"harnesses"`
	// CUDAUnavailableReason non-nil means the GPU stack is broken on that
	// host: never cold-load there.
	CUDAUnavailableReason *string `json:"cuda_unavailable_reason"`
	MaxPromptTokens       int64   `json:"max_prompt_tokens"`
}

// Device is one GPU in Discovery.
type Device struct {
	Index             int    `json:"index"`
	Name              string `json:"name"`
	VRAMTotalMB       int64  `json:"vram_total_mb"`
	ComputeCapability string `json:"compute_capability"`
}

// Status of a model on a neuron, as GET /models reports it.
type Status string

// The statuses neuron-api.md defines. Anything else is unknown: not routable.
const (
	StatusLoaded     Status = "loaded"
	StatusUnloaded   Status = "unloaded"
	StatusReloading  Status = "reloading"
	StatusRecovering Status = "recovering"
)

// Known reports whether s is one of the documented statuses.
func (s Status) Known() bool {
	switch s {
	case StatusLoaded, StatusUnloaded, StatusReloading, StatusRecovering:
		return true
	}
	return false
}

// Resident reports whether the weights are on the GPU (loaded or reloading).
func (s Status) Resident() bool { return s == StatusLoaded || s == StatusReloading }

// Model is one entry of GET /models.
type Model struct {
	ID      string `json:"id"`
	Harness string `json:"harness"`
	Status  Status `json:"status"`
	Devices []int  `json:"devices"`
	// VRAMUsedMB may be null: fall back to the catalogue's vram_mb.
	VRAMUsedMB   *int64   `json:"vram_used_mb"`
	Capabilities []string `json:"capabilities"`
	ToolCall     *bool    `json:"tool_call"`
	Reasoning    *bool    `json:"reasoning"`
	Limit        *Limit   `json:"limit"`
	// Servable absent means servable.
	Servable *Servable `json:"servable"`
}

// IsServable reports whether the neuron says this resident model can serve now.
func (m *Model) IsServable() bool { return m.Servable == nil || m.Servable.OK }

// Limit is a model's advertised token budget.
type Limit struct {
	Context int64 `json:"context,omitempty"`
	Input   int64 `json:"input,omitempty"`
	Output  int64 `json:"output,omitempty"`
}

// Servable is {"ok": false, "reason": "insufficient_vram"} for a resident
// model that currently cannot serve.
type Servable struct {
	OK     bool   `json:"ok"`
	Reason string `json:"reason,omitempty"`
}

// Health is GET /health: live load and free VRAM.
type Health struct {
	UptimeSecs int64          `json:"uptime_secs"`
	Devices    []DeviceHealth `json:"devices"`
	Activation *Activation    `json:"activation"`
	Models     []ModelHealth  `json:"models"`
}

// DeviceHealth is one device's live VRAM reading.
type DeviceHealth struct {
	Index          int     `json:"index"`
	VRAMUsedMB     int64   `json:"vram_used_mb"`
	VRAMFreeMB     int64   `json:"vram_free_mb"`
	UtilizationPct float64 `json:"utilization_pct"`
	TempC          float64 `json:"temp_c"`
}

// Activation is the neuron's start-up pre-warm progress.
type Activation struct {
	State      string          `json:"state"` // pre_warming | ready
	Pending    IDList          `json:"pending"`
	InProgress IDList          `json:"in_progress"`
	Completed  IDList          `json:"completed"`
	Failed     json.RawMessage `json:"failed"` // shape varies across neuron versions; not used for routing
}

// Loading lists the models the neuron is pre-warming (in_progress and pending).
func (a *Activation) Loading() []string {
	if a == nil {
		return nil
	}
	out := make([]string, 0, len(a.InProgress)+len(a.Pending))
	out = append(out, a.InProgress...)
	return append(out, a.Pending...)
}

// IDList accepts null, a single string or an array of strings: neurons have
// reported in_progress both as one id and as a list.
type IDList []string

// UnmarshalJSON implements json.Unmarshaler.
func (l *IDList) UnmarshalJSON(b []byte) error {
	var one *string
	if err := json.Unmarshal(b, &one); err == nil {
		if one != nil && *one != "" {
			*l = IDList{*one}
		} else {
			*l = nil
		}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*l = many
	return nil
}

// ModelHealth is a replica's live queue in /health.
type ModelHealth struct {
	ID            string `json:"id"`
	InFlight      int    `json:"in_flight"`
	QueueDepth    int    `json:"queue_depth"`
	MaxInFlight   int    `json:"max_in_flight"`
	MaxQueueDepth int    `json:"max_queue_depth"`
}

// LoadSpec is the body of POST /models/load (a "model spec").
type LoadSpec struct {
	ModelID        string  `json:"model_id"`
	Harness        string  `json:"harness"`
	Quant          *string `json:"quant"`
	TensorParallel *int    `json:"tensor_parallel"`
	Devices        []int   `json:"devices"`
}

// API is the neuron management API as cortex-extproc uses it. *Client
// implements it over HTTP; tests substitute fakes.
type API interface {
	Discovery(ctx context.Context) (*Discovery, error)
	Models(ctx context.Context) ([]Model, error)
	Health(ctx context.Context) (*Health, error)
	// Endpoint answers the inference base URL for a model the neuron lists,
	// with a loopback host already replaced by the neuron's own host.
	Endpoint(ctx context.Context, modelID string) (string, error)
	// Load blocks until the weights are resident; "already loaded" is success.
	Load(ctx context.Context, spec LoadSpec) error
	Unload(ctx context.Context, modelID string) error
}
