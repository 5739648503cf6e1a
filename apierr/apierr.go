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

// Error is a client-visible failure. Message must say what went wrong and,
// where there is one, what to do next.
type Error struct {
	Status     int    // HTTP status
	Type       string // OpenAI error type
	Code       string // OpenAI error code
	Message    string
	RetryAfter int // seconds; 0 means no Retry-After header
}

func (e *Error) Error() string {
	return fmt.Sprintf("%d %s: %s", e.Status, e.Code, e.Message)
}

// InvalidRequest is a 400: the body is not JSON, or model is missing or not a string.
func InvalidRequest(format string, args ...any) *Error {
	return &Error{Status: 400, Type: TypeInvalidRequest, Code: CodeInvalidRequest, Message: fmt.Sprintf(format, args...)}
}

// ModelNotFound is a 404 for a model no neuron has and the catalogue lacks.
func ModelNotFound(format string, args ...any) *Error {
	return &Error{Status: 404, Type: TypeInvalidRequest, Code: CodeModelNotFound, Message: fmt.Sprintf(format, args...)}
}

// NotFound is a 404 for a path cortex-extproc does not serve.
func NotFound(format string, args ...any) *Error {
	return &Error{Status: 404, Type: TypeInvalidRequest, Code: CodeNotFound, Message: fmt.Sprintf(format, args...)}
}

// Unavailable is a 503 service_unavailable with the given Retry-After
// (routing.md: 5 no healthy node, 3 feasible node unhealthy, 2 recovering or
// endpoint not resolvable, 5 cold load failed).
func Unavailable(retryAfter int, format string, args ...any) *Error {
	return &Error{Status: 503, Type: TypeAPI, Code: CodeServiceUnavailable, Message: fmt.Sprintf(format, args...), RetryAfter: retryAfter}
}

// NoFeasible is a 503 no_feasible_neuron: no neuron's topology can hold the
// model. Retrying does not help until the catalogue or the fleet changes.
func NoFeasible(format string, args ...any) *Error {
	return &Error{Status: 503, Type: TypeAPI, Code: CodeNoFeasibleNeuron, Message: fmt.Sprintf(format, args...)}
}

// TooLarge is a 413 for a body over the configured cap.
func TooLarge(format string, args ...any) *Error {
	return &Error{Status: 413, Type: TypeInvalidRequest, Code: CodeRequestTooLarge, Message: fmt.Sprintf(format, args...)}
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
