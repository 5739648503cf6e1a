package extproc

import (
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"

	"github.com/helexa/cortex-extproc/extproc/internal/wire"
)

// NewGRPCServer returns a gRPC server that serves s, with the codec its
// replies need (package wire). Other services (health, xDS) may be
// registered on it too: the codec encodes their messages as gRPC's own.
func NewGRPCServer(s *Server, opts ...grpc.ServerOption) *grpc.Server {
	opts = append(opts[:len(opts):len(opts)], grpc.ForceServerCodecV2(wire.NewCodec()))
	g := grpc.NewServer(opts...)
	extprocv3.RegisterExternalProcessorServer(g, s)
	return g
}

// IsImmediateResponse reports whether m, a message a Process stream sends
// (an encoded reply, or a *extprocv3.ProcessingResponse), answers the
// request itself (an immediate response): Envoy replies to the client with
// it and then ends the stream. For stream interceptors that must tell a
// request answered by cortex-extproc from one routed on.
func IsImmediateResponse(m any) bool {
	switch r := m.(type) {
	case *wire.Reply:
		return r.Immediate()
	case *extprocv3.ProcessingResponse:
		return r.GetImmediateResponse() != nil
	}
	return false
}
