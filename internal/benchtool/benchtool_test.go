package benchtool

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/tidwall/gjson"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int{"2KB": 2048, "64kb": 64 << 10, "1MB": 1 << 20, "1MiB": 1 << 20, "512": 512, "3 K": 3072} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "KB", "-1MB", "1GB", "two"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) accepted a bad size", bad)
		}
	}
}

func TestChatBodyIsARealisticRequestOfTheAskedSize(t *testing.T) {
	for _, size := range []int{2 << 10, 64 << 10, 1 << 20} {
		body := ChatBody("helexa/balanced", size)
		if len(body) != size {
			t.Errorf("%d: body is %d bytes", size, len(body))
		}
		if !json.Valid(body) {
			t.Fatalf("%d: body is not valid JSON", size)
		}
		if !bytes.HasPrefix(body, []byte(`{"model":"helexa/balanced",`)) {
			t.Errorf("%d: model is not the first field: %.60s", size, body)
		}
		var req struct {
			Model    string `json:"model"`
			Messages []struct{ Role, Content string }
		}
		if err := json.Unmarshal(body, &req); err != nil {
			t.Fatal(err)
		}
		if req.Model != "helexa/balanced" || len(req.Messages) < 2 || req.Messages[0].Role != "system" {
			t.Errorf("%d: unexpected shape: model %q, %d messages", size, req.Model, len(req.Messages))
		}
		if size >= 64<<10 && len(req.Messages) < 4 {
			t.Errorf("%d: want a conversation of several long messages, got %d", size, len(req.Messages))
		}
		if !strings.Contains(req.Messages[1].Content, "\n") || !strings.Contains(req.Messages[1].Content, `"`) {
			t.Errorf("%d: content has no escaped newlines or quotes for a parser to walk", size)
		}
	}
}

// The SDKs' shape: every field as ChatBody has it, "model" last.
func TestChatBodyModelLast(t *testing.T) {
	for _, size := range []int{2 << 10, 64 << 10, 1 << 20} {
		body := ChatBodyModelLast("helexa/balanced", size)
		if len(body) != size || !json.Valid(body) {
			t.Fatalf("%d: %d bytes, valid JSON %v", size, len(body), json.Valid(body))
		}
		if !bytes.HasSuffix(body, []byte(`],"model":"helexa/balanced"}`)) {
			t.Errorf("%d: model is not the last field: …%s", size, body[len(body)-60:])
		}
		var first, last map[string]any
		if json.Unmarshal(ChatBody("helexa/balanced", size), &first) != nil || json.Unmarshal(body, &last) != nil {
			t.Fatal("bodies do not decode")
		}
		if len(first) != len(last) || first["model"] != last["model"] || len(first["messages"].([]any)) < len(last["messages"].([]any))-1 {
			t.Errorf("%d: model-last body is not the same request: %d vs %d fields", size, len(last), len(first))
		}
	}
}

// cortex-extproc's server reads and rewrites a model sent last just the
// same (past reqbody.NearLimit: the validator's span and the splice).
func TestRunModelLast(t *testing.T) {
	self, err := StartSelf(SelfFleet{Nodes: 5, ModelsPerNode: 5})
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	results, err := Run(context.Background(), Config{BodySizes: []int{2 << 10, 64 << 10}, Models: []string{"helexa/small", "Qwen/Qwen3-8B"},
		Concurrency: []int{2}, Requests: 6, ModelLast: true}, []*Server{self})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range results {
		if r.Errors != 0 || r.Immediate != 0 || !r.ModelLast {
			t.Fatalf("%s %d: %d errors (%s), %d local replies (%s)", r.Model, r.BodySize, r.Errors, r.FirstError, r.Immediate, r.FirstImmediate)
		}
		newBody := r.SampleBody.GetRequestBody().GetResponse().GetBodyMutation().GetBody()
		want := ChatBodyModelLast("Qwen/Qwen3-1.7B", r.BodySize-len("helexa/small")+len("Qwen/Qwen3-1.7B"))
		switch {
		case r.Model == "helexa/small" && (r.Mutations != r.Requests || !bytes.Equal(newBody, want)):
			t.Errorf("%d: alias sent last: %d of %d rewritten, body as expected %v", r.BodySize, r.Mutations, r.Requests, bytes.Equal(newBody, want))
		case r.Model != "helexa/small" && r.Mutations != 0:
			t.Errorf("%d: concrete id sent last: body sent back", r.BodySize)
		}
	}
	var out bytes.Buffer
	if err := Write(&out, results, ReportOptions{Markdown: true}); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "| self | 64 KB, model last | helexa/small |") {
		t.Errorf("table does not say the model came last:\n%s", out.String())
	}
}

