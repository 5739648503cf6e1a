package neuronsim

import (
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestParseModelSpecs(t *testing.T) {
	specs, err := ParseModelSpecs("Qwen/Qwen3-8B:17800, Qwen/Qwen3-32B:44000@0,1,unsloth/Qwen3-0.6B-GGUF")
	if err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(specs)
	want := "[{Qwen/Qwen3-8B 17800 []} {Qwen/Qwen3-32B 44000 [0 1]} {unsloth/Qwen3-0.6B-GGUF 0 []}]"
	if got != want {
		t.Errorf("specs = %s, want %s", got, want)
	}
	for _, bad := range []string{"3", "m:-5", "m@x", ":100"} {
		if _, err := ParseModelSpecs(bad); err == nil {
			t.Errorf("ParseModelSpecs(%q) succeeded", bad)
		}
	}
}

func TestParseCommandLine(t *testing.T) {
	c, err := ParseCommandLine([]string{
		"--listen", "0.0.0.0:13131", "--name", "rig2", "--devices", "16384",
		"--models", "Qwen/Qwen3-4B:9000", "--unloaded", "unsloth/Qwen3-0.6B-GGUF",
		"--load-latency", "3s", "--token-interval", "200ms", "--max-in-flight", "8",
		"--sizes", "Qwen/Qwen3-8B:17800", "--log-requests", "--anthropic-native",
	}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	o := c.Options
	if c.Listen != "0.0.0.0:13131" || o.Name != "rig2" || fmt.Sprint(o.Devices) != "[16384]" ||
		o.Models[0].ID != "Qwen/Qwen3-4B" || o.Unloaded[0].ID != "unsloth/Qwen3-0.6B-GGUF" ||
		o.LoadLatency != 3*time.Second || o.MaxInFlight != 8 || o.Sizes["Qwen/Qwen3-8B"] != 17800 || !o.LogRequests || !o.AnthropicNative {
		t.Errorf("parsed %+v", c)
	}
	// An OpenAI-only neuron unless told otherwise.
	d, err := ParseCommandLine(nil, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if d.Options.AnthropicNative {
		t.Error("AnthropicNative on by default; want an OpenAI-only neuron")
	}
	for _, bad := range [][]string{{"--devices", "big"}, {"--load-fail-rate", "2"}, {"stray"}, {"--sizes", "m"}} {
		if _, err := ParseCommandLine(bad, io.Discard); err == nil {
			t.Errorf("ParseCommandLine(%q) succeeded", bad)
		}
	}
}

func TestCatalogueInfoReadsOperatorCatalogue(t *testing.T) {
	data, err := os.ReadFile("../../../shared/testdata/cortex-models.example.toml")
	if err != nil {
		t.Skipf("shared test data not present: %v", err)
	}
	sizes, caps, err := CatalogueInfo(data)
	if err != nil {
		t.Fatal(err)
	}
	if sizes["Qwen/Qwen3-8B"] != 18000 || sizes["Qwen/Qwen3.6-27B"] != 54000 {
		t.Errorf("sizes = %v", sizes)
	}
	if !strings.Contains(fmt.Sprint(caps["Qwen/Qwen3.6-27B"]), "reasoning") {
		t.Errorf("caps = %v", caps)
	}
}

// With LogRequests every request is logged before it is handled, also
// ones the sim does not serve: a test running the sim as a process reads
// this to tell what reached it.
func TestLogRequests(t *testing.T) {
	var buf syncBuffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	_, srv := startSim(t, Options{LogRequests: true, Logger: log, Models: []ModelSpec{{ID: "Qwen/Qwen3-1.7B"}}})
	for _, r := range [][2]string{{"POST", "/models/unload"}, {"POST", "/foo?x=1"}, {"GET", "/health"}} {
		req, _ := http.NewRequest(r[0], srv.URL+r[1], strings.NewReader(`{"model_id":"Qwen/Qwen3-1.7B"}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	out := buf.String()
	for _, want := range []string{"msg=request node=beast method=POST uri=/models/unload", "method=POST uri=\"/foo?x=1\"", "method=GET uri=/health"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	_, quiet := startSim(t, Options{Logger: log})
	before := buf.String()
	resp, err := http.Get(quiet.URL + "/health")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if buf.String() != before {
		t.Errorf("logged a request without LogRequests: %s", strings.TrimPrefix(buf.String(), before))
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
