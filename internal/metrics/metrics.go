// Package metrics holds cortex-extproc's Prometheus metrics (contract.md,
// prefix cortex_extproc_) and the per-request log line. Label values are
// bounded: model labels are only catalogue ids and aliases (anything else
// is "other"), node labels only configured neuron names, reasons only
// apierr's constants.
package metrics

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

const ns = "cortex_extproc"

// Other is the label value for a model outside the catalogue and aliases.
const Other = "other"

// Outcomes of requests_total.
const (
	OutcomeRouted    = "routed"
	OutcomeColdStart = "cold_start"
)

// decisionBuckets span sub-millisecond decisions; loadBuckets span seconds
// to a 30-minute cold load.
var (
	decisionBuckets = []float64{0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5}
	loadBuckets     = []float64{0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600}
)

// Metrics is the registry and every metric in it.
type Metrics struct {
	Registry *prometheus.Registry

	Requests          *prometheus.CounterVec   // model, requested, node, outcome
	Errors            *prometheus.CounterVec   // model, requested, node, status, code, reason
	LogLinesDropped   *prometheus.CounterVec   // reason
	Decision          prometheus.Histogram     // seconds, body received → reply ready, no waits
	ColdLoads         *prometheus.CounterVec   // model, node, result
	ColdLoadSeconds   *prometheus.HistogramVec // model
	ColdLoadWait      *prometheus.HistogramVec // model: time requests were held
	ColdLoadWaiters   prometheus.Gauge
	Evictions         *prometheus.CounterVec // node, model
	NeuronHealthy     *prometheus.GaugeVec   // node
	NeuronPollFailure *prometheus.CounterVec // node
	SuspectSignals    *prometheus.CounterVec // node, signal
	FastUnhealthy     *prometheus.CounterVec // node
	CatalogueReloads  *prometheus.CounterVec // result
	CatalogueModels   prometheus.Gauge
	CatalogueInfo     *prometheus.GaugeVec // hash, generation
	InflightStreams   prometheus.Gauge

	catalogue atomic.Pointer[catalogue.Catalogue]
	log       atomic.Pointer[slog.Logger] // nil: Decided logs nothing
	limiter   *logLimiter
	fleet     *fleetCollector

	// requests caches Requests' children by label values: hashing and
	// validating four label values on every request (client_golang's
	// WithLabelValues) cost more than the rest of Decided together.
	requestsMu sync.RWMutex
	requests   map[requestLabels]prometheus.Counter
}

type requestLabels struct{ model, requested, node, outcome string }