// TestRunMeasuresEachServerAndChecksTheirReplies runs the core against the
// three servers the tool starts itself, with Envoy's full sequence.
func TestRunMeasuresEachServerAndChecksTheirReplies(t *testing.T) {
	self, err := StartSelf(SelfFleet{})
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	naive, err := StartSJSON(SelfAliases)
	if err != nil {
		t.Fatal(err)
	}
	defer naive.Close()
	triv, err := StartTrivial()
	if err != nil {
		t.Fatal(err)
	}
	defer triv.Close()

	const n = 20
	results, err := Run(context.Background(), Config{
		BodySizes:       []int{2 << 10},
		Models:          []string{"helexa/balanced", "Qwen/Qwen3-8B"},
		Concurrency:     []int{1, 4},
		Requests:        n,
		Warmup:          2,
		Rounds:          2,
		ResponseHeaders: true,
	}, []*Server{self, naive, triv})
	if err != nil {
		t.Fatal(err)
	}
	if len(results) != 2*2*3 {
		t.Fatalf("got %d results, want models × concurrencies × servers = 12", len(results))
	}
	for _, r := range results {
		name := r.Server + " " + r.Model
		if r.Errors != 0 || r.Immediate != 0 {
			t.Fatalf("%s: %d errors (%s), %d local replies (%s)", name, r.Errors, r.FirstError, r.Immediate, r.FirstImmediate)
		}
		if r.Requests != n || r.P50 <= 0 || r.P99 < r.P50 || r.Mean <= 0 || r.Throughput <= 0 {
			t.Errorf("%s: empty stats: %d requests, p50 %v p99 %v mean %v, %.0f req/s", name, r.Requests, r.P50, r.P99, r.Mean, r.Throughput)
		}
		if r.CPUScope != "process" || r.CPU <= 0 || !r.HasAllocs || r.Allocs == 0 || r.AllocBytes == 0 {
			t.Errorf("%s: no CPU (%v, %s) or allocations (%d)", name, r.CPU, r.CPUScope, r.Allocs)
		}
		body := r.SampleBody.GetRequestBody().GetResponse()
		newBody := body.GetBodyMutation().GetBody()
		switch {
		case r.Server == NameTrivial:
			if r.Mutations != 0 || body.GetHeaderMutation() != nil {
				t.Errorf("%s: the trivial server changed the request", name)
			}
		case r.Server == NameSJSON || r.Model == "helexa/balanced":
			// The naive server always sends the body back; ours only to
			// rewrite an alias.
			if r.Mutations != r.Requests {
				t.Errorf("%s: %d of %d bodies sent back, want all", name, r.Mutations, r.Requests)
			}
			if got := gjson.GetBytes(newBody, "model").String(); got != "Qwen/Qwen3-8B" {
				t.Errorf("%s: rewritten body names model %q, want the alias target Qwen/Qwen3-8B", name, got)
			}
			if r.Server == NameSelf && !strings.HasPrefix(headerSet(body.GetHeaderMutation(), "x-cortex-cluster"), "neuron-node-") {
				t.Errorf("%s: no route to a fleet node: %v", name, body.GetHeaderMutation())
			}
		default: // self, concrete id: routed, body untouched
			if r.Mutations != 0 || newBody != nil {
				t.Errorf("%s: body sent back for a concrete model (%d times)", name, r.Mutations)
			}
			if !strings.HasPrefix(headerSet(body.GetHeaderMutation(), "x-cortex-cluster"), "neuron-node-") {
				t.Errorf("%s: no route to a fleet node: %v", name, body.GetHeaderMutation())
			}
		}
	}

	var out bytes.Buffer
	if err := Write(&out, results, ReportOptions{Markdown: true, Command: "extproc-bench --self"}); err != nil {
		t.Fatal(err)
	}
	md := out.String()
	for _, want := range []string{"| server | body | model |", "| self | 2 KB | helexa/balanced | 4 | 20 | 0 | yes |",
		"| self | 2 KB | Qwen/Qwen3-8B | 1 | 20 | 0 | no |", "- Command: `extproc-bench --self`"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(line, "| trivial |") {
			cols := strings.Split(line, " | ")
			if cols[14] != "1.00" || cols[15] != "1.00" {
				t.Errorf("trivial's ratio to itself is not 1.00: %s", line)
			}
		}
		if strings.HasPrefix(line, "| self |") && strings.Contains(line, "| – | – | – |") {
			t.Errorf("self row lacks ratios: %s", line)
		}
	}
}

