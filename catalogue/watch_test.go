package catalogue

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/filewatch"
)

const waitLimit = 5 * time.Second

// catalogueTOML is a valid catalogue with the given models and
// "helexa/small" pointing at target.
func catalogueTOML(target string, ids ...string) string {
	var b strings.Builder
	for _, id := range ids {
		fmt.Fprintf(&b, "[[models]]\nid = %q\nharness = \"candle\"\n\n", id)
	}
	fmt.Fprintf(&b, "[aliases]\n\"helexa/small\" = %q\n", target)
	return b.String()
}

type watchRun struct {
	store   *Store
	results chan ReloadResult
	logs    *syncBuffer
}

// startWatch loads path into a new store and runs Watch on it until the
// test ends.
func startWatch(t *testing.T, path string, opts WatchOptions) *watchRun {
	t.Helper()
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return startWatchStore(t, path, NewStore(c), opts)
}

func startWatchStore(t *testing.T, path string, store *Store, opts WatchOptions) *watchRun {
	t.Helper()
	r := &watchRun{store: store, results: make(chan ReloadResult, 200), logs: &syncBuffer{}}
	opts.Logger = slog.New(slog.NewJSONHandler(r.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	opts.OnReload = func(res ReloadResult) { r.results <- res }
	ready := make(chan struct{})
	opts.ready = func() { close(ready) }

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, path, store, opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Watch returned %v after cancel", err)
			}
		case <-time.After(waitLimit):
			t.Error("Watch did not return after its context ended")
		}
	})
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("Watch returned early: %v", err)
	case <-time.After(waitLimit):
		t.Fatal("Watch did not start")
	}
	return r
}

// next waits for the next hook call.
func (r *watchRun) next(t *testing.T) ReloadResult {
	t.Helper()
	select {
	case res := <-r.results:
		return res
	case <-time.After(waitLimit):
		t.Fatalf("no reload reported within %v; logs:\n%s", waitLimit, r.logs)
		return ReloadResult{}
	}
}

// waitResolves waits until the store resolves helexa/small to want.
func (r *watchRun) waitResolves(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for r.store.Load().ResolveAlias("helexa/small") != want {
		if time.Now().After(deadline) {
			t.Fatalf("helexa/small still resolves to %q, want %q; logs:\n%s",
				r.store.Load().ResolveAlias("helexa/small"), want, r.logs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func expectOK(t *testing.T, res ReloadResult, gen uint64, target string) {
	t.Helper()
	if !res.OK || res.Err != nil {
		t.Fatalf("reload failed: %v", res.Err)
	}
	if res.Generation != gen {
		t.Errorf("generation = %d, want %d", res.Generation, gen)
	}
	if got := res.Catalogue.ResolveAlias("helexa/small"); got != target {
		t.Errorf("hook catalogue resolves helexa/small to %q, want %q", got, target)
	}
}

func TestWatchEditInPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: -1})

	writeFile(t, path, catalogueTOML("b", "a", "b"))
	res := r.next(t)
	expectOK(t, res, 2, "b")
	want := Changes{Added: []string{"b"}, Removed: []string{}, Changed: []string{}, AliasesChanged: []string{"helexa/small"}}
	if !reflect.DeepEqual(res.Diff, want) {
		t.Errorf("diff = %v, want %v", res.Diff, want)
	}
	if r.store.Load().Profile("b") == nil || r.store.Generation() != 2 {
		t.Errorf("store not updated: generation %d", r.store.Generation())
	}
	r.logs.mustHave(t, "catalogue reloaded", map[string]any{"generation": 2.0, "trigger": "file", "added": []any{"b"}, "aliases_changed": []any{"helexa/small"}})
}

func TestWatchRenameOver(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: -1})

	// What editors and config-management tools do: write aside, rename over.
	tmp := filepath.Join(dir, ".models.toml.tmp")
	writeFile(t, tmp, catalogueTOML("b", "b"))
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	expectOK(t, r.next(t), 2, "b")
	r.waitResolves(t, "b")

	// The watch survives the swap of inode.
	writeFile(t, tmp, catalogueTOML("c", "c"))
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
	expectOK(t, r.next(t), 3, "c")
}

func TestWatchKubernetesConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	writeVersion := func(name, content string) {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, name, "models.toml"), content)
	}
	// The kubelet's layout: models.toml -> ..data/models.toml,
	// ..data -> ..<timestamp>.
	writeVersion("..2026_01_01_00_00_00.1", catalogueTOML("a", "a"))
	mustSymlink(t, "..2026_01_01_00_00_00.1", filepath.Join(dir, "..data"))
	mustSymlink(t, "..data/models.toml", filepath.Join(dir, "models.toml"))
	path := filepath.Join(dir, "models.toml")
	r := startWatch(t, path, WatchOptions{PollInterval: -1})

	swap := func(version string) {
		writeVersion(version, catalogueTOML(version, version))
		mustSymlink(t, version, filepath.Join(dir, "..data_tmp"))
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	swap("..2026_01_01_00_01_00.2")
	expectOK(t, r.next(t), 2, "..2026_01_01_00_01_00.2")
	if err := os.RemoveAll(filepath.Join(dir, "..2026_01_01_00_00_00.1")); err != nil {
		t.Fatal(err)
	}
	swap("..2026_01_01_00_02_00.3")
	expectOK(t, r.next(t), 3, "..2026_01_01_00_02_00.3")
	r.waitResolves(t, "..2026_01_01_00_02_00.3")
}

func TestWatchSIGHUP(t *testing.T) {
	// Keeps a stray SIGHUP from killing the test binary should Watch's
	// handler be gone.
	guard := make(chan os.Signal, 8)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	// No file watch and no poll: only the signal can notice the edit.
	r := startWatch(t, path, WatchOptions{PollInterval: -1, noFileWatch: true})

	writeFile(t, path, catalogueTOML("b", "b"))
	hup(t)
	expectOK(t, r.next(t), 2, "b")
	r.waitResolves(t, "b")

	// An unchanged file is not swapped, but the operator gets an answer.
	hup(t)
	r.logs.waitFor(t, "catalogue unchanged", map[string]any{"trigger": "sighup", "generation": 2.0})

	// A bad file is reported on every SIGHUP, not only the first.
	writeFile(t, path, "[[models]]\nid = \"b\"\n")
	for range 2 {
		hup(t)
		res := r.next(t)
		if res.OK || res.Err == nil || !strings.Contains(res.Err.Error(), "harness is required") {
			t.Fatalf("bad file: %+v", res)
		}
	}
	if r.store.Generation() != 2 || r.store.Load().ResolveAlias("helexa/small") != "b" {
		t.Error("a bad file replaced the catalogue")
	}
}

func hup(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
}

func TestWatchPollCatchesWhatNotificationsMiss(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: 20 * time.Millisecond, noFileWatch: true})

	writeFile(t, path, catalogueTOML("b", "a", "b"))
	expectOK(t, r.next(t), 2, "b")
	r.waitResolves(t, "b")

	// A bad file is reported once, not on every poll.
	writeFile(t, path, "not toml at all [")
	if res := r.next(t); res.OK || res.Generation != 2 {
		t.Fatalf("bad file: %+v", res)
	}
	time.Sleep(10 * 20 * time.Millisecond) // ten polls' worth
	writeFile(t, path, catalogueTOML("c", "c"))
	expectOK(t, r.next(t), 3, "c")
}

func TestWatchInvalidKeepsLastGoodThenFixed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: 50 * time.Millisecond})

	// A duplicate id and a chained alias: both reported, nothing swapped.
	writeFile(t, path, catalogueTOML("a", "a", "a")+"\"helexa/big\" = \"helexa/small\"\n")
	res := r.next(t)
	var ve *ValidationError
	if res.OK || !errors.As(res.Err, &ve) || len(ve.Problems) != 2 || ve.File != path {
		t.Fatalf("invalid file: %+v", res)
	}
	if res.Catalogue != r.store.Load() || res.Generation != 1 {
		t.Errorf("failure should report the catalogue kept in force")
	}
	if r.store.Generation() != 1 || r.store.Load().ResolveAlias("helexa/small") != "a" {
		t.Fatal("the last good catalogue must stay in force")
	}
	r.logs.mustHave(t, "catalogue problem", map[string]any{"level": "ERROR", "key": `models[1] (id "a")`})
	r.logs.mustHave(t, "catalogue problem", map[string]any{"level": "ERROR", "key": `aliases."helexa/big"`})
	r.logs.mustHave(t, "catalogue reload failed; keeping the previous catalogue", map[string]any{"problems": 2.0})

	writeFile(t, path, catalogueTOML("b", "a", "b"))
	expectOK(t, r.next(t), 2, "b")
	r.waitResolves(t, "b")
}

func TestWatchDeletedFileAndDirectoryInItsPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: 20 * time.Millisecond})

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	res := r.next(t)
	if res.OK || !errors.Is(res.Err, os.ErrNotExist) || res.Catalogue.ResolveAlias("helexa/small") != "a" {
		t.Fatalf("deleted file: %+v", res)
	}

	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	res = r.next(t)
	if res.OK || res.Err == nil || !strings.Contains(res.Err.Error(), "is a directory") {
		t.Fatalf("directory: %+v", res)
	}
	if r.store.Load().ResolveAlias("helexa/small") != "a" {
		t.Fatal("the last good catalogue must stay in force")
	}

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, catalogueTOML("b", "b"))
	for {
		res = r.next(t)
		if res.OK {
			break
		}
		// The poll may see the file gone once more before it comes back.
		if !errors.Is(res.Err, os.ErrNotExist) {
			t.Fatalf("unexpected failure: %v", res.Err)
		}
	}
	expectOK(t, res, 2, "b")
}

