package e2e

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/envoy"
)

// envoyLite is an http.Handler that stands in for Envoy configured as
// envoy/envoy.yaml configures it: an HTTP connection manager with the
// ext_proc filter (request headers SEND, request body BUFFERED, response
// headers SEND, response body NONE, failure_mode_allow false) in front of
// envoy.yaml's own route table, parsed from the file (envoy.RouteTable):
// the inference paths and GET /v1/models[/{id}] go through ext_proc to
// the cluster named in `x-cortex-cluster`; every other request gets the
// table's direct_response 404, without an ext_proc stream (ext_proc is
// disabled on that route) and without touching any upstream.
//
// Every reply it makes itself (a local reply: 503 NC or UF, 413, the 504
// of the message timer, ext_proc's immediate responses) is rewritten by
// the config's local_reply_config (envoy.LocalReplies) before any filter
// sees it, as Envoy does. The router's local replies then end the ext_proc
// stream without response headers, as Envoy 1.34 and later do
// (skip_ext_proc_on_local_reply), or go through ext_proc's response path
// like an upstream's answer, as older Envoys do (LocalRepliesToExtProc).
//
// It follows shared/docs/envoy-ext-proc.md strictly, so that a protocol
// mistake in cortex-extproc fails a test here the way it would fail in
// production: one gRPC stream per request, one reply per message, replies
// of the wrong type are spurious (500), header values only from raw_value
// (both set: 500; value only: empty header), the content-length check
// after a body mutation (500), clear_route_cache honoured only next to a
// header_mutation, the route cached at header time, a per-message timer
// (504 with an empty body) that one standalone override_message_timeout
// may restart. Mistakes Envoy tolerates silently (a second override, an
// ignored clear_route_cache, a disallowed header mutation, a message after
// the last expected reply) are recorded as problems in the access log, for
// tests to fail on.
type envoyLite struct {
	conn     *grpc.ClientConn
	ep       extprocv3.ExternalProcessorClient
	clusters map[string]string // Envoy cluster name → upstream base URL
	upstream *http.Client
	routes   *envoy.RouteTable
	// filter is envoy.yaml's ext_proc filter config: allow_mode_override
	// and allowed_override_modes decide whether a mode_override counts.
	filter *filterv3.ExternalProcessor
	// localReplies is the HCM's local_reply_config: every local reply is
	// rewritten by it before any filter sees it.
	localReplies *envoy.LocalReplies
	// localRepliesToExtProc: the router's local replies go through
	// ext_proc's response path (Envoy before 1.34); otherwise the stream
	// ends without response headers (envoyLiteConfig.LocalRepliesToExtProc).
	localRepliesToExtProc bool

	messageTimeout     time.Duration
	maxMessageTimeout  time.Duration
	bufferLimit        int
	remoteCloseTimeout time.Duration

	mu  sync.Mutex
	log []*accessEntry
	bg  sync.WaitGroup // stream closers still waiting for the server
}

// envoyLiteConfig mirrors the parts of envoy.yaml envoyLite implements.
type envoyLiteConfig struct {
	ExtProcAddr string
	// Clusters maps Envoy cluster names (neuron-beast) to base URLs.
	Clusters map[string]string
	// Zero values take envoy.yaml's settings.
	MessageTimeout    time.Duration // 30s
	MaxMessageTimeout time.Duration // 1h
	BufferLimit       int           // 32 MiB
	// EnvoyConfig is the bootstrap whose route table envoyLite applies;
	// empty: envoyYAML.
	EnvoyConfig string
	// LocalRepliesToExtProc models an Envoy that sends its router's local
	// replies (503 UF, NC, …) through ext_proc's response path: before
	// 1.34 (1.30.10, 1.31.6, 1.32.4, 1.33.1), or with the runtime guard
	// envoy.reloadable_features.skip_ext_proc_on_local_reply false. False,
	// the default, is the shipped image (v1.36): ext_proc's side stream
	// ends without response headers and the client gets the reply.
	LocalRepliesToExtProc bool
}

// envoyYAML is the config envoyLite stands in for.
const envoyYAML = "../envoy/envoy.yaml"

// loadRouteTable parses the route table, the ext_proc filter config and
// the local reply mappers of an Envoy bootstrap file.
func loadRouteTable(path string) (*envoy.RouteTable, *filterv3.ExternalProcessor, *envoy.LocalReplies, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("envoylite: %w", err)
	}
	b, err := envoy.ParseBootstrapYAML(data)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("envoylite: %s: %w", path, err)
	}
	rt, err := envoy.InferenceRouteTable(b)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("envoylite: %s: %w", path, err)
	}
	lr, err := envoy.NewLocalReplies(rt.HCM.GetLocalReplyConfig())
	if err != nil {
		return nil, nil, nil, fmt.Errorf("envoylite: %s: local_reply_config: %w", path, err)
	}
	return rt, extProcFilter(b), lr, nil
}

// extProcFilter finds the first ext_proc filter config in b (nil if none).
func extProcFilter(b *bootstrapv3.Bootstrap) *filterv3.ExternalProcessor {
	for _, l := range b.GetStaticResources().GetListeners() {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				hcm := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().UnmarshalTo(hcm) != nil {
					continue
				}
				for _, hf := range hcm.GetHttpFilters() {
					ep := &filterv3.ExternalProcessor{}
					if hf.GetTypedConfig().UnmarshalTo(ep) == nil {
						return ep
					}
				}
			}
		}
	}
	return nil
}

