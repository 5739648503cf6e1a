package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/spf13/viper"

	"github.com/helexa/cortex-extproc/config"
	"github.com/helexa/cortex-extproc/fleet"
	"github.com/helexa/cortex-extproc/neuron"
)

// neuronReloadDebounce is how long file events must be quiet before the
// config file is re-read, so an editor's burst of writes is read once.
const neuronReloadDebounce = 200 * time.Millisecond

// neuronReloader keeps the fleet's neurons in step with the service config
// file's [[neurons]] list, without a restart. It notices a change the way
// the catalogue watcher does: Viper's WatchConfig on the file (debounced),
// SIGHUP, and a content-hash poll every catalogue.poll_interval, the
// backstop for edits file notifications miss (Docker single-file bind
// mounts, Kubernetes ConfigMap symlink swaps).
//
// A changed file is loaded and validated like at start. A valid one swaps
// the name → client map (read by the cold loader) and hands the new list
// to the poller; other changed keys are named in a warning, as they take
// effect only after a restart. An invalid one is logged problem by problem
// and changes nothing.
type neuronReloader struct {
	path     string
	log      *slog.Logger
	hc       *http.Client
	poller   *fleet.Poller
	clients  *atomic.Pointer[map[string]neuron.API]
	poll     time.Duration // <= 0: no hash poll
	debounce time.Duration
	// events receives Viper's change notifications (coalesced).
	events chan struct{}

	// Owner state, touched only by run's goroutine after it starts.
	//
	// running is the config in force: the one the service started with,
	// with the [[neurons]] of the last valid reload.
	running config.Config
	// hash is the content hash of the file last read valid; lastFailure
	// the failure last reported (content hash or read error), so the poll
	// does not repeat it.
	hash        string
	lastFailure string
	missing     bool
	armed       bool
	armErr      string

	// Test hooks: ready is called once SIGHUP is handled and the first
	// read is done; reloaded after each attempt that was not a no-op.
	ready    func()
	reloaded func(ok bool)
	// noFileWatch turns the Viper path off so tests can show SIGHUP and
	// the poll work alone.
	noFileWatch bool
}

func newNeuronReloader(cfg config.Config, log *slog.Logger, hc *http.Client, p *fleet.Poller, clients *atomic.Pointer[map[string]neuron.API]) *neuronReloader {
	r := &neuronReloader{
		path:     cfg.File,
		log:      log.With("file", cfg.File),
		hc:       hc,
		poller:   p,
		clients:  clients,
		poll:     cfg.Catalogue.PollInterval,
		debounce: neuronReloadDebounce,
		events:   make(chan struct{}, 1),
		running:  cfg,
	}
	if abs, err := filepath.Abs(cfg.File); err == nil {
		r.path = abs
	}
	return r
}

// neuronClients builds the name → client map and the poller's list for
// ns, reusing prev's client for a neuron whose endpoint is unchanged.
func neuronClients(ns []config.Neuron, hc *http.Client, prev map[string]neuron.API) (map[string]neuron.API, []fleet.Neuron, error) {
	clients := make(map[string]neuron.API, len(ns))
	list := make([]fleet.Neuron, 0, len(ns))
	for _, n := range ns {
		c, ok := prev[n.Name]
		if cl, isClient := c.(*neuron.Client); !ok || !isClient || cl.BaseURL() != n.Endpoint {
			nc, err := neuron.New(n.Name, n.Endpoint, hc)
			if err != nil {
				return nil, nil, fmt.Errorf("neurons %q: %w", n.Name, err)
			}
			c = nc
		}
		clients[n.Name] = c
		list = append(list, fleet.Neuron{Name: n.Name, Cluster: n.ClusterName(), Endpoint: n.Endpoint, API: c})
	}
	return clients, list, nil
}

// run watches until ctx ends. Like the catalogue watcher, it is meant to
// run once per process: Viper's watch goroutine ends only when the file is
// removed.
func (r *neuronReloader) run(ctx context.Context) {
	sighup := make(chan os.Signal, 1)
	signal.Notify(sighup, syscall.SIGHUP)
	defer signal.Stop(sighup)

	r.ensureFileWatch()
	// The file may have changed since the service read it.
	r.reload("start", false)

	var pollC <-chan time.Time
	if r.poll > 0 {
		t := time.NewTicker(r.poll)
		defer t.Stop()
		pollC = t.C
	}
	if r.ready != nil {
		r.ready()
	}
	debounce := time.NewTimer(time.Hour)
	debounce.Stop()
	defer debounce.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.events:
			debounce.Reset(r.debounce)
		case <-debounce.C:
			r.reload("file", false)
		case <-sighup:
			r.reload("sighup", true)
		case <-pollC:
			r.reload("poll", false)
		}
	}
}

