package extproc

import (
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
)

func headersOf(kv ...string) *extprocv3.HttpHeaders {
	hs := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.HttpHeaders{Headers: hs}
}

// Every routed request's answer is read by envoyFailure: it must not
// allocate.
func TestEnvoyFailureDoesNotAllocate(t *testing.T) {
	upstream := headersOf(":status", "200", "content-type", "text/event-stream", "date", "Mon, 02 Mar 2026 10:00:00 GMT",
		"x-neuron-name", "beast", "transfer-encoding", "chunked")
	if allocs := testing.AllocsPerRun(100, func() { envoyFailure(upstream) }); allocs != 0 {
		t.Errorf("envoyFailure allocates %v times per answer", allocs)
	}
}

func TestEnvoyFailureRule(t *testing.T) {
	for _, c := range []struct {
		name   string
		h      *extprocv3.HttpHeaders
		status int
		ok     bool
	}{
		{"Envoy's 503", headersOf(":status", "503", "content-type", "text/plain"), 503, true},
		{"Envoy's 502", headersOf(":status", "502"), 502, true},
		{"Envoy's 504", headersOf(":status", "504", "content-type", "application/json"), 504, true},
		{"a neuron's 503", headersOf(":status", "503", "date", "Mon, 02 Mar 2026 10:00:00 GMT"), 503, false},
		{"Envoy's 500 (ext_proc)", headersOf(":status", "500"), 500, false},
		{"Envoy's 404", headersOf(":status", "404"), 404, false},
		{"no status", headersOf("content-type", "text/plain"), 0, false},
		{"garbled status", headersOf(":status", "5o3"), 0, false},
		{"long status", headersOf(":status", "5030"), 0, false},
	} {
		status, ok := envoyFailure(c.h)
		if status != c.status || ok != c.ok {
			t.Errorf("%s: (%d, %v), want (%d, %v)", c.name, status, ok, c.status, c.ok)
		}
	}
}