// modeOverrideAllowed is ext_proc.cc's rule for a mode_override in a reply
// to a headers message: allow_mode_override on, and the mode in
// allowed_override_modes when that list is set (header modes there are
// not compared; body modes are taken literally).
func (e *envoyLite) modeOverrideAllowed(m *filterv3.ProcessingMode) (bool, string) {
	f := e.filter
	if !f.GetAllowModeOverride() {
		return false, "allow_mode_override is off"
	}
	if f.GetSendBodyWithoutWaitingForHeaderResponse() {
		return false, "send_body_without_waiting_for_header_response is on"
	}
	allowed := f.GetAllowedOverrideModes()
	if len(allowed) == 0 {
		return true, ""
	}
	for _, a := range allowed {
		if a.GetRequestBodyMode() == m.GetRequestBodyMode() && a.GetResponseBodyMode() == m.GetResponseBodyMode() &&
			a.GetRequestTrailerMode() == m.GetRequestTrailerMode() && a.GetResponseTrailerMode() == m.GetResponseTrailerMode() &&
			a.GetResponseHeaderMode() == m.GetResponseHeaderMode() {
			return true, ""
		}
	}
	return false, "the mode is not in allowed_override_modes"
}

func newEnvoyLite(cfg envoyLiteConfig) (*envoyLite, error) {
	if cfg.EnvoyConfig == "" {
		cfg.EnvoyConfig = envoyYAML
	}
	routes, filter, localReplies, err := loadRouteTable(cfg.EnvoyConfig)
	if err != nil {
		return nil, err
	}
	// Envoy accepts replies of any size (EnvoyGrpc max_receive_message_length
	// 0); grpc-go's client default would cap the rewritten body at 4 MiB.
	conn, err := grpc.NewClient(cfg.ExtProcAddr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32)))
	if err != nil {
		return nil, fmt.Errorf("envoylite: ext_proc client for %s: %w", cfg.ExtProcAddr, err)
	}
	e := &envoyLite{
		conn:     conn,
		ep:       extprocv3.NewExternalProcessorClient(conn),
		clusters: cfg.Clusters,
		upstream: &http.Client{
			Transport: &http.Transport{Proxy: nil, DisableCompression: true, MaxIdleConnsPerHost: 16},
			// Envoy's router does not follow redirects.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		routes:                routes,
		filter:                filter,
		localReplies:          localReplies,
		localRepliesToExtProc: cfg.LocalRepliesToExtProc,
		messageTimeout:        cfg.MessageTimeout,
		maxMessageTimeout:     cfg.MaxMessageTimeout,
		bufferLimit:           cfg.BufferLimit,
		remoteCloseTimeout:    time.Second,
	}
	if e.messageTimeout <= 0 {
		e.messageTimeout = 30 * time.Second
	}
	if e.maxMessageTimeout <= 0 {
		e.maxMessageTimeout = time.Hour
	}
	if e.bufferLimit <= 0 {
		e.bufferLimit = 32 << 20
	}
	return e, nil
}

// Close waits for stream closers and closes the gRPC connection.
func (e *envoyLite) Close() error {
	e.bg.Wait()
	e.upstream.CloseIdleConnections()
	return e.conn.Close()
}

// accessEntry is one request as Envoy's access log would show it, plus
// what envoyLite observed of the ext_proc exchange.
type accessEntry struct {
	RequestID string
	Method    string
	Path      string
	Status    int
	// Details is %RESPONSE_CODE_DETAILS%: via_upstream, cluster_not_found,
	// the immediate response's details, ext_proc errors.
	Details string
	Flags   string // %RESPONSE_FLAGS%: NC, UF
	Cluster string // %UPSTREAM_CLUSTER%
	// Metadata is the dynamic metadata namespace "cortex"
	// (metadata_options.receiving_namespaces in envoy.yaml).
	Metadata map[string]any
	// Sent lists the ext_proc messages sent, in order.
	Sent []string
	// Overrides counts accepted override_message_timeout messages.
	Overrides int
	// Problems are protocol mistakes Envoy would tolerate silently.
	Problems []string
	// request is the request headers as they stand (ext_proc's mutations
	// applied): what local_reply_config's header filters see.
	request headerList
}

func (e *envoyLite) newEntry(method, path string) *accessEntry {
	ent := &accessEntry{Method: method, Path: path}
	e.mu.Lock()
	e.log = append(e.log, ent)
	e.mu.Unlock()
	return ent
}

func (e *envoyLite) update(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f()
}

func (e *envoyLite) problem(ent *accessEntry, format string, args ...any) {
	e.update(func() { ent.Problems = append(ent.Problems, fmt.Sprintf(format, args...)) })
}

// Entries returns a copy of the access log.
func (e *envoyLite) Entries() []accessEntry {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make([]accessEntry, len(e.log))
	for i, ent := range e.log {
		out[i] = *ent
		out[i].Sent = append([]string(nil), ent.Sent...)
		out[i].Problems = append([]string(nil), ent.Problems...)
	}
	return out
}

// Entry returns the access log entry of the request with this x-request-id.
func (e *envoyLite) Entry(requestID string) (accessEntry, bool) {
	for _, ent := range e.Entries() {
		if ent.RequestID == requestID {
			return ent, true
		}
	}
	return accessEntry{}, false
}

// localReply is a response Envoy generates itself.
type localReply struct {
	status  int
	details string
	flags   string
	body    string
	headers headerList // applied over the defaults (immediate responses)
	// router: sent by the router filter (direct_response, NR, NC, UF), so
	// it still passes through ext_proc's response path; ext_proc's own
	// immediate responses and errors end processing first.
	router bool
	// clientGone: nothing can be written; the HTTP request is over.
	clientGone bool
}

// matched is the route the HCM picked and what it resolved with it.
type matched struct {
	route *routev3.Route // nil: no route matched (404 NR)
	// extProc: ext_proc runs for this request (it is not disabled by the
	// route's typed_per_filter_config). Envoy decides this once, on the
	// route matched at header time.
	extProc bool
	// cluster: a cluster_header route's cluster is read from the request
	// headers when the route is matched, not when the router runs.
	cluster string
}

