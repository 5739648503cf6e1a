// Command extproc-bench drives any Envoy ext_proc gRPC server with Envoy's
// exact BUFFERED message sequence at chosen body sizes and concurrencies,
// and prints latency percentiles, throughput, CPU and allocations per
// request, with ratios against a trivial CONTINUE server and a naive
// gjson+sjson server it can start itself. See package benchtool.
//
//	extproc-bench --self --trivial --sjson-baseline --ab --body-size 2KB,1MB --concurrency 1,16,64 --markdown
//	extproc-bench --target 127.0.0.1:9002 --target-pid $(pidof cortex-extproc) --trivial --ab --model helexa/balanced
//
// Two builds of the server, each in its own process (BENCHMARKS.md has the
// whole recipe):
//
//	extproc-bench --serve --self            # prints self=127.0.0.1:PORT@PID, serves until interrupted
//	extproc-bench --target old=ADDR@PID,new=ADDR@PID --baseline old --ab --markdown
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/helexa/cortex-extproc/internal/benchtool"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "extproc-bench:", err)
		os.Exit(1)
	}
}

// run is the command; ctx ends at Ctrl-C or SIGTERM.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("extproc-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		target     = fs.String("target", "", "ext_proc gRPC servers to benchmark (e.g. a running cortex-extproc): host:port, or a comma-separated list of name=host:port[@pid]")
		targetName = fs.String("target-name", benchtool.NameTarget, "name of a single --target host:port in the table")
		targetPID  = fs.Int("target-pid", 0, "pid of a single --target host:port process, to report its CPU per request from /proc/PID/stat (same machine only)")
		baseline   = fs.String("baseline", "", "name of a server of the run to compare every row with (p50, p99, CPU ratios), e.g. an earlier build given as --target old=…")
		serveOnly  = fs.Bool("serve", false, "start the servers chosen with --self, --trivial, --sjson-baseline, print each as name=host:port@pid (--target's syntax) and serve until interrupted; no client")
		modelLast  = fs.Bool("model-last", false, "put \"model\" after the messages, as the OpenAI and Anthropic SDKs send it (default: first)")
		self       = fs.Bool("self", false, "start cortex-extproc's own ext_proc server in-process over a fake fleet (--nodes × --models-per-node, aliases "+aliasList()+")")
		trivial    = fs.Bool("trivial", false, "start a trivial in-process server that answers CONTINUE to everything: the baseline")
		sjsonBase  = fs.Bool("sjson-baseline", false, "start a naive in-process server (gjson + default sjson.SetBytes + header and body mutation): the reference")
		sizes      = fs.String("body-size", "2KB", "comma-separated request body sizes (chat-completions JSON), e.g. 2KB,64KB,1MB")
		models     = fs.String("model", "Qwen/Qwen3-8B,helexa/balanced", "comma-separated models to request: concrete ids and/or aliases")
		concs      = fs.String("concurrency", "1,16,64", "comma-separated numbers of concurrent requests")
		requests   = fs.Int("requests", 2000, "measured requests per server and cell (body size × model × concurrency)")
		duration   = fs.Duration("duration", 0, "measure for this long per server and cell instead of --requests")
		warmup     = fs.Int("warmup", 100, "unmeasured requests per server and cell before measuring")
		ab         = fs.Bool("ab", false, "interleave the servers A/B/A/B in --rounds rounds within each cell, so one run gives fair ratios")
		rounds     = fs.Int("rounds", 4, "rounds per cell with --ab")
		respHdrs   = fs.Bool("response-headers", false, "also send response_headers after the body reply (response_header_mode SEND)")
		path       = fs.String("path", "/v1/chat/completions", "request :path")
		timeout    = fs.Duration("timeout", 10*time.Second, "longest one request may take")
		nodes      = fs.Int("nodes", 100, "--self: neurons in the fake fleet")
		perNode    = fs.Int("models-per-node", 50, "--self: models listed by each neuron")
		markdown   = fs.Bool("markdown", false, "print a markdown table (for BENCHMARKS.md)")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile of this process (client and in-process servers) to this file")
		memProfile = fs.String("memprofile", "", "write an allocation profile of this process (client and in-process servers) to this file")
	)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "Usage: extproc-bench [--target host:port] [--self] [--trivial] [--sjson-baseline] [flags]")
		fmt.Fprintln(stderr, "Drives ext_proc servers with Envoy's BUFFERED message sequence and prints latency, throughput, CPU and allocations.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q; flags start with --", fs.Arg(0))
	}
	cfg := benchtool.Config{
		Requests:        *requests,
		Duration:        *duration,
		Warmup:          *warmup,
		ResponseHeaders: *respHdrs,
		Path:            *path,
		Timeout:         *timeout,
		Progress:        stderr,
		Models:          splitList(*models),
		ModelLast:       *modelLast,
	}
	if *ab {
		cfg.Rounds = *rounds
	}
	for _, s := range splitList(*sizes) {
		n, err := benchtool.ParseSize(s)
		if err != nil {
			return fmt.Errorf("--body-size: %w", err)
		}
		cfg.BodySizes = append(cfg.BodySizes, n)
	}
	for _, s := range splitList(*concs) {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			return fmt.Errorf("--concurrency %q: want positive integers, e.g. 1,16,64", s)
		}
		cfg.Concurrency = append(cfg.Concurrency, n)
	}
	if *targetPID != 0 && *target == "" {
		return errors.New("--target-pid needs --target")
	}
	var servers []*benchtool.Server
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	if *target != "" {
		targets, err := parseTargets(*target, *targetName, *targetPID)
		if err != nil {
			return err
		}
		servers = append(servers, targets...)
	}
	if *serveOnly && len(servers) > 0 {
		return errors.New("--serve starts servers for another extproc-bench to drive; it takes no --target")
	}
	start := func(enabled bool, f func() (*benchtool.Server, error)) error {
		if !enabled {
			return nil
		}
		s, err := f()
		if err != nil {
			return err
		}
		servers = append(servers, s)
		return nil
	}
	if err := start(*self, func() (*benchtool.Server, error) {
		return benchtool.StartSelf(benchtool.SelfFleet{Nodes: *nodes, ModelsPerNode: *perNode})
	}); err != nil {
		return err
	}
	if err := start(*sjsonBase, func() (*benchtool.Server, error) { return benchtool.StartSJSON(benchtool.SelfAliases) }); err != nil {
		return err
	}
	if err := start(*trivial, benchtool.StartTrivial); err != nil {
		return err
	}
	if len(servers) == 0 {
		fs.Usage()
		return errors.New("nothing to benchmark: give --target host:port and/or --self, --trivial, --sjson-baseline")
	}
	names := map[string]bool{}
	for _, s := range servers {
		if names[s.Name] {
			return fmt.Errorf("two servers are named %q; name each --target differently", s.Name)
		}
		names[s.Name] = true
	}
	if *baseline != "" && !names[*baseline] {
		return fmt.Errorf("--baseline %q is none of the servers of this run (%s)", *baseline, strings.Join(slices.Sorted(maps.Keys(names)), ", "))
	}
	if *serveOnly {
		return serve(ctx, servers, stdout, stderr)
	}

	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}

	if *memProfile != "" {
		f, err := os.Create(*memProfile)
		if err != nil {
			return fmt.Errorf("--memprofile: %w", err)
		}
		defer func() {
			if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
				fmt.Fprintln(stderr, "extproc-bench: --memprofile:", err)
			}
			f.Close()
		}()
	}

	load := benchtool.LoadAverage()
	results, err := benchtool.Run(ctx, cfg, servers)
	if len(results) > 0 {
		cmd := "go run ./cmd/extproc-bench " + strings.Join(args, " ")
		if werr := benchtool.Write(stdout, results, benchtool.ReportOptions{Markdown: *markdown, Command: cmd, LoadBefore: load, Baseline: *baseline}); werr != nil && err == nil {
			err = werr
		}
	}
	if errors.Is(err, context.Canceled) {
		return errors.New("interrupted; the table above has the cells measured so far")
	}
	return err
}