// New registers every metric, plus the Go and process collectors.
func New() *Metrics {
	r := prometheus.NewRegistry()
	m := &Metrics{
		Registry: r,
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "requests_total",
			Help: "Requests answered (decided, or refused at their headers), by concrete model, requested name (alias or id), node and outcome (routed, cold_start, or the error code)."},
			[]string{"model", "requested", "node", "outcome"}),
		Errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "request_errors_total",
			Help: "Requests answered with an error, by concrete model, requested name, node, HTTP status, error code and reason (why; \"unclassified\" is a bug). Requests refused before any decision (path_not_routed, extproc_misconfigured, an empty body) have no model or node."},
			[]string{"model", "requested", "node", "status", "code", "reason"}),
		LogLinesDropped: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "log_lines_dropped_total",
			Help: "Per-request log lines not written because their reason exceeded its rate (an error reason, or cold_start)."},
			[]string{"reason"}),
		Decision: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "request_decision_seconds",
			Help: "Time from request body received to reply ready, excluding waits for cold loads.", Buckets: decisionBuckets}),
		ColdLoads: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "cold_loads_total",
			Help: "Cold loads by model, node and result (success, failure)."}, []string{"model", "node", "result"}),
		ColdLoadSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "cold_load_seconds",
			Help: "Duration of cold loads (POST /models/load, evictions included).", Buckets: loadBuckets}, []string{"model"}),
		ColdLoadWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: ns, Name: "cold_load_wait_seconds",
			Help: "Time requests were held waiting for a cold load.", Buckets: loadBuckets}, []string{"model"}),
		ColdLoadWaiters: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "cold_load_waiters",
			Help: "Requests currently held for cold loads."}),
		Evictions: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "evictions_total",
			Help: "Models unloaded to make room for a cold load."}, []string{"node", "model"}),
		NeuronHealthy: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "neuron_healthy",
			Help: "1 when the neuron passes its /models polls, 0 after failure_threshold consecutive failures."}, []string{"node"}),
		NeuronPollFailure: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "neuron_poll_failures_total",
			Help: "Failed /models polls per neuron."}, []string{"node"}),
		SuspectSignals: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "neuron_suspect_signals_total",
			Help: "Routed requests whose upstream failed as if the neuron were gone or its listing stale, by node and signal (envoy_local_reply: Envoy answered 502/503/504 itself; no_response_headers: the ext_proc stream ended before the answer; model_missing: the neuron answered 404, it no longer holds the model). Each asks for a re-poll of the node."},
			[]string{"node", "signal"}),
		FastUnhealthy: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "neuron_fast_unhealthy_total",
			Help: "Neurons marked unhealthy at once because the re-poll after a failed request failed, without waiting for failure_threshold polls."},
			[]string{"node"}),
		CatalogueReloads: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "catalogue_reloads_total",
			Help: "Catalogue reloads by result (ok, error)."}, []string{"result"}),
		CatalogueModels: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "catalogue_models",
			Help: "Models in the catalogue in force."}),
		CatalogueInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "catalogue_info",
			Help: "1 for the catalogue in force, labelled with its content hash and generation."}, []string{"hash", "generation"}),
		InflightStreams: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "inflight_streams",
			Help: "ext_proc streams open now (requests being decided or held)."}),
	}
	m.limiter = newLogLimiter(LogBurst, LogEvery, time.Now)
	m.requests = map[requestLabels]prometheus.Counter{}
	m.fleet = &fleetCollector{label: m.ModelLabel}
	r.MustRegister(m.Requests, m.Errors, m.LogLinesDropped, m.Decision, m.ColdLoads, m.ColdLoadSeconds, m.ColdLoadWait, m.ColdLoadWaiters,
		m.Evictions, m.NeuronHealthy, m.NeuronPollFailure, m.SuspectSignals, m.FastUnhealthy, m.CatalogueReloads, m.CatalogueModels, m.CatalogueInfo,
		m.InflightStreams, buildInfo(), m.fleet,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Both results exist from the start, so a dashboard's rate() of errors
	// shows 0 rather than "no data" until the first failed reload.
	m.CatalogueReloads.WithLabelValues("ok")
	m.CatalogueReloads.WithLabelValues("error")
	m.catalogue.Store(catalogue.Empty())
	return m
}

// SetLogger makes Decided write one log line per decided request: at debug
// for a plain routing, at info for a cold start or an error. Keys:
// request_id, model (as requested), resolved, node, cold_start,
// decision_ms, and for errors status, code, reason, error. The info lines
// are rate-limited per reason (LogBurst at once, then one per LogEvery):
// a flood of bad requests cannot flood the log. Lines not written are
// counted in log_lines_dropped_total, and the next line written for that
// reason says how many in "suppressed".
func (m *Metrics) SetLogger(l *slog.Logger) { m.log.Store(l) }

// SetCatalogue records the catalogue in force: it bounds model labels and
// updates catalogue_models and catalogue_info.
func (m *Metrics) SetCatalogue(c *catalogue.Catalogue, generation uint64) {
	m.catalogue.Store(c)
	m.CatalogueModels.Set(float64(len(c.Models())))
	m.CatalogueInfo.Reset()
	m.CatalogueInfo.WithLabelValues(c.Hash, strconv.FormatUint(generation, 10)).Set(1)
}