// match picks the route for the request headers as Envoy's HCM does:
// envoy.yaml's route table, first route whose match applies.
func (e *envoyLite) match(hs headerList) matched {
	m := matched{}
	m.route, m.extProc = e.routes.Match(hs.routeHeaders())
	if ra := m.route.GetRoute(); ra != nil {
		if h := ra.GetClusterHeader(); h != "" {
			m.cluster, _ = hs.get(strings.ToLower(h))
		} else {
			m.cluster = ra.GetCluster()
		}
	}
	return m
}

func (e *envoyLite) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ent := e.newEntry(r.Method, r.URL.RequestURI())
	hs := downstreamHeaders(r)
	reqID, _ := hs.get("x-request-id")
	e.update(func() { ent.RequestID = reqID })
	// normalize_path: the HCM rewrites :path before routing and filters.
	hs.set(":path", e.routes.NormalizePath(hs.first(":path")))
	e.setRequest(ent, hs)

	// The HCM matches the route when the headers arrive, before any filter
	// runs, and caches it: with cluster_header the cluster is taken from
	// the client's headers now. Only a honoured clear_route_cache makes the
	// router look again.
	m := e.match(hs)
	if !m.extProc {
		// ExtProcPerRoute disabled (envoy.yaml's 404 routes): no ext_proc
		// stream at all, and nothing buffers the body. A direct response
		// does not read it.
		var body []byte
		if m.route.GetRoute() != nil {
			var err error
			if body, err = io.ReadAll(r.Body); err != nil {
				e.finish(w, ent, nil, &localReply{status: 400, details: "downstream_body_read_error", body: "Bad Request"})
				return
			}
		}
		e.router(w, r, ent, nil, m, hs, body)
		return
	}

	// BUFFERED: Envoy holds the whole body; above the buffer limit the
	// client gets 413 and ext_proc never sees the body. envoyLite buffers
	// before sending the headers message (Envoy buffers while the headers
	// reply is pending); the server cannot tell, and the body message still
	// goes out only after the headers reply, so a server that waits for the
	// body before answering the headers times out here as behind Envoy.
	body, err := io.ReadAll(io.LimitReader(r.Body, int64(e.bufferLimit)+1))
	if err != nil {
		e.finish(w, ent, nil, &localReply{status: 400, details: "downstream_body_read_error", body: "Bad Request"})
		return
	}
	if len(body) > e.bufferLimit {
		e.finish(w, ent, nil, &localReply{status: 413, details: "request_payload_too_large", body: "Payload Too Large"})
		return
	}
	noBody := r.ContentLength == 0

	st := e.openStream(r.Context(), ent)
	defer st.close()

	// request_headers, with protocol_config on the first message.
	resp, fail := st.exchange("request_headers", &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: hs.proto(), EndOfStream: noBody}},
		ProtocolConfig: &extprocv3.ProtocolConfiguration{
			RequestBodyMode:  filterv3.ProcessingMode_BUFFERED,
			ResponseBodyMode: filterv3.ProcessingMode_NONE,
		},
	})
	cleared := false
	if fail == nil && resp != nil {
		switch rr := resp.GetResponse().(type) {
		case *extprocv3.ProcessingResponse_ImmediateResponse:
			e.finish(w, ent, st, st.immediate(rr.ImmediateResponse))
			return
		case *extprocv3.ProcessingResponse_RequestHeaders:
			var c bool
			c, fail = st.applyRequestCommon(rr.RequestHeaders.GetResponse(), &hs, nil, "request_headers")
			cleared = cleared || c
			e.setRequest(ent, hs)
		default:
			fail = st.spurious("request_headers", resp)
		}
	}
	if fail != nil {
		e.finish(w, ent, st, fail)
		return
	}

	// request_body: the one buffered body message, only after the headers reply.
	if !noBody && st.active {
		resp, fail = st.exchange("request_body", &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}},
		})
		if fail == nil && resp != nil {
			switch rr := resp.GetResponse().(type) {
			case *extprocv3.ProcessingResponse_ImmediateResponse:
				e.finish(w, ent, st, st.immediate(rr.ImmediateResponse))
				return
			case *extprocv3.ProcessingResponse_RequestBody:
				var c bool
				c, fail = st.applyRequestCommon(rr.RequestBody.GetResponse(), &hs, &body, "request_body")
				cleared = cleared || c
				e.setRequest(ent, hs)
			default:
				fail = st.spurious("request_body", resp)
			}
		}
		if fail != nil {
			e.finish(w, ent, st, fail)
			return
		}
	}

	if cleared {
		// Matched afresh with the mutated headers; ext_proc's per-route
		// config stays what it was at header time.
		again := e.match(hs)
		m.route, m.cluster = again.route, again.cluster
	}
	e.router(w, r, ent, st, m, hs, body)
}

