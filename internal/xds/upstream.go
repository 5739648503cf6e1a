package xds

import (
	"time"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// Upstream is the extproc.Upstream for cluster_header mode with xDS on: it
// names the cluster that reaches the target's inference endpoint, and only
// once every connected Envoy has acknowledged it.
type Upstream struct {
	s      *Server
	header string
	wait   time.Duration
}

// Upstream returns the extproc.Upstream backed by this server's ACK state.
func (s *Server) Upstream() *Upstream {
	return &Upstream{s: s, header: s.opt.ClusterHeader, wait: s.opt.AckWait}
}

// Header implements extproc.Upstream.
func (u *Upstream) Header() string { return u.header }

// DynamicMetadataKey implements extproc.Upstream: nothing beyond the header.
func (u *Upstream) DynamicMetadataKey() string { return "" }

// Value implements extproc.Upstream. A cluster not yet acknowledged (a new
// neuron, a model that just loaded on a new port, a changed endpoint) is
// waited for up to AckWait, since Envoy normally acknowledges within
// milliseconds of the fleet change; after that the client gets 503 with
// Retry-After 2 rather than Envoy's bare 503 NC for an unknown cluster.
func (u *Upstream) Value(t *routing.Target) (string, *apierr.Error) {
	a, err := parseAddr(t.Endpoint)
	if err != nil {
		return "", apierr.Unavailable(2, "inference endpoint of model %s on neuron %s is unusable (%v); check the neuron's /models/{id}/endpoint answer", t.Model, t.Node, err).WithReason(apierr.ReasonEndpointUnresolved)
	}
	key := routeKey(t.Node, a)
	var timer *time.Timer
	for {
		cluster, ok, connected, changed := u.s.lookup(key)
		if ok {
			return cluster, nil
		}
		if !connected {
			return "", apierr.Unavailable(2, "neuron %s's Envoy cluster is not yet acknowledged by Envoy (xDS); retry shortly. No Envoy has subscribed to clusters on cortex-extproc's gRPC port yet: check dynamic_resources (ads_config, cds_config) in Envoy's config, as in envoy/envoy-xds.yaml", t.Node).WithReason(apierr.ReasonClusterNotAcked)
		}
		if u.wait <= 0 {
			return "", notAcked(t)
		}
		if timer == nil {
			timer = time.NewTimer(u.wait)
			defer timer.Stop()
		}
		select {
		case <-changed:
		case <-timer.C:
			return "", notAcked(t)
		}
	}
}

func notAcked(t *routing.Target) *apierr.Error {
	return apierr.Unavailable(2, "neuron %s's Envoy cluster is not yet acknowledged by Envoy (xDS); retry shortly", t.Node).WithReason(apierr.ReasonClusterNotAcked)
}
