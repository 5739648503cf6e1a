// Command cortex-extproc is the LLM routing service that Envoy consults
// through its ext_proc filter. See the README for configuration.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/service"
	"github.com/helexa/cortex-extproc/routing"
	"github.com/helexa/cortex-extproc/routing/coldload"
)

// Set by -ldflags "-X main.version=… -X main.commit=…".
var (
	version = "dev"
	commit  = ""
)

// errProblems makes validate exit 1 after printing its own report.
var errProblems = errors.New("problems found")

func main() {
	if err := rootCmd().Execute(); err != nil {
		if !errors.Is(err, errProblems) {
			fmt.Fprintln(os.Stderr, "cortex-extproc:", err)
		}
		os.Exit(1)
	}
}

func rootCmd() *cobra.Command {
	var cfgFile string
	root := &cobra.Command{
		Use:           "cortex-extproc",
		Short:         "LLM routing for Envoy: picks (and cold-loads) the neuron for each request via ext_proc",
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE:          func(cmd *cobra.Command, _ []string) error { return serve(cmd.Context(), cfgFile) },
	}
	root.PersistentFlags().StringVar(&cfgFile, "config", "", "config file (TOML, YAML or JSON); embedded defaults when empty")

	root.AddCommand(&cobra.Command{
		Use:   "serve",
		Short: "Run the service",
		Args:  cobra.NoArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return serve(cmd.Context(), cfgFile) },
	})

	var catFile string
	validate := &cobra.Command{
		Use:   "validate",
		Short: "Check the config and the catalogue; print every problem, exit 1 if any",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return validateCmd(cmd.OutOrStdout(), cfgFile, catFile)
		},
	}
	validate.Flags().StringVar(&catFile, "catalogue", "", "check this catalogue file (alone, or instead of the config's models_config)")
	root.AddCommand(validate)

	var model string
	var asJSON bool
	route := &cobra.Command{
		Use:   "route",
		Short: "Poll the fleet once and print the decision a request for --model would get (loads and evicts nothing)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return routeCmd(cmd.Context(), cmd.OutOrStdout(), cfgFile, model, asJSON)
		},
	}
	route.Flags().StringVar(&model, "model", "", "model id or alias, as a client would send it")
	route.Flags().BoolVar(&asJSON, "json", false, "print the decision as JSON")
	_ = route.MarkFlagRequired("model")
	root.AddCommand(route)

	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "Print version, commit and Go version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "cortex-extproc %s (commit %s, %s)\n", version, buildCommit(), runtime.Version())
		},
	})
	return root
}

func buildCommit() string {
	if commit != "" {
		return commit
	}
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "unknown"
}

func serve(ctx context.Context, cfgFile string) error {
	res, err := config.Load(cfgFile)
	if err != nil {
		return err
	}
	log, err := newLogger(res.Config.Log, os.Stderr)
	if err != nil {
		return err
	}
	slog.SetDefault(log)
	if cfgFile == "" {
		log.Warn("no --config given: running on embedded defaults with no neurons configured")
	}
	for _, k := range res.Unknown {
		log.Warn("unknown config key ignored; check its spelling", "key", k, "file", cfgFile)
	}
	for _, name := range res.UnknownEnv {
		log.Warn("environment variable matches no config key and is ignored; sections are joined by __", "variable", name)
	}
	if ps := res.Config.Validate(); len(ps) > 0 {
		for _, p := range ps {
			log.Error("config problem", "key", p.Key, "problem", p.Message)
		}
		return fmt.Errorf("config %s has %d problem(s); run `cortex-extproc validate --config %s`", cfgFile, len(ps), cfgFile)
	}
	metrics.SetBuild(version, buildCommit())
	svc, err := service.New(res.Config, log)
	if err != nil {
		return err
	}
	if ctx == nil {
		ctx = context.Background()
	}
	return runUntilSignalled(ctx, svc)
}

// newLogger is JSON when stderr is not a terminal (containers, journald),
// text on a terminal, unless log.format says otherwise.
func newLogger(c config.Log, w *os.File) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(strings.ToUpper(strings.Replace(c.Level, "warning", "warn", 1)))); err != nil {
		return nil, fmt.Errorf("log.level %q: use debug, info, warn or error", c.Level)
	}
	opts := &slog.HandlerOptions{Level: level, ReplaceAttr: logAttr}
	format := c.Format
	if format == "" || format == "auto" {
		format = "json"
		if st, err := w.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			format = "text"
		}
	}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts)), nil
	}
	return slog.New(slog.NewJSONHandler(w, opts)), nil
}