// router is Envoy's router filter, last in the chain: it answers a
// direct_response route itself, or forwards to the route's cluster.
func (e *envoyLite) router(w http.ResponseWriter, r *http.Request, ent *accessEntry, st *extprocStream, m matched, hs headerList, body []byte) {
	switch {
	case m.route == nil:
		e.finish(w, ent, st, &localReply{status: 404, details: "route_not_found", flags: "NR", router: true})
		return
	case m.route.GetDirectResponse() != nil:
		dr := m.route.GetDirectResponse()
		lr := &localReply{status: int(dr.GetStatus()), details: "direct_response", body: dr.GetBody().GetInlineString(), router: true}
		// Route-level response_headers_to_add, applied before Envoy
		// defaults content-type to text/plain (prepareLocalReply).
		for _, o := range m.route.GetResponseHeadersToAdd() {
			k, v := strings.ToLower(o.GetHeader().GetKey()), o.GetHeader().GetValue()
			if o.GetAppendAction() == corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
				lr.headers = append(lr.headers, header{k, v})
			} else {
				lr.headers.set(k, v)
			}
		}
		e.finish(w, ent, st, lr)
		return
	case m.route.GetRoute() == nil:
		e.finish(w, ent, st, &localReply{status: 500, details: "envoylite_unmodelled_route_action", body: fmt.Sprintf("envoylite does not model route %v", m.route), router: true})
		return
	}
	routeCluster := m.cluster
	e.update(func() { ent.Cluster = routeCluster })
	base, ok := e.clusters[routeCluster]
	if !ok {
		e.finish(w, ent, st, &localReply{status: 503, details: "cluster_not_found", flags: "NC", router: true})
		return
	}
	up, err := e.forward(r.Context(), base, hs, body)
	if err != nil {
		if r.Context().Err() != nil {
			e.finish(w, ent, st, &localReply{clientGone: true, details: "downstream_remote_disconnect"})
			return
		}
		e.finish(w, ent, st, &localReply{status: 503, flags: "UF", router: true,
			details: "upstream_reset_before_response_started{connection_failure}",
			body:    "upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: " + err.Error()})
		return
	}
	e.respond(w, ent, st, up)
}

// downstreamHeaders is what the HCM hands the filter chain: lower-case
// keys, the pseudo-headers, hop-by-hop headers gone, an x-request-id.
func downstreamHeaders(r *http.Request) headerList {
	hs := headerList{
		{":authority", r.Host},
		{":path", r.URL.RequestURI()},
		{":method", r.Method},
		{":scheme", "http"},
	}
	hop := hopByHop(r.Header)
	for k, vs := range r.Header {
		lk := strings.ToLower(k)
		if hop[lk] {
			continue
		}
		for _, v := range vs {
			hs = append(hs, header{lk, v})
		}
	}
	if _, ok := hs.get("content-length"); !ok && r.ContentLength > 0 {
		hs = append(hs, header{"content-length", strconv.FormatInt(r.ContentLength, 10)})
	}
	if _, ok := hs.get("x-request-id"); !ok {
		hs = append(hs, header{"x-request-id", newUUID()})
	}
	return hs
}

func hopByHop(h http.Header) map[string]bool {
	hop := map[string]bool{"connection": true, "keep-alive": true, "proxy-connection": true,
		"transfer-encoding": true, "upgrade": true, "te": true, "host": true}
	for _, v := range h.Values("Connection") {
		for _, f := range strings.Split(v, ",") {
			hop[strings.ToLower(strings.TrimSpace(f))] = true
		}
	}
	return hop
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// forward sends the request to the upstream cluster as Envoy's router
// would: the (mutated) headers and body, HTTP/1.1, chunked when the
// content-length header is gone.
func (e *envoyLite) forward(ctx context.Context, base string, hs headerList, body []byte) (*http.Response, error) {
	method, _ := hs.get(":method")
	path, _ := hs.get(":path")
	authority, _ := hs.get(":authority")
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimSuffix(base, "/")+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Host = authority
	req.ContentLength = -1
	if len(body) == 0 {
		req.Body, req.ContentLength = http.NoBody, 0
	}
	for _, h := range hs {
		switch {
		case strings.HasPrefix(h.k, ":"):
		case h.k == "content-length":
			n, err := strconv.ParseInt(h.v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("invalid content-length %q", h.v)
			}
			req.ContentLength = n
		default:
			req.Header.Add(h.k, h.v)
		}
	}
	req.Header.Set("x-forwarded-proto", "http")
	return e.upstream.Do(req)
}

// respond runs the response headers through ext_proc and streams the
// upstream body to the client, flushing every chunk (SSE).
func (e *envoyLite) respond(w http.ResponseWriter, ent *accessEntry, st *extprocStream, up *http.Response) {
	defer up.Body.Close()
	rh := headerList{{":status", strconv.Itoa(up.StatusCode)}}
	hop := hopByHop(up.Header)
	for k, vs := range up.Header {
		lk := strings.ToLower(k)
		if hop[lk] {
			continue
		}
		for _, v := range vs {
			rh = append(rh, header{lk, v})
		}
	}
	if st.active {
		resp, fail := st.exchange("response_headers", &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
				Headers: rh.proto(), EndOfStream: up.ContentLength == 0}},
		})
		if fail == nil && resp != nil {
			switch rr := resp.GetResponse().(type) {
			case *extprocv3.ProcessingResponse_ImmediateResponse:
				fail = st.immediate(rr.ImmediateResponse)
			case *extprocv3.ProcessingResponse_ResponseHeaders:
				fail = st.applyResponseCommon(rr.ResponseHeaders.GetResponse(), &rh)
			default:
				fail = st.spurious("response_headers", resp)
			}
		}
		if fail != nil {
			e.finish(w, ent, nil, fail)
			return
		}
	}
	streamed := st.active && st.responseBodyMode == filterv3.ProcessingMode_STREAMED
	if streamed {
		// STREAMED: the headers go on without content-length; every body
		// chunk then goes through ext_proc, one reply each, in order.
		rh.del("content-length")
	} else {
		if st.active {
			st.finished()
		}
		// Response body mode NONE: nothing more for ext_proc. Envoy closes
		// the stream now, long before an SSE body ends.
		st.close()
	}
	code, _ := strconv.Atoi(rh.first(":status"))
	for _, h := range rh {
		if !strings.HasPrefix(h.k, ":") {
			w.Header().Add(h.k, h.v)
		}
	}
	e.update(func() { ent.Status, ent.Details = code, "via_upstream" })
	w.WriteHeader(code)
	rc := http.NewResponseController(w)
	buf := make([]byte, 32<<10)
	for {
		n, err := up.Body.Read(buf)
		chunk, end := buf[:n], err != nil
		if streamed && (n > 0 || end) {
			var ok bool
			if chunk, ok = st.responseBody(chunk, end); !ok {
				// Headers are gone: Envoy can only reset the stream.
				e.update(func() { ent.Details = "ext_proc_error_response_body" })
				st.close()
				panic(http.ErrAbortHandler)
			}
		}
		if len(chunk) > 0 {
			if _, werr := w.Write(chunk); werr != nil {
				st.close()
				return
			}
			_ = rc.Flush()
		}
		if end {
			if streamed {
				st.finished()
				st.close()
			}
			return
		}
	}
}

