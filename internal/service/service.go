// Package service wires cortex-extproc together: config → catalogue store
// and fleet poller → router → ext_proc gRPC server, plus gRPC health, the
// admin HTTP listener and the catalogue watcher. cmd/cortex-extproc runs it;
// end-to-end tests run it in-process.
package service

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/metrics"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/internal/neuron"
	"github.com/helexa/cortex-extproc/internal/xds"
	"github.com/helexa/cortex-extproc/routing"
	"github.com/helexa/cortex-extproc/routing/coldload"
)

// Health service names answered on the gRPC port.
const (
	HealthExtProc   = "envoy.service.ext_proc.v3.ExternalProcessor"
	HealthLiveness  = "liveness"
	HealthReadiness = "readiness"
)

// Service is a running cortex-extproc.
type Service struct {
	cfg     config.Config
	log     *slog.Logger
	store   *catalogue.Store
	poller  *fleet.Poller
	xds     *xds.Server // nil unless [xds] enabled
	loader  *coldload.Loader
	router  *routing.Router
	metrics *metrics.Metrics
	health  *health.Server
	grpc    *grpc.Server
	admin   *http.Server
	models  *modellist.List
	clients atomic.Pointer[map[string]neuron.API] // swapped whole by a [[neurons]] reload
	neurons *neuronReloader                       // nil without a config file
	// anthropic: which neurons get /v1/messages translated.
	anthropic *anthropicRoutes
	// readiness drives the readiness and ext_proc gRPC health statuses,
	// /readyz and Ready() (ready.go).
	readiness *readiness

	holds     *holds        // requests held for cold loads, until Envoy has their answer
	skipDelay chan struct{} // closed by SkipShutdownDelay
	skipOnce  sync.Once

	grpcLis  net.Listener
	adminLis net.Listener
}

