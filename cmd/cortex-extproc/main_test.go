package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// run executes the CLI in-process, as `cortex-extproc args...` would, and
// returns what it printed and the error main turns into exit 1.
func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	cmd := rootCmd()
	var out bytes.Buffer
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeNeuron answers the neuron management API for a one-GPU host with
// the given resident models, and records every request that is not a GET
// (a load or an unload) so tests can show `route` never sends one.
type fakeNeuron struct {
	srv *httptest.Server
	mu  sync.Mutex
	// writes are the non-GET requests received.
	writes []string
}

type residentModel struct {
	id     string
	status string
	vramMB int64
}

func newFakeNeuron(t *testing.T, totalMB, freeMB int64, models ...residentModel) *fakeNeuron {
	t.Helper()
	f := &fakeNeuron{}
	reply := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(v)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /discovery", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]any{"hostname": "fake", "devices": []map[string]any{{"index": 0, "name": "RTX", "vram_total_mb": totalMB}},
			"harnesses": []string{"candle"}, "max_prompt_tokens": 32768})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]any{"uptime_secs": 1000, "devices": []map[string]any{{"index": 0, "vram_used_mb": totalMB - freeMB, "vram_free_mb": freeMB}}})
	})
	mux.HandleFunc("GET /models", func(w http.ResponseWriter, _ *http.Request) {
		list := []map[string]any{}
		for _, m := range models {
			list = append(list, map[string]any{"id": m.id, "harness": "candle", "status": m.status, "devices": []int{0}, "vram_used_mb": m.vramMB})
		}
		reply(w, list)
	})
	mux.HandleFunc("GET /models/{id}/endpoint", func(w http.ResponseWriter, r *http.Request) {
		for _, m := range models {
			if m.id == r.PathValue("id") {
				reply(w, map[string]string{"url": "http://localhost:8000"})
				return
			}
		}
		http.Error(w, `{"error":"model not found"}`, http.StatusNotFound)
	})
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			f.mu.Lock()
			f.writes = append(f.writes, r.Method+" "+r.URL.Path)
			f.mu.Unlock()
			http.Error(w, "route must not change the fleet", http.StatusForbidden)
			return
		}
		mux.ServeHTTP(w, r)
	}))
	t.Cleanup(f.srv.Close)
	t.Cleanup(func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		if len(f.writes) > 0 {
			t.Errorf("the neuron received %v; the CLI must only read", f.writes)
		}
	})
	return f
}

const testCatalogue = `
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"
vram_mb = 18000
min_devices = 1

[[models]]
id = "Tongyi-MAI/Z-Image-Turbo"
harness = "candle"
vram_mb = 15000
min_devices = 1
min_device_vram_mb = 20000

[[models]]
id = "Qwen/Qwen3.6-27B"
harness = "candle"
vram_mb = 54000
min_devices = 2
min_device_vram_mb = 24000

[aliases]
"helexa/small" = "Qwen/Qwen3-8B"
`

// fleetConfig writes a catalogue and a config listing the neurons (name →
// URL, in order) and returns the config's path.
func fleetConfig(t *testing.T, extra string, neurons ...[2]string) string {
	t.Helper()
	dir := t.TempDir()
	writeFile(t, dir, "models.toml", testCatalogue)
	var b strings.Builder
	b.WriteString("models_config = \"models.toml\"\n")
	b.WriteString("[poll]\ntimeout = \"5s\"\n")
	b.WriteString(extra)
	for _, n := range neurons {
		fmt.Fprintf(&b, "[[neurons]]\nname = %q\nendpoint = %q\n", n[0], n[1])
	}
	return writeFile(t, dir, "cortex-extproc.toml", b.String())
}

// standardFleet: beast (24 GB, 5 GB free) has Qwen3-8B loaded; rig2 (8 GB)
// has nothing.
func standardFleet(t *testing.T, extra string) string {
	beast := newFakeNeuron(t, 24000, 5000, residentModel{"Qwen/Qwen3-8B", "loaded", 18000})
	rig2 := newFakeNeuron(t, 8000, 8000)
	return fleetConfig(t, extra, [2]string{"beast", beast.srv.URL}, [2]string{"rig2", rig2.srv.URL})
}