// parseTargets reads --target: a bare host:port (named name, with pid), or
// a comma-separated list of name=host:port[@pid].
func parseTargets(list, name string, pid int) ([]*benchtool.Server, error) {
	if !strings.Contains(list, "=") {
		if pid != 0 {
			if _, err := benchtool.ProcCPU(pid); err != nil {
				return nil, err
			}
		}
		return []*benchtool.Server{benchtool.External(name, list, pid)}, nil
	}
	if pid != 0 {
		return nil, errors.New("--target-pid is for a single --target host:port; in a list, give each pid as name=host:port@pid")
	}
	var out []*benchtool.Server
	for _, item := range splitList(list) {
		n, addr, ok := strings.Cut(item, "=")
		if !ok || n == "" || addr == "" {
			return nil, fmt.Errorf("--target %q: want name=host:port[@pid]", item)
		}
		p := 0
		if a, ps, ok := strings.Cut(addr, "@"); ok {
			var err error
			if p, err = strconv.Atoi(ps); err != nil || p <= 0 {
				return nil, fmt.Errorf("--target %q: the pid after @ must be a positive number", item)
			}
			if _, err := benchtool.ProcCPU(p); err != nil {
				return nil, err
			}
			addr = a
		}
		out = append(out, benchtool.External(n, addr, p))
	}
	return out, nil
}

// serve prints each in-process server as --target's name=host:port@pid and
// keeps them serving until ctx ends (the process is interrupted).
func serve(ctx context.Context, servers []*benchtool.Server, stdout, stderr io.Writer) error {
	var list []string
	for _, s := range servers {
		list = append(list, fmt.Sprintf("%s=%s@%d", s.Name, s.Addr, os.Getpid()))
	}
	fmt.Fprintln(stdout, strings.Join(list, ","))
	fmt.Fprintln(stderr, "extproc-bench: serving until interrupted")
	<-ctx.Done()
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func aliasList() string {
	var out []string
	for a, c := range benchtool.SelfAliases {
		out = append(out, a+"→"+c)
	}
	slices.Sort(out)
	return strings.Join(out, ", ")
}
