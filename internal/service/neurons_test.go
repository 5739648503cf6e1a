package service

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/config"
)

// reloadWait bounds every wait in these tests; nothing is timed.
const reloadWait = 15 * time.Second

// reloadNeuron is a minimal neuron: it answers the management API with one
// loaded model, so the poller marks it healthy.
func reloadNeuron(t *testing.T) string {
	t.Helper()
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("GET /discovery", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]any{"hostname": "sim", "devices": []map[string]any{{"index": 0, "vram_total_mb": 24000}}, "max_prompt_tokens": 8192})
	})
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]any{"uptime_secs": 100, "devices": []map[string]any{{"index": 0, "vram_free_mb": 20000}}})
	})
	mux.HandleFunc("GET /models", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, []map[string]any{{"id": "m", "harness": "candle", "status": "loaded", "devices": []int{0}}})
	})
	mux.HandleFunc("GET /models/{id}/endpoint", func(w http.ResponseWriter, _ *http.Request) {
		reply(w, map[string]string{"url": "http://localhost:1"})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL
}

// syncLog collects JSON log lines from several goroutines.
type syncLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

type reloadRun struct {
	svc      *Service
	path     string
	logs     *syncLog
	attempts chan bool
}

type reloadOpts struct {
	noFileWatch bool
	pollMS      int // catalogue.poll_interval; 0 = 1h
	symlinked   bool
	// relative runs the service from the config's folder with --config
	// given relative to it, as `cortex-extproc serve --config
	// cortex-extproc.toml` does.
	relative bool
	// unknownKey adds a top-level key the service does not know.
	unknownKey bool
}

// configText is a service config on loopback ports with the given neurons
// (name → endpoint, in order), plus extra TOML lines.
func configText(neurons [][2]string, extra string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "models_config = %q\n%s\n", "models.toml", extra)
	b.WriteString("[extproc]\nlisten = \"127.0.0.1:0\"\nshutdown_delay = \"0s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n")
	for _, n := range neurons {
		fmt.Fprintf(&b, "[[neurons]]\nname = %q\nendpoint = %q\n", n[0], n[1])
	}
	return b.String()
}

func (o reloadOpts) extra() string {
	poll := "1h"
	if o.pollMS > 0 {
		poll = fmt.Sprintf("%dms", o.pollMS)
	}
	unknown := ""
	if o.unknownKey {
		unknown = "bogus_key = 1\n"
	}
	return unknown + fmt.Sprintf("[poll]\ninterval = \"100ms\"\ntimeout = \"2s\"\n[catalogue]\npoll_interval = %q\n", poll)
}

// startReload runs a Service whose config file lists neurons, and waits
// until it is ready and its reloader is watching.
func startReload(t *testing.T, o reloadOpts, neurons [][2]string) *reloadRun {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "models.toml"), []byte("# no models\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := &reloadRun{path: filepath.Join(dir, "cortex-extproc.toml"), logs: &syncLog{}, attempts: make(chan bool, 100)}
	if o.symlinked {
		// Kubernetes mounts a ConfigMap key as a symlink through "..data",
		// itself a symlink to a timestamped folder swapped atomically.
		if err := os.Mkdir(filepath.Join(dir, "..v1"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("..v1", filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join("..data", "cortex-extproc.toml"), r.path); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, "..v1", "cortex-extproc.toml"), configText(neurons, o.extra()))
	} else {
		writeFile(t, r.path, configText(neurons, o.extra()))
	}
	if o.relative {
		t.Chdir(dir)
		r.path = filepath.Base(r.path)
	}
	res, err := config.Load(r.path)
	if err != nil {
		t.Fatal(err)
	}
	if ps := res.Config.Validate(); len(ps) > 0 {
		t.Fatalf("test config: %v", ps)
	}
	log := slog.New(slog.NewJSONHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	r.svc, err = New(res.Config, log)
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	r.svc.neurons.ready = func() { close(ready) }
	r.svc.neurons.reloaded = func(ok bool) { r.attempts <- ok }
	r.svc.neurons.noFileWatch = o.noFileWatch

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(reloadWait):
			t.Error("Run did not return after its context ended")
		}
	})
	for _, ch := range []<-chan struct{}{ready, r.svc.Ready()} {
		select {
		case <-ch:
		case <-time.After(reloadWait):
			t.Fatalf("service not ready; logs:\n%s", r.logs)
		}
	}
	// The first read at start is an attempt too.
	r.nextAttempt(t)
	return r
}

