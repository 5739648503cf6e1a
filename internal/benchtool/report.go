package benchtool

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// ReportOptions shape Write's output.
type ReportOptions struct {
	Markdown bool
	Command  string // the command line, printed above the table
	// LoadBefore is LoadAverage() taken before the run: on a shared
	// machine, other work skews every number.
	LoadBefore string
	// Baseline, when set, names a server of the run (an earlier build of
	// the server under test, say) that every row is also compared with:
	// p50, p99 and CPU as ratios to its figures in the same cell.
	Baseline string
}

type cellKey struct {
	size  int
	model string
	conc  int
}

// Write prints the results as an aligned text table or a markdown table,
// with the ratios against the trivial and sjson servers of the same cell,
// and against opt.Baseline when set.
func Write(w io.Writer, results []Result, opt ReportOptions) error {
	base := map[cellKey]map[string]*Result{}
	for i := range results {
		r := &results[i]
		k := cellKey{r.BodySize, r.Model, r.Concurrency}
		if base[k] == nil {
			base[k] = map[string]*Result{}
		}
		base[k][r.Server] = r
	}
	header := []string{"server", "body", "model", "conc", "requests", "errors", "body sent back", "p50", "p99", "mean", "req/s",
		"CPU/req", "allocs/req", "B/req", "p50 ×trivial", "p99 ×trivial", "CPU ×trivial", "Δallocs vs trivial", "p50 ×sjson", "p99 ×sjson"}
	if opt.Baseline != "" {
		header = append(header, "p50 ×"+opt.Baseline, "p99 ×"+opt.Baseline, "CPU ×"+opt.Baseline)
	}
	rows := [][]string{}
	for i := range results {
		r := &results[i]
		cell := base[cellKey{r.BodySize, r.Model, r.Concurrency}]
		errs := fmt.Sprint(r.Errors)
		if r.Immediate > 0 {
			errs += fmt.Sprintf(" (+%d local replies)", r.Immediate)
		}
		cpu := fmtDur(r.CPUPerRequest())
		if r.CPUScope != "process" {
			cpu += " (" + r.CPUScope + ")"
		}
		allocs, bytes := "–", "–"
		if r.HasAllocs {
			allocs, bytes = fmt.Sprintf("%.0f", r.AllocsPerRequest()), fmtBytes(r.BytesPerRequest())
		}
		size := FormatSize(r.BodySize)
		if r.ModelLast {
			size += ", model last"
		}
		row := []string{r.Server, size, r.Model, fmt.Sprint(r.Concurrency), fmt.Sprint(r.Requests), errs, bodyBack(r),
			fmtDur(r.P50), fmtDur(r.P99), fmtDur(r.Mean), fmt.Sprintf("%.0f", r.Throughput), cpu, allocs, bytes}
		t, s := cell[NameTrivial], cell[NameSJSON]
		row = append(row, latRatio(r, t, p50), latRatio(r, t, p99), cpuRatio(r, t), allocDelta(r, t),
			latRatio(r, s, p50), latRatio(r, s, p99))
		if opt.Baseline != "" {
			b := cell[opt.Baseline]
			row = append(row, latRatio(r, b, p50), latRatio(r, b, p99), cpuRatio(r, b))
		}
		rows = append(rows, row)
	}

	bw := bufio.NewWriter(w)
	// The preamble is a list in markdown so each line renders on its own.
	item := ""
	if opt.Markdown {
		item = "- "
	}
	if opt.Command != "" {
		if opt.Markdown {
			fmt.Fprintf(bw, "%sCommand: `%s`\n", item, opt.Command)
		} else {
			fmt.Fprintf(bw, "Command: %s\n", opt.Command)
		}
	}
	fmt.Fprintf(bw, "%sMachine: %s\n", item, Machine())
	if opt.LoadBefore != "" {
		fmt.Fprintf(bw, "%sLoad average (1/5/15 min): %s before, %s after\n", item, opt.LoadBefore, LoadAverage())
	}
	fmt.Fprintln(bw)
	if opt.Markdown {
		fmt.Fprintf(bw, "| %s |\n", strings.Join(header, " | "))
		seps := make([]string, len(header))
		for i := range seps {
			seps[i] = "---"
			if i >= 3 {
				seps[i] = "---:"
			}
		}
		fmt.Fprintf(bw, "|%s|\n", strings.Join(seps, "|"))
		for _, row := range rows {
			fmt.Fprintf(bw, "| %s |\n", strings.Join(row, " | "))
		}
	} else {
		tw := tabwriter.NewWriter(bw, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, strings.Join(header, "\t")+"\t")
		for _, row := range rows {
			fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
		}
		tw.Flush()
	}
	fmt.Fprint(bw, "\n"+notes(opt.Markdown))
	for i := range results {
		r := &results[i]
		if r.FirstError != "" {
			fmt.Fprintf(bw, "\n%s %s %s c=%d: first error: %s\n", r.Server, FormatSize(r.BodySize), r.Model, r.Concurrency, r.FirstError)
		}
		if r.FirstImmediate != "" {
			fmt.Fprintf(bw, "\n%s %s %s c=%d: answered with a local reply (not routed): %s\n", r.Server, FormatSize(r.BodySize), r.Model, r.Concurrency, r.FirstImmediate)
		}
	}
	return bw.Flush()
}

