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

// Every routed request's answer is read by upstreamFailure: it must not
// allocate.
func TestUpstreamFailureDoesNotAllocate(t *testing.T) {
	upstream := headersOf(":status", "200", "content-type", "text/event-stream", "date", "Mon, 02 Mar 2026 10:00:00 GMT",
		"x-neuron-name", "beast", "transfer-encoding", "chunked")
	if allocs := testing.AllocsPerRun(100, func() { upstreamFailure(upstream) }); allocs != 0 {
		t.Errorf("upstreamFailure allocates %v times per answer", allocs)
	}
}

func TestUpstreamFailureRule(t *testing.T) {
	const date = "Mon, 02 Mar 2026 10:00:00 GMT"
	for _, c := range []struct {
		name   string
		h      *extprocv3.HttpHeaders
		status int
		how    string
	}{
		{"Envoy's 503", headersOf(":status", "503", "content-type", "text/plain"), 503, FailedLocalReply},
		{"Envoy's 502", headersOf(":status", "502"), 502, FailedLocalReply},
		{"Envoy's 504", headersOf(":status", "504", "content-type", "application/json"), 504, FailedLocalReply},
		{"a neuron's 503", headersOf(":status", "503", "date", date), 503, ""},
		{"a neuron's 404 (it does not hold the model)", headersOf(":status", "404", "content-type", "application/json", "date", date), 404, FailedModelMissing},
		{"a neuron's 200", headersOf(":status", "200", "date", date), 200, ""},
		{"a neuron's 400", headersOf(":status", "400", "date", date), 400, ""},
		{"Envoy's 500 (ext_proc)", headersOf(":status", "500"), 500, ""},
		{"Envoy's 404 (no route)", headersOf(":status", "404"), 404, ""},
		{"no status", headersOf("content-type", "text/plain"), 0, ""},
		{"garbled status", headersOf(":status", "5o3"), 0, ""},
		{"long status", headersOf(":status", "5030"), 0, ""},
	} {
		status, how := upstreamFailure(c.h)
		if status != c.status || how != c.how {
			t.Errorf("%s: (%d, %q), want (%d, %q)", c.name, status, how, c.status, c.how)
		}
	}
}