// New builds the service from cfg: it reads the catalogue (an invalid one is
// an error here: there is no previous good one to keep) and binds both
// listeners, so a port clash fails fast.
func New(cfg config.Config, log *slog.Logger) (*Service, error) {
	s := &Service{cfg: cfg, log: log, metrics: metrics.New(),
		holds: newHolds(), skipDelay: make(chan struct{}), anthropic: newAnthropicRoutes(cfg)}

	cat := catalogue.Empty()
	if cfg.ModelsConfig != "" {
		c, err := catalogue.LoadFile(cfg.ModelsConfig)
		if err != nil {
			return nil, err
		}
		cat = c
		for _, w := range c.Warnings() {
			log.Warn("catalogue warning", "key", w.Key, "problem", w.Message)
		}
	} else {
		log.Warn("no catalogue configured (models_config): only models already loaded on neurons can be routed")
	}
	s.store = catalogue.NewStore(cat)
	s.metrics.SetCatalogue(cat, s.store.Generation())
	s.metrics.SetLogger(log) // one line per decided request (debug; info for cold starts and errors)

	if len(cfg.Neurons) == 0 {
		log.Warn("no neurons are configured: every request will get 503 until [[neurons]] entries are added")
	}
	hc := &http.Client{Transport: &http.Transport{
		Proxy:               nil,
		MaxIdleConnsPerHost: 8,
		IdleConnTimeout:     90 * time.Second,
	}}
	clients, ns, err := neuronClients(cfg.Neurons, hc, nil)
	if err != nil {
		return nil, err
	}
	s.clients.Store(&clients)
	s.poller = fleet.NewPoller(fleet.PollerConfig{
		Interval:         cfg.Poll.Interval,
		Timeout:          cfg.Poll.Timeout,
		FailureThreshold: cfg.Poll.FailureThreshold,
		OnPoll:           s.metrics.PollResult,
		OnHealth:         s.metrics.NeuronHealth,
		OnRemove:         s.metrics.NeuronRemoved,
		// A re-poll after a failed request that fails takes the neuron
		// out at once (fleet/suspect.go).
		OnSuspectUnhealthy: s.metrics.SuspectUnhealthy,
	}, ns, log)
	if cfg.File != "" {
		s.neurons = newNeuronReloader(cfg, log, hc, s.poller, &s.clients)
		s.neurons.onNeurons = s.anthropic.setNeurons
	}

	usage := routing.NewUsage()
	s.loader = coldload.New(coldload.Config{
		Timeout:         cfg.ColdLoad.Timeout,
		MaxEvictions:    cfg.ColdLoad.EvictionLimit(),
		MaxWaiters:      cfg.ColdLoad.MaxWaiters,
		FailureCooldown: cfg.ColdLoad.Cooldown(),
	}, coldload.Deps{
		Catalogue:    s.store.Load,
		Fleet:        s.poller.Snapshot,
		Neuron:       s.neuron,
		MarkLoaded:   s.poller.MarkLoaded,
		FleetChanged: s.poller.Changed,
		Usage:        usage,
		Log:          log,
		Observer:     s.metrics,
	})
	s.router = routing.NewRouter(s.store.Load, s.poller.Snapshot, s.loader, usage)
	s.metrics.WatchFleet(metrics.FleetSource{Snapshot: s.poller.Snapshot, Ledger: s.loader.Commitments, Usage: usage})
	s.models = modellist.New(s.store.Load, s.poller.Snapshot)

	var upstream extproc.Upstream = extproc.ClusterHeader{Name: cfg.Upstream.ClusterHeader}
	if cfg.XDS.Enabled {
		// Clusters come from us over ADS: name one only once Envoy ACKed it.
		s.xds = xds.New(xds.Options{Fleet: s.poller, ClusterHeader: cfg.Upstream.ClusterHeader, Log: log})
		upstream = s.xds.Upstream()
	}
	if cfg.Upstream.Mode == config.ModeOriginalDst {
		upstream = extproc.NewOriginalDst(nil)
	}
	ep := extproc.New(s.holds.router(s.router), extproc.Options{
		MaxRequestBytes:   cfg.ExtProc.MaxRequestBytes,
		ColdLoadTimeout:   cfg.ColdLoad.Timeout,
		MaxMessageTimeout: cfg.ExtProc.MaxMessageTimeout,
		Upstream:          upstream,
		Models:            s.models,
		Observer:          s.metrics,
		Log:               log,
		// An Anthropic request to a neuron that speaks only OpenAI is
		// translated, and its answer too (extproc/anthropic.go).
		TranslateAnthropic: s.anthropic.translates,
		// A routed request that Envoy could not deliver makes its neuron
		// suspect: re-polled at once, unhealthy if it does not answer.
		UpstreamFailed: s.upstreamFailed,
	})

	opts, err := grpcOptions(cfg.ExtProc)
	if err != nil {
		return nil, err
	}
	opts = append(opts, grpc.ChainStreamInterceptor(s.holds.intercept))
	s.grpc = extproc.NewGRPCServer(ep, opts...)
	s.health = health.NewServer()
	healthpb.RegisterHealthServer(s.grpc, s.health)
	if s.xds != nil {
		s.xds.Register(s.grpc)
	}
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(HealthLiveness, healthpb.HealthCheckResponse_SERVING)
	s.readiness = newReadiness(s.health) // readiness and ext_proc: NOT_SERVING until ready

	s.admin = &http.Server{Handler: s.adminMux(), ReadHeaderTimeout: 10 * time.Second}

	if s.grpcLis, err = net.Listen("tcp", cfg.ExtProc.Listen); err != nil {
		return nil, fmt.Errorf("extproc.listen %s: %w", cfg.ExtProc.Listen, err)
	}
	if s.adminLis, err = net.Listen("tcp", cfg.Admin.Listen); err != nil {
		s.grpcLis.Close()
		return nil, fmt.Errorf("admin.listen %s: %w", cfg.Admin.Listen, err)
	}
	return s, nil
}

