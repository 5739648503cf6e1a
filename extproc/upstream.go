package extproc

import (
	"context"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// OriginalDst implements the Gateway API Inference Extension endpoint-picker
// protocol (contract mode original_dst): the chosen neuron's inference
// endpoint as "ip:port" in x-gateway-destination-endpoint and in dynamic
// metadata envoy.lb. Envoy's ORIGINAL_DST cluster does not resolve
// hostnames, so hostnames are resolved here (cached briefly).
type OriginalDst struct {
	resolver *net.Resolver
	ttl      time.Duration
	mu       sync.Mutex
	cache    map[string]resolved
}

type resolved struct {
	addr    string
	expires time.Time
}

// NewOriginalDst returns the original_dst upstream; r nil uses the system resolver.
func NewOriginalDst(r *net.Resolver) *OriginalDst {
	if r == nil {
		r = net.DefaultResolver
	}
	return &OriginalDst{resolver: r, ttl: 30 * time.Second, cache: map[string]resolved{}}
}

// Header implements Upstream.
func (o *OriginalDst) Header() string { return HeaderDestination }

// DynamicMetadataKey implements Upstream.
func (o *OriginalDst) DynamicMetadataKey() string { return HeaderDestination }

// Value implements Upstream: the target endpoint as an IP literal and port.
func (o *OriginalDst) Value(t *routing.Target) (string, *apierr.Error) {
	u, err := url.Parse(t.Endpoint)
	if err != nil || u.Hostname() == "" {
		return "", apierr.Unavailable(2, "inference endpoint %q of %s on %s is not a URL; check the neuron's /models/{id}/endpoint answer", t.Endpoint, t.Model, t.Node).WithReason(apierr.ReasonEndpointUnresolved)
	}
	port := u.Port()
	if port == "" {
		port = "80"
		if u.Scheme == "https" {
			port = "443"
		}
	}
	host := u.Hostname()
	if ip := net.ParseIP(host); ip != nil {
		return net.JoinHostPort(ip.String(), port), nil
	}
	key := host + ":" + port
	now := time.Now()
	o.mu.Lock()
	r, ok := o.cache[key]
	o.mu.Unlock()
	if ok && now.Before(r.expires) {
		return r.addr, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	ips, err := o.resolver.LookupIP(ctx, "ip", host)
	if err != nil || len(ips) == 0 {
		return "", apierr.Unavailable(2, "cannot resolve %s (inference endpoint of %s on %s): %v; Envoy's ORIGINAL_DST cluster needs an IP", host, t.Model, t.Node, err).WithReason(apierr.ReasonEndpointUnresolved)
	}
	addr := net.JoinHostPort(ips[0].String(), strconv.Itoa(atoiOr(port, 80)))
	o.mu.Lock()
	o.cache[key] = resolved{addr: addr, expires: now.Add(o.ttl)}
	o.mu.Unlock()
	return addr, nil
}

func atoiOr(s string, def int) int {
	if n, err := strconv.Atoi(s); err == nil {
		return n
	}
	return def
}
