// Package wiretest builds Envoy's messages the way the ext_proc tests and
// benchmarks feed them to the codec: encoded, and split into the buffers
// gRPC hands over.
package wiretest

import (
	"testing"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// Marshal encodes m, failing tb on error.
func Marshal(tb testing.TB, m proto.Message) []byte {
	tb.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// BodyRequest is Envoy's buffered request body message for body.
func BodyRequest(body []byte) *extprocv3.ProcessingRequest {
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: true}}}
}

// Chunks splits b the way gRPC hands a large message to a codec: several
// buffers of size bytes.
func Chunks(b []byte, size int) mem.BufferSlice {
	var s mem.BufferSlice
	for len(b) > 0 {
		n := min(size, len(b))
		s = append(s, mem.SliceBuffer(b[:n]))
		b = b[n:]
	}
	return s
}