// scripted is an ext_proc server whose body reply the test chooses.
type scripted struct {
	extprocv3.UnimplementedExternalProcessorServer
	headers func() *extprocv3.ProcessingResponse
	body    []*extprocv3.ProcessingResponse
}

func (s *scripted) Process(g extprocv3.ExternalProcessor_ProcessServer) error {
	return loop(g, func(req *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		switch req.GetRequest().(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			if s.headers != nil {
				return s.headers()
			}
		case *extprocv3.ProcessingRequest_RequestBody:
			for _, r := range s.body[:len(s.body)-1] {
				if err := g.Send(r); err != nil {
					return nil
				}
			}
			return s.body[len(s.body)-1]
		}
		return continueReply(req)
	})
}

func startScripted(t *testing.T, s *scripted) *Server {
	t.Helper()
	srv, err := serve("scripted", func(g *grpc.Server) { extprocv3.RegisterExternalProcessorServer(g, s) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

func bodyReply(cr *extprocv3.CommonResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
		RequestBody: &extprocv3.BodyResponse{Response: cr}}}
}

func runOne(t *testing.T, s *Server) Result {
	t.Helper()
	results, err := Run(context.Background(), Config{BodySizes: []int{1024}, Models: []string{"m"},
		Concurrency: []int{2}, Requests: 6}, []*Server{s})
	if err != nil {
		t.Fatal(err)
	}
	return results[0]
}

// A cold load makes the server send a standalone override_message_timeout
// before the real body reply; the client must wait for the latter.
func TestOverrideMessageTimeoutIsSkipped(t *testing.T) {
	srv := startScripted(t, &scripted{body: []*extprocv3.ProcessingResponse{
		{OverrideMessageTimeout: durationpb.New(time.Minute)},
		bodyReply(&extprocv3.CommonResponse{}),
	}})
	r := runOne(t, srv)
	if r.Errors != 0 || r.Requests != 6 || r.Overrides != 6 {
		t.Fatalf("errors %d (%s), requests %d, overrides %d; want 0, 6, 6", r.Errors, r.FirstError, r.Requests, r.Overrides)
	}
}

// Replies Envoy would reject count as errors, with the reason.
func TestRepliesEnvoyRejectsAreErrors(t *testing.T) {
	for name, tc := range map[string]struct {
		s    *scripted
		want string
	}{
		"body reply to headers": {&scripted{headers: func() *extprocv3.ProcessingResponse {
			return bodyReply(&extprocv3.CommonResponse{})
		}, body: []*extprocv3.ProcessingResponse{bodyReply(nil)}}, "spurious"},
		"content-length not updated": {&scripted{body: []*extprocv3.ProcessingResponse{bodyReply(&extprocv3.CommonResponse{
			BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: []byte(`{"model":"x"}`)}},
			HeaderMutation: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
				setHeader("content-length", "1024")}},
		})}}, "mismatch_between_content_length"},
	} {
		t.Run(name, func(t *testing.T) {
			srv := startScripted(t, tc.s)
			_, err := Run(context.Background(), Config{BodySizes: []int{1024}, Models: []string{"m"},
				Concurrency: []int{1}, Requests: 5}, []*Server{srv})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "protocol") {
				t.Fatalf("err = %v; want the server refused as not following the protocol, mentioning %q", err, tc.want)
			}
		})
	}
}

func TestUnreachableServerFailsFast(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	_, err = Run(context.Background(), Config{BodySizes: []int{1024}, Models: []string{"m"}, Concurrency: []int{1},
		Requests: 1000, Timeout: 5 * time.Second}, []*Server{External(NameTarget, addr, 0)})
	if err == nil || !strings.Contains(err.Error(), addr) || !strings.Contains(err.Error(), "ext_proc gRPC port") {
		t.Fatalf("err = %v; want one naming %s and what to check", err, addr)
	}
}

func TestProcCPUReadsAProcess(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	if _, err := ProcCPU(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := ProcCPU(1 << 30); err == nil || !strings.Contains(err.Error(), "--target-pid") {
		t.Fatalf("missing process: err = %v, want one naming --target-pid", err)
	}
}
