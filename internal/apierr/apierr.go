// Package apierr holds the errors a client of cortex-extproc can see: an
// HTTP status, the OpenAI error envelope fields and an optional Retry-After.
// routing produces them, extproc renders them as Envoy immediate responses.
package apierr

import (
	"encoding/json"
	"fmt"
)

// Error codes and types from routing.md's error table.
const (
	TypeInvalidRequest = "invalid_request_error"
	TypeAPI            = "api_error"

	CodeInvalidRequest     = "invalid_request"
	CodeModelNotFound      = "model_not_found"
	CodeServiceUnavailable = "service_unavailable"
	CodeNoFeasibleNeuron   = "no_feasible_neuron"
	CodeRequestTooLarge    = "request_too_large"
	CodeNotFound           = "not_found"
)

// Reason says why a request failed, finer than Code (which is the
// client's contract and stays coarse: most 503s are service_unavailable).
// It is a metric label and a log key, so its values are the constants
// below and nothing else: never build one from request or neuron data.
type Reason string

// Reasons, by where they arise. Every error a client can get carries one;
// an error made without one is counted as ReasonUnclassified.
const (
	// The request itself (4xx).
	ReasonInvalidBody    Reason = "invalid_body"     // empty, not JSON, not an object, no or several "model", model not a string
	ReasonInvalidModelID Reason = "invalid_model_id" // model empty, too long, not UTF-8, control or format characters
	ReasonBodyTooLarge   Reason = "body_too_large"   // over extproc.max_request_bytes
	ReasonUnknownModel   Reason = "unknown_model"    // on no neuron, not in the catalogue, not an alias
	ReasonPathNotRouted  Reason = "path_not_routed"  // not an inference path or the model list

	// The fleet, at decision time.
	ReasonNoNeurons          Reason = "no_neurons"          // no [[neurons]] configured
	ReasonNotPolled          Reason = "not_polled"          // no neuron polled yet
	ReasonNoHealthy          Reason = "no_healthy"          // every neuron fails its polls
	ReasonRecovering         Reason = "recovering"          // the model is recovering on a neuron
	ReasonPreWarming         Reason = "pre_warming"         // a neuron is loading it at start-up
	ReasonEndpointUnresolved Reason = "endpoint_unresolved" // the inference endpoint cannot be resolved or addressed
	ReasonUnservable         Reason = "unservable"          // resident, but the neuron says it cannot serve now
	ReasonClusterNotAcked    Reason = "cluster_not_acked"   // xDS: Envoy does not hold the neuron's cluster yet

	// Placement and cold loads.
	ReasonNoFeasible        Reason = "no_feasible"         // no neuron's topology can ever hold the model
	ReasonFeasibleUnhealthy Reason = "feasible_unhealthy"  // the neurons that could take it are unhealthy or not ready
	ReasonCooldown          Reason = "cooldown"            // the neurons that could take it failed a load recently
	ReasonNoRoom            Reason = "no_room"             // room cannot be made now (bound, or victims in use)
	ReasonColdLoadsDisabled Reason = "cold_loads_disabled" // in the catalogue, loaded nowhere, no cold loader
	ReasonWaitersFull       Reason = "waiters_full"        // cold_load.max_waiters requests already held
	ReasonLoadFailed        Reason = "load_failed"         // POST /models/load failed
	ReasonLoadTimeout       Reason = "load_timeout"        // the load, or the request's wait for it, ran out of time
	ReasonNodeGone          Reason = "node_gone"           // loaded on a neuron that left the fleet
	ReasonEvictedAfterLoad  Reason = "evicted_after_load"  // the fresh model was claimed by an eviction
	ReasonShuttingDown      Reason = "shutting_down"       // cortex-extproc is stopping

	// Envoy's configuration.
	ReasonMisconfigured Reason = "extproc_misconfigured" // the ext_proc filter's processing mode

	// ReasonUnclassified is what an error without a reason is counted as:
	// a bug to fix, made visible on /metrics rather than hidden.
	ReasonUnclassified Reason = "unclassified"
)

// Reasons lists every Reason but ReasonUnclassified, for label hygiene
// checks and documentation.
var Reasons = []Reason{
	ReasonInvalidBody, ReasonInvalidModelID, ReasonBodyTooLarge, ReasonUnknownModel, ReasonPathNotRouted,
	ReasonNoNeurons, ReasonNotPolled, ReasonNoHealthy, ReasonRecovering, ReasonPreWarming, ReasonEndpointUnresolved,
	ReasonUnservable, ReasonClusterNotAcked,
	ReasonNoFeasible, ReasonFeasibleUnhealthy, ReasonCooldown, ReasonNoRoom, ReasonColdLoadsDisabled, ReasonWaitersFull,
	ReasonLoadFailed, ReasonLoadTimeout, ReasonNodeGone, ReasonEvictedAfterLoad, ReasonShuttingDown,
	ReasonMisconfigured,
}