// GRPCAddr is the bound ext_proc address (useful with port 0).
func (s *Service) GRPCAddr() string { return s.grpcLis.Addr().String() }

// AdminAddr is the bound admin HTTP address.
func (s *Service) AdminAddr() string { return s.adminLis.Addr().String() }

// Ready is closed once the catalogue is loaded and the first poll round
// finished, after gRPC health says SERVING; never if the shutdown began first.
func (s *Service) Ready() <-chan struct{} { return s.readiness.Done() }

// upstreamFailed is extproc's Options.UpstreamFailed: count the signal
// and have the poller re-poll the node (it never blocks). A node a config
// reload removed meanwhile is not counted: node labels are configured
// neurons only.
func (s *Service) upstreamFailed(node, _ string, _ int, how string) {
	if s.poller.Snapshot().Node(node) == nil {
		return
	}
	s.metrics.SuspectSignal(node, how)
	s.poller.Suspect(node)
}

func (s *Service) neuron(name string) neuron.API {
	if c, ok := (*s.clients.Load())[name]; ok {
		return c
	}
	return nil
}

// SkipShutdownDelay ends the shutdown delay at once (or skips it, if the
// shutdown has not begun): the drain starts without waiting for Envoy's
// health checks. cortex-extproc calls it on a second SIGTERM or Ctrl-C.
func (s *Service) SkipShutdownDelay() { s.skipOnce.Do(func() { close(s.skipDelay) }) }

// Run serves until ctx is done, then shuts down: readiness goes
// NOT_SERVING while new streams are still served for shutdown_delay; then
// the listener closes and open streams get drain_timeout to finish; then
// cold loads still running are cancelled, and once every request held for
// one has its 503 the remaining streams are closed.
func (s *Service) Run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopTracing := s.startTracing(ctx)

	errc := make(chan error, 2)
	go func() { errc <- s.grpc.Serve(s.grpcLis) }()
	go func() {
		if err := s.admin.Serve(s.adminLis); !errors.Is(err, http.ErrServerClosed) {
			errc <- err
		}
	}()
	go s.poller.Run(runCtx)
	if s.xds != nil {
		go s.xds.Run(runCtx)
	}
	if s.neurons != nil {
		go s.neurons.run(runCtx)
	}
	if s.cfg.ModelsConfig != "" {
		go func() {
			err := catalogue.Watch(runCtx, s.cfg.ModelsConfig, s.store, catalogue.WatchOptions{
				PollInterval: s.cfg.Catalogue.PollInterval,
				Logger:       s.log,
				OnReload: func(r catalogue.ReloadResult) {
					s.metrics.CatalogueReload(r.OK)
					if r.OK {
						s.metrics.SetCatalogue(r.Catalogue, r.Generation)
					}
				},
			})
			if err != nil {
				s.log.Error("catalogue watch stopped; edits to the catalogue need a restart", "error", err)
			}
		}()
	}
	go func() {
		select {
		case <-s.poller.Ready():
			if s.readiness.Ready() { // ignored once draining
				s.log.Info("ready: catalogue loaded and first poll round finished",
					"models", len(s.store.Load().Models()), "neurons", len(s.cfg.Neurons))
			}
		case <-runCtx.Done():
		}
	}()
	s.log.Info("cortex-extproc serving", "extproc", s.GRPCAddr(), "admin", s.AdminAddr(),
		"upstream_mode", s.cfg.Upstream.Mode, "neurons", len(s.cfg.Neurons))

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		s.log.Error("listener failed", "error", runErr)
		s.SkipShutdownDelay() // nothing more can be served
	}
	s.drain()
	cancel()
	// Streams are gone; a load still running is abandoned after a short
	// grace (the neuron finishes it on its own and the next poll sees it).
	cctx, ccancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer ccancel()
	s.loader.Close(cctx)
	stopTracing()
	return runErr
}