// ModelLabel bounds a model label (the concrete id, or the name a client
// requested) to catalogue ids and aliases.
func (m *Metrics) ModelLabel(id string) string {
	c := m.catalogue.Load()
	if c.Profile(id) != nil || c.IsAlias(id) {
		return id
	}
	return Other
}

// StreamStarted implements extproc.Observer.
func (m *Metrics) StreamStarted() { m.InflightStreams.Inc() }

// StreamEnded implements extproc.Observer.
func (m *Metrics) StreamEnded() { m.InflightStreams.Dec() }

// Decided implements extproc.Observer.
func (m *Metrics) Decided(requestID string, t *routing.Target, err *apierr.Error, d time.Duration) {
	m.Decision.Observe(d.Seconds())
	model, requested, node := "", "", ""
	if t != nil {
		model, requested, node = t.Model, t.Requested, t.Node
	}
	modelLabel := m.ModelLabel(model)
	requestedLabel := modelLabel // a concrete id, or no model at all
	if requested != "" && requested != model {
		requestedLabel = m.ModelLabel(requested)
	}
	outcome := OutcomeRouted
	switch {
	case err != nil:
		outcome = err.Code
		m.Errors.WithLabelValues(modelLabel, requestedLabel, node, statusLabel(err.Status), err.Code, string(err.Classified())).Inc()
	case t != nil && t.ColdStart:
		outcome = OutcomeColdStart
	}
	m.requestCounter(requestLabels{modelLabel, requestedLabel, node, outcome}).Inc()
	m.logDecision(requestID, t, err, d)
}

// Refused implements extproc.Observer: a request answered before any
// decision is counted in requests_total and request_errors_total without
// model or node, and logged like a rejected decision (rate-limited by
// reason). It is not a decision: request_decision_seconds leaves it out.
func (m *Metrics) Refused(requestID string, err *apierr.Error) {
	m.Errors.WithLabelValues("", "", "", statusLabel(err.Status), err.Code, string(err.Classified())).Inc()
	m.requestCounter(requestLabels{outcome: err.Code}).Inc()
	m.logDecision(requestID, nil, err, -1)
}

// requestCounter is Requests.WithLabelValues(k…), cached. Label values are
// bounded, so the cache is too; children are never deleted from Requests,
// so a cached one stays the one /metrics shows.
func (m *Metrics) requestCounter(k requestLabels) prometheus.Counter {
	m.requestsMu.RLock()
	c, ok := m.requests[k]
	m.requestsMu.RUnlock()
	if ok {
		return c
	}
	c = m.Requests.WithLabelValues(k.model, k.requested, k.node, k.outcome)
	m.requestsMu.Lock()
	m.requests[k] = c
	m.requestsMu.Unlock()
	return c
}

// statusLabel avoids strconv's allocation for the statuses we answer.
func statusLabel(status int) string {
	switch status {
	case 400:
		return "400"
	case 404:
		return "404"
	case 413:
		return "413"
	case 500:
		return "500"
	case 503:
		return "503"
	}
	return strconv.Itoa(status)
}

