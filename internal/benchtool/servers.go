package benchtool

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/tidwall/gjson"
	"github.com/tidwall/sjson"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/routing"
)

// Names of the servers the tool can start itself.
const (
	NameTrivial = "trivial"
	NameSJSON   = "sjson"
	NameSelf    = "self"
	NameTarget  = "target"
)

// Server is an ext_proc server under test.
type Server struct {
	Name string
	Addr string
	// InProcess: the server runs in this process, so process CPU and
	// allocations include it (and the client).
	InProcess bool
	// PID > 0: an external server whose CPU is read from /proc/PID/stat.
	PID  int
	stop func()
}

// Close stops an in-process server; a no-op for an external one.
func (s *Server) Close() {
	if s.stop != nil {
		s.stop()
		s.stop = nil
	}
}

// External describes a server this tool does not run (pid 0: CPU unknown).
func External(name, addr string, pid int) *Server {
	return &Server{Name: name, Addr: addr, PID: pid}
}

// maxMsg bounds gRPC messages on both sides: above any body the tool builds
// and above cortex-extproc's default max_request_bytes (32 MiB) plus headers,
// as the production server is configured (envoy-ext-proc.md §5.5).
const maxMsg = 36 << 20

// serve starts srv on an ephemeral loopback port with the production
// server's message limits.
func serve(name string, register func(*grpc.Server)) (*Server, error) {
	return serveWith(name, func(opts ...grpc.ServerOption) *grpc.Server {
		g := grpc.NewServer(opts...)
		register(g)
		return g
	})
}

// serveWith is serve for a server built by newServer from the options.
func serveWith(name string, newServer func(...grpc.ServerOption) *grpc.Server) (*Server, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("start %s server on 127.0.0.1: %w", name, err)
	}
	g := newServer(grpc.MaxRecvMsgSize(maxMsg), grpc.MaxSendMsgSize(maxMsg))
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	return &Server{Name: name, Addr: lis.Addr().String(), InProcess: true, stop: func() {
		g.Stop()
		<-done
	}}, nil
}

// StartTrivial starts the baseline: a server that answers CONTINUE (an
// empty reply of the right type) to every message and does nothing else.
// Its latency is the floor the ext_proc protocol itself costs.
func StartTrivial() (*Server, error) {
	return serve(NameTrivial, func(g *grpc.Server) {
		extprocv3.RegisterExternalProcessorServer(g, trivial{})
	})
}

type trivial struct {
	extprocv3.UnimplementedExternalProcessorServer
}

func (trivial) Process(s extprocv3.ExternalProcessor_ProcessServer) error {
	return loop(s, func(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		return continueReply(req)
	})
}

// loop is a minimal ext_proc stream loop: one reply per message, in order,
// until Envoy (or the bench client) half-closes.
func loop(s extprocv3.ExternalProcessor_ProcessServer, reply func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse) error {
	for {
		req, err := s.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		resp := reply(req)
		if resp == nil {
			return status.Errorf(codes.InvalidArgument, "unsupported ext_proc message %T", req.GetRequest())
		}
		if err := s.Send(resp); err != nil {
			return err
		}
	}
}

// continueReply is the empty reply of the type req needs.
func continueReply(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	switch req.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{
			RequestHeaders: &extprocv3.HeadersResponse{}}}
	case *extprocv3.ProcessingRequest_RequestBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
			RequestBody: &extprocv3.BodyResponse{}}}
	case *extprocv3.ProcessingRequest_RequestTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
			RequestTrailers: &extprocv3.TrailersResponse{}}}
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
			ResponseHeaders: &extprocv3.HeadersResponse{}}}
	case *extprocv3.ProcessingRequest_ResponseBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
			ResponseBody: &extprocv3.BodyResponse{}}}
	case *extprocv3.ProcessingRequest_ResponseTrailers:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
			ResponseTrailers: &extprocv3.TrailersResponse{}}}
	}
	return nil
}

// StartSJSON starts the "default sjson" reference of issue 7: what a naive
// routing ext_proc does on every request — gjson to read "model", an alias
// lookup, sjson.SetBytes (always, even when the value does not change), a
// routing header, the new content-length and the whole body sent back.
func StartSJSON(aliases map[string]string) (*Server, error) {
	return serve(NameSJSON, func(g *grpc.Server) {
		extprocv3.RegisterExternalProcessorServer(g, &naive{aliases: aliases})
	})
}

type naive struct {
	extprocv3.UnimplementedExternalProcessorServer
	aliases map[string]string
}

