package envoy

import (
	"errors"
	"fmt"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// The only requests an Envoy in front of cortex-extproc may forward
// (routing.md, "Only inference is routed"): the neurons serve their
// management API (/models/load, /models/unload) on the inference port.
var inferencePaths = []string{
	"/v1/chat/completions",
	"/v1/completions",
	"/v1/responses",
	"/v1/embeddings",
	"/v1/images/generations",
	"/v1/messages",
}

const (
	// modelsPath and modelsPrefix (GET /v1/models, /v1/models/{id}) are
	// routed too: cortex-extproc answers them at the headers phase.
	modelsPath   = "/v1/models"
	modelsPrefix = "/v1/models/"
)

// InferencePaths are the paths Envoy may forward with POST, matched
// exactly; GET /v1/models and /v1/models/{id} are the only others.
func InferencePaths() []string { return append([]string(nil), inferencePaths...) }

// forwardable reports whether a route matching m may forward upstream,
// and if not, describes the match for the error.
func forwardable(m *routev3.RouteMatch) (ok bool, what string) {
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Path:
		for _, ip := range inferencePaths {
			if p.Path == ip {
				return true, ""
			}
		}
		return p.Path == modelsPath, fmt.Sprintf("path %q", p.Path)
	case *routev3.RouteMatch_Prefix:
		return p.Prefix == modelsPrefix, fmt.Sprintf("prefix %q", p.Prefix)
	case *routev3.RouteMatch_SafeRegex:
		return false, fmt.Sprintf("safe_regex %q", p.SafeRegex.GetRegex())
	case *routev3.RouteMatch_PathSeparatedPrefix:
		return false, fmt.Sprintf("path_separated_prefix %q", p.PathSeparatedPrefix)
	case nil:
		return false, "no path matcher"
	default:
		return false, fmt.Sprintf("%T", p)
	}
}

// extProcDisabled reports whether the ext_proc filter named filter is
// switched off for route r by typed_per_filter_config. As in Envoy, the
// most specific config (route, then virtual host, then route
// configuration) decides: a route-level ExtProcPerRoute with overrides
// re-enables what a virtual host disabled.
func extProcDisabled(filter string, rc *routev3.RouteConfiguration, vh *routev3.VirtualHost, r *routev3.Route) bool {
	for _, cfgs := range []map[string]*anypb.Any{r.GetTypedPerFilterConfig(), vh.GetTypedPerFilterConfig(), rc.GetTypedPerFilterConfig()} {
		a, ok := cfgs[filter]
		if !ok {
			continue
		}
		if fc, ok := unpack[*routev3.FilterConfig](a); ok {
			if fc.GetDisabled() {
				return true
			}
			a = fc.GetConfig()
		}
		if pr, ok := unpack[*extprocv3.ExtProcPerRoute](a); ok {
			return pr.GetDisabled()
		}
		return false
	}
	return false
}

// RouteTable is the inline route configuration of the HTTP connection
// manager that runs ext_proc, with what is needed to pick a route the way
// Envoy does for the matchers our configs use. It lets tests (and the e2e
// Envoy stand-in) answer "where does this request go?" from the shipped
// YAML itself.
type RouteTable struct {
	HCM *hcmv3.HttpConnectionManager
	// ExtProcFilter is the name of the ext_proc HTTP filter, the key of
	// its typed_per_filter_config.
	ExtProcFilter string
}

// InferenceRouteTable finds the first HTTP connection manager with an
// ext_proc filter and an inline route_config. It fails when a route or
// virtual host uses a matcher Match does not model, so that a model of
// Envoy built on it cannot silently diverge from the config.
func InferenceRouteTable(b *bootstrapv3.Bootstrap) (*RouteTable, error) {
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				hcm, ok := unpack[*hcmv3.HttpConnectionManager](f.GetTypedConfig())
				if !ok {
					continue
				}
				for _, hf := range hcm.GetHttpFilters() {
					if _, ok := unpack[*extprocv3.ExternalProcessor](hf.GetTypedConfig()); !ok {
						continue
					}
					if hcm.GetRouteConfig() == nil {
						return nil, errors.New("the HTTP connection manager with ext_proc has no inline route_config")
					}
					t := &RouteTable{HCM: hcm, ExtProcFilter: hf.GetName()}
					return t, t.modelled()
				}
			}
		}
	}
	return nil, errors.New("no HTTP connection manager with an ext_proc filter")
}