// responseBody sends one response body chunk in STREAMED mode and returns
// what goes to the client instead: the chunk as the reply's body_mutation
// leaves it. false: no usable reply (timeout, error, wrong type).
func (st *extprocStream) responseBody(chunk []byte, end bool) ([]byte, bool) {
	resp, fail := st.exchange("response_body", &extprocv3.ProcessingRequest{
		Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: bytes.Clone(chunk), EndOfStream: end}},
	})
	if fail != nil || resp == nil {
		return nil, false
	}
	rb, ok := resp.GetResponse().(*extprocv3.ProcessingResponse_ResponseBody)
	if !ok {
		st.spurious("response_body", resp)
		return nil, false
	}
	c := rb.ResponseBody.GetResponse()
	if c.GetHeaderMutation() != nil {
		st.e.problem(st.ent, "header_mutation in a response_body reply in STREAMED mode: the headers are already sent, Envoy ignores it")
	}
	switch m := c.GetBodyMutation().GetMutation().(type) {
	case nil:
		return chunk, true
	case *extprocv3.BodyMutation_Body:
		return m.Body, true
	case *extprocv3.BodyMutation_ClearBody:
		return nil, true
	default:
		st.e.problem(st.ent, "body_mutation %T is only for FULL_DUPLEX_STREAMED: Envoy ignores it in STREAMED", m)
		return chunk, true
	}
}

// finish answers with a local reply. The router's replies (direct
// responses, 404 NR, 503 NC, UF) still pass through the ext_proc filter's
// response path; ext_proc's immediate responses and its errors end
// processing first.
func (e *envoyLite) finish(w http.ResponseWriter, ent *accessEntry, st *extprocStream, lr *localReply) {
	if lr.clientGone {
		e.update(func() { ent.Details = lr.details })
		return
	}
	// local_reply_config rewrites the reply before any encoder filter
	// sees it (FilterManager::sendLocalReplyViaFilterChain).
	lr = e.rewrite(ent, lr)
	if st != nil && st.active && lr.router {
		if !e.localRepliesToExtProc {
			// Envoy ≥ 1.34 (skip_ext_proc_on_local_reply): ext_proc does
			// not process local replies; its stream ends here without
			// response headers, and the client gets the reply.
			st.finished()
			st.close()
			e.writeLocal(w, ent, lr)
			return
		}
		// Before 1.34 the router's reply runs the encoder filter chain,
		// ext_proc included: its headers are Envoy's own (no date, which
		// the HCM adds after the filters).
		rh := headerList{{":status", strconv.Itoa(lr.status)}, {"content-length", strconv.Itoa(len(lr.body))}}
		if ct, ok := lr.headers.get("content-type"); ok {
			rh = append(rh, header{"content-type", ct})
		} else if lr.body != "" {
			rh = append(rh, header{"content-type", "text/plain"})
		}
		for _, h := range lr.headers {
			if h.k != "content-type" {
				rh = append(rh, h)
			}
		}
		resp, fail := st.exchange("response_headers", &extprocv3.ProcessingRequest{
			Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
				Headers: rh.proto(), EndOfStream: lr.body == ""}},
		})
		if fail == nil && resp != nil {
			switch rr := resp.GetResponse().(type) {
			case *extprocv3.ProcessingResponse_ImmediateResponse:
				fail = st.immediate(rr.ImmediateResponse)
			case *extprocv3.ProcessingResponse_ResponseHeaders:
				fail = st.applyResponseCommon(rr.ResponseHeaders.GetResponse(), &rh)
			default:
				fail = st.spurious("response_headers", resp)
			}
		}
		if fail != nil {
			lr = e.rewrite(ent, fail)
		} else {
			st.finished()
			lr.headers = rh
		}
	}
	e.writeLocal(w, ent, lr)
}

// setRequest records the request headers as they stand, for the local
// reply mappers' header filters.
func (e *envoyLite) setRequest(ent *accessEntry, hs headerList) {
	c := slices.Clone(hs)
	e.update(func() { ent.request = c })
}

// rewrite applies local_reply_config (envoy.LocalReplies) to a local
// reply: status, body, content type and the mapper's headers.
func (e *envoyLite) rewrite(ent *accessEntry, lr *localReply) *localReply {
	var req map[string]string
	e.update(func() { req = ent.request.routeHeaders() })
	var flags []string
	if lr.flags != "" {
		flags = strings.Split(lr.flags, ",")
	}
	ct, _ := lr.headers.get("content-type")
	got := e.localReplies.Rewrite(envoy.LocalReply{Status: lr.status, Flags: flags, Details: lr.details, Body: lr.body, ContentType: ct, Request: req})
	if got.Mapper < 0 {
		return lr
	}
	out := *lr
	out.status, out.body = got.Status, got.Body
	out.headers = slices.Clone(lr.headers)
	if got.ContentType != "" {
		out.headers.set("content-type", got.ContentType)
	}
	for _, h := range got.Headers {
		out.headers.set(h[0], h[1])
	}
	return &out
}

