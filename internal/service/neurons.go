package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/filewatch"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/neuron"
)

// neuronReloader keeps the fleet's neurons in step with the service config
// file's [[neurons]] list, without a restart. It notices a change the way
// the catalogue watcher does (package filewatch): Viper's file watch
// (debounced), SIGHUP, and a content-hash poll every
// catalogue.poll_interval.
//
// A changed file is loaded and validated like at start. A valid one swaps
// the name → client map (read by the cold loader) and hands the new list
// to the poller; other changed keys are named in a warning, as they take
// effect only after a restart. An invalid one is logged problem by problem
// and changes nothing.
type neuronReloader struct {
	path    string
	log     *slog.Logger
	hc      *http.Client
	poller  *fleet.Poller
	clients *atomic.Pointer[map[string]neuron.API]
	poll    time.Duration // < 0: no hash poll
	// onNeurons, when set, learns the [[neurons]] of each applied reload.
	onNeurons func([]config.Neuron)

	// Owner state, touched only by run's goroutine after it starts.
	//
	// running is the config in force: the one the service started with,
	// with the [[neurons]] of the last valid reload.
	running config.Config
	// hash is the content hash of the file last read valid.
	hash string

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
		path:    cfg.File,
		log:     log,
		hc:      hc,
		poller:  p,
		clients: clients,
		poll:    cfg.Catalogue.PollInterval,
		running: cfg,
	}
	if r.poll <= 0 {
		r.poll = -1
	}
	if abs, err := filepath.Abs(cfg.File); err == nil {
		r.path = abs
		// A re-read resolves a relative models_config against the absolute
		// path; resolve the running one the same way, or a relative
		// --config would look like a changed models_config.
		if mc := cfg.ModelsConfig; mc != "" && !filepath.IsAbs(mc) {
			if absMC, err := filepath.Abs(mc); err == nil {
				r.running.ModelsConfig = absMC
			}
		}
	}
	r.log = log.With("file", r.path)
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
	err := filewatch.Watch(ctx, r.path, filewatch.Options{
		PollInterval: r.poll,
		Logger:       r.log.With("watch", "config"),
		NoNotify:     r.noFileWatch,
		Ready:        r.ready,
	}, r.apply)
	if err != nil {
		r.log.Error("config watch stopped; [[neurons]] edits need a restart", "error", err)
	}
}

// apply takes the [[neurons]] of the config ev carries if the content is
// new and valid. A SIGHUP is answered even when the file is unchanged.
func (r *neuronReloader) apply(ev filewatch.Event) {
	trigger := string(ev.Trigger)
	if ev.Err != nil {
		r.log.Error("config file unreadable; keeping the current [[neurons]]", "trigger", trigger, "error", ev.Err)
		r.report(false)
		return
	}
	if ev.Hash == r.hash {
		if ev.Trigger == filewatch.SIGHUP {
			r.log.Info("config unchanged", "trigger", trigger, "neurons", len(r.running.Neurons))
		}
		return
	}

	res, err := config.Parse(r.path, ev.Data)
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
		// The file watch delivers a content once, so the poll does not
		// repeat this.
		for _, p := range problems {
			r.log.Error("config problem", "key", p.Key, "problem", p.Message)
		}
		r.log.Error("config reload failed; keeping the current [[neurons]]", "trigger", trigger,
			"problems", len(problems), "neurons", len(r.running.Neurons))
		r.report(false)
		return
	}

	r.hash = ev.Hash
	changedKeys := config.ChangedKeys(r.running, next)
	if ev.Trigger == filewatch.Start && len(changedKeys) == 0 {
		// The content the service started with: main has already
		// reported its unknown keys.
		r.report(true)
		return
	}
	for _, k := range res.Unknown {
		r.log.Warn("unknown config key ignored; check its spelling", "key", k)
	}
	if keys := slices.DeleteFunc(changedKeys, func(k string) bool { return k == "neurons" }); len(keys) > 0 {
		r.log.Warn("config keys changed that take effect only after a restart; [[neurons]] and the catalogue's content reload live",
			"keys", keys, "trigger", trigger)
	}
	added, removed, changed := diffNeurons(r.running.Neurons, next.Neurons)
	r.running.Neurons = next.Neurons
	if len(added)+len(removed)+len(changed) == 0 {
		if ev.Trigger != filewatch.Start {
			r.log.Info("config reloaded; [[neurons]] unchanged", "trigger", trigger, "neurons", len(next.Neurons))
		}
		r.report(true)
		return
	}
	// The client map first: a snapshot naming a new neuron must find its
	// client. A load already running on a removed neuron keeps the client
	// it has and finishes.
	r.clients.Store(&clients)
	if r.onNeurons != nil {
		r.onNeurons(next.Neurons)
	}
	r.poller.SetNeurons(list)
	r.log.Info("neurons reloaded", "trigger", trigger, "neurons", len(next.Neurons),
		"added", added, "removed", removed, "changed", changed)
	r.report(true)
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
		case o.Endpoint != n.Endpoint || o.ClusterName() != n.ClusterName() || o.AnthropicNative != n.AnthropicNative:
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
