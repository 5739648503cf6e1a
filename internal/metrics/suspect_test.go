package metrics_test

import (
	"testing"

	"github.com/helexa/cortex-extproc/internal/metrics"
)

// Signals are counted per node and kind, fast-path unhealthy marks per
// node, and a neuron removed from the config takes its series with it.
func TestSuspectMetrics(t *testing.T) {
	m := metrics.New()
	for range 3 {
		m.SuspectSignal("beast", "no_response_headers")
	}
	m.SuspectSignal("beast", "envoy_local_reply")
	m.SuspectSignal("rig", "envoy_local_reply")
	m.SuspectUnhealthy("beast")

	for _, c := range []struct {
		name      string
		got, want float64
	}{
		{"signals{beast,no_response_headers}", value(m.SuspectSignals.WithLabelValues("beast", "no_response_headers")), 3},
		{"signals{beast,envoy_local_reply}", value(m.SuspectSignals.WithLabelValues("beast", "envoy_local_reply")), 1},
		{"signals{rig,envoy_local_reply}", value(m.SuspectSignals.WithLabelValues("rig", "envoy_local_reply")), 1},
		{"fast_unhealthy{beast}", value(m.FastUnhealthy.WithLabelValues("beast")), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	m.NeuronRemoved("beast")
	if n := count(m.SuspectSignals); n != 1 {
		t.Errorf("%d neuron_suspect_signals_total series after removing beast, want rig's 1", n)
	}
	if n := count(m.FastUnhealthy); n != 0 {
		t.Errorf("%d neuron_fast_unhealthy_total series after removing beast, want 0", n)
	}
}