// writeLocal writes a local reply: content-length from the body,
// content-type text/plain unless the reply's headers set one.
func (e *envoyLite) writeLocal(w http.ResponseWriter, ent *accessEntry, lr *localReply) {
	if lr.clientGone {
		e.update(func() { ent.Details = lr.details })
		return
	}
	code := lr.status
	if code < 200 {
		code = 200
	}
	for _, h := range lr.headers {
		if !strings.HasPrefix(h.k, ":") && h.k != "content-length" {
			w.Header().Add(h.k, h.v)
		}
	}
	if lr.body != "" && w.Header().Get("content-type") == "" {
		w.Header().Set("content-type", "text/plain")
	}
	w.Header().Set("content-length", strconv.Itoa(len(lr.body)))
	e.update(func() { ent.Status, ent.Details, ent.Flags = code, lr.details, lr.flags })
	w.WriteHeader(code)
	_, _ = io.WriteString(w, lr.body)
}

// extprocStream is the ext_proc gRPC stream of one HTTP request.
type extprocStream struct {
	e       *envoyLite
	ent     *accessEntry
	client  context.Context // the HTTP request's context
	cancel  context.CancelFunc
	stream  extprocv3.ExternalProcessor_ProcessClient
	openErr error
	recv    chan recvResult
	// recvDone is closed when the receiving goroutine has stopped.
	recvDone chan struct{}
	// active: Envoy still consults the server. False after an immediate
	// response, an error, or the server closing the stream with OK.
	active bool
	// done: every expected reply arrived; anything more is a problem.
	done   bool
	closed bool
	// responseBodyMode is NONE as shipped, or what an accepted
	// mode_override in a headers reply set for this request.
	responseBodyMode filterv3.ProcessingMode_BodySendMode
}

type recvResult struct {
	resp *extprocv3.ProcessingResponse
	err  error
}

func (e *envoyLite) openStream(client context.Context, ent *accessEntry) *extprocStream {
	// The stream outlives a finished HTTP exchange by the close grace, and a
	// client hang-up resets it (Envoy destroys the filter).
	ctx, cancel := context.WithCancel(context.Background())
	st := &extprocStream{e: e, ent: ent, client: client, cancel: cancel,
		recv: make(chan recvResult), recvDone: make(chan struct{}), active: true}
	st.stream, st.openErr = e.ep.Process(ctx)
	if st.openErr == nil {
		go func() {
			defer close(st.recvDone)
			for {
				resp, err := st.stream.Recv()
				select {
				case st.recv <- recvResult{resp, err}:
				case <-ctx.Done():
					return
				}
				if err != nil {
					return
				}
			}
		}()
	}
	return st
}

// finished marks the last expected reply as received.
func (st *extprocStream) finished() { st.done = true }

// close half-closes the stream and gives the server remoteCloseTimeout to
// finish before resetting it, like Envoy's graceful close. Messages that
// arrive after the last expected reply are problems.
func (st *extprocStream) close() {
	if st.closed {
		return
	}
	st.closed = true
	if st.openErr != nil {
		st.cancel()
		return
	}
	_ = st.stream.CloseSend()
	st.e.bg.Add(1)
	go func() {
		defer st.e.bg.Done()
		defer st.cancel()
		t := time.NewTimer(st.e.remoteCloseTimeout)
		defer t.Stop()
		for {
			select {
			case r := <-st.recv:
				if r.err != nil {
					return
				}
				if st.done {
					st.e.problem(st.ent, "ext_proc sent %s after the last expected reply", describe(r.resp))
				}
			case <-st.recvDone:
				return
			case <-t.C:
				return
			}
		}
	}()
}

// exchange sends one message and waits for its reply under the message
// timer. A standalone override_message_timeout restarts the timer once.
// It returns (nil, nil) when the server closed the stream with OK: Envoy
// then carries on without processing.
func (st *extprocStream) exchange(name string, req *extprocv3.ProcessingRequest) (*extprocv3.ProcessingResponse, *localReply) {
	e := st.e
	if st.openErr != nil {
		return nil, grpcFailure(st.openErr)
	}
	e.update(func() { st.ent.Sent = append(st.ent.Sent, name) })
	if err := st.stream.Send(req); err != nil {
		st.active = false
		if errors.Is(err, io.EOF) {
			// The server ended the stream; Recv has its status.
			r := <-st.recv
			for r.err == nil {
				e.problem(st.ent, "ext_proc sent %s before %s was sent", describe(r.resp), name)
				r = <-st.recv
			}
			if errors.Is(r.err, io.EOF) {
				e.problem(st.ent, "ext_proc closed the stream before answering %s: Envoy forwards the request unprocessed", name)
				return nil, nil
			}
			return nil, grpcFailure(r.err)
		}
		return nil, grpcFailure(err)
	}
	timer := time.NewTimer(e.messageTimeout)
	defer timer.Stop()
	overridden := false
	for {
		select {
		case r := <-st.recv:
			if r.err != nil {
				st.active = false
				if errors.Is(r.err, io.EOF) {
					e.problem(st.ent, "ext_proc closed the stream with OK before answering %s: Envoy forwards the request unprocessed", name)
					return nil, nil
				}
				return nil, grpcFailure(r.err)
			}
			resp := r.resp
			if d := resp.GetOverrideMessageTimeout(); d != nil {
				// Envoy looks at this field first and ignores the rest.
				if resp.GetResponse() != nil {
					e.problem(st.ent, "override_message_timeout combined with a %s reply: Envoy ignores the reply", describe(resp))
				}
				v := d.AsDuration()
				switch {
				case overridden:
					e.problem(st.ent, "second override_message_timeout (%s) for %s: Envoy ignores it", v, name)
				case v < time.Millisecond || v > e.maxMessageTimeout:
					e.problem(st.ent, "override_message_timeout %s outside [1ms, max_message_timeout %s]: Envoy ignores it", v, e.maxMessageTimeout)
				default:
					overridden = true
					e.update(func() { st.ent.Overrides++ })
					timer.Reset(v)
				}
				continue
			}
			if mo := resp.GetModeOverride(); mo != nil {
				ok, why := e.modeOverrideAllowed(mo)
				switch {
				case name != "request_headers" && name != "response_headers":
					e.problem(st.ent, "mode_override in the reply to %s: Envoy honours it only in a reply to a headers message", name)
				case !ok:
					e.problem(st.ent, "mode_override sent but %s: Envoy ignores it", why)
				case mo.GetRequestBodyMode() != filterv3.ProcessingMode_BUFFERED && name == "request_headers":
					e.problem(st.ent, "mode_override sets request_body_mode %s: body modes are taken literally, and cortex-extproc needs BUFFERED", mo.GetRequestBodyMode())
				default:
					st.responseBodyMode = mo.GetResponseBodyMode()
				}
			}
			st.takeMetadata(resp)
			return resp, nil
		case <-timer.C:
			st.active = false
			st.cancel()
			return nil, &localReply{status: 504, details: "ext_proc_error_per-message_timeout_exceeded"}
		case <-st.client.Done():
			st.active = false
			return nil, &localReply{clientGone: true, details: "downstream_remote_disconnect"}
		}
	}
}