// reload reads the file and applies its [[neurons]] if the content is new
// and valid. force (SIGHUP) reports even an unchanged file or a repeated
// failure.
func (r *neuronReloader) reload(trigger string, force bool) {
	data, err := os.ReadFile(r.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) && !r.missing {
			r.missing = true
			// Viper's watch ends when the file is removed; watch the
			// folder again so the re-created file is seen at once.
			r.armed = false
			r.ensureFileWatch()
		}
		r.fail(trigger, force, "read: "+err.Error(), func() {
			r.log.Error("config file unreadable; keeping the current [[neurons]]", "trigger", trigger, "error", err)
		})
		return
	}
	r.missing = false
	sum := sha256.Sum256(data)
	hash := hex.EncodeToString(sum[:])
	if hash == r.hash {
		r.lastFailure = ""
		if force {
			r.log.Info("config unchanged", "trigger", trigger, "neurons", len(r.running.Neurons))
		}
		return
	}
	if !force && hash == r.lastFailure {
		return
	}

	res, err := config.Parse(r.path, data)
	var problems []config.Problem
	var le *config.LoadError
	switch {
	case errors.As(err, &le):
		problems = le.Problems
	case err != nil:
		problems = []config.Problem{{Message: err.Error()}}
	default:
		problems = res.Config.Validate()
	}
	next := res.Config
	var clients map[string]neuron.API
	var list []fleet.Neuron
	if len(problems) == 0 {
		clients, list, err = neuronClients(next.Neurons, r.hc, *r.clients.Load())
		if err != nil {
			problems = []config.Problem{{Key: "neurons", Message: err.Error()}}
		}
	}
	if len(problems) > 0 {
		r.fail(trigger, force, hash, func() {
			for _, p := range problems {
				r.log.Error("config problem", "key", p.Key, "problem", p.Message)
			}
			r.log.Error("config reload failed; keeping the current [[neurons]]", "trigger", trigger,
				"problems", len(problems), "neurons", len(r.running.Neurons))
		})
		return
	}

	r.lastFailure = ""
	r.hash = hash
	for _, k := range res.Unknown {
		r.log.Warn("unknown config key ignored; check its spelling", "key", k)
	}
	if keys := slices.DeleteFunc(config.ChangedKeys(r.running, next), func(k string) bool { return k == "neurons" }); len(keys) > 0 {
		r.log.Warn("config keys changed that take effect only after a restart; [[neurons]] and the catalogue's content reload live",
			"keys", keys, "trigger", trigger)
	}
	added, removed, changed := diffNeurons(r.running.Neurons, next.Neurons)
	r.running.Neurons = next.Neurons
	if len(added)+len(removed)+len(changed) == 0 {
		if force || trigger != "start" {
			r.log.Info("config reloaded; [[neurons]] unchanged", "trigger", trigger, "neurons", len(next.Neurons))
		}
		r.report(true)
		return
	}
	// The client map first: a snapshot naming a new neuron must find its
	// client. A load already running on a removed neuron keeps the client
	// it has and finishes.
	r.clients.Store(&clients)
	r.poller.SetNeurons(list)
	r.log.Info("neurons reloaded", "trigger", trigger, "neurons", len(next.Neurons),
		"added", added, "removed", removed, "changed", changed)
	r.report(true)
}

// fail logs a failed attempt once per distinct failure, unless forced.
func (r *neuronReloader) fail(trigger string, force bool, key string, logIt func()) {
	if !force && key == r.lastFailure {
		return
	}
	r.lastFailure = key
	logIt()
	r.report(false)
}

func (r *neuronReloader) report(ok bool) {
	if r.reloaded != nil {
		r.reloaded(ok)
	}
}

// diffNeurons names the neurons added, removed, and changed (endpoint or
// Envoy cluster) from prev to next, each sorted.
func diffNeurons(prev, next []config.Neuron) (added, removed, changed []string) {
	old := map[string]config.Neuron{}
	for _, n := range prev {
		old[n.Name] = n
	}
	seen := map[string]bool{}
	for _, n := range next {
		seen[n.Name] = true
		o, ok := old[n.Name]
		switch {
		case !ok:
			added = append(added, n.Name)
		case o.Endpoint != n.Endpoint || o.ClusterName() != n.ClusterName():
			changed = append(changed, n.Name)
		}
	}
	for _, n := range prev {
		if !seen[n.Name] {
			removed = append(removed, n.Name)
		}
	}
	slices.Sort(added)
	slices.Sort(removed)
	slices.Sort(changed)
	return added, removed, changed
}

func (r *neuronReloader) ensureFileWatch() {
	if r.noFileWatch || r.armed {
		return
	}
	if err := r.armFileWatch(); err != nil {
		if msg := err.Error(); msg != r.armErr {
			r.armErr = msg
			r.log.Error("config file watch unavailable; [[neurons]] edits are picked up only by SIGHUP and the content poll",
				"poll_interval", r.poll, "error", err)
		}
		return
	}
	r.armed, r.armErr = true, ""
}

// armFileWatch starts Viper's WatchConfig on an instance used only for the
// notification: its decoder is a no-op, the config itself is read by
// config.Parse.
func (r *neuronReloader) armFileWatch() error {
	dir := filepath.Dir(r.path)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("directory %s of the config file does not exist", dir)
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
		viper.WithLogger(slog.New(minLevel{r.log.Handler(), slog.LevelError}).With("component", "viper")),
	)
	v.SetConfigFile(r.path)
	v.SetConfigType("toml") // any supported type: the codec registered for it ignores the content
	events := r.events
	v.OnConfigChange(func(fsnotify.Event) {
		// Non-blocking: a pending notification already covers this one,
		// and nobody reads after run returns.
		select {
		case events <- struct{}{}:
		default:
		}
	})
	v.WatchConfig()
	return nil
}

// notifyOnlyCodec lets the watch-only Viper instance "read" the file
// without parsing it, so a broken file is reported once, by the reloader.
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
