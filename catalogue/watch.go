package catalogue

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
	// DefaultPollInterval is how often Watch re-reads the file when no
	// notification arrived.
	DefaultPollInterval = 30 * time.Second
	// DefaultDebounce is how long file events must be quiet before Watch
	// reloads.
	DefaultDebounce = 200 * time.Millisecond
)

// WatchOptions tunes Watch. The zero value uses the defaults.
type WatchOptions struct {
	// PollInterval is how often the file's content hash is checked, the
	// backstop for changes file notifications miss (Docker single-file
	// bind mounts, some ConfigMap updates, a deleted and re-created file).
	// 0 means DefaultPollInterval; negative disables polling.
	PollInterval time.Duration
	// Debounce is how long file events must be quiet before a reload, so an
	// editor's burst of writes is read once, complete. 0 means
	// DefaultDebounce.
	Debounce time.Duration
	// Logger receives reload and problem logs; nil means slog.Default().
	Logger *slog.Logger
	// OnReload, when set, is called after every reload that changed the
	// catalogue and every failed attempt (not for an unchanged file), from
	// Watch's goroutine: it must not block for long.
	OnReload func(ReloadResult)

	// noFileWatch turns the Viper notification path off, so tests can show
	// that SIGHUP and the poll work on their own.
	noFileWatch bool
	// ready is called once the SIGHUP handler is installed and the first
	// reload is done.
	ready func()
}

// ReloadResult is the outcome of one reload attempt.
type ReloadResult struct {
	OK bool
	// Err says why the file was not taken (a *ValidationError for a bad
	// catalogue); nil when OK.
	Err error
	// Catalogue is the catalogue in force after the attempt: the new one,
	// or the previous one that stays on failure.
	Catalogue  *Catalogue
	Generation uint64
	// Diff is what changed; empty on failure.
	Diff Changes
}

// Watch keeps store in step with the catalogue file at path until ctx ends,
// then returns nil. A change is noticed three ways: Viper's file watch
// (debounced), SIGHUP (reloads at once and logs even when nothing changed),
// and a slow content-hash poll. A reload reads the file, does nothing if its
// hash is the one in force, and otherwise parses and validates it: a good
// catalogue is swapped in and its changes logged; a bad one (or a missing
// file, or a directory in its place) is logged problem by problem and the
// previous catalogue stays. Each outcome goes to opts.OnReload. A failure is
// reported once, not again on every poll, until the content changes.
//
// Watch is meant to run once per process: the goroutine behind Viper's file
// watch cannot be stopped and ends only when the file is removed.
func Watch(ctx context.Context, path string, store *Store, opts WatchOptions) error {
	if path == "" {
		return errors.New("catalogue watch: no file path; set models_config")
	}
	if store == nil {
		return errors.New("catalogue watch: nil store")
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("catalogue watch: resolve %s: %w", path, err)
	}
	w := &watcher{
		path:     abs,
		store:    store,
		opts:     opts,
		events:   make(chan struct{}, 1),
		debounce: opts.Debounce,
	}
	if w.debounce <= 0 {
		w.debounce = DefaultDebounce
	}
	w.poll = opts.PollInterval
	if w.poll == 0 {
		w.poll = DefaultPollInterval
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

	w.ensureFileWatch()
	// The file may have changed between the caller's LoadFile and now.
	w.reload("start", false)

	var pollC <-chan time.Time
	if w.poll > 0 {
		t := time.NewTicker(w.poll)
		defer t.Stop()
		pollC = t.C
	}
	if opts.ready != nil {
		opts.ready()
	}

	var debounce *time.Timer
	var debounceC <-chan time.Time
	defer func() {
		if debounce != nil {
			debounce.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.events:
			if debounce == nil {
				debounce = time.NewTimer(w.debounce)
			} else {
				debounce.Reset(w.debounce)
			}
			debounceC = debounce.C
		case <-debounceC:
			debounceC = nil
			w.reload("file", false)
		case <-sighup:
			w.reload("sighup", true)
		case <-pollC:
			w.reload("poll", false)
		}
	}
}

// watcher is Watch's state, owned by its goroutine.
type watcher struct {
	path     string
	store    *Store
	opts     WatchOptions
	log      *slog.Logger
	debounce time.Duration
	poll     time.Duration // <= 0: off
	// events receives Viper's change notifications (coalesced).
	events chan struct{}
	// armed reports a Viper file watch believed alive; armErr is the last
	// arming failure, logged once.
	armed  bool
	armErr string
	// missing is set while the file is absent.
	missing bool
	// lastFailure identifies the failure last reported (the content hash,
	// or the read error), so the poll does not repeat it.
	lastFailure string
}

func (w *watcher) ensureFileWatch() {
	if w.opts.noFileWatch || w.armed {
		return
	}
	if err := w.armFileWatch(); err != nil {
		if msg := err.Error(); msg != w.armErr {
			w.armErr = msg
			w.log.Error("catalogue file watch unavailable; edits are picked up only by SIGHUP and the content poll",
				"poll_interval", w.poll, "error", err)
		}
		return
	}
	w.armed, w.armErr = true, ""
}

// armFileWatch starts Viper's WatchConfig on an instance used only for the
// notification: its decoder is a no-op, the catalogue itself is parsed by
// Parse.
func (w *watcher) armFileWatch() error {
	dir := filepath.Dir(w.path)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("directory %s of the catalogue does not exist", dir)
	}
	// WatchConfig calls os.Exit when it cannot create an inotify watcher
	// (e.g. fs.inotify.max_user_instances reached); find out first.
	probe, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("create file watcher: %w", err)
	}
	_ = probe.Close()

	codecs := viper.NewCodecRegistry()
	if err := codecs.RegisterCodec("toml", notifyOnlyCodec{}); err != nil {
		return err
	}
	v := viper.NewWithOptions(
		viper.WithCodecRegistry(codecs),
		viper.WithLogger(slog.New(minLevelHandler{w.log.Handler(), slog.LevelError}).With("component", "viper")),
	)
	v.SetConfigFile(w.path)
	v.SetConfigType("toml")
	events := w.events
	v.OnConfigChange(func(fsnotify.Event) {
		// Non-blocking: a pending notification already covers this one,
		// and nobody reads after Watch returns.
		select {
		case events <- struct{}{}:
		default:
		}
	})
	v.WatchConfig()
	return nil
}

