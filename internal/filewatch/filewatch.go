// Package filewatch tells a reloader when a config file's content may have
// changed. It is the one mechanism behind the catalogue reload and the
// [[neurons]] reload: Viper's file watch (debounced), SIGHUP, and a slow
// content-hash poll as the backstop for what file notifications miss
// (Docker single-file bind mounts, some Kubernetes ConfigMap updates).
// What the content means, and whether it is valid, is the caller's.
package filewatch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spf13/viper"
)

const (
	// DefaultPollInterval is how often the file is re-read when no
	// notification arrived.
	DefaultPollInterval = 30 * time.Second
	// DefaultDebounce is how long file events must be quiet before the file
	// is read.
	DefaultDebounce = 200 * time.Millisecond
)

// Trigger says what made Watch read the file; its value is what reloaders
// log under "trigger".
type Trigger string

const (
	Start  Trigger = "start"  // the first read, when Watch starts
	File   Trigger = "file"   // a file notification, after the debounce
	SIGHUP Trigger = "sighup" // the operator asked
	Poll   Trigger = "poll"   // the content-hash poll
)

// Event is one read of the file.
type Event struct {
	Trigger Trigger
	// Data is the file's content, Hash its hex SHA-256; both empty when Err
	// is set.
	Data []byte
	Hash string
	// Err is why the file could not be read: it is missing, a directory is
	// in its place, it may not be read.
	Err error
}

// Read reads path into an Event, as Watch does.
func Read(path string, trigger Trigger) Event {
	data, err := os.ReadFile(path)
	if err != nil {
		return Event{Trigger: trigger, Err: err}
	}
	sum := sha256.Sum256(data)
	return Event{Trigger: trigger, Data: data, Hash: hex.EncodeToString(sum[:])}
}

// key identifies what an event says, for the dedupe.
func (e Event) key() string {
	if e.Err != nil {
		return "error: " + e.Err.Error()
	}
	return e.Hash
}

// Options tunes Watch. The zero value uses the defaults.
type Options struct {
	// PollInterval is how often the file's content hash is checked. 0 means
	// DefaultPollInterval; negative turns the poll off.
	PollInterval time.Duration
	// Debounce is how long file events must be quiet before the file is
	// read, so an editor's burst of writes is read once, complete. 0 means
	// DefaultDebounce.
	Debounce time.Duration
	// Logger receives the file watch's own problems; nil means
	// slog.Default(). Watch adds the "file" key.
	Logger *slog.Logger
	// NoNotify turns Viper's file watch off, leaving SIGHUP and the poll
	// (tests use it to show that those work on their own).
	NoNotify bool
	// Ready, when set, is called once the SIGHUP handler is installed and
	// the Start event has been handled.
	Ready func()
}

// Watch calls onChange, from Watch's goroutine, whenever the file's content
// may have changed, until ctx ends; then it returns nil. The first call is
// the Start event. File notifications are debounced: the file is read once
// they have been quiet for Debounce. A change the poll sees is read again
// after Debounce too, as the poll may have caught a write half done. After
// Start, an event is delivered only when what it says (the content hash,
// or the read error) differs from the last one delivered, so an unchanged
// file and a failure already reported stay quiet; a SIGHUP event is always
// delivered, so the operator who sent it gets an answer.
//
// Watch is meant to run once per file per process: the goroutine behind
// Viper's file watch cannot be stopped, and ends only when the file is
// removed (Watch then watches again, so the re-created file is seen).
func Watch(ctx context.Context, path string, opts Options, onChange func(Event)) error {
	if path == "" {
		return errors.New("file watch: no file path")
	}
	if onChange == nil {
		return errors.New("file watch: nil onChange")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("file watch: resolve %s: %w", path, err)
	}
	w := &watcher{path: abs, opts: opts, onChange: onChange, events: make(chan struct{}, 1)}
	if w.opts.Debounce <= 0 {
		w.opts.Debounce = DefaultDebounce
	}
	if w.opts.PollInterval == 0 {
		w.opts.PollInterval = DefaultPollInterval
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	w.log = log.With("file", abs)

	// Registered for the whole run: SIGHUP's default action ends the
	// process.
	sighup := make(chan os.Signal, 1)
	signal.Notify(sighup, syscall.SIGHUP)
	defer signal.Stop(sighup)

	w.ensureNotify()
	w.deliver(w.read(Start))

	var pollC <-chan time.Time
	if w.opts.PollInterval > 0 {
		t := time.NewTicker(w.opts.PollInterval)
		defer t.Stop()
		pollC = t.C
	}
	if opts.Ready != nil {
		opts.Ready()
	}

	// pending is the trigger the debounce timer is running for; "" when it
	// is stopped.
	var pending Trigger
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.events:
			// Every event restarts the wait: the burst must be over.
			if pending == "" {
				pending = File
			}
			debounce.Reset(w.opts.Debounce)
		case <-debounce.C:
			trigger := pending
			pending = ""
			w.deliver(w.read(trigger))
		case <-sighup:
			w.deliver(w.read(SIGHUP))
		case <-pollC:
			// A poll can land between a writer's truncate and its write;
			// a change it sees is read again after the debounce, like a
			// file event. It does not restart a running wait, or a poll
			// faster than the debounce would hold the change back forever.
			if ev := w.read(Poll); ev.key() != w.delivered && pending == "" {
				pending = Poll
				debounce.Reset(w.opts.Debounce)
			}
		}
	}
}