// logDecision writes the per-request line; d < 0: no decision was made
// (Refused), so no decision_ms.
func (m *Metrics) logDecision(requestID string, t *routing.Target, err *apierr.Error, d time.Duration) {
	log := m.log.Load()
	if log == nil {
		return
	}
	level, msg, limitKey := slog.LevelDebug, "routed", ""
	switch {
	case err != nil:
		level, msg, limitKey = slog.LevelInfo, "request rejected", string(err.Classified())
	case t != nil && t.ColdStart:
		level, msg, limitKey = slog.LevelInfo, "routed after a cold start", ReasonColdStart
	}
	// Checked first so a routed request at the default info level costs
	// no attribute building.
	ctx := context.Background()
	if !log.Enabled(ctx, level) {
		return
	}
	var suppressed int64
	if limitKey != "" {
		var ok bool
		if ok, suppressed = m.limiter.allow(limitKey); !ok {
			m.LogLinesDropped.WithLabelValues(limitKey).Inc()
			return
		}
	}
	var requested, resolved, node string
	coldStart := false
	if t != nil {
		requested, resolved, node, coldStart = t.Requested, t.Model, t.Node, t.ColdStart
	}
	attrs := make([]slog.Attr, 0, 11)
	attrs = append(attrs,
		slog.String("request_id", BoundLogValue(requestID)),
		slog.String("model", requested),
		slog.String("resolved", resolved),
		slog.String("node", node),
		slog.Bool("cold_start", coldStart),
	)
	if d >= 0 {
		attrs = append(attrs, slog.Float64("decision_ms", float64(d.Microseconds())/1000))
	}
	if err != nil {
		attrs = append(attrs, slog.Int("status", err.Status), slog.String("code", err.Code),
			slog.String("reason", string(err.Classified())), slog.String("error", err.Message))
	}
	if suppressed > 0 {
		attrs = append(attrs, slog.Int64("suppressed", suppressed))
	}
	log.LogAttrs(ctx, level, msg, attrs...)
}

// Waited implements extproc.Observer.
func (m *Metrics) Waited(model string, d time.Duration, _ *apierr.Error) {
	m.ColdLoadWait.WithLabelValues(m.ModelLabel(model)).Observe(d.Seconds())
}

// LoadStarted implements coldload.Observer.
func (m *Metrics) LoadStarted(model, node string) {}

// LoadFinished implements coldload.Observer.
func (m *Metrics) LoadFinished(model, node string, ok bool, d time.Duration) {
	result := "success"
	if !ok {
		result = "failure"
	}
	label := m.ModelLabel(model)
	m.ColdLoads.WithLabelValues(label, node, result).Inc()
	m.ColdLoadSeconds.WithLabelValues(label).Observe(d.Seconds())
}

// Evicted implements coldload.Observer.
func (m *Metrics) Evicted(node, model string) {
	m.Evictions.WithLabelValues(node, m.ModelLabel(model)).Inc()
}

// WaitersChanged implements coldload.Observer.
func (m *Metrics) WaitersChanged(n int) { m.ColdLoadWaiters.Set(float64(n)) }

// PollResult records one /models poll of a neuron.
func (m *Metrics) PollResult(node string, ok bool) {
	if !ok {
		m.NeuronPollFailure.WithLabelValues(node).Inc()
	} else {
		m.NeuronPollFailure.WithLabelValues(node).Add(0)
	}
}

// NeuronHealth records a neuron's health state.
func (m *Metrics) NeuronHealth(node string, healthy bool) {
	v := 0.0
	if healthy {
		v = 1
	}
	m.NeuronHealthy.WithLabelValues(node).Set(v)
}

// SuspectSignal records a routed request whose upstream failed as if the
// neuron were gone (extproc.FailedLocalReply, extproc.FailedNoResponse).
func (m *Metrics) SuspectSignal(node, signal string) {
	m.SuspectSignals.WithLabelValues(node, signal).Inc()
}

// SuspectUnhealthy records a neuron taken out by a failed re-poll.
func (m *Metrics) SuspectUnhealthy(node string) {
	m.FastUnhealthy.WithLabelValues(node).Inc()
}

// NeuronRemoved drops the label values of a neuron no longer configured.
func (m *Metrics) NeuronRemoved(node string) {
	m.NeuronHealthy.DeleteLabelValues(node)
	m.NeuronPollFailure.DeleteLabelValues(node)
	m.SuspectSignals.DeletePartialMatch(prometheus.Labels{"node": node})
	m.FastUnhealthy.DeleteLabelValues(node)
}

// CatalogueReload records a reload attempt.
func (m *Metrics) CatalogueReload(ok bool) {
	if ok {
		m.CatalogueReloads.WithLabelValues("ok").Inc()
	} else {
		m.CatalogueReloads.WithLabelValues("error").Inc()
	}
}
