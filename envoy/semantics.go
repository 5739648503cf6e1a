package envoy

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	upstreamhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/proto"

	"github.com/helexa/cortex-extproc/extproc"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// ExtProcSettings are the cortex-extproc settings an Envoy config must
// agree with.
type ExtProcSettings struct {
	// MaxRequestBytes is extproc.max_request_bytes: Envoy must not buffer a
	// larger body (above it cortex-extproc answers 413 itself, and beyond
	// its gRPC message limit Envoy gets an error and answers 500).
	MaxRequestBytes int64
	// MaxMessageTimeout is extproc.max_message_timeout, the longest
	// override_message_timeout cortex-extproc sends while a request waits on
	// a cold load. Envoy ignores overrides above its own max_message_timeout
	// (the client then gets 504), and every idle timer must outlast it.
	MaxMessageTimeout time.Duration
	// ClusterHeader is upstream.cluster_header: routes that take their
	// cluster from a header must read this one. Empty skips the check.
	ClusterHeader string
}

// DefaultExtProcSettings are cortex-extproc's defaults (contract.md).
var DefaultExtProcSettings = ExtProcSettings{
	MaxRequestBytes:   32 << 20,
	MaxMessageTimeout: time.Hour,
	ClusterHeader:     "x-cortex-cluster",
}

// Envoy defaults the checks account for.
const (
	// defaultMessageTimeout is Envoy's ext_proc message_timeout when unset.
	defaultMessageTimeout = 200 * time.Millisecond
	// defaultStreamIdleTimeout is Envoy's HCM stream_idle_timeout when unset.
	defaultStreamIdleTimeout = 5 * time.Minute
	// defaultMaxRequests is Envoy's circuit-breaker max_requests when unset.
	defaultMaxRequests = 1024
)

// CheckBootstrap runs CheckBootstrapFor with DefaultExtProcSettings.
func CheckBootstrap(b *bootstrapv3.Bootstrap) error {
	return CheckBootstrapFor(b, DefaultExtProcSettings)
}

// CheckBootstrapFor runs the semantic checks cortex-extproc, configured with
// s, relies on and PGV cannot express (envoy-ext-proc.md §10 layer 3). Each
// error names the field path and what to change. It expects a bootstrap
// that passed ValidateMessage; it does not repeat those checks.
func CheckBootstrapFor(b *bootstrapv3.Bootstrap, s ExtProcSettings) error {
	c := &checker{clusters: map[string]*clusterv3.Cluster{}, settings: s, minIdle: max(time.Hour, s.MaxMessageTimeout)}
	for i, cl := range b.GetStaticResources().GetClusters() {
		path := fmt.Sprintf("static_resources.clusters[%d](%s)", i, cl.GetName())
		if _, dup := c.clusters[cl.GetName()]; dup {
			c.addf(path, "duplicate cluster name %q: Envoy rejects the bootstrap", cl.GetName())
		}
		c.clusters[cl.GetName()] = cl
		c.errs = append(c.errs, checkCluster(cl, path)...)
	}
	c.cds = b.GetDynamicResources().GetCdsConfig() != nil

	for i, gs := range b.GetDynamicResources().GetAdsConfig().GetGrpcServices() {
		path := fmt.Sprintf("dynamic_resources.ads_config.grpc_services[%d].envoy_grpc.cluster_name", i)
		if name := gs.GetEnvoyGrpc().GetClusterName(); name != "" {
			c.grpcCluster(path, name, false)
		}
	}

	extProcs := 0
	for li, l := range b.GetStaticResources().GetListeners() {
		lpath := fmt.Sprintf("static_resources.listeners[%d](%s)", li, l.GetName())
		chains := slices.Clone(l.GetFilterChains())
		if l.GetDefaultFilterChain() != nil {
			chains = append(chains, l.GetDefaultFilterChain())
		}
		for fci, fc := range chains {
			for fi, f := range fc.GetFilters() {
				hcm, ok := unpack[*hcmv3.HttpConnectionManager](f.GetTypedConfig())
				if !ok {
					continue
				}
				path := fmt.Sprintf("%s.filter_chains[%d].filters[%d].typed_config", lpath, fci, fi)
				extProcs += c.checkHCM(path, lpath, l, hcm)
			}
		}
	}
	if extProcs == 0 {
		c.addf("static_resources.listeners", "no envoy.filters.http.ext_proc filter in any HTTP connection manager: this Envoy would never ask cortex-extproc where to route")
	}
	return errors.Join(c.errs...)
}