// clientSupplied are log keys whose values come from a client's headers.
var clientSupplied = map[string]bool{"request_id": true, "traceparent": true, "tracestate": true}

// logAttr keeps log values readable and bounded: a duration is written as
// Go writes it ("1.5s"; JSON would otherwise print 1500000000
// nanoseconds), and a value a client supplied (x-request-id, trace
// headers) is cut to metrics.MaxLogValue bytes with a marker, whichever
// line logs it.
func logAttr(_ []string, a slog.Attr) slog.Attr {
	switch a.Value.Kind() {
	case slog.KindDuration:
		return slog.String(a.Key, a.Value.Duration().String())
	case slog.KindString:
		if clientSupplied[a.Key] {
			return slog.String(a.Key, metrics.BoundLogValue(a.Value.String()))
		}
	}
	return a
}

// validateCmd prints every problem in the config and the catalogue, each
// as "file: key: message", and returns errProblems if there is any.
func validateCmd(out io.Writer, cfgFile, catFile string) error {
	var problems []string
	problem := func(file, msg string) { problems = append(problems, file+": "+msg) }
	models, aliases, neurons := 0, 0, 0
	var neuronNames []string // nil: no config read, pinned_on cannot be checked
	if cfgFile == "" && catFile == "" {
		fmt.Fprintln(out, "nothing to validate: give --config FILE and/or --catalogue FILE")
		return errProblems
	}
	if cfgFile != "" {
		res, err := config.Load(cfgFile)
		var le *config.LoadError
		if err != nil && !errors.As(err, &le) {
			le = &config.LoadError{File: cfgFile, Problems: []config.Problem{{Message: err.Error()}}}
		}
		// Keys already reported as undecodable are not reported again by
		// Validate (they decoded as zero).
		reported := map[string]bool{}
		if le != nil {
			for _, p := range le.Problems {
				problem(cfgFile, p.String())
				reported[p.Key] = true
			}
		}
		// A wrong-typed value still leaves the rest decoded (File set);
		// a syntax error leaves nothing to check.
		if res.Config.File != "" {
			for _, k := range res.Unknown {
				problem(cfgFile, k+": unknown key; check its spelling (README, Configuration)")
			}
			for _, name := range res.UnknownEnv {
				fmt.Fprintf(out, "warning: environment %s matches no key and is ignored (sections are joined by __, e.g. %s)\n", name, config.EnvName("extproc.listen"))
			}
			if catFile != "" {
				res.Config.ModelsConfig = catFile
			}
			for _, p := range res.Config.Validate() {
				if reported[p.Key] {
					continue
				}
				reported[p.Key] = true
				problem(cfgFile, p.String())
			}
			neurons = len(res.Config.Neurons)
			neuronNames = []string{}
			for _, n := range res.Config.Neurons {
				neuronNames = append(neuronNames, n.Name)
			}
			// A models_config problem (unset, missing file) is already
			// reported; reading the catalogue would say it again.
			if catFile == "" && !reported["models_config"] {
				catFile = res.Config.ModelsConfig
			}
		}
	}
	if catFile != "" {
		c, err := catalogue.LoadFile(catFile)
		var ve *catalogue.ValidationError
		switch {
		case errors.As(err, &ve):
			for _, p := range ve.Problems {
				problem(catFile, p.String())
			}
		case err != nil:
			problems = append(problems, err.Error())
		default:
			models, aliases = len(c.Models()), len(c.Aliases())
			for _, w := range c.Warnings() {
				fmt.Fprintf(out, "warning: %s: %s\n", catFile, w)
			}
			if neuronNames != nil {
				for _, w := range pinnedOnWarnings(c, cfgFile, neuronNames) {
					fmt.Fprintf(out, "warning: %s: %s\n", catFile, w)
				}
			}
		}
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(out, p)
		}
		fmt.Fprintf(out, "%d problem(s) found\n", len(problems))
		return errProblems
	}
	if cfgFile == "" {
		fmt.Fprintf(out, "ok: %d catalogue model(s), %d alias(es)\n", models, aliases)
		return nil
	}
	fmt.Fprintf(out, "ok: %d neuron(s), %d catalogue model(s), %d alias(es)\n", neurons, models, aliases)
	return nil
}