func grpcFailure(err error) *localReply {
	s := status.Convert(err)
	d := fmt.Sprintf("ext_proc_error_gRPC_error_%d{%s}", int(s.Code()), s.Message())
	return &localReply{status: 500, details: strings.ReplaceAll(d, " ", "_")}
}

func (st *extprocStream) spurious(name string, resp *extprocv3.ProcessingResponse) *localReply {
	st.active = false
	st.e.problem(st.ent, "spurious %s reply to %s", describe(resp), name)
	return &localReply{status: 500, details: "spurious_message_received_on_gRPC_stream"}
}

func describe(resp *extprocv3.ProcessingResponse) string {
	if resp.GetOverrideMessageTimeout() != nil && resp.GetResponse() == nil {
		return "override_message_timeout"
	}
	switch resp.GetResponse().(type) {
	case *extprocv3.ProcessingResponse_RequestHeaders:
		return "request_headers"
	case *extprocv3.ProcessingResponse_RequestBody:
		return "request_body"
	case *extprocv3.ProcessingResponse_RequestTrailers:
		return "request_trailers"
	case *extprocv3.ProcessingResponse_ResponseHeaders:
		return "response_headers"
	case *extprocv3.ProcessingResponse_ResponseBody:
		return "response_body"
	case *extprocv3.ProcessingResponse_ResponseTrailers:
		return "response_trailers"
	case *extprocv3.ProcessingResponse_ImmediateResponse:
		return "immediate_response"
	case *extprocv3.ProcessingResponse_StreamedImmediateResponse:
		return "streamed_immediate_response"
	case nil:
		return "empty"
	}
	return fmt.Sprintf("%T", resp.GetResponse())
}

// takeMetadata keeps namespace "cortex", the one envoy.yaml lists in
// receiving_namespaces; Envoy drops the others.
func (st *extprocStream) takeMetadata(resp *extprocv3.ProcessingResponse) {
	ns := resp.GetDynamicMetadata().GetFields()["cortex"]
	if ns == nil {
		return
	}
	st.e.update(func() {
		if st.ent.Metadata == nil {
			st.ent.Metadata = map[string]any{}
		}
		for k, v := range ns.GetStructValue().AsMap() {
			st.ent.Metadata[k] = v
		}
	})
}

// immediate turns an ImmediateResponse into Envoy's local reply.
func (st *extprocStream) immediate(ir *extprocv3.ImmediateResponse) *localReply {
	st.active = false
	st.done = true // Envoy closes the stream; nothing more may come
	var hs headerList
	if fail := st.applyMutation(ir.GetHeaders(), &hs, "immediate_response"); fail != nil {
		return fail
	}
	return &localReply{
		status:  int(ir.GetStatus().GetCode()),
		details: strings.ReplaceAll(ir.GetDetails(), " ", "_"),
		body:    string(ir.GetBody()),
		headers: hs,
	}
}

// applyRequestCommon applies a CommonResponse in the request direction:
// header mutation, then (body replies only) body mutation and Envoy's
// content-length check. It reports whether the route cache was cleared.
func (st *extprocStream) applyRequestCommon(c *extprocv3.CommonResponse, hs *headerList, body *[]byte, name string) (bool, *localReply) {
	if c.GetStatus() != extprocv3.CommonResponse_CONTINUE {
		st.e.problem(st.ent, "%s reply with status %s: cortex-extproc never needs it and envoylite does not model it", name, c.GetStatus())
	}
	if fail := st.applyMutation(c.GetHeaderMutation(), hs, name); fail != nil {
		return false, fail
	}
	if bm := c.GetBodyMutation(); bm != nil {
		if body == nil {
			st.e.problem(st.ent, "body_mutation in a %s reply with status CONTINUE: Envoy ignores it", name)
		} else {
			var nb []byte
			switch m := bm.GetMutation().(type) {
			case *extprocv3.BodyMutation_Body:
				nb = m.Body
			case *extprocv3.BodyMutation_ClearBody:
				nb = []byte{}
			default:
				st.e.problem(st.ent, "body_mutation %T is only for FULL_DUPLEX_STREAMED: Envoy ignores it in BUFFERED", m)
				nb = *body
			}
			// BUFFERED + header SEND keeps the client's content-length and
			// compares it, after this reply's header mutation, with the new body.
			if cl, ok := hs.get("content-length"); ok {
				if n, err := strconv.Atoi(cl); err == nil && n != len(nb) {
					st.active = false
					st.e.problem(st.ent, "content-length %d after the %s reply, mutated body is %d bytes", n, name, len(nb))
					return false, &localReply{status: 500, details: "mismatch_between_content_length_and_the_length_of_the_mutated_body"}
				}
			}
			*body = nb
		}
	}
	if !c.GetClearRouteCache() {
		return false, nil
	}
	if c.GetHeaderMutation() == nil {
		st.e.problem(st.ent, "clear_route_cache in the %s reply without a header_mutation: Envoy ignores it (clear_route_cache_ignored)", name)
		return false, nil
	}
	return true, nil
}

