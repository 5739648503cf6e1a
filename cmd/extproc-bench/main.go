// Command extproc-bench drives any Envoy ext_proc gRPC server with Envoy's
// exact BUFFERED message sequence at chosen body sizes and concurrencies,
// and prints latency percentiles, throughput, CPU and allocations per
// request, with ratios against a trivial CONTINUE server and a naive
// gjson+sjson server it can start itself. See package benchtool.
//
//	extproc-bench --self --trivial --sjson-baseline --ab --body-size 2KB,1MB --concurrency 1,16,64 --markdown
//	extproc-bench --target 127.0.0.1:9002 --target-pid $(pidof cortex-extproc) --trivial --ab --model helexa/balanced
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/helexa/cortex-extproc/benchtool"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "extproc-bench:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("extproc-bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		target     = fs.String("target", "", "host:port of an ext_proc gRPC server to benchmark (e.g. a running cortex-extproc)")
		targetName = fs.String("target-name", benchtool.NameTarget, "name of --target in the table")
		targetPID  = fs.Int("target-pid", 0, "pid of the --target process, to report its CPU per request from /proc/PID/stat (same machine only)")
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
	if *targetPID != 0 {
		if _, err := benchtool.ProcCPU(*targetPID); err != nil {
			return err
		}
	}

	var servers []*benchtool.Server
	defer func() {
		for _, s := range servers {
			s.Close()
		}
	}()
	if *target != "" {
		servers = append(servers, benchtool.External(*targetName, *target, *targetPID))
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

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	load := benchtool.LoadAverage()
	results, err := benchtool.Run(ctx, cfg, servers)
	if len(results) > 0 {
		cmd := "go run ./cmd/extproc-bench " + strings.Join(args, " ")
		if werr := benchtool.Write(stdout, results, benchtool.ReportOptions{Markdown: *markdown, Command: cmd, LoadBefore: load}); werr != nil && err == nil {
			err = werr
		}
	}
	if errors.Is(err, context.Canceled) {
		return errors.New("interrupted; the table above has the cells measured so far")
	}
	return err
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
