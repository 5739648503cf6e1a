// Package benchtool drives ext_proc gRPC servers with Envoy's exact message
// sequence (envoy-ext-proc.md §1.5) and measures them: latency percentiles,
// throughput, CPU and allocations per request, and ratios against a
// trivial CONTINUE server and a naive gjson+sjson server run in the same
// benchmark. cmd/extproc-bench is its command line.
package benchtool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Config is one benchmark run. Every combination of BodySizes × Models ×
// Concurrency is a cell; every server runs every cell.
type Config struct {
	BodySizes   []int
	Models      []string
	Concurrency []int
	// Requests per server and cell; ignored when Duration > 0.
	Requests int
	// Duration per server and cell.
	Duration time.Duration
	// Warmup requests per server and cell, not measured.
	Warmup int
	// Rounds > 1 interleaves the servers A/B/A/B within each cell, each
	// round running 1/Rounds of the requests (or duration) per server, so
	// drift (thermal, noisy neighbours, GC state) hits all servers alike.
	Rounds int
	// ResponseHeaders also sends response_headers after the body reply.
	ResponseHeaders bool
	// ModelLast puts "model" after the messages (ChatBodyModelLast), as
	// the OpenAI and Anthropic SDKs send it, instead of first.
	ModelLast bool
	// Path is the request :path (default /v1/chat/completions).
	Path string
	// Timeout bounds one request (default 10s).
	Timeout time.Duration
	// MaxErrors stops a server's segment after this many failed requests
	// (default 50), so a broken server cannot make the run hang.
	MaxErrors int
	// Progress receives one line per measured segment (nil: none).
	Progress io.Writer
}