// pinnedOnWarnings names each pinned_on entry that is not a configured
// neuron. Only a warning: one catalogue may serve several gateways with
// different neurons. A model none of whose pinned_on neurons is configured
// can never be cold-loaded here, and says so.
func pinnedOnWarnings(c *catalogue.Catalogue, cfgFile string, neurons []string) []string {
	configured := map[string]bool{}
	for _, n := range neurons {
		configured[n] = true
	}
	have := "it configures no neurons"
	if len(neurons) > 0 {
		have = "it configures " + strings.Join(neurons, ", ")
	}
	var out []string
	for _, p := range c.Models() {
		var missing []string
		for _, n := range p.PinnedOn {
			if !configured[n] {
				missing = append(missing, strconv.Quote(n))
			}
		}
		if len(missing) == 0 {
			continue
		}
		key := fmt.Sprintf("models (id %q).pinned_on", p.ID)
		if len(missing) == len(p.PinnedOn) {
			out = append(out, fmt.Sprintf("%s: %s not a neuron in %s (%s), so %s can never be cold-loaded by this cortex-extproc (503 no_feasible_neuron); fix the name or add the neuron",
				key, isAre(missing), cfgFile, have, p.ID))
			continue
		}
		out = append(out, fmt.Sprintf("%s: %s not a neuron in %s (%s); cold loads use only the others", key, isAre(missing), cfgFile, have))
	}
	return out
}

func isAre(names []string) string {
	if len(names) == 1 {
		return names[0] + " is"
	}
	return strings.Join(names, ", ") + " are"
}

// decisionView is what `route` prints.
type decisionView struct {
	Requested string     `json:"requested"`
	Model     string     `json:"model"`
	Node      string     `json:"node,omitempty"`
	Cluster   string     `json:"cluster,omitempty"`
	Endpoint  string     `json:"endpoint,omitempty"`
	ColdStart bool       `json:"cold_start"`
	Action    string     `json:"action"`
	Load      *loadView  `json:"load,omitempty"`
	Error     *errorView `json:"error,omitempty"`
	// Neurons is what the one poll found, so an error can be traced to
	// the neuron that caused it.
	Neurons []neuronView `json:"neurons"`
}

type neuronView struct {
	Name    string `json:"name"`
	Healthy bool   `json:"healthy"`
	Error   string `json:"error,omitempty"`
}

type loadView struct {
	Node        string   `json:"node"`
	Devices     []int    `json:"devices"`
	PerDeviceMB int64    `json:"per_device_mb"`
	Evict       []string `json:"evict"`
}

type errorView struct {
	Status     int    `json:"status"`
	Code       string `json:"code"`
	Reason     string `json:"reason"` // the request_errors_total reason
	Message    string `json:"message"`
	RetryAfter int    `json:"retry_after,omitempty"`
}