// CheckCluster runs the cluster rules of CheckBootstrap on one cluster,
// e.g. one cortex-extproc is about to serve over CDS.
func CheckCluster(cl *clusterv3.Cluster) error {
	return errors.Join(checkCluster(cl, fmt.Sprintf("cluster(%s)", cl.GetName()))...)
}

func checkCluster(cl *clusterv3.Cluster, path string) []error {
	var errs []error
	add := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", path, field, fmt.Sprintf(format, args...)))
	}
	odc := cl.GetOriginalDstLbConfig()
	if cl.GetType() == clusterv3.Cluster_ORIGINAL_DST {
		if cl.GetLbPolicy() != clusterv3.Cluster_CLUSTER_PROVIDED {
			add("lb_policy", "is %s; an ORIGINAL_DST cluster needs lb_policy: CLUSTER_PROVIDED", cl.GetLbPolicy())
		}
		if cl.GetLoadAssignment() != nil {
			add("load_assignment", "must be absent on an ORIGINAL_DST cluster: its hosts come from each request")
		}
	} else {
		if cl.GetLbPolicy() == clusterv3.Cluster_CLUSTER_PROVIDED && cl.GetClusterType() == nil {
			add("lb_policy", "CLUSTER_PROVIDED is only valid on an ORIGINAL_DST cluster (this one is %s)", cl.GetType())
		}
		if odc != nil {
			add("original_dst_lb_config", "set on a %s cluster; it only applies to type: ORIGINAL_DST", cl.GetType())
		}
	}
	if odc.GetHttpHeaderName() != "" && !odc.GetUseHttpHeader() {
		add("original_dst_lb_config.http_header_name", "%q is only read with use_http_header: true", odc.GetHttpHeaderName())
	}
	return errs
}

type checker struct {
	errs     []error
	clusters map[string]*clusterv3.Cluster
	cds      bool
	settings ExtProcSettings
	// minIdle is the shortest idle timer (and non-zero route timeout)
	// accepted: nothing reaches the HCM while a request waits on a cold
	// load, which lasts up to the override cortex-extproc sends.
	minIdle time.Duration
}

func (c *checker) addf(path, format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf("%s: %s", path, fmt.Sprintf(format, args...)))
}