func (c *Config) defaults() error {
	if len(c.BodySizes) == 0 || len(c.Models) == 0 || len(c.Concurrency) == 0 {
		return errors.New("need at least one body size, model and concurrency")
	}
	for _, n := range c.Concurrency {
		if n <= 0 {
			return fmt.Errorf("concurrency %d: must be at least 1", n)
		}
	}
	if c.Requests <= 0 && c.Duration <= 0 {
		return errors.New("give a number of requests or a duration per cell")
	}
	if c.Rounds <= 0 {
		c.Rounds = 1
	}
	if c.Path == "" {
		c.Path = "/v1/chat/completions"
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	if c.MaxErrors <= 0 {
		c.MaxErrors = 50
	}
	if c.Progress == nil {
		c.Progress = io.Discard
	}
	return nil
}

// Result is one server in one cell.
type Result struct {
	Server      string
	BodySize    int
	ModelLast   bool // "model" after the messages (Config.ModelLast)
	Model       string
	Concurrency int

	Requests  int // completed without error (immediate responses included)
	Errors    int
	Immediate int // requests answered with an immediate_response (a local reply)
	Mutations int // body replies that replaced the body
	Overrides int // standalone override_message_timeout replies seen
	// FirstError / FirstImmediate explain the first failure or local reply.
	FirstError     string
	FirstImmediate string

	P50, P99, Mean time.Duration
	Elapsed        time.Duration // wall time of the measured segments
	Throughput     float64       // requests per second

	// CPU during the measured segments; CPUScope says whose: "process"
	// (client and in-process server together), "server" (/proc/PID/stat of
	// an external server) or "client" (external server, pid unknown).
	CPU      time.Duration
	CPUScope string
	// Allocs and AllocBytes are process-wide (client included), only for
	// in-process servers.
	Allocs, AllocBytes uint64
	HasAllocs          bool

	// SampleHeaders and SampleBody are the first measured request's replies.
	SampleHeaders, SampleBody *extprocv3.ProcessingResponse
}

// CPUPerRequest is CPU time per completed request.
func (r *Result) CPUPerRequest() time.Duration {
	if r.Requests == 0 {
		return 0
	}
	return r.CPU / time.Duration(r.Requests)
}

// AllocsPerRequest and BytesPerRequest are process allocations per request.
func (r *Result) AllocsPerRequest() float64 { return perRequest(r.Allocs, r.Requests) }

// BytesPerRequest is process bytes allocated per request.
func (r *Result) BytesPerRequest() float64 { return perRequest(r.AllocBytes, r.Requests) }

func perRequest(v uint64, n int) float64 {
	if n == 0 {
		return 0
	}
	return float64(v) / float64(n)
}

// accum gathers one server's segments within a cell.
type accum struct {
	res       Result
	latencies []time.Duration
}

// Run measures every server in every cell. It returns an error only when a
// server cannot be reached at all; failures during measurement are counted
// in Result.Errors.
func Run(ctx context.Context, cfg Config, servers []*Server) ([]Result, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if len(servers) == 0 {
		return nil, errors.New("no server to benchmark: give --target, --self, --trivial or --sjson-baseline")
	}
	clients := make([]extprocv3.ExternalProcessorClient, len(servers))
	for i, s := range servers {
		conn, err := dial(s.Addr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", s.Name, err)
		}
		defer conn.Close()
		clients[i] = extprocv3.NewExternalProcessorClient(conn)
	}

	// One probe per server so a wrong address fails in a second with a
	// clear message instead of filling a table with errors.
	probe := &request{path: cfg.Path, body: ChatBody(cfg.Models[0], 512), responseHeaders: cfg.ResponseHeaders, timeout: cfg.Timeout}
	for i, s := range servers {
		if o := do(ctx, clients[i], probe, "bench-probe"); o.err != nil {
			if status.Code(o.err) == codes.Unavailable {
				return nil, fmt.Errorf("%s server at %s cannot be reached: %v; check the address is its ext_proc gRPC port", s.Name, s.Addr, o.err)
			}
			return nil, fmt.Errorf("%s server at %s does not follow Envoy's ext_proc protocol: %v", s.Name, s.Addr, o.err)
		}
	}

	var results []Result
	for _, size := range cfg.BodySizes {
		for _, model := range cfg.Models {
			body := ChatBody(model, size)
			if cfg.ModelLast {
				body = ChatBodyModelLast(model, size)
			}
			req := &request{path: cfg.Path, body: body, responseHeaders: cfg.ResponseHeaders, timeout: cfg.Timeout}
			for _, conc := range cfg.Concurrency {
				cell, err := runCell(ctx, &cfg, servers, clients, req, model, conc)
				results = append(results, cell...)
				if err != nil {
					return results, err
				}
			}
		}
	}
	return results, nil
}

func runCell(ctx context.Context, cfg *Config, servers []*Server, clients []extprocv3.ExternalProcessorClient,
	req *request, model string, conc int) ([]Result, error) {
	acc := make([]*accum, len(servers))
	for i, s := range servers {
		acc[i] = &accum{res: Result{Server: s.Name, BodySize: len(req.body), ModelLast: cfg.ModelLast, Model: model, Concurrency: conc}}
		if cfg.Warmup > 0 {
			warm := &accum{}
			segment(ctx, cfg, s, clients[i], req, conc, cfg.Warmup, 0, warm)
		}
	}
	perRound := 0
	if cfg.Duration <= 0 {
		perRound = (cfg.Requests + cfg.Rounds - 1) / cfg.Rounds
	}
	dur := cfg.Duration / time.Duration(cfg.Rounds)
	for round := 0; round < cfg.Rounds; round++ {
		// Alternate the order (A B, B A, …) so neither server always
		// runs right after the other's garbage.
		order := make([]int, len(servers))
		for i := range order {
			order[i] = i
		}
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, i := range order {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			n := perRound
			if perRound > 0 && round == cfg.Rounds-1 {
				n = cfg.Requests - perRound*(cfg.Rounds-1)
			}
			if n <= 0 && dur <= 0 {
				continue
			}
			segment(ctx, cfg, servers[i], clients[i], req, conc, n, dur, acc[i])
		}
	}
	out := make([]Result, len(servers))
	for i, a := range acc {
		a.finish()
		out[i] = a.res
		r := &a.res
		fmt.Fprintf(cfg.Progress, "%-8s %6s %-16s c=%-3d %6d req  p50 %-9s p99 %-9s %8.0f req/s  errors %d\n",
			r.Server, FormatSize(r.BodySize), r.Model, r.Concurrency, r.Requests, fmtDur(r.P50), fmtDur(r.P99), r.Throughput, r.Errors)
	}
	return out, ctx.Err()
}

// segment runs n requests (or for dur) at concurrency conc against one
// server and adds latencies, counts, CPU and allocations to a.
func segment(ctx context.Context, cfg *Config, s *Server, client extprocv3.ExternalProcessorClient,
	req *request, conc, n int, dur time.Duration, a *accum) {
	// Start every segment from a collected heap, so one server's garbage
	// is not collected on another's time.
	runtime.GC()
	var ms0, ms1 runtime.MemStats
	if s.InProcess {
		runtime.ReadMemStats(&ms0)
	}
	cpu0, _ := cpuOf(s)

	var (
		next, errs atomic.Int64
		mu         sync.Mutex
		wg         sync.WaitGroup
		deadline   time.Time
	)
	if n <= 0 {
		deadline = time.Now().Add(dur)
	}
	start := time.Now()
	for w := 0; w < conc; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var (
				lat   []time.Duration
				local Result
				first outcome
				sent  int64
			)
			for {
				if n > 0 {
					if next.Add(1) > int64(n) {
						break
					}
				} else if time.Now().After(deadline) {
					break
				}
				if errs.Load() >= int64(cfg.MaxErrors) || ctx.Err() != nil {
					break
				}
				sent++
				o := do(ctx, client, req, requestID(w, sent))
				if o.err != nil {
					errs.Add(1)
					local.Errors++
					if local.FirstError == "" {
						local.FirstError = o.err.Error()
					}
					continue
				}
				lat = append(lat, o.latency)
				local.Overrides += o.overrides
				if o.mutated {
					local.Mutations++
				}
				if o.immediate != nil {
					local.Immediate++
					if local.FirstImmediate == "" {
						local.FirstImmediate = fmt.Sprintf("HTTP %d %s: %.200s", o.immediate.GetStatus().GetCode(), o.immediate.GetDetails(), o.immediate.GetBody())
					}
				}
				if first.headers == nil {
					first = o
				}
			}
			mu.Lock()
			defer mu.Unlock()
			a.latencies = append(a.latencies, lat...)
			a.res.Errors += local.Errors
			a.res.Immediate += local.Immediate
			a.res.Mutations += local.Mutations
			a.res.Overrides += local.Overrides
			if a.res.FirstError == "" {
				a.res.FirstError = local.FirstError
			}
			if a.res.FirstImmediate == "" {
				a.res.FirstImmediate = local.FirstImmediate
			}
			if a.res.SampleHeaders == nil && first.headers != nil {
				a.res.SampleHeaders, a.res.SampleBody = first.headers, first.bodyReply
			}
		}()
	}
	wg.Wait()
	a.res.Elapsed += time.Since(start)

	cpu1, scope := cpuOf(s)
	a.res.CPU += cpu1 - cpu0
	a.res.CPUScope = scope
	if s.InProcess {
		runtime.ReadMemStats(&ms1)
		a.res.Allocs += ms1.Mallocs - ms0.Mallocs
		a.res.AllocBytes += ms1.TotalAlloc - ms0.TotalAlloc
		a.res.HasAllocs = true
	}
}

