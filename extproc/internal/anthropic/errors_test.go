package anthropic

import (
	"encoding/json"
	"strings"
	"testing"

	sdk "github.com/anthropics/anthropic-sdk-go/v2"
)

func TestErrorType(t *testing.T) {
	for status, want := range map[int]string{
		400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
		403: "permission_error", 404: "not_found_error", 409: "invalid_request_error",
		413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
		500: "api_error", 502: "api_error", 503: "overloaded_error", 504: "timeout_error",
		529: "overloaded_error", 200: "api_error", 0: "api_error",
	} {
		if got := ErrorType(status); got != want {
			t.Errorf("ErrorType(%d) = %q, want %q", status, got, want)
		}
	}
}

func TestTranslateError(t *testing.T) {
	long := strings.Repeat("é", 3000)
	for _, tt := range []struct {
		name   string
		status int
		body   string
		typ    string
		msg    string
	}{
		{"openai", 400, `{"error":{"message":"max_tokens is too large","type":"invalid_request_error","param":null,"code":null}}`, "invalid_request_error", "max_tokens is too large"},
		{"neuron string", 503, `{"error":"candle harness not enabled on this neuron"}`, "overloaded_error", "candle harness not enabled on this neuron"},
		{"fastapi detail", 422, `{"detail":"Input validation error"}`, "invalid_request_error", "Input validation error"},
		{"fastapi list", 422, `{"detail":[{"loc":["body","messages"],"msg":"field required"}]}`, "invalid_request_error", `[{"loc":["body","messages"],"msg":"field required"}]`},
		{"bare message", 429, `{"message":"slow down"}`, "rate_limit_error", "slow down"},
		{"anthropic passthrough", 529, `{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}`, "overloaded_error", "Overloaded"},
		{"error with only a code", 401, `{"error":{"code":"invalid_api_key"}}`, "authentication_error", "invalid_api_key"},
		{"html", 502, `<html><body>Bad Gateway</body></html>`, "api_error", "upstream returned HTTP 502 Bad Gateway"},
		{"empty", 500, ``, "api_error", "upstream returned HTTP 500 Internal Server Error"},
		{"empty message", 404, `{"error":{"message":"  "}}`, "not_found_error", "upstream returned HTTP 404 Not Found"},
		{"odd status", 599, `garbage`, "api_error", "upstream returned HTTP 599"},
		{"invalid utf-8", 400, "{\"error\":\"bad \xff byte\"}", "invalid_request_error", "bad \ufffd byte"},
		{"long", 500, `{"error":"` + long + `"}`, "api_error", long[:4096] + "…"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out := TranslateError(tt.status, []byte(tt.body))
			var e struct {
				Type  string `json:"type"`
				Error struct {
					Type    string `json:"type"`
					Message string `json:"message"`
				} `json:"error"`
			}
			if err := json.Unmarshal(out, &e); err != nil {
				t.Fatalf("not JSON: %s", out)
			}
			if e.Type != "error" || e.Error.Type != tt.typ || e.Error.Message != tt.msg {
				t.Errorf("got %s\nwant type %q message %q", out, tt.typ, tt.msg)
			}
			// The SDK's own error type reads it.
			var sdkErr sdk.ErrorResponse
			if err := json.Unmarshal(out, &sdkErr); err != nil || sdkErr.Error.Message != e.Error.Message {
				t.Errorf("SDK ErrorResponse: %v %+v", err, sdkErr)
			}
		})
	}
}

func TestRequestErrorBody(t *testing.T) {
	_, err := TranslateRequest([]byte(`{"max_tokens":1}`), "m")
	re := asRequestError(err)
	if re == nil {
		t.Fatalf("error %v (%T) is not a *RequestError", err, err)
	}
	if re.Status() != 400 {
		t.Errorf("status %d", re.Status())
	}
	jsonEqual(t, re.Body(), `{"type":"error","error":{"type":"invalid_request_error","message":`+string(marshal(re.Message))+`}}`)
}