// Error is a client-visible failure. Message must say what went wrong and,
// where there is one, what to do next.
type Error struct {
	Status     int    // HTTP status
	Type       string // OpenAI error type
	Code       string // OpenAI error code
	Message    string
	RetryAfter int    // seconds; 0 means no Retry-After header
	Reason     Reason // why, for metrics and logs; never sent to the client
}

// WithReason sets e's reason and returns e, for use where the error is
// made: apierr.Unavailable(5, "…").WithReason(apierr.ReasonNoHealthy).
func (e *Error) WithReason(r Reason) *Error {
	e.Reason = r
	return e
}

// Classified is e's reason, or ReasonUnclassified when it has none.
func (e *Error) Classified() Reason {
	if e.Reason == "" {
		return ReasonUnclassified
	}
	return e.Reason
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message)
}

// InvalidRequest is a 400: the body is not JSON, or model is missing or
// not a string (reason invalid_body unless set otherwise).
func InvalidRequest(format string, args ...any) *Error {
	return &Error{Status: 400, Type: TypeInvalidRequest, Code: CodeInvalidRequest, Message: fmt.Sprintf(format, args...), Reason: ReasonInvalidBody}
}

// ModelNotFound is a 404 for a model no neuron has and the catalogue lacks
// (reason unknown_model).
func ModelNotFound(format string, args ...any) *Error {
	return &Error{Status: 404, Type: TypeInvalidRequest, Code: CodeModelNotFound, Message: fmt.Sprintf(format, args...), Reason: ReasonUnknownModel}
}

// NotFound is a 404 for a path cortex-extproc does not serve (reason
// path_not_routed).
func NotFound(format string, args ...any) *Error {
	return &Error{Status: 404, Type: TypeInvalidRequest, Code: CodeNotFound, Message: fmt.Sprintf(format, args...), Reason: ReasonPathNotRouted}
}

// Unavailable is a 503 service_unavailable with the given Retry-After
// (routing.md: 5 no healthy node, 3 feasible node unhealthy, 2 recovering or
// endpoint not resolvable, 5 cold load failed). A 503 has many causes, so
// it has no default reason: give it one with WithReason.
func Unavailable(retryAfter int, format string, args ...any) *Error {
	return &Error{Status: 503, Type: TypeAPI, Code: CodeServiceUnavailable, Message: fmt.Sprintf(format, args...), RetryAfter: retryAfter}
}

// NoFeasible is a 503 no_feasible_neuron: no neuron's topology can hold the
// model. Retrying does not help until the catalogue or the fleet changes
// (reason no_feasible).
func NoFeasible(format string, args ...any) *Error {
	return &Error{Status: 503, Type: TypeAPI, Code: CodeNoFeasibleNeuron, Message: fmt.Sprintf(format, args...), Reason: ReasonNoFeasible}
}

// TooLarge is a 413 for a body over the configured cap (reason
// body_too_large).
func TooLarge(format string, args ...any) *Error {
	return &Error{Status: 413, Type: TypeInvalidRequest, Code: CodeRequestTooLarge, Message: fmt.Sprintf(format, args...), Reason: ReasonBodyTooLarge}
}

type openAIEnvelope struct {
	Error openAIError `json:"error"`
}

type openAIError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    string  `json:"code"`
}

// OpenAIBody is the OpenAI error envelope:
// {"error":{"message":…,"type":…,"param":null,"code":…}}.
func (e *Error) OpenAIBody() []byte {
	b, _ := json.Marshal(openAIEnvelope{Error: openAIError{Message: e.Message, Type: e.Type, Code: e.Code}})
	return b
}

type anthropicEnvelope struct {
	Type  string         `json:"type"`
	Error anthropicError `json:"error"`
}

type anthropicError struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// AnthropicType maps the HTTP status to Anthropic's error type.
func (e *Error) AnthropicType() string {
	switch e.Status {
	case 400:
		return "invalid_request_error"
	case 404:
		return "not_found_error"
	case 413:
		return "request_too_large"
	case 503:
		return "overloaded_error"
	default:
		if e.Status >= 500 {
			return "api_error"
		}
		return "invalid_request_error"
	}
}

// AnthropicBody is Anthropic's error shape, used on /v1/messages:
// {"type":"error","error":{"type":…,"message":…}}.
func (e *Error) AnthropicBody() []byte {
	b, _ := json.Marshal(anthropicEnvelope{Type: "error", Error: anthropicError{Type: e.AnthropicType(), Message: e.Message}})
	return b
}
