package catalogue

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"syscall"
	"time"

	"github.com/helexa/cortex-extproc/internal/filewatch"
)

const (
	// DefaultPollInterval is how often Watch re-reads the file when no
	// notification arrived.
	DefaultPollInterval = filewatch.DefaultPollInterval
	// DefaultDebounce is how long file events must be quiet before Watch
	// reloads.
	DefaultDebounce = filewatch.DefaultDebounce
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
// then returns nil. A change is noticed three ways (package filewatch):
// Viper's file watch (debounced), SIGHUP (reloads at once and logs even
// when nothing changed), and a slow content-hash poll. A reload does nothing
// if the file's hash is the one in force, and otherwise parses and
// validates it: a good catalogue is swapped in and its changes logged; a
// bad one (or a missing file, or a directory in its place) is logged
// problem by problem and the previous catalogue stays. Each outcome goes to
// opts.OnReload. A failure is reported once, not again on every poll, until
// the content changes.
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
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	r := &reloader{path: abs, store: store, log: log.With("file", abs), onReload: opts.OnReload}
	return filewatch.Watch(ctx, abs, filewatch.Options{
		PollInterval: opts.PollInterval,
		Debounce:     opts.Debounce,
		Logger:       log.With("watch", "catalogue"),
		NoNotify:     opts.noFileWatch,
		Ready:        opts.ready,
	}, r.apply)
}

// reloader applies what the file watch reads to the store. Its methods run
// on Watch's goroutine only.
type reloader struct {
	path     string
	store    *Store
	log      *slog.Logger
	onReload func(ReloadResult)
}

// apply swaps in the catalogue ev carries if it is new and valid. A SIGHUP
// is answered even when the file is unchanged.
func (r *reloader) apply(ev filewatch.Event) {
	trigger := string(ev.Trigger)
	if ev.Err != nil {
		r.fail(trigger, readError(r.path, ev.Err))
		return
	}
	cur := r.store.Load()
	if ev.Hash == cur.Hash {
		if ev.Trigger == filewatch.SIGHUP {
			r.log.Info("catalogue unchanged", "trigger", trigger, "generation", r.store.Generation(), "hash", short(ev.Hash))
		}
		return
	}
	c, err := Parse(ev.Data)
	if err != nil {
		var ve *ValidationError
		if errors.As(err, &ve) {
			ve.File = r.path
		}
		r.fail(trigger, err)
		return
	}
	gen := r.store.Swap(c)
	d := Diff(cur, c)
	r.log.Info("catalogue reloaded", "generation", gen, "trigger", trigger, "models", len(c.Models()), "hash", short(c.Hash),
		"added", d.Added, "removed", d.Removed, "changed", d.Changed, "aliases_changed", d.AliasesChanged)
	for _, p := range c.Warnings() {
		r.log.Warn("catalogue warning", problemAttrs(p)...)
	}
	if r.onReload != nil {
		r.onReload(ReloadResult{OK: true, Catalogue: c, Generation: gen, Diff: d})
	}
}

// fail logs a failed attempt and reports it. The file watch delivers a
// failure once per content, so the poll does not repeat it.
func (r *reloader) fail(trigger string, err error) {
	cur, gen := r.store.Load(), r.store.Generation()
	var ve *ValidationError
	if errors.As(err, &ve) {
		for _, p := range ve.Problems {
			r.log.Error("catalogue problem", problemAttrs(p)...)
		}
		r.log.Error("catalogue reload failed; keeping the previous catalogue", "trigger", trigger,
			"generation", gen, "hash", short(cur.Hash), "problems", len(ve.Problems))
	} else {
		r.log.Error("catalogue reload failed; keeping the previous catalogue", "trigger", trigger,
			"generation", gen, "hash", short(cur.Hash), "error", err)
	}
	if r.onReload != nil {
		r.onReload(ReloadResult{Err: err, Catalogue: cur, Generation: gen, Diff: Diff(cur, cur)})
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

// readError turns a failed read of the catalogue file into an error that
// says what to do, like LoadFile's.
func readError(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("catalogue file %s does not exist (%w); create it or point models_config at it", path, err)
	case errors.Is(err, syscall.EISDIR):
		return fmt.Errorf("catalogue %s is a directory, not a file; point models_config at the models.toml inside it (%w)", path, err)
	}
	return fmt.Errorf("read catalogue %s: %w", path, err)
}