// watcher is Watch's state, owned by its goroutine.
type watcher struct {
	path     string
	opts     Options
	log      *slog.Logger
	onChange func(Event)
	// events receives Viper's change notifications, coalesced.
	events chan struct{}
	// delivered is the key of the last event delivered; "" before the
	// first.
	delivered string
	// armed reports a Viper file watch believed alive; armErr is the last
	// arming failure, logged once.
	armed  bool
	armErr string
	// missing is set while the file is absent.
	missing bool
}

// read reads the file. Finding it gone, it watches the folder again:
// Viper's watch ends when the file is removed, and the re-created file
// should be seen at once.
func (w *watcher) read(trigger Trigger) Event {
	ev := Read(w.path, trigger)
	if errors.Is(ev.Err, fs.ErrNotExist) {
		if !w.missing {
			w.missing = true
			w.armed = false
			w.ensureNotify()
		}
	} else {
		w.missing = false
	}
	return ev
}

// deliver hands ev to onChange unless it says what the last delivered event
// said. Start and SIGHUP are always delivered.
func (w *watcher) deliver(ev Event) {
	key := ev.key()
	if ev.Trigger != Start && ev.Trigger != SIGHUP && key == w.delivered {
		return
	}
	w.delivered = key
	w.onChange(ev)
}

func (w *watcher) ensureNotify() {
	if w.opts.NoNotify || w.armed {
		return
	}
	if err := w.armNotify(); err != nil {
		if msg := err.Error(); msg != w.armErr {
			w.armErr = msg
			fallback := "SIGHUP and the content poll"
			if w.opts.PollInterval < 0 {
				fallback = "SIGHUP"
			}
			w.log.Error("file watch unavailable; edits are picked up only by "+fallback,
				"poll_interval", w.opts.PollInterval, "error", err)
		}
		return
	}
	w.armed, w.armErr = true, ""
}

// armNotify starts Viper's WatchConfig on an instance used only for the
// notification: its decoder is a no-op, the caller parses the content.
func (w *watcher) armNotify() error {
	dir := filepath.Dir(w.path)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("directory %s of the file does not exist", dir)
	}
	// WatchConfig calls os.Exit when it cannot create an inotify watcher
	// (e.g. fs.inotify.max_user_instances reached); find out first.
	probe, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("create file watcher: %w", err)
	}
	_ = probe.Close()

	codecs := viper.NewCodecRegistry()
	if err := codecs.RegisterCodec(notifyOnlyType, notifyOnlyCodec{}); err != nil {
		return err
	}
	v := viper.NewWithOptions(
		viper.WithCodecRegistry(codecs),
		viper.WithLogger(slog.New(minLevel{w.log.Handler(), slog.LevelError}).With("component", "viper")),
	)
	v.SetConfigFile(w.path)
	v.SetConfigType(notifyOnlyType)
	events := w.events
	v.OnConfigChange(func(fsnotify.Event) {
		// Non-blocking: a pending notification already covers this one,
		// and nobody reads after Watch returns.
		select {
		case events <- struct{}{}:
		default:
		}
	})
	v.WatchConfig() // returns once the folder is watched
	return nil
}

// notifyOnlyType is the config type the watch-only Viper instance is told
// the file has; any type Viper knows will do, as its codec ignores the
// content.
const notifyOnlyType = "toml"

// notifyOnlyCodec lets the watch-only Viper instance "read" the file without
// parsing it: Viper's parse would lower-case keys and duplicate the
// caller's errors.
type notifyOnlyCodec struct{}

func (notifyOnlyCodec) Decode([]byte, map[string]any) error { return nil }

func (notifyOnlyCodec) Encode(map[string]any) ([]byte, error) {
	return nil, errors.New("the watch-only Viper instance does not write files")
}

// minLevel drops records below min: Viper logs every read at info.
type minLevel struct {
	slog.Handler
	min slog.Level
}

func (h minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h minLevel) WithAttrs(attrs []slog.Attr) slog.Handler {
	return minLevel{h.Handler.WithAttrs(attrs), h.min}
}

func (h minLevel) WithGroup(name string) slog.Handler {
	return minLevel{h.Handler.WithGroup(name), h.min}
}
