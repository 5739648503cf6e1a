package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCommandPrintsAMarkdownTable(t *testing.T) {
	var out, errOut bytes.Buffer
	err := run(context.Background(), []string{"--trivial", "--sjson-baseline", "--ab", "--rounds", "2", "--body-size", "1KB",
		"--model", "helexa/small", "--concurrency", "2", "--requests", "6", "--warmup", "0", "--markdown"}, &out, &errOut)
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}
	for _, want := range []string{"| sjson | 1 KB | helexa/small | 2 | 6 | 0 | yes |", "| trivial | 1 KB | helexa/small | 2 | 6 | 0 | no |"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestCommandRefusesBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{},                                                 // nothing to benchmark
		{"--trivial", "--body-size", "big"},                // not a size
		{"--trivial", "--concurrency", "0"},                // not a concurrency
		{"--target-pid", "1"},                              // pid without target
		{"--target", "a=127.0.0.1:1@x"},                    // not a pid
		{"--target", "a=127.0.0.1:1,=127.0.0.1:2"},         // no name
		{"--target", "a=127.0.0.1:1,a=127.0.0.1:2"},        // the same name twice
		{"--target", "a=127.0.0.1:1", "--target-pid", "1"}, // --target-pid with a list
		{"--trivial", "--baseline", "old"},                 // no such server
		{"--serve", "--target", "127.0.0.1:1"},             // nothing to serve
	} {
		var out, errOut bytes.Buffer
		if err := run(context.Background(), args, &out, &errOut); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}

// Two builds of a server, each in its own process, are compared through
// --serve (which prints --target's syntax) and --target list --baseline.
func TestServeThenCompareWithABaseline(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--serve", "--trivial", "--sjson-baseline"}, pw, io.Discard)
		pw.Close()
	}()
	line := make([]byte, 256)
	n, err := pr.Read(line)
	if err != nil {
		t.Fatal(err)
	}
	targets := strings.TrimSpace(string(line[:n]))
	pid := "@" + strconv.Itoa(os.Getpid())
	if !strings.HasPrefix(targets, "sjson=127.0.0.1:") || !strings.Contains(targets, ",trivial=127.0.0.1:") || strings.Count(targets, pid) != 2 {
		t.Fatalf("--serve printed %q; want sjson=host:port@pid,trivial=host:port@pid", targets)
	}
	// Renamed, as an old and a new build would be.
	targets = strings.NewReplacer("sjson=", "old=", "trivial=", "new=").Replace(targets)

	var out, errOut bytes.Buffer
	err = run(context.Background(), []string{"--target", targets, "--baseline", "old", "--model-last", "--body-size", "1KB",
		"--model", "helexa/small", "--concurrency", "1", "--requests", "4", "--warmup", "0", "--markdown"}, &out, &errOut)
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}
	md := out.String()
	for _, want := range []string{"| p50 ×old | p99 ×old | CPU ×old |", "| old | 1 KB, model last | helexa/small | 1 | 4 | 0 | yes |",
		"| new | 1 KB, model last | helexa/small | 1 | 4 | 0 | no |", "--baseline old"} {
		if !strings.Contains(md, want) {
			t.Errorf("output lacks %q:\n%s", want, md)
		}
	}
	for _, l := range strings.Split(md, "\n") {
		cols := strings.Split(strings.Trim(l, "| "), " | ")
		last := cols[max(len(cols)-3, 0):] // p50, p99 and CPU ×old; CPU may be "–" (/proc counts 10 ms ticks)
		if strings.HasPrefix(l, "| old |") && (last[0] != "1.00" || last[1] != "1.00") {
			t.Errorf("the baseline's latency ratios to itself are not 1.00: %s", l)
		}
		if strings.HasPrefix(l, "| new |") && (last[0] == "–" || last[1] == "–") {
			t.Errorf("no ratios to the baseline: %s", l)
		}
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("--serve returned %v once interrupted", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("--serve did not stop once interrupted")
	}
}
