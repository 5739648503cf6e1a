package main

import (
	"bytes"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCommandPrintsAMarkdownTable(t *testing.T) {
	var out, errOut bytes.Buffer
	err := run([]string{"--trivial", "--sjson-baseline", "--ab", "--rounds", "2", "--body-size", "1KB",
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
		{},                                  // nothing to benchmark
		{"--trivial", "--body-size", "big"}, // not a size
		{"--trivial", "--concurrency", "0"}, // not a concurrency
		{"--target-pid", "1"},               // pid without target
	} {
		var out, errOut bytes.Buffer
		if err := run(args, &out, &errOut); err == nil {
			t.Errorf("%v: accepted", args)
		}
	}
}
