package service_test

// Rolling restarts (issue 15, part 2): on SIGTERM readiness goes
// NOT_SERVING first, new streams are still served for shutdown_delay (until
// Envoy's health checks have taken the instance out), then the listener
// closes while open streams drain. Nothing here waits for a duration to
// pass: the delay is an hour and the test ends it with SkipShutdownDelay.

import (
	"context"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/helexa/cortex-extproc/internal/service"
)

// fxWatchReadiness opens a health watch on readiness and checks it starts
// SERVING; the returned function reads the next status.
func fxWatchReadiness(t *testing.T, h *fxService) (next func() healthpb.HealthCheckResponse_ServingStatus, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := healthpb.NewHealthClient(h.conn).Watch(ctx, &healthpb.HealthCheckRequest{Service: service.HealthReadiness})
	if err != nil {
		t.Fatal(err)
	}
	next = func() healthpb.HealthCheckResponse_ServingStatus {
		t.Helper()
		m, err := w.Recv()
		if err != nil {
			t.Fatalf("readiness watch: %v", err)
		}
		return m.Status
	}
	if s := next(); s != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("readiness before SIGTERM: %v", s)
	}
	return next, cancel
}

// fxCheck is one grpc.health.v1 Check, as Envoy's health checker and the
// kubelet make them.
func fxCheck(t *testing.T, conn *grpc.ClientConn, svc string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		t.Fatalf("health check %q: %v", svc, err)
	}
	return r.Status
}

