package filewatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// waitLimit bounds every wait; nothing is timed.
const waitLimit = 10 * time.Second

type run struct {
	events chan Event
}

// start runs Watch on path until the test ends and returns once it is
// ready, with the Start event already taken and checked against want.
func start(t *testing.T, path string, opts Options, want string) *run {
	t.Helper()
	r := &run{events: make(chan Event, 100)}
	ready := make(chan struct{})
	opts.Ready = func() { close(ready) }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, path, opts, func(ev Event) { r.events <- ev }) }()
	t.Cleanup(func() {
		cancel()
		if err := receive(t, done, "Watch to return after its context ended"); err != nil {
			t.Errorf("Watch returned %v", err)
		}
	})
	receive(t, ready, "Watch to be ready")
	// Ready comes after the Start event is handled: it is already queued.
	select {
	case ev := <-r.events:
		expect(t, ev, Start, want)
	default:
		t.Fatal("no Start event before Ready")
	}
	return r
}

func (r *run) next(t *testing.T) Event {
	t.Helper()
	return receive(t, r.events, "an event")
}

// receive waits for a value on ch.
func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitLimit):
		t.Fatalf("waited %v for %s", waitLimit, what)
		var zero T
		return zero
	}
}

// expect checks that ev is a successful read of content.
func expect(t *testing.T, ev Event, trigger Trigger, content string) {
	t.Helper()
	if ev.Err != nil {
		t.Fatalf("%s event: read failed: %v", ev.Trigger, ev.Err)
	}
	if ev.Trigger != trigger || string(ev.Data) != content {
		t.Fatalf("event = %s %q, want %s %q", ev.Trigger, ev.Data, trigger, content)
	}
	sum := sha256.Sum256([]byte(content))
	if ev.Hash != hex.EncodeToString(sum[:]) {
		t.Errorf("hash %s is not the SHA-256 of the content", ev.Hash)
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// guardSIGHUP keeps a stray SIGHUP from killing the test binary should
// Watch's handler be gone.
func guardSIGHUP(t *testing.T) {
	guard := make(chan os.Signal, 8)
	signal.Notify(guard, syscall.SIGHUP)
	t.Cleanup(func() { signal.Stop(guard) })
}

func hup(t *testing.T) {
	t.Helper()
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
}

func TestEditInPlace(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a = 1\n")
	r := start(t, path, Options{PollInterval: -1, Debounce: 20 * time.Millisecond}, "a = 1\n")

	write(t, path, "a = 2\n")
	expect(t, r.next(t), File, "a = 2\n")
	write(t, path, "a = 3\n")
	expect(t, r.next(t), File, "a = 3\n")

	// A save that changes nothing is not delivered: the next event is the
	// next content.
	write(t, path, "a = 3\n")
	time.Sleep(10 * 20 * time.Millisecond) // ten debounces' worth
	write(t, path, "a = 4\n")
	expect(t, r.next(t), File, "a = 4\n")
}

func TestRenameOver(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.toml")
	write(t, path, "v1")
	r := start(t, path, Options{PollInterval: -1}, "v1")

	// What editors and deploy tools do: write aside, rename over. The
	// second time shows the watch survives the new inode.
	for _, v := range []string{"v2", "v3"} {
		tmp := filepath.Join(dir, ".app.toml.tmp")
		write(t, tmp, v)
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		expect(t, r.next(t), File, v)
	}
}

func TestKubernetesConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	version := func(name string) {
		if err := os.Mkdir(filepath.Join(dir, name), 0o755); err != nil {
			t.Fatal(err)
		}
		write(t, filepath.Join(dir, name, "app.toml"), name)
	}
	symlink := func(target, link string) {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
	// The kubelet's layout: app.toml -> ..data/app.toml, ..data -> ..<ts>;
	// an update swaps ..data by renaming a new symlink over it, so the
	// file itself never sees a write.
	version("..v1")
	symlink("..v1", "..data")
	symlink("..data/app.toml", "app.toml")
	path := filepath.Join(dir, "app.toml")
	r := start(t, path, Options{PollInterval: -1}, "..v1")

	for i, v := range []string{"..v2", "..v3"} {
		version(v)
		symlink(v, "..data_tmp")
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
		expect(t, r.next(t), File, v)
		if i == 0 {
			if err := os.RemoveAll(filepath.Join(dir, "..v1")); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestSIGHUPIsAlwaysDelivered(t *testing.T) {
	guardSIGHUP(t)
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a")
	// No file watch and no poll: only the signal can notice the edit.
	r := start(t, path, Options{PollInterval: -1, NoNotify: true}, "a")

	write(t, path, "b")
	hup(t)
	expect(t, r.next(t), SIGHUP, "b")
	// Unchanged, yet the operator who asked gets an answer.
	hup(t)
	expect(t, r.next(t), SIGHUP, "b")
}

func TestPollAloneNoticesChangesOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a")
	r := start(t, path, Options{PollInterval: 10 * time.Millisecond, Debounce: 20 * time.Millisecond, NoNotify: true}, "a")

	write(t, path, "b")
	expect(t, r.next(t), Poll, "b")
	// Many polls see "b" again; none of them is delivered, so the next
	// event is the next content.
	time.Sleep(20 * 10 * time.Millisecond)
	write(t, path, "c")
	expect(t, r.next(t), Poll, "c")
}

// A poll can read the file between a writer's truncate and its write; the
// empty file it sees must not be delivered as the new content.
func TestPollWaitsOutAWriteInProgress(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a")
	// A debounce far longer than the gap below, so the machine's load
	// cannot stretch the gap past it.
	r := start(t, path, Options{PollInterval: 5 * time.Millisecond, Debounce: 3 * time.Second, NoNotify: true}, "a")

	write(t, path, "") // the truncate
	time.Sleep(50 * time.Millisecond)
	write(t, path, "b") // the write
	expect(t, r.next(t), Poll, "b")
}

func TestDebounceReadsABurstOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "m")
	// A generous window so the burst below fits in it on a busy machine.
	r := start(t, path, Options{PollInterval: -1, Debounce: 2 * time.Second}, "m")

	// Ten edits a few milliseconds apart, as an editor or a deploy tool
	// makes them: without the debounce the first would be read on its own.
	for i := range 10 {
		write(t, path, fmt.Sprint("m", i))
		time.Sleep(10 * time.Millisecond)
	}
	expect(t, r.next(t), File, "m9")
}

// Viper's watch ends when the file is removed; the re-created file must
// still be noticed without the poll.
func TestDeletedThenRecreated(t *testing.T) {
	guardSIGHUP(t)
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a")
	r := start(t, path, Options{PollInterval: -1}, "a")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	hup(t) // the operator asks; Watch finds the file gone
	ev := r.next(t)
	if ev.Trigger != SIGHUP || !errors.Is(ev.Err, fs.ErrNotExist) || ev.Data != nil {
		t.Fatalf("deleted file: %+v", ev)
	}
	write(t, path, "b")
	expect(t, r.next(t), File, "b")
}

func TestReadErrorsAreDeliveredOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "app.toml")
	write(t, path, "a")
	r := start(t, path, Options{PollInterval: 10 * time.Millisecond, Debounce: 20 * time.Millisecond}, "a")

	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if ev := r.next(t); !errors.Is(ev.Err, fs.ErrNotExist) {
		t.Fatalf("deleted file: %+v", ev)
	}
	// Many polls find it still gone; none of them is delivered, so the
	// next event is the directory put in its place.
	time.Sleep(20 * 10 * time.Millisecond)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	if ev := r.next(t); !errors.Is(ev.Err, syscall.EISDIR) {
		t.Fatalf("directory in its place: %+v", ev)
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	write(t, path, "b")
	for {
		ev := r.next(t)
		if ev.Err == nil {
			expect(t, ev, ev.Trigger, "b")
			break
		}
		// A read may find the file gone once more before it comes back.
		if !errors.Is(ev.Err, fs.ErrNotExist) {
			t.Fatalf("unexpected read error: %v", ev.Err)
		}
	}
}

func TestWatchArguments(t *testing.T) {
	if err := Watch(context.Background(), "", Options{}, func(Event) {}); err == nil {
		t.Error("empty path accepted")
	}
	if err := Watch(context.Background(), "app.toml", Options{}, nil); err == nil {
		t.Error("nil onChange accepted")
	}
}