// reload reads the file and swaps in its catalogue if it is new and valid.
// force (SIGHUP) reports even an unchanged file or a repeated failure.
func (w *watcher) reload(trigger string, force bool) {
	cur := w.store.Load()
	data, err := readFile(w.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && !w.missing {
			w.missing = true
			// Viper's watch ends when the file is removed; watch the
			// folder again so the re-created file is seen at once.
			w.armed = false
			w.ensureFileWatch()
		}
		w.fail(trigger, force, "read: "+err.Error(), err)
		return
	}
	w.missing = false
	sum := sha256.Sum256(data)
	hash := hex.EncodeToString(sum[:])
	if hash == cur.Hash {
		w.lastFailure = ""
		if force {
			w.log.Info("catalogue unchanged", "trigger", trigger, "generation", w.store.Generation(), "hash", short(hash))
		}
		return
	}
	if !force && hash == w.lastFailure {
		return
	}
	c, err := Parse(data)
	if err != nil {
		var ve *ValidationError
		if errors.As(err, &ve) {
			ve.File = w.path
		}
		w.fail(trigger, force, hash, err)
		return
	}
	w.lastFailure = ""
	gen := w.store.Swap(c)
	d := Diff(cur, c)
	w.log.Info("catalogue reloaded", "generation", gen, "trigger", trigger, "models", len(c.Models()), "hash", short(c.Hash),
		"added", d.Added, "removed", d.Removed, "changed", d.Changed, "aliases_changed", d.AliasesChanged)
	for _, p := range c.Warnings() {
		w.log.Warn("catalogue warning", problemAttrs(p)...)
	}
	if w.opts.OnReload != nil {
		w.opts.OnReload(ReloadResult{OK: true, Catalogue: c, Generation: gen, Diff: d})
	}
}

// fail logs a failed attempt and reports it, once per distinct failure
// unless forced.
func (w *watcher) fail(trigger string, force bool, key string, err error) {
	if !force && key == w.lastFailure {
		return
	}
	w.lastFailure = key
	cur, gen := w.store.Load(), w.store.Generation()
	var ve *ValidationError
	if errors.As(err, &ve) {
		for _, p := range ve.Problems {
			w.log.Error("catalogue problem", problemAttrs(p)...)
		}
		w.log.Error("catalogue reload failed; keeping the previous catalogue", "trigger", trigger,
			"generation", gen, "hash", short(cur.Hash), "problems", len(ve.Problems))
	} else {
		w.log.Error("catalogue reload failed; keeping the previous catalogue", "trigger", trigger,
			"generation", gen, "hash", short(cur.Hash), "error", err)
	}
	if w.opts.OnReload != nil {
		w.opts.OnReload(ReloadResult{Err: err, Catalogue: cur, Generation: gen, Diff: Diff(cur, cur)})
	}
}

func problemAttrs(p Problem) []any {
	attrs := []any{"key", p.Key, "problem", p.Message}
	if p.Line > 0 {
		attrs = append(attrs, "line", p.Line, "column", p.Column)
	}
	return attrs
}

// short abbreviates a hash for logs.
func short(hash string) string {
	if len(hash) > 12 {
		return hash[:12]
	}
	return hash
}

// notifyOnlyCodec lets the watch-only Viper instance "read" the file without
// parsing it: Viper would lower-case and split the alias keys, and its
// errors would duplicate Parse's.
type notifyOnlyCodec struct{}

func (notifyOnlyCodec) Decode([]byte, map[string]any) error { return nil }

func (notifyOnlyCodec) Encode(map[string]any) ([]byte, error) {
	return nil, errors.New("catalogue: the watch-only Viper instance does not write files")
}

// minLevelHandler drops records below min: Viper logs every read at info.
type minLevelHandler struct {
	slog.Handler
	min slog.Level
}

func (h minLevelHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= h.min && h.Handler.Enabled(ctx, l)
}

func (h minLevelHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return minLevelHandler{h.Handler.WithAttrs(attrs), h.min}
}

func (h minLevelHandler) WithGroup(name string) slog.Handler {
	return minLevelHandler{h.Handler.WithGroup(name), h.min}
}