// fxNewConn is a fresh client connection: a new TCP connection to the
// listener, as a new Envoy worker would open.
func fxNewConn(t *testing.T, h *fxService) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(h.svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// fxRunning reports whether Run has not returned yet.
func (h *fxService) running() bool {
	select {
	case err := <-h.done:
		h.done <- err // put it back for wait
		return false
	default:
		return true
	}
}

// TestFaultShutdownServesNewStreamsDuringDelayThenRefusesThem follows one
// rolling restart: SIGTERM with a request held for a cold load; readiness
// goes NOT_SERVING (gRPC health and /readyz) while streams opened on the
// existing connection and on a new one are still routed; once the delay
// ends the listener refuses new streams, the held request is still served
// when its load finishes, and Run returns.
func TestFaultShutdownServesNewStreamsDuringDelayThenRefusesThem(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	cfg := fxConfig(t, fxCatalogue, a)
	cfg.ExtProc.ShutdownDelay = time.Hour // ended by SkipShutdownDelay below
	cfg.ExtProc.DrainTimeout = time.Hour  // the held request ends the drain
	cfg.ColdLoad.Timeout = time.Minute
	h := fxStart(t, cfg)
	release := a.sim.HoldLoads()
	defer release()

	held := make(chan fxReply, 1)
	heldErr := make(chan error, 1)
	waiting := make(chan struct{})
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		r, err := fxExchange(ctx, h.ep, "/v1/chat/completions", fxChat("fx/cold"), func() { close(waiting) })
		if err != nil {
			heldErr <- err
			return
		}
		held <- r
	}()
	select {
	case <-waiting:
	case err := <-heldErr:
		t.Fatalf("cold request: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("cold request never held")
	}

	next, stopWatch := fxWatchReadiness(t, h)
	h.cancel() // SIGTERM
	if s := next(); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("readiness after SIGTERM: %v, want NOT_SERVING", s)
	}
	stopWatch() // a health watch must not hold the drain

	// Inside shutdown_delay: not ready, alive, and still serving.
	if c, body := h.get(t, "/readyz"); c != 503 || !strings.Contains(body, "draining") {
		t.Errorf("/readyz %d %q during shutdown_delay, want 503 draining", c, body)
	}
	if s := fxCheck(t, h.conn, service.HealthExtProc); s != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health %s = %v during shutdown_delay: Envoy's health check must see NOT_SERVING", service.HealthExtProc, s)
	}
	if s := fxCheck(t, h.conn, service.HealthLiveness); s != healthpb.HealthCheckResponse_SERVING {
		t.Errorf("liveness = %v during shutdown_delay, want SERVING (the kubelet would kill the pod)", s)
	}
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
	fresh := fxNewConn(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := fxExchange(ctx, extprocv3.NewExternalProcessorClient(fresh), "/v1/chat/completions", fxChat("fx/warm"), nil)
	if err != nil {
		t.Fatalf("stream on a new connection during shutdown_delay: %v", err)
	}
	fxWantRouted(t, r, "a", "Org/Warm")
	if !h.running() {
		t.Fatal("Run returned during shutdown_delay")
	}

	// After the delay: the listener is closed, new streams are refused
	// (Envoy retries them on another replica), the held one carries on.
	h.svc.SkipShutdownDelay()
	fxEventually(t, "new streams refused after shutdown_delay", func() bool {
		conn, err := grpc.NewClient(h.svc.GRPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err = fxExchange(ctx, extprocv3.NewExternalProcessorClient(conn), "/v1/chat/completions", fxChat("fx/warm"), nil)
		return status.Code(err) == codes.Unavailable
	})
	if !h.running() {
		t.Fatal("Run returned with a request still held")
	}
	select {
	case r := <-held:
		t.Fatalf("held request answered before its load finished: %s", r)
	case err := <-heldErr:
		t.Fatalf("held request cut off when the listener closed: %v", err)
	default:
	}
	release()
	select {
	case r := <-held:
		fxWantRouted(t, r, "a", "Org/Cold")
	case err := <-heldErr:
		t.Fatalf("held request: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("held request not answered after its load finished")
	}
	if err := h.wait(30 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestFaultShutdownHeldRequestsToldShutdown: loads that outlast the drain
// are cancelled; every request they hold gets a 503 saying cortex-extproc
// is shutting down, with Retry-After, in both API shapes, and the streams
// are closed only once each has its answer (no fixed grace).
func TestFaultShutdownHeldRequestsToldShutdown(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	cfg := fxConfig(t, fxCatalogue, a)
	cfg.ExtProc.DrainTimeout = 0 // straight to cancelling the loads
	cfg.ColdLoad.Timeout = time.Minute
	h := fxStart(t, cfg)
	release := a.sim.HoldLoads()
	defer release()

	paths := []string{"/v1/chat/completions", "/v1/messages", "/v1/chat/completions", "/v1/messages"}
	type result struct {
		path string
		r    fxReply
		err  error
	}
	results := make(chan result, len(paths))
	waiting := make(chan struct{}, len(paths))
	for _, p := range paths {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			r, err := fxExchange(ctx, h.ep, p, fxChat("fx/cold"), func() { waiting <- struct{}{} })
			results <- result{p, r, err}
		}()
	}
	for range paths {
		select {
		case <-waiting:
		case res := <-results:
			t.Fatalf("%s answered before the shutdown: %s %v", res.path, res.r, res.err)
		case <-time.After(time.Minute):
			t.Fatal("requests never held")
		}
	}

	h.cancel() // SIGTERM
	for range paths {
		var res result
		select {
		case res = <-results:
		case <-time.After(time.Minute):
			t.Fatal("held request not answered at shutdown")
		}
		if res.err != nil {
			t.Fatalf("%s: held request cut off instead of answered: %v", res.path, res.err)
		}
		if res.r.Status != 503 || res.r.RetryAfter == "" || !strings.Contains(res.r.Message, "shutting down") {
			t.Errorf("%s: %s, want 503 with Retry-After saying cortex-extproc is shutting down", res.path, res.r)
		}
		if strings.Contains(res.r.Message, "neuron's logs") || strings.Contains(res.r.Message, "skips a node") {
			t.Errorf("%s: %q blames the neuron for our own shutdown", res.path, res.r.Message)
		}
	}
	if err := h.wait(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if logs := h.logs.String(); strings.Contains(logs, "still unanswered") {
		t.Errorf("the drain closed streams before every held request had its answer:\n%s", logs)
	}
}