func TestVersion(t *testing.T) {
	out, err := run(t, "version")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"cortex-extproc " + version, "commit ", runtime.Version()} {
		if !strings.Contains(out, want) {
			t.Errorf("version printed %q, want it to contain %q", out, want)
		}
	}
}

func TestValidateGoodConfig(t *testing.T) {
	out, err := run(t, "validate", "--config", fleetConfig(t, "", [2]string{"beast", "http://beast.internal:13131"}, [2]string{"rig2", "http://rig2.internal:13131"}))
	if err != nil {
		t.Fatalf("err %v; output:\n%s", err, out)
	}
	if want := "ok: 2 neuron(s), 3 catalogue model(s), 1 alias(es)\n"; out != want {
		t.Errorf("output %q, want %q", out, want)
	}
}

func TestValidateReportsEveryProblemWithFileAndKey(t *testing.T) {
	dir := t.TempDir()
	cat := writeFile(t, dir, "models.toml", `
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"

[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"

[[models]]
id = "Tongyi-MAI/Z-Image-Turbo"

[aliases]
"Qwen/Qwen3-8B" = "Tongyi-MAI/Z-Image-Turbo"
`)
	cfg := writeFile(t, dir, "cortex-extproc.toml", `
models_config = "models.toml"
[poll]
intervall = "5s"
timeout = 5
[upstream]
mode = "header"
[[neurons]]
name = "beast"
endpoint = "http://beast:13131"
[[neurons]]
name = "rig2"
endpoint = "rig2:13131"
typo = 1
`)
	out, err := run(t, "validate", "--config", cfg)
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v, want exit 1; output:\n%s", err, out)
	}
	wantLines := []string{
		cfg + ": poll.timeout: 5 has no unit",
		cfg + ": poll.intervall: unknown key",
		cfg + ": neurons[1].typo: unknown key",
		cfg + `: upstream.mode: "header" is not one of cluster_header, original_dst`,
		cfg + `: neurons[1].endpoint: "rig2:13131": scheme must be http or https`,
		cat + ": models[1]",
		cat + ": models[2]",
		cat + `: aliases."Qwen/Qwen3-8B"`,
	}
	for _, w := range wantLines {
		if !strings.Contains(out, w) {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
	if n := strings.Count(out, "poll.timeout"); n != 1 {
		t.Errorf("poll.timeout reported %d times, want once:\n%s", n, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if last := lines[len(lines)-1]; last != fmt.Sprintf("%d problem(s) found", len(lines)-1) {
		t.Errorf("last line %q; %d problem lines", last, len(lines)-1)
	}
}

func TestValidateCatalogueAlone(t *testing.T) {
	// The operators' real catalogue, unchanged.
	out, err := run(t, "validate", "--catalogue", filepath.Join("..", "..", "catalogue", "testdata", "cortex-models.example.toml"))
	if err != nil || !strings.HasPrefix(out, "ok: ") && !strings.Contains(out, "\nok: ") {
		t.Fatalf("example catalogue: err %v, output:\n%s", err, out)
	}

	bad := writeFile(t, t.TempDir(), "models.toml", "[[models]]\nid = \"x\"\nvram_mb = -1\n")
	out, err = run(t, "validate", "--catalogue", bad)
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v; output:\n%s", err, out)
	}
	if !strings.Contains(out, bad+": models[0]") || !strings.Contains(out, "harness is required") || !strings.Contains(out, "vram_mb is -1") {
		t.Errorf("output:\n%s", out)
	}
}

func TestValidateCatalogueFlagReplacesTheConfigs(t *testing.T) {
	cfg := fleetConfig(t, "", [2]string{"beast", "http://beast:13131"})
	other := writeFile(t, t.TempDir(), "other.toml", "[[models]]\nid = \"a\"\nharness = \"candle\"\n")
	out, err := run(t, "validate", "--config", cfg, "--catalogue", other)
	if err != nil || out != "ok: 1 neuron(s), 1 catalogue model(s), 0 alias(es)\n" {
		t.Errorf("err %v, output %q", err, out)
	}
}

func TestValidateMissingCatalogueReportedOnce(t *testing.T) {
	dir := t.TempDir()
	cfg := writeFile(t, dir, "c.toml", "models_config = \"gone.toml\"\n")
	out, err := run(t, "validate", "--config", cfg)
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v", err)
	}
	if !strings.Contains(out, cfg+": models_config: catalogue file "+filepath.Join(dir, "gone.toml")+" does not exist") || !strings.HasSuffix(out, "1 problem(s) found\n") {
		t.Errorf("output:\n%s", out)
	}
}

func TestValidateSyntaxError(t *testing.T) {
	cfg := writeFile(t, t.TempDir(), "c.toml", "models_config = \"models.toml\"\n[poll\n")
	out, err := run(t, "validate", "--config", cfg)
	if !errors.Is(err, errProblems) || !strings.Contains(out, cfg+": line 2, column") {
		t.Errorf("err %v, output:\n%s", err, out)
	}
}

func TestValidateNothingGiven(t *testing.T) {
	out, err := run(t, "validate")
	if !errors.Is(err, errProblems) || !strings.Contains(out, "give --config FILE and/or --catalogue FILE") {
		t.Errorf("err %v, output %q", err, out)
	}
}

func TestValidateWarnsAboutMisspelledEnvironment(t *testing.T) {
	t.Setenv("CORTEX_EXTPROC_LISTEN", "0.0.0.0:9002")
	out, err := run(t, "validate", "--config", fleetConfig(t, "", [2]string{"beast", "http://beast:13131"}))
	if err != nil || !strings.Contains(out, "warning: environment CORTEX_EXTPROC_LISTEN matches no key") {
		t.Errorf("err %v, output:\n%s", err, out)
	}
}

func TestRouteAliasToLoadedReplica(t *testing.T) {
	cfg := standardFleet(t, "")
	out, err := run(t, "route", "--config", cfg, "--model", "helexa/small")
	if err != nil {
		t.Fatalf("err %v; output:\n%s", err, out)
	}
	for _, want := range []string{
		"model:      helexa/small (alias of Qwen/Qwen3-8B)",
		"decision:   route to a loaded replica",
		"node:       beast",
		"cluster:    neuron-beast",
		"cold start: false",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRouteColdLoadShowsNodeAndEvictions(t *testing.T) {
	cfg := standardFleet(t, "")
	out, err := run(t, "route", "--config", cfg, "--model", "Tongyi-MAI/Z-Image-Turbo")
	if err != nil {
		t.Fatalf("err %v; output:\n%s", err, out)
	}
	// rig2's 8 GB device is below min_device_vram_mb; beast must make room.
	for _, want := range []string{
		"decision:   cold load",
		"node:       beast",
		"cluster:    neuron-beast",
		"cold start: true",
		"would evict: Qwen/Qwen3-8B",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestRouteColdLoadThatFits(t *testing.T) {
	// rig2 is empty: the small model fits there without evicting.
	beast := newFakeNeuron(t, 24000, 5000, residentModel{"Qwen/Qwen3-8B", "loaded", 18000})
	rig2 := newFakeNeuron(t, 24000, 24000)
	cfg := fleetConfig(t, "", [2]string{"beast", beast.srv.URL}, [2]string{"rig2", rig2.srv.URL})
	out, err := run(t, "route", "--config", cfg, "--model", "Tongyi-MAI/Z-Image-Turbo")
	if err != nil || !strings.Contains(out, "node:       rig2") || !strings.Contains(out, "would evict: nothing") {
		t.Errorf("err %v, output:\n%s", err, out)
	}
}

func TestRouteRespectsMaxEvictionsZero(t *testing.T) {
	// max_evictions = 0 means never evict: the same cold load has no room.
	cfg := standardFleet(t, "[cold_load]\nmax_evictions = 0\n")
	out, err := run(t, "route", "--config", cfg, "--model", "Tongyi-MAI/Z-Image-Turbo")
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v, want exit 1; output:\n%s", err, out)
	}
	if !strings.Contains(out, "decision:   error") || !strings.Contains(out, "error:      503 ") || strings.Contains(out, "would evict") {
		t.Errorf("output:\n%s", out)
	}
}

func TestRouteUnknownModel(t *testing.T) {
	cfg := standardFleet(t, "")
	out, err := run(t, "route", "--config", cfg, "--model", "nobody/has-this")
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v, want exit 1; output:\n%s", err, out)
	}
	if !strings.Contains(out, "decision:   error") || !strings.Contains(out, "error:      404 model_not_found") || !strings.Contains(out, `"nobody/has-this"`) {
		t.Errorf("output:\n%s", out)
	}
}

func TestRouteJSON(t *testing.T) {
	cfg := standardFleet(t, "")
	var d decisionView

	out, err := run(t, "route", "--config", cfg, "--model", "Tongyi-MAI/Z-Image-Turbo", "--json")
	if err != nil {
		t.Fatalf("err %v; output:\n%s", err, out)
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if d.Action != "cold load" || d.Node != "beast" || d.Cluster != "neuron-beast" || !d.ColdStart || d.Load == nil ||
		d.Load.Node != "beast" || len(d.Load.Evict) != 1 || d.Load.Evict[0] != "Qwen/Qwen3-8B" || d.Error != nil {
		t.Errorf("cold load decision = %+v (load %+v)", d, d.Load)
	}

	out, err = run(t, "route", "--config", cfg, "--model", "helexa/small", "--json")
	if err != nil {
		t.Fatalf("err %v; output:\n%s", err, out)
	}
	d = decisionView{}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if d.Requested != "helexa/small" || d.Model != "Qwen/Qwen3-8B" || d.Node != "beast" || d.ColdStart || d.Endpoint == "" {
		t.Errorf("alias decision = %+v", d)
	}

	out, err = run(t, "route", "--config", cfg, "--model", "nobody/has-this", "--json")
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v", err)
	}
	d = decisionView{}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if d.Action != "error" || d.Error == nil || d.Error.Status != 404 || d.Error.Code != "model_not_found" {
		t.Errorf("unknown model decision = %+v", d)
	}
}

func TestRouteUnreachableNeuron(t *testing.T) {
	// Nothing listens on this port once the server is closed.
	gone := httptest.NewServer(http.NotFoundHandler())
	gone.Close()
	cfg := fleetConfig(t, "", [2]string{"beast", gone.URL})
	out, err := run(t, "route", "--config", cfg, "--model", "helexa/small")
	if !errors.Is(err, errProblems) || !strings.Contains(out, "error:      503 ") || !strings.Contains(out, "no healthy neuron") {
		t.Errorf("err %v, output:\n%s", err, out)
	}
	// The operator sees which neuron failed and why, not just the 503.
	if !strings.Contains(out, "neuron:     beast unhealthy: ") || !strings.Contains(out, "GET /models") {
		t.Errorf("output does not name the failing neuron and its poll error:\n%s", out)
	}
}

func TestRouteRequiresModel(t *testing.T) {
	_, err := run(t, "route", "--config", standardFleet(t, ""))
	if err == nil || !strings.Contains(err.Error(), "model") {
		t.Errorf("err = %v, want the missing --model named", err)
	}
}

func TestRouteRefusesAnInvalidConfig(t *testing.T) {
	cfg := fleetConfig(t, "[upstream]\nmode = \"header\"\n", [2]string{"beast", "http://beast:13131"})
	_, err := run(t, "route", "--config", cfg, "--model", "helexa/small")
	if err == nil || !strings.Contains(err.Error(), "upstream.mode") || !strings.Contains(err.Error(), "cortex-extproc validate") {
		t.Errorf("err = %v", err)
	}
}

func TestServeRefusesAnInvalidConfig(t *testing.T) {
	cfg := fleetConfig(t, "[log]\nlevel = \"loud\"\n", [2]string{"beast", "http://beast:13131"})
	_, err := run(t, "serve", "--config", cfg)
	if err == nil || !strings.Contains(err.Error(), "log.level") {
		t.Errorf("err = %v, want the bad key named", err)
	}
}

// A model whose declared size no neuron's devices can ever hold is an
// error that says so, with the numbers, not a "retry later".
func TestRouteNeverFits(t *testing.T) {
	small := newFakeNeuron(t, 16384, 16384)
	cfg := fleetConfig(t, "", [2]string{"small", small.srv.URL})
	out, err := run(t, "route", "--config", cfg, "--model", "Qwen/Qwen3-8B")
	if !errors.Is(err, errProblems) {
		t.Fatalf("err = %v, want exit 1; output:\n%s", err, out)
	}
	for _, want := range []string{"error:      503 no_feasible_neuron", "can never fit", "18000 MB", "16384 MB"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "retry") {
		t.Errorf("a model that can never fit is not retry-later:\n%s", out)
	}
}