func notes(md bool) string {
	b := "- "
	if !md {
		b = "  "
	}
	return b + "Latency: first ext_proc message sent → last reply received, per HTTP request (one gRPC stream each, one shared HTTP/2 connection per server).\n" +
		b + "CPU/req: process CPU (client and in-process servers share it and the cores) unless marked (server: /proc/PID/stat of --target-pid) or (client: the bench client only).\n" +
		b + "allocs/req, B/req: whole process (client included), in-process servers only; Δallocs vs trivial is the server's own extra.\n" +
		b + "Ratios compare servers measured in the same cell (body, model, concurrency), rounds interleaved with --ab.\n"
}

// bodyBack says whether the server replaced the body: the 1 MB cost.
func bodyBack(r *Result) string {
	switch r.Mutations {
	case 0:
		return "no"
	case r.Requests:
		return "yes"
	}
	return fmt.Sprintf("%d of %d", r.Mutations, r.Requests)
}

func p50(r *Result) time.Duration { return r.P50 }
func p99(r *Result) time.Duration { return r.P99 }

// latRatio is r's latency over base's in the same cell ("–" without a base).
func latRatio(r, base *Result, of func(*Result) time.Duration) string {
	if base == nil || r.Requests == 0 || of(base) <= 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", float64(of(r))/float64(of(base)))
}

func cpuRatio(r, t *Result) string {
	if t == nil || r.CPUScope != t.CPUScope || t.CPUPerRequest() <= 0 || r.Requests == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", float64(r.CPUPerRequest())/float64(t.CPUPerRequest()))
}

func allocDelta(r, t *Result) string {
	if t == nil || !r.HasAllocs || !t.HasAllocs || r.Requests == 0 || t.Requests == 0 {
		return "–"
	}
	return fmt.Sprintf("%+.0f", r.AllocsPerRequest()-t.AllocsPerRequest())
}

func fmtDur(d time.Duration) string {
	switch {
	case d <= 0:
		return "–"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/float64(time.Microsecond))
	case d < time.Second:
		return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func fmtBytes(b float64) string {
	switch {
	case b >= 1<<20:
		return fmt.Sprintf("%.2f MB", b/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1f KB", b/(1<<10))
	}
	return fmt.Sprintf("%.0f B", b)
}

// LoadAverage is the 1, 5 and 15 minute load averages ("?" without /proc).
func LoadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

// Machine describes where the numbers were taken.
func Machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	return fmt.Sprintf("%s/%s, %s, %d CPUs, GOMAXPROCS %d, %s", runtime.GOOS, runtime.GOARCH, model,
		runtime.NumCPU(), runtime.GOMAXPROCS(0), runtime.Version())
}