// checkHCM checks one HTTP connection manager and returns how many ext_proc
// filters it has. The inference-path checks (timeouts, body limit) apply
// only to an HCM that runs ext_proc.
func (c *checker) checkHCM(path, lpath string, l *listenerv3.Listener, hcm *hcmv3.HttpConnectionManager) int {
	var extProcs []*extprocv3.ExternalProcessor
	var extProcNames []string // keys of their typed_per_filter_config
	routerAt := -1
	for i, hf := range hcm.GetHttpFilters() {
		fpath := fmt.Sprintf("%s.http_filters[%d](%s)", path, i, hf.GetName())
		if ep, ok := unpack[*extprocv3.ExternalProcessor](hf.GetTypedConfig()); ok {
			if routerAt >= 0 {
				c.addf(fpath, "ext_proc comes after the router filter and never runs; put it before envoy.filters.http.router")
			}
			c.checkExtProc(fpath+".typed_config", ep)
			extProcs = append(extProcs, ep)
			extProcNames = append(extProcNames, hf.GetName())
		}
		if _, ok := unpack[*routerv3.Router](hf.GetTypedConfig()); ok {
			routerAt = i
		}
	}
	inference := len(extProcs) > 0

	if inference {
		if l.GetPerConnectionBufferLimitBytes() == nil {
			c.addf(lpath+".per_connection_buffer_limit_bytes",
				"unset: Envoy buffers at most 1 MiB of request body for ext_proc by default, so long chats and images get 413; set it explicitly (e.g. 33554432 for 32 MiB)")
		} else {
			c.checkBodyLimit(lpath+".per_connection_buffer_limit_bytes", uint64(l.GetPerConnectionBufferLimitBytes().GetValue()))
		}
		if d := hcm.GetRequestTimeout(); d != nil && d.AsDuration() != 0 && d.AsDuration() < c.minIdle {
			c.addf(path+".request_timeout", "%s covers the time ext_proc waits on a cold load; set 0s (disabled) or at least %s", d.AsDuration(), c.minIdle)
		}
		if d := hcm.GetStreamIdleTimeout(); d != nil && d.AsDuration() != 0 && d.AsDuration() < c.minIdle {
			c.addf(path+".stream_idle_timeout", "%s: no stream events happen while a request waits on a cold load, so Envoy answers 408; set at least %s", d.AsDuration(), c.minIdle)
		}
		c.checkLocalReplies(path, hcm)
	}

	usesClusterHeader := false
	rc := hcm.GetRouteConfig()
	for vi, vh := range rc.GetVirtualHosts() {
		vpath := fmt.Sprintf("%s.route_config.virtual_hosts[%d](%s)", path, vi, vh.GetName())
		if inference {
			//lint:ignore SA1019 the deprecated limit is still honoured by Envoy.
			c.checkRouteBodyLimits(vpath, vh.GetRequestBodyBufferLimit(), vh.GetPerRequestBufferLimitBytes())
		}
		var first forwardRoute // the virtual host's first forwarding route
		for ri, r := range vh.GetRoutes() {
			rpath := fmt.Sprintf("%s.routes[%d]", vpath, ri)
			ra := r.GetRoute()
			if inference {
				c.checkRouteScope(rpath, hcm, vh, r, extProcNames, &first)
			} else if h := ra.GetClusterHeader(); h != "" {
				c.addf(rpath+".route.cluster_header", "takes its cluster from request header %q, but this connection manager has no ext_proc filter, so only the client sets it: any client could reach any cluster, a neuron's /models/load included", h)
			}
			if ra == nil {
				continue // redirect / direct_response: no upstream
			}
			if inference {
				//lint:ignore SA1019 the deprecated limit is still honoured by Envoy.
				c.checkRouteBodyLimits(rpath, r.GetRequestBodyBufferLimit(), r.GetPerRequestBufferLimitBytes())
			}
			switch spec := ra.GetClusterSpecifier().(type) {
			case *routev3.RouteAction_Cluster:
				c.routeCluster(rpath+".route.cluster", spec.Cluster)
			case *routev3.RouteAction_WeightedClusters:
				for wi, wc := range spec.WeightedClusters.GetClusters() {
					if wc.GetName() != "" {
						c.routeCluster(fmt.Sprintf("%s.route.weighted_clusters.clusters[%d].name", rpath, wi), wc.GetName())
					}
				}
			case *routev3.RouteAction_ClusterHeader:
				usesClusterHeader = true
				if want := c.settings.ClusterHeader; want != "" && !strings.EqualFold(spec.ClusterHeader, want) {
					c.addf(rpath+".route.cluster_header", "is %q but cortex-extproc sets %q (upstream.cluster_header): no request would find its cluster", spec.ClusterHeader, want)
				}
			}
			if inference {
				c.checkRouteTimeouts(rpath, ra, hcm.GetStreamIdleTimeout())
			}
		}
	}

	for _, ep := range extProcs {
		if usesClusterHeader && (ep.GetDisableClearRouteCache() || ep.GetRouteCacheAction() == extprocv3.ExternalProcessor_RETAIN) {
			c.addf(path+".http_filters", "ext_proc never clears the route cache (disable_clear_route_cache / route_cache_action: RETAIN) but a route takes its cluster from a header ext_proc sets: the route would be chosen before cortex-extproc answers")
		}
	}
	// An ORIGINAL_DST cluster that reads the destination from envoy.lb
	// metadata only sees it if ext_proc may write that namespace.
	for name, cl := range c.clusters {
		if cl.GetOriginalDstLbConfig().GetMetadataKey().GetKey() != "envoy.lb" {
			continue
		}
		for _, ep := range extProcs {
			if !slices.Contains(ep.GetMetadataOptions().GetReceivingNamespaces().GetUntyped(), "envoy.lb") {
				c.addf(path+".http_filters", "cluster %q reads the destination from envoy.lb metadata, but ext_proc's metadata_options.receiving_namespaces.untyped lacks \"envoy.lb\": Envoy drops it", name)
			}
		}
	}
	return len(extProcs)
}