func requestID(worker int, n int64) string {
	return fmt.Sprintf("%08x-0000-4000-8000-%012x", worker, n)
}

func (a *accum) finish() {
	r := &a.res
	r.Requests = len(a.latencies)
	if r.Requests == 0 {
		return
	}
	slices.Sort(a.latencies)
	var sum time.Duration
	for _, l := range a.latencies {
		sum += l
	}
	r.Mean = sum / time.Duration(r.Requests)
	r.P50 = percentile(a.latencies, 0.50)
	r.P99 = percentile(a.latencies, 0.99)
	if r.Elapsed > 0 {
		r.Throughput = float64(r.Requests) / r.Elapsed.Seconds()
	}
}

// percentile is the nearest-rank percentile of sorted latencies.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// cpuOf reads the CPU time that counts for s.
func cpuOf(s *Server) (time.Duration, string) {
	if s.PID > 0 {
		if d, err := ProcCPU(s.PID); err == nil {
			return d, "server"
		}
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, "none"
	}
	d := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	if s.InProcess {
		return d, "process"
	}
	return d, "client"
}

// userHZ is the unit of /proc/PID/stat times: USER_HZ, 100 on every Linux
// architecture Go supports (the kernel's ABI, independent of CONFIG_HZ).
const userHZ = 100

// ProcCPU is the user+system CPU time of process pid from /proc/PID/stat.
func ProcCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("read CPU of --target-pid %d: %w (is the server running on this machine?)", pid, err)
	}
	// The command name is in parentheses and may contain spaces: fields
	// are counted after the last ')'. utime and stime are fields 14 and 15.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected utime/stime %q %q", pid, f[11], f[12])
	}
	return time.Duration(ut+st) * time.Second / userHZ, nil
}