const (
	// answerHeldTimeout bounds, after the loads are cancelled, the wait for
	// every request held for one to have its 503: normally milliseconds,
	// even for thousands of them.
	answerHeldTimeout = 10 * time.Second
	// adminShutdownTimeout bounds the admin listener's graceful close.
	adminShutdownTimeout = 5 * time.Second

	// ShutdownOverhead is the most Run takes to return once its context
	// ends, beyond extproc.shutdown_delay + extproc.drain_timeout. A
	// supervisor must allow at least that sum before it kills the process
	// (terminationGracePeriodSeconds, TimeoutStopSec, stop_grace_period).
	ShutdownOverhead = answerHeldTimeout + adminShutdownTimeout
)

// drain turns readiness off first and keeps serving new streams for
// shutdown_delay, so that Envoy's health checks take this instance out
// before its listener closes; then it lets open streams finish within
// drain_timeout; then it cancels the cold loads still running and closes
// the remaining streams once every request held for a load has its 503.
func (s *Service) drain() {
	s.readiness.Drain() // readiness and ext_proc NOT_SERVING, /readyz "draining", for good

	if d := s.cfg.ExtProc.ShutdownDelay; d > 0 {
		s.log.Info("shutting down: readiness NOT_SERVING; new ext_proc streams are still served until Envoy's health checks take this instance out (signal again to skip)",
			"shutdown_delay", d)
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-s.skipDelay:
			t.Stop()
		}
	}
	s.log.Info("draining: closing the ext_proc listener; open streams get drain_timeout", "drain_timeout", s.cfg.ExtProc.DrainTimeout)

	done := make(chan struct{})
	if s.xds != nil {
		// ADS streams never end on their own; GracefulStop would wait
		// drain_timeout for them. Envoy keeps the clusters it has.
		s.xds.Stop()
	}
	go func() { s.grpc.GracefulStop(); close(done) }()
	drainTimer := time.NewTimer(s.cfg.ExtProc.DrainTimeout)
	select {
	case <-done:
		drainTimer.Stop()
	case <-drainTimer.C:
		// Requests still held for a cold load get our 503 with Retry-After
		// rather than a cut stream (Envoy's bare 500): cancel the loads,
		// then close what is left once each of them has its answer.
		s.log.Warn("drain timeout: cancelling cold loads; the requests they hold get 503 with Retry-After, then the remaining ext_proc streams are closed",
			"held", s.holds.count())
		cctx, ccancel := context.WithCancel(context.Background())
		ccancel()
		s.loader.Close(cctx) // returns once every load has ended and released its waiters
		actx, acancel := context.WithTimeout(context.Background(), answerHeldTimeout)
		if n := s.holds.waitHeldAnswered(actx, done); n > 0 {
			s.log.Error("held requests still unanswered; closing their streams (Envoy answers them 500)",
				"held", n, "waited", answerHeldTimeout)
		}
		acancel()
		s.grpc.Stop()
		<-done
	}
	s.health.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), adminShutdownTimeout)
	defer cancel()
	_ = s.admin.Shutdown(ctx)
}

// grpcOptions follows envoy-ext-proc.md §5.5: a receive limit above Envoy's
// buffer limit, no MaxConnectionAge (it would kill streams held for cold
// loads), and a keepalive policy that accepts Envoy's HTTP/2 pings.
func grpcOptions(c config.ExtProc) ([]grpc.ServerOption, error) {
	opts := []grpc.ServerOption{
		grpc.MaxRecvMsgSize(c.MaxRequestBytes + 4<<20),
		grpc.MaxSendMsgSize(c.MaxRequestBytes + 4<<20),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * time.Minute, Timeout: 20 * time.Second}),
	}
	if c.TLSCertFile == "" {
		return opts, nil
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("extproc.tls_cert_file/tls_key_file: %w", err)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if c.ClientCAFile != "" {
		pem, err := os.ReadFile(c.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("extproc.client_ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("extproc.client_ca_file %s: no PEM certificates found", c.ClientCAFile)
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return append(opts, grpc.Creds(credentials.NewTLS(tc))), nil
}