// checkRouteScope enforces "only inference is routed" (routing.md) on one
// route of a connection manager that runs ext_proc: a route that forwards
// must match an inference path exactly, or GET /v1/models[/{id}], and run
// ext_proc; a route Envoy answers itself must switch ext_proc off, since
// the router (last in the chain) sends direct responses only after
// ext_proc has seen the request. first is the virtual host's first
// forwarding route, whose timeouts every later one must share.
func (c *checker) checkRouteScope(rpath string, hcm *hcmv3.HttpConnectionManager, vh *routev3.VirtualHost, r *routev3.Route, extProcNames []string, first *forwardRoute) {
	rc := hcm.GetRouteConfig()
	disabled := ""
	for _, name := range extProcNames {
		if extProcDisabled(name, rc, vh, r) {
			disabled = name
		}
	}
	ra := r.GetRoute()
	if ra == nil {
		if (r.GetDirectResponse() != nil || r.GetRedirect() != nil) && disabled == "" && len(extProcNames) > 0 {
			c.addf(rpath+".typed_per_filter_config", "the route answers itself (direct_response or redirect), but Envoy's router sends that answer only after ext_proc has run, so cortex-extproc still sees the request: add typed_per_filter_config {%s: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute, disabled: true}}", extProcNames[0])
		}
		return
	}
	if ok, what := forwardable(r.GetMatch()); !ok {
		c.addf(rpath+".match", "%s forwards to an upstream cluster, but only POST %s and GET %s, %s{id} may be routed: the neurons serve their management API (/models/load, /models/unload) on the same port; match each of those paths exactly (path: /v1/chat/completions, …) and answer everything else with a last route {match: {prefix: \"/\"}, direct_response: {status: 404, …}} (see envoy/envoy.yaml)",
			what, strings.Join(inferencePaths, ", "), modelsPath, modelsPrefix)
	} else if r.GetMatch().GetPrefix() == modelsPrefix && !hcm.GetNormalizePath().GetValue() {
		c.addf(rpath+".match", "prefix %q also matches %s../../models/load, which an upstream that resolves dot segments serves as its management API: set normalize_path: true on the HTTP connection manager", modelsPrefix, modelsPrefix)
	}
	if disabled != "" {
		c.addf(rpath+".typed_per_filter_config", "%s is disabled on a route that forwards: requests would reach the upstream without cortex-extproc choosing or checking them; only routes with a direct_response may switch ext_proc off", disabled)
	}
	if first.action == nil {
		*first = forwardRoute{rpath, ra}
		return
	}
	if f := first.action; !proto.Equal(f.GetTimeout(), ra.GetTimeout()) || !proto.Equal(f.GetIdleTimeout(), ra.GetIdleTimeout()) {
		c.addf(rpath+".route", "timeout %s / idle_timeout %s differ from %s (%s / %s): Envoy re-applies the matched route's timeouts when ext_proc clears the route cache; give every forwarding route the same ones (the shipped configs share one action, &neuron)",
			durString(ra.GetTimeout()), durString(ra.GetIdleTimeout()), first.rpath, durString(f.GetTimeout()), durString(f.GetIdleTimeout()))
	}
}

type forwardRoute struct {
	rpath  string
	action *routev3.RouteAction
}

func durString(d *durationpb.Duration) string {
	if d == nil {
		return "unset"
	}
	return d.AsDuration().String()
}