// writeFile writes in place, the way `echo >` or a plain editor save does.
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// renameOver writes a new file next to path and renames it over path, the
// way vim and most deploy tools save.
func renameOver(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	writeFile(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// waitFor waits until the logs hold substr.
func (l *syncLog) waitFor(t *testing.T, substr string) {
	t.Helper()
	deadline := time.Now().Add(reloadWait)
	for !strings.Contains(l.String(), substr) {
		if time.Now().After(deadline) {
			t.Fatalf("logs lack %s:\n%s", substr, l)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (r *reloadRun) nextAttempt(t *testing.T) bool {
	t.Helper()
	select {
	case ok := <-r.attempts:
		return ok
	case <-time.After(reloadWait):
		t.Fatalf("no reload attempt; logs:\n%s", r.logs)
		return false
	}
}

// nodes is the poller's current view: name → healthy.
func (r *reloadRun) nodes() map[string]bool {
	out := map[string]bool{}
	for _, n := range r.svc.poller.Snapshot().Nodes {
		out[n.Name] = n.Healthy
	}
	return out
}

// waitNodes waits until the poller's snapshot holds exactly names, all
// healthy (so the new neuron's client really answers).
func (r *reloadRun) waitNodes(t *testing.T, names ...string) {
	t.Helper()
	deadline := time.After(reloadWait)
	for {
		changed := r.svc.poller.Changed()
		got := r.nodes()
		ok := len(got) == len(names)
		for _, n := range names {
			ok = ok && got[n]
		}
		if ok {
			return
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("poller nodes = %v, want %v healthy; logs:\n%s", got, names, r.logs)
		}
	}
}

func (r *reloadRun) hasClient(name string) bool { return r.svc.neuron(name) != nil }

func TestNeuronsReloadOnFileEdits(t *testing.T) {
	a, b, c := reloadNeuron(t), reloadNeuron(t), reloadNeuron(t)
	r := startReload(t, reloadOpts{}, [][2]string{{"alpha", a}})
	r.waitNodes(t, "alpha")
	extra := reloadOpts{}.extra()

	// Added, by an in-place write.
	writeFile(t, r.path, configText([][2]string{{"alpha", a}, {"beta", b}}, extra))
	r.waitNodes(t, "alpha", "beta")
	if !r.hasClient("beta") {
		t.Error("the cold loader has no client for the added neuron")
	}
	if !strings.Contains(r.logs.String(), `"added":["beta"]`) {
		t.Errorf("the reload must log what was added; logs:\n%s", r.logs)
	}

	// Removed, by a rename over the file.
	renameOver(t, r.path, configText([][2]string{{"beta", b}}, extra))
	r.waitNodes(t, "beta")
	if r.hasClient("alpha") {
		t.Error("the cold loader still has a client for the removed neuron")
	}

	// Invalid: nothing changes, every problem is logged with its key.
	for len(r.attempts) > 0 {
		<-r.attempts
	}
	writeFile(t, r.path, configText([][2]string{{"beta", b}, {"gamma", "ftp://gamma:13131"}, {"", c}}, extra))
	for r.nextAttempt(t) {
		// an earlier write's event may still be in the pipe
	}
	logs := r.logs.String()
	for _, key := range []string{`"key":"neurons[1].endpoint"`, `"key":"neurons[2].name"`, "config reload failed; keeping the current [[neurons]]"} {
		if !strings.Contains(logs, key) {
			t.Errorf("logs lack %s:\n%s", key, logs)
		}
	}
	if got := r.nodes(); len(got) != 1 || !got["beta"] {
		t.Errorf("after an invalid config the poller has %v, want the old list [beta]", got)
	}
	if !r.hasClient("beta") || r.hasClient("gamma") {
		t.Error("an invalid config changed the cold loader's clients")
	}

	// Fixed: taken. A changed endpoint counts as a change.
	writeFile(t, r.path, configText([][2]string{{"beta", c}, {"gamma", a}}, extra))
	r.waitNodes(t, "beta", "gamma")
	if n := r.svc.poller.Snapshot().Node("beta"); n == nil || n.Endpoint != c {
		t.Errorf("beta = %+v, want endpoint %s", n, c)
	}
	if !strings.Contains(r.logs.String(), `"changed":["beta"]`) {
		t.Errorf("the changed endpoint is not logged; logs:\n%s", r.logs)
	}
}

func TestNeuronsReloadNamesKeysThatNeedARestart(t *testing.T) {
	a, b := reloadNeuron(t), reloadNeuron(t)
	r := startReload(t, reloadOpts{}, [][2]string{{"alpha", a}})
	extra := strings.Replace(reloadOpts{}.extra(), `timeout = "2s"`, `timeout = "3s"`, 1)
	writeFile(t, r.path, configText([][2]string{{"alpha", a}, {"beta", b}}, extra+"[log]\nlevel = \"debug\"\n"))
	r.waitNodes(t, "alpha", "beta")
	logs := r.logs.String()
	if !strings.Contains(logs, "take effect only after a restart") || !strings.Contains(logs, `"keys":["log.level","poll.timeout"]`) {
		t.Errorf("want a warning naming log.level and poll.timeout; logs:\n%s", logs)
	}
}

// A clean start must not warn: the reloader's first read is the file the
// service started with. With --config relative to the working folder, the
// running models_config was relative while the re-read one is absolute, and
// the reloader used to report models_config as changed, needing a restart.
func TestNeuronsReloadCleanStartIsQuiet(t *testing.T) {
	a, b := reloadNeuron(t), reloadNeuron(t)
	o := reloadOpts{relative: true, unknownKey: true}
	r := startReload(t, o, [][2]string{{"alpha", a}})
	r.waitNodes(t, "alpha")
	logs := r.logs.String()
	if strings.Contains(logs, "take effect only after a restart") {
		t.Errorf("a clean start warned about keys needing a restart; logs:\n%s", logs)
	}
	// The caller (main) reports the unknown keys of the file it loaded.
	if strings.Contains(logs, "unknown config key ignored") {
		t.Errorf("a clean start repeated the unknown-key warning; logs:\n%s", logs)
	}

	// An edit of [[neurons]] alone is taken and names no other key.
	writeFile(t, r.path, configText([][2]string{{"alpha", a}, {"beta", b}}, o.extra()))
	r.waitNodes(t, "alpha", "beta")
	r.logs.waitFor(t, `"msg":"neurons reloaded"`)
	if logs := r.logs.String(); strings.Contains(logs, "take effect only after a restart") {
		t.Errorf("an edit of [[neurons]] alone warned about keys needing a restart; logs:\n%s", logs)
	}
}

func TestNeuronsReloadOnSIGHUP(t *testing.T) {
	// Keeps a stray SIGHUP from killing the test binary should the
	// service's handler not be installed.
	guard := make(chan os.Signal, 1)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	a, b := reloadNeuron(t), reloadNeuron(t)
	r := startReload(t, reloadOpts{noFileWatch: true}, [][2]string{{"alpha", a}})
	r.waitNodes(t, "alpha")
	writeFile(t, r.path, configText([][2]string{{"alpha", a}, {"beta", b}}, reloadOpts{}.extra()))
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	r.waitNodes(t, "alpha", "beta")
}

func TestNeuronsReloadByHashPoll(t *testing.T) {
	a, b := reloadNeuron(t), reloadNeuron(t)
	o := reloadOpts{noFileWatch: true, pollMS: 100}
	r := startReload(t, o, [][2]string{{"alpha", a}})
	writeFile(t, r.path, configText([][2]string{{"beta", b}}, o.extra()))
	r.waitNodes(t, "beta")
}

func TestNeuronsReloadKubernetesSymlinkSwap(t *testing.T) {
	a, b := reloadNeuron(t), reloadNeuron(t)
	r := startReload(t, reloadOpts{symlinked: true}, [][2]string{{"alpha", a}})
	r.waitNodes(t, "alpha")

	dir := filepath.Dir(r.path)
	if err := os.Mkdir(filepath.Join(dir, "..v2"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "..v2", "cortex-extproc.toml"), configText([][2]string{{"alpha", a}, {"beta", b}}, reloadOpts{}.extra()))
	if err := os.Symlink("..v2", filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	r.waitNodes(t, "alpha", "beta")
}

func TestDiffNeurons(t *testing.T) {
	prev := []config.Neuron{{Name: "a", Endpoint: "http://a:1"}, {Name: "b", Endpoint: "http://b:1"}, {Name: "c", Endpoint: "http://c:1"}}
	next := []config.Neuron{{Name: "a", Endpoint: "http://a:1"}, {Name: "b", Endpoint: "http://b:2"}, {Name: "c", Endpoint: "http://c:1", Cluster: "other"}, {Name: "d", Endpoint: "http://d:1"}}
	added, removed, changed := diffNeurons(prev, next)
	if !slices.Equal(added, []string{"d"}) || len(removed) != 0 || !slices.Equal(changed, []string{"b", "c"}) {
		t.Errorf("added %v removed %v changed %v", added, removed, changed)
	}
	added, removed, changed = diffNeurons(next, prev[:1])
	if len(added) != 0 || !slices.Equal(removed, []string{"b", "c", "d"}) || len(changed) != 0 {
		t.Errorf("added %v removed %v changed %v", added, removed, changed)
	}
}
