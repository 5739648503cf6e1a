package anthropic

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"unicode/utf8"

	"github.com/tidwall/gjson"
)

// Anthropic error types (https://docs.anthropic.com/en/api/errors).
const (
	ErrInvalidRequest  = "invalid_request_error"
	ErrAuthentication  = "authentication_error"
	ErrBilling         = "billing_error"
	ErrPermission      = "permission_error"
	ErrNotFound        = "not_found_error"
	ErrRequestTooLarge = "request_too_large"
	ErrRateLimit       = "rate_limit_error"
	ErrAPI             = "api_error"
	ErrTimeout         = "timeout_error"
	ErrOverloaded      = "overloaded_error"
)

// maxErrorMessage bounds a message copied from an upstream error body, so
// a neuron that puts a whole stack trace in its error cannot make every
// client error megabytes long.
const maxErrorMessage = 4096

// ErrorType is the Anthropic error type for an HTTP status. Statuses
// Anthropic does not name fall back by class: other 4xx are
// invalid_request_error, everything else api_error.
func ErrorType(status int) string {
	switch status {
	case http.StatusBadRequest, http.StatusUnprocessableEntity:
		return ErrInvalidRequest
	case http.StatusUnauthorized:
		return ErrAuthentication
	case http.StatusPaymentRequired:
		return ErrBilling
	case http.StatusForbidden:
		return ErrPermission
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusRequestEntityTooLarge:
		return ErrRequestTooLarge
	case http.StatusTooManyRequests:
		return ErrRateLimit
	case http.StatusGatewayTimeout:
		return ErrTimeout
	case http.StatusServiceUnavailable, 529:
		return ErrOverloaded
	}
	if status >= 400 && status < 500 {
		return ErrInvalidRequest
	}
	return ErrAPI
}

// errorObject is Anthropic's error body.
type errorObject struct {
	Type  string      `json:"type"`
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// ErrorBody renders Anthropic's error object,
// {"type":"error","error":{"type":errType,"message":message}}.
func ErrorBody(errType, message string) []byte {
	return marshal(errorObject{Type: "error", Error: errorDetail{Type: errType, Message: message}})
}

// TranslateError turns an upstream error response into Anthropic's error
// object. The type comes from status (see ErrorType), because that is what
// Anthropic clients branch on (retry on 429/529, re-auth on 401); the
// message is the upstream's own where one can be found — OpenAI's
// {"error":{"message"}}, neuron's {"error":"..."}, FastAPI's {"detail"},
// a bare {"message"}, or an Anthropic error passed through — and otherwise
// says only which status came back: a non-JSON body (an HTML page from a
// proxy, a stack trace) is not copied to the client.
func TranslateError(status int, body []byte) []byte {
	return ErrorBody(ErrorType(status), upstreamMessage(status, body))
}

// upstreamMessage finds the human-readable message in an error body.
func upstreamMessage(status int, body []byte) string {
	if gjson.ValidBytes(body) {
		root := gjson.ParseBytes(body)
		for _, path := range []string{"error.message", "error", "message", "detail", "error.type", "error.code"} {
			v := root.Get(path)
			switch {
			case v.Type == gjson.String && strings.TrimSpace(v.Str) != "":
				return truncate(v.Str)
			case path == "detail" && (v.IsArray() || v.IsObject()):
				// FastAPI validation errors: a list of {loc, msg}.
				return truncate(v.Raw)
			}
		}
	}
	text := http.StatusText(status)
	if text == "" {
		return fmt.Sprintf("upstream returned HTTP %d", status)
	}
	return fmt.Sprintf("upstream returned HTTP %d %s", status, text)
}

// truncate cuts s to maxErrorMessage bytes on a rune boundary.
func truncate(s string) string {
	if len(s) <= maxErrorMessage {
		return s
	}
	cut := maxErrorMessage
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}

// RequestError is a request the translator refuses. The ext_proc server
// answers it with HTTP Status() and Body(): Anthropic's 400
// invalid_request_error, whose message says what was wrong and what to send
// instead.
type RequestError struct {
	Message string
}

func (e *RequestError) Error() string { return e.Message }

// Status is the HTTP status to answer with: always 400.
func (e *RequestError) Status() int { return http.StatusBadRequest }

// Body is the Anthropic error object to answer with.
func (e *RequestError) Body() []byte { return ErrorBody(ErrInvalidRequest, e.Message) }

func requestErrorf(format string, args ...any) *RequestError {
	return &RequestError{Message: fmt.Sprintf(format, args...)}
}

// marshal is json.Marshal without HTML escaping (model output is full of
// <, > and &, and \u003c triples its size) and without the encoder's
// trailing newline. It cannot fail on the package's own types.
func marshal(v any) []byte {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		// Only reachable with a value json cannot encode, which the
		// package never builds; keep the output well-formed anyway.
		return ErrorBody(ErrAPI, "internal translation error: "+err.Error())
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}