func (c *checker) checkExtProc(path string, ep *extprocv3.ExternalProcessor) {
	if ep.GetGrpcService() == nil {
		c.addf(path+".grpc_service", "unset: cortex-extproc is a gRPC server (http_service cannot carry request bodies)")
	} else if name := ep.GetGrpcService().GetEnvoyGrpc().GetClusterName(); name != "" {
		c.grpcCluster(path+".grpc_service.envoy_grpc.cluster_name", name, true)
	}
	if ep.GetFailureModeAllow() {
		c.addf(path+".failure_mode_allow", "must be false: with true, a timeout or error forwards the request unrewritten, and a client-sent x-cortex-cluster header would choose the upstream")
	}
	if ep.GetObservabilityMode() {
		c.addf(path+".observability_mode", "must be false: in observability mode Envoy ignores cortex-extproc's answers, so nothing is routed")
	}
	pm := ep.GetProcessingMode()
	if m := pm.GetRequestHeaderMode(); m != extprocv3.ProcessingMode_SEND && m != extprocv3.ProcessingMode_DEFAULT {
		c.addf(path+".processing_mode.request_header_mode", "is %s; must be SEND: cortex-extproc strips client routing headers and answers GET /v1/models at the headers phase", m)
	}
	if m := pm.GetRequestBodyMode(); m != extprocv3.ProcessingMode_BUFFERED {
		c.addf(path+".processing_mode.request_body_mode", "is %s; must be BUFFERED: cortex-extproc routes on the whole JSON body and re-routes in the body reply", m)
	}
	msg := durOr(ep.GetMessageTimeout(), defaultMessageTimeout)
	if ep.GetMessageTimeout() == nil {
		c.addf(path+".message_timeout", "unset: Envoy's default of 200ms answers 504 while cortex-extproc asks a neuron for its endpoint; set e.g. 30s")
	}
	maxMsg := durOr(ep.GetMaxMessageTimeout(), 0)
	switch {
	case maxMsg == 0:
		c.addf(path+".max_message_timeout", "is 0, which disables override_message_timeout: every request waiting on a cold load would get 504 after message_timeout (%s); set e.g. 3600s", msg)
	case maxMsg < msg:
		c.addf(path+".max_message_timeout", "%s is below message_timeout %s: cold-load waits cannot be extended", maxMsg, msg)
	case maxMsg < c.settings.MaxMessageTimeout:
		c.addf(path+".max_message_timeout", "%s is below cortex-extproc's extproc.max_message_timeout %s: Envoy ignores its longer overrides and answers 504 after message_timeout; set them equal", maxMsg, c.settings.MaxMessageTimeout)
	}
	if ep.GetDisableClearRouteCache() && ep.GetRouteCacheAction() != extprocv3.ExternalProcessor_DEFAULT {
		c.addf(path+".disable_clear_route_cache", "set together with route_cache_action %s: Envoy rejects this combination", ep.GetRouteCacheAction())
	}
	c.checkModeOverride(path, ep)
}

// checkModeOverride: an Anthropic Messages request sent to a neuron that
// speaks only OpenAI has its answer translated back, which needs that one
// request's response body streamed through cortex-extproc; it asks with a
// mode_override in its response-headers reply (extproc.TranslatedMode).
func (c *checker) checkModeOverride(path string, ep *extprocv3.ExternalProcessor) {
	want := extproc.TranslatedMode()
	switch {
	case !ep.GetAllowModeOverride():
		c.addf(path+".allow_mode_override", "must be true: cortex-extproc switches the response body of a translated Anthropic request to STREAMED; without it Anthropic clients get untranslated OpenAI answers. Add allowed_override_modes with exactly %s to allow nothing else", modeString(want))
	case ep.GetSendBodyWithoutWaitingForHeaderResponse():
		c.addf(path+".send_body_without_waiting_for_header_response", "must be false: Envoy then ignores every mode_override, and translated Anthropic answers stay untranslated")
	case len(ep.GetAllowedOverrideModes()) > 0 && !slices.ContainsFunc(ep.GetAllowedOverrideModes(), func(m *extprocv3.ProcessingMode) bool { return proto.Equal(m, want) }):
		c.addf(path+".allowed_override_modes", "does not list %s, the only mode cortex-extproc overrides to (a translated Anthropic answer); add it", modeString(want))
	}
	for i, m := range ep.GetAllowedOverrideModes() {
		if !proto.Equal(m, want) {
			c.addf(fmt.Sprintf("%s.allowed_override_modes[%d]", path, i), "allows %s, which cortex-extproc never asks for; list only %s", modeString(m), modeString(want))
		}
	}
}

func modeString(m *extprocv3.ProcessingMode) string {
	return fmt.Sprintf("{request_header_mode: %s, response_header_mode: %s, request_body_mode: %s, response_body_mode: %s, request_trailer_mode: %s, response_trailer_mode: %s}",
		m.GetRequestHeaderMode(), m.GetResponseHeaderMode(), m.GetRequestBodyMode(), m.GetResponseBodyMode(), m.GetRequestTrailerMode(), m.GetResponseTrailerMode())
}