func (t *RouteTable) modelled() error {
	var errs []error
	for _, vh := range t.HCM.GetRouteConfig().GetVirtualHosts() {
		for _, d := range vh.GetDomains() {
			if d != "*" && strings.Contains(d, "*") {
				errs = append(errs, fmt.Errorf("virtual host %s: domain pattern %q is not modelled", vh.GetName(), d))
			}
		}
		for i, r := range vh.GetRoutes() {
			m := r.GetMatch()
			switch m.GetPathSpecifier().(type) {
			case *routev3.RouteMatch_Path, *routev3.RouteMatch_Prefix:
			default:
				errs = append(errs, fmt.Errorf("%s routes[%d]: path matcher %T is not modelled", vh.GetName(), i, m.GetPathSpecifier()))
			}
			if len(m.GetQueryParameters()) > 0 || m.GetGrpc() != nil || m.GetRuntimeFraction() != nil ||
				m.GetTlsContext() != nil || len(m.GetDynamicMetadata()) > 0 || len(m.GetFilterState()) > 0 {
				errs = append(errs, fmt.Errorf("%s routes[%d]: only path, prefix, case_sensitive and headers matching is modelled", vh.GetName(), i))
			}
			for _, h := range m.GetHeaders() {
				if h.GetInvertMatch() || h.GetTreatMissingHeaderAsEmpty() {
					errs = append(errs, fmt.Errorf("%s routes[%d]: header %s: invert_match and treat_missing_header_as_empty are not modelled", vh.GetName(), i, h.GetName()))
				}
				switch h.GetHeaderMatchSpecifier().(type) {
				case *routev3.HeaderMatcher_StringMatch:
					if h.GetStringMatch().GetExact() == "" {
						errs = append(errs, fmt.Errorf("%s routes[%d]: header %s: only string_match.exact is modelled", vh.GetName(), i, h.GetName()))
					}
				case *routev3.HeaderMatcher_PresentMatch:
				default:
					errs = append(errs, fmt.Errorf("%s routes[%d]: header %s: matcher %T is not modelled", vh.GetName(), i, h.GetName(), h.GetHeaderMatchSpecifier()))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// NormalizePath is what the connection manager does to :path before
// routing: with normalize_path, "." and ".." segments are resolved (RFC
// 3986 5.2.4), "%2e" counting as "."; the query is kept. Envoy's
// normalization does more (decoding other unreserved characters,
// backslashes); this is the part that matters for prefixes.
func (t *RouteTable) NormalizePath(p string) string {
	if !t.HCM.GetNormalizePath().GetValue() {
		return p
	}
	path, query, hasQuery := strings.Cut(p, "?")
	path = strings.NewReplacer("%2e", ".", "%2E", ".").Replace(path)
	var out []string
	segs := strings.Split(path, "/")
	for i, s := range segs {
		last := i == len(segs)-1
		switch s {
		case ".":
			if last {
				out = append(out, "")
			}
		case "..":
			if len(out) > 1 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, s)
		}
	}
	path = strings.Join(out, "/")
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	if hasQuery {
		return path + "?" + query
	}
	return path
}

// Match returns the route Envoy picks for a request (nil if none) and
// whether ext_proc runs for it. headers holds the request headers by
// lower-case name, pseudo-headers (":path", ":method", ":authority")
// included; ":path" should already be normalized (NormalizePath).
func (t *RouteTable) Match(headers map[string]string) (r *routev3.Route, extProc bool) {
	rc := t.HCM.GetRouteConfig()
	vh := t.virtualHost(headers[":authority"])
	if vh == nil {
		return nil, true
	}
	for _, r := range vh.GetRoutes() {
		if routeMatches(r.GetMatch(), headers) {
			return r, !extProcDisabled(t.ExtProcFilter, rc, vh, r)
		}
	}
	return nil, true
}

func (t *RouteTable) virtualHost(authority string) *routev3.VirtualHost {
	host := strings.ToLower(authority)
	var wildcard *routev3.VirtualHost
	for _, vh := range t.HCM.GetRouteConfig().GetVirtualHosts() {
		for _, d := range vh.GetDomains() {
			switch d = strings.ToLower(d); {
			case d == "*":
				if wildcard == nil {
					wildcard = vh
				}
			case d == host:
				return vh
			}
		}
	}
	return wildcard
}

func routeMatches(m *routev3.RouteMatch, headers map[string]string) bool {
	path, _, _ := strings.Cut(headers[":path"], "?") // exact path matches ignore the query
	caseSensitive := m.GetCaseSensitive() == nil || m.GetCaseSensitive().GetValue()
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Path:
		if caseSensitive && path != p.Path || !caseSensitive && !strings.EqualFold(path, p.Path) {
			return false
		}
	case *routev3.RouteMatch_Prefix:
		full := headers[":path"]
		if caseSensitive && !strings.HasPrefix(full, p.Prefix) ||
			!caseSensitive && !(len(full) >= len(p.Prefix) && strings.EqualFold(full[:len(p.Prefix)], p.Prefix)) {
			return false
		}
	default:
		return false
	}
	for _, h := range m.GetHeaders() {
		v, present := headers[strings.ToLower(h.GetName())]
		var ok bool
		switch h.GetHeaderMatchSpecifier().(type) {
		case *routev3.HeaderMatcher_PresentMatch:
			ok = present == h.GetPresentMatch()
		case *routev3.HeaderMatcher_StringMatch:
			sm := h.GetStringMatch()
			if sm.GetIgnoreCase() {
				ok = present && strings.EqualFold(v, sm.GetExact())
			} else {
				ok = present && v == sm.GetExact()
			}
		}
		if !ok {
			return false
		}
	}
	return true
}