func (n *naive) Process(s extprocv3.ExternalProcessor_ProcessServer) error {
	var model string
	return loop(s, func(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		switch r := req.GetRequest().(type) {
		case *extprocv3.ProcessingRequest_RequestBody:
			body := r.RequestBody.GetBody()
			model = gjson.GetBytes(body, "model").String()
			if c, ok := n.aliases[model]; ok {
				model = c
			}
			nb, err := sjson.SetBytes(body, "model", model)
			if err != nil {
				return nil
			}
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
				RequestBody: &extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{
					HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
						setHeader(extproc.HeaderCluster, "neuron-node-000"),
						setHeader("content-length", strconv.Itoa(len(nb))),
					}},
					BodyMutation:    &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: nb}},
					ClearRouteCache: true,
				}}}}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
				ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{
					HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
						setHeader(extproc.HeaderNode, "node-000"),
						setHeader(extproc.HeaderModel, model),
					}}}}}}
		}
		return continueReply(req)
	})
}

func setHeader(k, v string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: k, RawValue: []byte(v)}}
}

// SelfFleet is the fake fleet cortex-extproc's own server routes over with
// --self: Nodes neurons, each listing ModelsPerNode loaded models.
type SelfFleet struct {
	Nodes         int // default 100
	ModelsPerNode int // default 50
}

// SelfAliases are the catalogue aliases of the --self fleet (the operator
// example's tiers, plus one whose target has the same length as the alias,
// for an in-place rewrite).
var SelfAliases = map[string]string{
	"helexa/small":    "Qwen/Qwen3-1.7B",
	"helexa/balanced": "Qwen/Qwen3-8B",
	"helexa/large":    "Qwen/Qwen3.6-27B",
	"helexa/qwen8b":   "Qwen/Qwen3-8B",
}

// namedModels are loaded on every fifth node; the rest of each node's list
// is synthetic, so a decision scans a realistic fleet.
var namedModels = []string{"Qwen/Qwen3-1.7B", "Qwen/Qwen3-8B", "Qwen/Qwen3.6-27B", "unsloth/Qwen3-0.6B-GGUF"}

// SelfSnapshots builds the --self catalogue and fleet snapshot.
func SelfSnapshots(f SelfFleet) (*catalogue.Catalogue, *fleet.Snapshot) {
	if f.Nodes <= 0 {
		f.Nodes = 100
	}
	if f.ModelsPerNode <= 0 {
		f.ModelsPerNode = 50
	}
	synthetic := make([]string, 4*f.ModelsPerNode)
	for i := range synthetic {
		synthetic[i] = fmt.Sprintf("bench/model-%03d", i)
	}
	var profiles []*catalogue.Profile
	for _, id := range append(append([]string{}, namedModels...), synthetic...) {
		profiles = append(profiles, &catalogue.Profile{ID: id, Harness: "candle", VRAMMB: 8000})
	}
	cat := catalogue.New(profiles, SelfAliases, "bench")

	disc := &neuron.Discovery{Devices: []neuron.Device{{Index: 0, VRAMTotalMB: 24000}, {Index: 1, VRAMTotalMB: 24000}}}
	snap := &fleet.Snapshot{Round: 1}
	for i := 0; i < f.Nodes; i++ {
		name := fmt.Sprintf("node-%03d", i)
		n := &fleet.Node{Name: name, Cluster: "neuron-" + name, Endpoint: "http://" + name + ":13131",
			Healthy: true, Discovery: disc}
		var ids []string
		if i%5 == 0 {
			ids = append(ids, namedModels...)
		}
		for j := 0; len(ids) < f.ModelsPerNode; j++ {
			ids = append(ids, synthetic[(i*7+j)%len(synthetic)])
		}
		slices.Sort(ids) // the poller publishes models sorted by id
		for j, id := range ids {
			n.Models = append(n.Models, &fleet.Model{
				Model:    neuron.Model{ID: id, Harness: "candle", Status: neuron.StatusLoaded, Devices: []int{j % 2}},
				InFlight: (i + j) % 7, QueueDepth: (i * j) % 3,
				Endpoint: "http://" + name + ":8080",
			})
		}
		snap.Nodes = append(snap.Nodes, n)
	}
	return cat, snap
}

// StartSelf starts cortex-extproc's own ext_proc server, wired as in
// production (router over catalogue and fleet snapshots, Prometheus
// observer) but over the static SelfFleet: no neurons, no cold loads.
func StartSelf(f SelfFleet) (*Server, error) {
	cat, snap := SelfSnapshots(f)
	router := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, nil)
	m := metrics.New()
	m.SetCatalogue(cat, 1)
	ep := extproc.New(router, extproc.Options{
		Observer: m,
		// Warnings only: a routed request logs nothing in production either.
		Log: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	return serveWith(NameSelf, func(opts ...grpc.ServerOption) *grpc.Server {
		return extproc.NewGRPCServer(ep, opts...)
	})
}