// grpcCluster checks a static cluster that carries gRPC (ext_proc or ADS).
func (c *checker) grpcCluster(path, name string, extProc bool) {
	cl, ok := c.clusters[name]
	if !ok {
		c.addf(path, "names cluster %q, which is not among static_resources.clusters (the gRPC cluster must be static)", name)
		return
	}
	if !hasHTTP2(cl) {
		c.addf(path, "cluster %q speaks HTTP/1.1; gRPC needs typed_extension_protocol_options envoy.extensions.upstreams.http.v3.HttpProtocolOptions with explicit_http_config.http2_protocol_options", name)
	}
	if extProc {
		maxReq := uint32(defaultMaxRequests)
		for _, t := range cl.GetCircuitBreakers().GetThresholds() {
			if t.GetPriority() == corev3.RoutingPriority_DEFAULT && t.GetMaxRequests() != nil {
				maxReq = t.GetMaxRequests().GetValue()
			}
		}
		if maxReq <= defaultMaxRequests {
			c.addf(path, "cluster %q allows %d concurrent requests (circuit_breakers max_requests): every request waiting on a cold load holds one ext_proc stream; raise it (e.g. 100000)", name, maxReq)
		}
	}
}

func hasHTTP2(cl *clusterv3.Cluster) bool {
	//lint:ignore SA1019 the deprecated cluster-level field is still honoured by Envoy.
	if cl.GetHttp2ProtocolOptions() != nil {
		return true
	}
	a, ok := cl.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
	if !ok {
		return false
	}
	o, ok := unpack[*upstreamhttpv3.HttpProtocolOptions](a)
	if !ok {
		return false
	}
	return o.GetExplicitHttpConfig().GetHttp2ProtocolOptions() != nil
}

func (c *checker) routeCluster(path, name string) {
	if _, ok := c.clusters[name]; ok || c.cds {
		// With CDS a route may name a cluster delivered at run time.
		return
	}
	c.addf(path, "cluster %q is not defined in static_resources.clusters: Envoy would answer 503 (NC) for every request", name)
}

func (c *checker) checkRouteTimeouts(rpath string, ra *routev3.RouteAction, hcmIdle *durationpb.Duration) {
	switch t := ra.GetTimeout(); {
	case t == nil:
		c.addf(rpath+".route.timeout", "unset: Envoy's default of 15s cuts SSE streams and long completions; set timeout: 0s")
	case t.AsDuration() != 0 && t.AsDuration() < c.minIdle:
		c.addf(rpath+".route.timeout", "%s cuts SSE streams and long completions; set 0s (disabled)", t.AsDuration())
	}
	// Envoy applies the route's idle_timeout, else the HCM's, else 5 min.
	if it := ra.GetIdleTimeout(); it != nil {
		if d := it.AsDuration(); d != 0 && d < c.minIdle {
			c.addf(rpath+".route.idle_timeout", "%s: a request waiting silently on a cold load gets 408 (and SSE streams with long pauses are cut); set at least %s", d, c.minIdle)
		}
	} else if hcmIdle == nil {
		c.addf(rpath+".route.idle_timeout", "unset, and the HCM has no stream_idle_timeout: Envoy's default of %s answers 408 during a cold load; set at least %s", defaultStreamIdleTimeout, c.minIdle)
	}
}

func (c *checker) checkBodyLimit(path string, v uint64) {
	if maxBytes := c.settings.MaxRequestBytes; maxBytes > 0 && v > uint64(maxBytes) {
		c.addf(path, "%d bytes is more than cortex-extproc accepts (extproc.max_request_bytes %d): larger bodies get its 413, or a 500 past its gRPC message limit, instead of Envoy's clean 413; set both to the same value", v, maxBytes)
	}
}

// checkRouteBodyLimits checks the per-vhost/route body limits, which take
// precedence over the listener's (request_body_buffer_limit since 1.36).
func (c *checker) checkRouteBodyLimits(path string, rb *wrapperspb.UInt64Value, legacy *wrapperspb.UInt32Value) {
	if rb != nil {
		c.checkBodyLimit(path+".request_body_buffer_limit", rb.GetValue())
	}
	if legacy != nil {
		c.checkBodyLimit(path+".per_request_buffer_limit_bytes", uint64(legacy.GetValue()))
	}
}

func durOr(d *durationpb.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return d.AsDuration()
}

// unpack unmarshals a into T when a holds a T; anything else (including nil)
// is reported as not-a-T.
func unpack[T proto.Message](a *anypb.Any) (T, bool) {
	var zero T
	if a == nil {
		return zero, false
	}
	m, err := a.UnmarshalNew()
	if err != nil {
		return zero, false
	}
	t, ok := m.(T)
	return t, ok
}