// applyResponseCommon applies a response_headers reply.
func (st *extprocStream) applyResponseCommon(c *extprocv3.CommonResponse, rh *headerList) *localReply {
	if c.GetClearRouteCache() {
		st.e.problem(st.ent, "clear_route_cache in the response direction: Envoy ignores it")
	}
	if c.GetBodyMutation() != nil {
		st.e.problem(st.ent, "body_mutation in a response_headers reply with response body mode NONE: Envoy ignores it")
	}
	return st.applyMutation(c.GetHeaderMutation(), rh, "response_headers")
}

// applyMutation applies a HeaderMutation like mutation_utils.cc with the
// default mutation_rules: removals first, then sets; raw_value only
// (value only gives an empty header, both is an invalid mutation → 500);
// host, :authority, :method, :scheme and x-envoy-* cannot be set and
// pseudo-headers and host cannot be removed (silently ignored: problems).
func (st *extprocStream) applyMutation(m *extprocv3.HeaderMutation, hs *headerList, name string) *localReply {
	invalid := func(format string, args ...any) *localReply {
		st.active = false
		st.e.problem(st.ent, "invalid header mutation in %s reply: %s", name, fmt.Sprintf(format, args...))
		return &localReply{status: 500, details: "ext_proc_invalid_header_mutation"}
	}
	for _, k := range m.GetRemoveHeaders() {
		if !validHeaderName(k) {
			return invalid("remove_headers %q is not a valid header name", k)
		}
		lk := strings.ToLower(k)
		if lk == "host" || strings.HasPrefix(lk, ":") || strings.HasPrefix(lk, "x-envoy") {
			st.e.problem(st.ent, "%s reply removes %q: not allowed by the default mutation_rules, Envoy ignores it", name, lk)
			continue
		}
		hs.del(lk)
	}
	for _, o := range m.GetSetHeaders() {
		h := o.GetHeader()
		if h == nil || !validHeaderName(h.GetKey()) {
			return invalid("set_headers key %q is not a valid header name", h.GetKey())
		}
		if h.GetValue() != "" && len(h.GetRawValue()) > 0 {
			return invalid("header %q has both value and raw_value", h.GetKey())
		}
		v := string(h.GetRawValue())
		if strings.ContainsAny(v, "\r\n\x00") {
			return invalid("header %q value %q contains CR, LF or NUL", h.GetKey(), v)
		}
		lk := strings.ToLower(h.GetKey())
		if h.GetValue() != "" {
			st.e.problem(st.ent, "%s reply sets %q in value, not raw_value: Envoy sets it empty", name, lk)
		}
		if o.GetAppendAction() != corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD {
			st.e.problem(st.ent, "%s reply sets %q with append_action %s: ext_proc ignores append_action", name, lk, o.GetAppendAction())
		}
		switch {
		case lk == "host" || lk == ":authority" || lk == ":method" || lk == ":scheme" || strings.HasPrefix(lk, "x-envoy"):
			st.e.problem(st.ent, "%s reply sets %q: not allowed by the default mutation_rules, Envoy ignores it", name, lk)
			continue
		case strings.HasPrefix(lk, ":") && lk != ":path" && lk != ":status":
			return invalid("pseudo-header %q cannot be set", lk)
		}
		//lint:ignore SA1019 ext_proc honours only the legacy append field (envoy-ext-proc.md §2.3).
		if o.GetAppend().GetValue() {
			if strings.HasPrefix(lk, ":") {
				return invalid("cannot append to pseudo-header %q", lk)
			}
			*hs = append(*hs, header{lk, v})
		} else {
			hs.set(lk, v)
		}
	}
	return nil
}

func validHeaderName(k string) bool {
	name := strings.TrimPrefix(k, ":")
	if name == "" {
		return false
	}
	for _, c := range []byte(name) {
		if c <= ' ' || c >= 0x7f || strings.IndexByte("\"(),/:;<=>?@[\\]{}", c) >= 0 {
			return false
		}
	}
	return true
}

// headerList is an ordered header map with lower-case keys, like
// Envoy's HeaderMap.
type headerList []header

type header struct{ k, v string }

func (h headerList) get(k string) (string, bool) {
	for _, kv := range h {
		if kv.k == k {
			return kv.v, true
		}
	}
	return "", false
}

func (h headerList) first(k string) string { v, _ := h.get(k); return v }

// routeHeaders is what route matching sees: the first value of each header.
func (h headerList) routeHeaders() map[string]string {
	m := make(map[string]string, len(h))
	for _, kv := range h {
		if _, ok := m[kv.k]; !ok {
			m[kv.k] = kv.v
		}
	}
	return m
}

// set replaces every value of k with v, keeping k's first position.
func (h *headerList) set(k, v string) {
	out := (*h)[:0]
	done := false
	for _, kv := range *h {
		if kv.k != k {
			out = append(out, kv)
		} else if !done {
			out = append(out, header{k, v})
			done = true
		}
	}
	if !done {
		out = append(out, header{k, v})
	}
	*h = out
}

func (h *headerList) del(k string) {
	out := (*h)[:0]
	for _, kv := range *h {
		if kv.k != k {
			out = append(out, kv)
		}
	}
	*h = out
}

// proto is the HeaderMap Envoy sends: values in raw_value only.
func (h headerList) proto() *corev3.HeaderMap {
	hm := &corev3.HeaderMap{Headers: make([]*corev3.HeaderValue, 0, len(h))}
	for _, kv := range h {
		hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv.k, RawValue: []byte(kv.v)})
	}
	return hm
}