func TestWatchDebouncesBursts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	// A generous window so the burst below fits in it on a busy machine.
	r := startWatch(t, path, WatchOptions{PollInterval: -1, Debounce: time.Second})

	// Ten edits a few milliseconds apart, as an editor or a deploy tool
	// makes them: without the debounce each would be its own reload.
	for i := range 10 {
		writeFile(t, path, catalogueTOML(fmt.Sprint("m", i), fmt.Sprint("m", i)))
		time.Sleep(10 * time.Millisecond)
	}
	expectOK(t, r.next(t), 2, "m9")
	select {
	case res := <-r.results:
		t.Fatalf("a burst should reload once, got another result: %+v", res)
	default:
	}
}

func TestWatchPicksUpAnEditMadeBeforeItStarted(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, catalogueTOML("b", "b"))
	r := startWatchStore(t, path, NewStore(c), WatchOptions{PollInterval: -1, noFileWatch: true})
	expectOK(t, r.next(t), 2, "b")
}

func TestWatchArguments(t *testing.T) {
	if err := Watch(context.Background(), "", NewStore(nil), WatchOptions{}); err == nil {
		t.Error("empty path accepted")
	}
	if err := Watch(context.Background(), "models.toml", nil, WatchOptions{}); err == nil {
		t.Error("nil store accepted")
	}
}

// Requests read the store while reloads swap it: every snapshot must be
// whole (its alias resolves to one of its own models).
func TestStoreConcurrentReadsDuringReloads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("m0", "m0"))
	c, err := LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	store := NewStore(c)
	w := &reloader{path: path, store: store, log: slog.New(slog.NewTextHandler(io.Discard, nil))}

	stop := make(chan struct{})
	var readers sync.WaitGroup
	var torn sync.Once
	for range 100 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				cat := store.Load()
				target := cat.ResolveAlias("helexa/small")
				if p := cat.Profile(target); p == nil || p.ID != target || cat.Priority(target) != DefaultPriority {
					torn.Do(func() { t.Errorf("snapshot resolves helexa/small to %q, not one of its models", target) })
				}
				runtime.Gosched() // two cores: leave the reloader room
			}
		}()
	}
	for i := 1; i <= 50; i++ {
		id := fmt.Sprint("m", i)
		writeFile(t, path, catalogueTOML(id, id, "shared"))
		w.apply(filewatch.Read(path, "test"))
		if got := store.Generation(); got != uint64(i+1) {
			t.Fatalf("after reload %d: generation %d", i, got)
		}
	}
	close(stop)
	readers.Wait()
	if store.Load().ResolveAlias("helexa/small") != "m50" {
		t.Error("last reload not in force")
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// syncBuffer collects JSON log lines from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// find reports whether a record with msg carries every attr in want.
func (b *syncBuffer) find(msg string, want map[string]any) bool {
	for _, line := range strings.Split(b.String(), "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil || rec["msg"] != msg {
			continue
		}
		match := true
		for k, v := range want {
			if !reflect.DeepEqual(rec[k], v) {
				match = false
			}
		}
		if match {
			return true
		}
	}
	return false
}

func (b *syncBuffer) mustHave(t *testing.T, msg string, want map[string]any) {
	t.Helper()
	if !b.find(msg, want) {
		t.Errorf("no log %q with %v; logs:\n%s", msg, want, b)
	}
}

func (b *syncBuffer) waitFor(t *testing.T, msg string, want map[string]any) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !b.find(msg, want) {
		if time.Now().After(deadline) {
			t.Fatalf("no log %q with %v; logs:\n%s", msg, want, b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Viper's watch ends when the file is removed; a re-created file must still
// be noticed without the poll.
func TestWatchFileWatchSurvivesDeleteAndRecreate(t *testing.T) {
	guard := make(chan os.Signal, 8)
	signal.Notify(guard, syscall.SIGHUP)
	defer signal.Stop(guard)

	path := filepath.Join(t.TempDir(), "models.toml")
	writeFile(t, path, catalogueTOML("a", "a"))
	r := startWatch(t, path, WatchOptions{PollInterval: -1})

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	hup(t) // the operator asks; Watch finds the file gone
	if res := r.next(t); res.OK || !errors.Is(res.Err, os.ErrNotExist) {
		t.Fatalf("deleted file: %+v", res)
	}
	writeFile(t, path, catalogueTOML("b", "b"))
	expectOK(t, r.next(t), 2, "b")
}
