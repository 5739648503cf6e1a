package extproc

import (
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

// A routed request whose neuron is gone fails inside Envoy: the router
// cannot connect (UF), loses the connection before the answer (UC), or
// finds no healthy host (UH), and answers the client a 503 itself. What
// the ext_proc stream of that request shows depends on Envoy's version:
//
//   - Envoy 1.34 and later (and 1.30.10, 1.31.6, 1.32.4, 1.33.1; runtime
//     guard envoy.reloadable_features.skip_ext_proc_on_local_reply, on by
//     default, CVE-2025-30157) do not send local replies to the ext_proc
//     server: the stream ends (half-close or reset) after our body reply,
//     without response headers.
//   - Older Envoys, or the guard set to false, send the local reply's
//     headers as response_headers like an upstream's: the router's
//     sendLocalReply runs the whole encoder filter chain
//     (FilterManager::sendLocalReplyViaFilterChain), ext_proc included,
//     after local_reply_config has rewritten it.
//
// Both are reported to Options.UpstreamFailed, which re-polls the node
// (fleet.Poller.Suspect): only the neuron's own silence on that re-poll
// takes it out, so a false alarm costs one /models call.
//
// Telling Envoy's 503 from a neuron's own 503 (a neuron answers 503 when
// its queue is full or it is shutting down, and must not be suspected for
// it): at the point ext_proc sees them, Envoy's local reply has only the
// headers Envoy builds for it (:status, content-length, content-type, and
// what local_reply_config or the route add), while every answer that came
// from an upstream HTTP server carries that server's Date header (hyper,
// under the neuron's axum, and Go's net/http, under neuron-sim, always
// send one). Envoy adds its own Date only after the filter chain
// (ConnectionManagerImpl's encodeHeaders), and the router adds nothing
// that would tell, since the shipped configs set suppress_envoy_headers
// (no x-envoy-upstream-service-time). So the rule is: a 502, 503 or 504
// without a date header is Envoy's. A neuron that sent none would only
// cost a re-poll that answers.

// A neuron's own 404 to a routed inference request says something else:
// the neuron is there but does not hold the model (it restarted, or the
// model was unloaded behind cortex-extproc's back), so the fleet view is
// stale. That is reported too (FailedModelMissing): the re-poll answers and
// replaces the listing, and the next request for the model is routed to a
// replica that has it or cold-loads it, instead of meeting the same 404
// until the next poll round.

// How a routed request's upstream failed (Options.UpstreamFailed).
const (
	// FailedLocalReply: the response headers are Envoy's own 502/503/504.
	FailedLocalReply = "envoy_local_reply"
	// FailedNoResponse: the stream ended without response headers after
	// the request was routed (Envoy ≥ 1.34 keeps its local replies from
	// ext_proc; a client that hangs up before the answer looks the same).
	FailedNoResponse = "no_response_headers"
	// FailedModelMissing: the neuron itself answered 404 (with its Date
	// header): it does not hold the model it was routed for.
	FailedModelMissing = "model_missing"
)

// upstreamFailure classifies response headers: Envoy's own answer to an
// upstream failure (FailedLocalReply), the neuron's own 404
// (FailedModelMissing), or neither (""), with their status. It reads the
// headers without copying them (every routed request's answer comes
// through here).
func upstreamFailure(h *extprocv3.HttpHeaders) (status int, how string) {
	dated := false
	for _, kv := range h.GetHeaders().GetHeaders() {
		switch kv.GetKey() {
		case ":status":
			status = statusCode(rawValue(kv))
		case "date":
			dated = true
		}
	}
	switch {
	case !dated && (status == 502 || status == 503 || status == 504):
		return status, FailedLocalReply
	case dated && status == 404:
		return status, FailedModelMissing
	}
	return status, ""
}

// statusCode parses a three-digit :status; anything else is 0.
func statusCode(b []byte) int {
	if len(b) != 3 {
		return 0
	}
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// upstreamAnswered records the response headers of a routed request and
// reports Envoy's own failure reply.
func (st *stream) upstreamAnswered(h *extprocv3.HttpHeaders) {
	routed := st.awaiting
	st.awaiting = false
	f := st.srv.opt.UpstreamFailed
	if !routed || f == nil {
		return
	}
	if status, how := upstreamFailure(h); how != "" {
		f(st.target.Node, st.target.Model, status, how)
	}
}

// ended reports a routed request whose stream ended before its response
// headers came.
func (st *stream) ended() {
	if f := st.srv.opt.UpstreamFailed; f != nil && st.awaiting {
		st.awaiting = false
		f(st.target.Node, st.target.Model, 0, FailedNoResponse)
	}
}