func routeCmd(ctx context.Context, out io.Writer, cfgFile, model string, asJSON bool) error {
	res, err := config.Load(cfgFile)
	if err != nil {
		return err
	}
	cfg := res.Config
	if ps := cfg.Validate(); len(ps) > 0 {
		return fmt.Errorf("config %s has %d problem(s), first %s; run `cortex-extproc validate --config %s`", cfgFile, len(ps), ps[0], cfgFile)
	}
	cat := catalogue.Empty()
	if cfg.ModelsConfig != "" {
		if cat, err = catalogue.LoadFile(cfg.ModelsConfig); err != nil {
			return err
		}
	}
	ns, err := neuronList(cfg.Neurons)
	if err != nil {
		return err
	}
	// One round is all `route` needs: the threshold is 1 so a neuron that
	// fails its single poll shows as unhealthy. The poller only reads:
	// nothing is loaded or evicted.
	quiet := slog.New(slog.DiscardHandler)
	p := fleet.NewPoller(fleet.PollerConfig{Interval: time.Hour, Timeout: cfg.Poll.Timeout, FailureThreshold: 1}, ns, quiet)
	if ctx == nil {
		ctx = context.Background()
	}
	pctx, cancel := context.WithCancel(ctx)
	stopped := make(chan struct{})
	go func() { _ = p.Run(pctx); close(stopped) }()
	defer func() { cancel(); <-stopped }()
	// Each neuron call is bounded by poll.timeout; a round makes a few
	// per neuron (health, discovery, models, one endpoint per model).
	limit := 10*cfg.Poll.Timeout + 5*time.Second
	select {
	case <-p.Ready():
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(limit):
		return fmt.Errorf("the fleet poll did not finish within %s; check the neurons' endpoints and poll.timeout", limit)
	}
	snap := p.Snapshot()
	// The router's own dry run: the same decision and placement a request
	// would get. The loader it holds never runs a load here.
	loader := coldload.New(coldload.Config{
		Timeout:         cfg.ColdLoad.Timeout,
		MaxEvictions:    cfg.ColdLoad.EvictionLimit(),
		MaxWaiters:      cfg.ColdLoad.MaxWaiters,
		FailureCooldown: cfg.ColdLoad.Cooldown(),
	}, coldload.Deps{
		Catalogue: func() *catalogue.Catalogue { return cat },
		Fleet:     p.Snapshot,
		Neuron:    func(string) neuron.API { return nil },
	})
	defer loader.Close(context.Background())
	x := routing.NewRouter(func() *catalogue.Catalogue { return cat }, p.Snapshot, loader, nil).Explain(model)
	d, aerr := x.Decision, x.Err
	v := decisionView{Requested: model, Model: d.Model, Node: d.Node, Cluster: d.Cluster, Endpoint: d.Endpoint, ColdStart: d.ColdStart,
		Neurons: []neuronView{}}
	for _, n := range snap.Nodes {
		v.Neurons = append(v.Neurons, neuronView{Name: n.Name, Healthy: n.Healthy, Error: n.LastError})
	}
	switch {
	case aerr != nil:
		v.Action = "error"
	case d.Step == routing.StepLoaded:
		v.Action = "route to a loaded replica"
	case d.Step == routing.StepUnloaded:
		v.Action = "route to the node that knows it; the neuron reloads it lazily"
	case d.Step == routing.StepColdLoad && x.Joins != "":
		v.Action = "wait for the cold load already in progress on " + x.Joins
		v.Node, v.Cluster = x.Joins, snap.Node(x.Joins).Cluster
	case d.Step == routing.StepColdLoad && x.Plan != nil:
		plan := x.Plan
		v.Action = "cold load"
		v.Node, v.Cluster = plan.Node, snap.Node(plan.Node).Cluster
		v.Load = &loadView{Node: plan.Node, Devices: append([]int{}, plan.Spec.Devices...), PerDeviceMB: plan.PerDeviceMB, Evict: append([]string{}, plan.Evict...)}
	}
	if aerr != nil {
		v.Error = &errorView{aerr.Status, aerr.Code, string(aerr.Classified()), aerr.Message, aerr.RetryAfter}
	}
	// An error decision is printed like any other, then exits 1 so a
	// script can tell "would be served" from "would fail" without parsing.
	fail := func() error {
		if v.Error != nil {
			return errProblems
		}
		return nil
	}
	if asJSON {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		if err := enc.Encode(v); err != nil {
			return err
		}
		return fail()
	}
	fmt.Fprintf(out, "model:      %s", v.Requested)
	if v.Model != v.Requested {
		fmt.Fprintf(out, " (alias of %s)", v.Model)
	}
	fmt.Fprintln(out)
	fmt.Fprintf(out, "decision:   %s\n", v.Action)
	for _, n := range v.Neurons {
		switch {
		case n.Healthy:
			fmt.Fprintf(out, "neuron:     %s healthy\n", n.Name)
		case n.Error != "":
			fmt.Fprintf(out, "neuron:     %s unhealthy: %s\n", n.Name, n.Error)
		default:
			fmt.Fprintf(out, "neuron:     %s unhealthy\n", n.Name)
		}
	}
	if v.Error != nil {
		fmt.Fprintf(out, "error:      %d %s: %s", v.Error.Status, v.Error.Code, v.Error.Message)
		if v.Error.RetryAfter > 0 {
			fmt.Fprintf(out, " (Retry-After %d)", v.Error.RetryAfter)
		}
		fmt.Fprintf(out, "\nreason:     %s\n", v.Error.Reason)
		return fail()
	}
	fmt.Fprintf(out, "node:       %s\ncluster:    %s\n", v.Node, v.Cluster)
	if v.Endpoint != "" {
		fmt.Fprintf(out, "endpoint:   %s\n", v.Endpoint)
	}
	fmt.Fprintf(out, "cold start: %t\n", v.ColdStart)
	if v.Load != nil {
		evict := "nothing (it fits in free VRAM)"
		if len(v.Load.Evict) > 0 {
			evict = strings.Join(v.Load.Evict, ", ")
		}
		fmt.Fprintf(out, "devices:    %v (%d MB each)\n", v.Load.Devices, v.Load.PerDeviceMB)
		fmt.Fprintf(out, "would evict: %s\n", evict)
	}
	return nil
}

// neuronList builds a client for every configured neuron.
func neuronList(cfg []config.Neuron) ([]fleet.Neuron, error) {
	var ns []fleet.Neuron
	for _, n := range cfg {
		c, err := neuron.New(n.Name, n.Endpoint, nil)
		if err != nil {
			return nil, fmt.Errorf("neurons %q: %w", n.Name, err)
		}
		ns = append(ns, fleet.Neuron{Name: n.Name, Cluster: n.ClusterName(), Endpoint: n.Endpoint, API: c})
	}
	return ns, nil
}
