package service

// The readiness state machine (ready.go), as Envoy's health checker, the
// kubelet's /readyz probe and whoever waits on Service.Ready() see it: the
// three agree in every state and at every moment, a shutdown is for good,
// and the ready channel closes once, after gRPC health says SERVING.
// Nothing here sleeps or waits for a duration.

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/helexa/cortex-extproc/internal/metrics"
)

const (
	serving    = healthpb.HealthCheckResponse_SERVING
	notServing = healthpb.HealthCheckResponse_NOT_SERVING
)

// readyFx is a readiness on a real gRPC health server, with liveness and ""
// set as New sets them, and /readyz served by the real admin mux.
type readyFx struct {
	r      *readiness
	health *health.Server
	admin  http.Handler
}

func newReadyFx(h healthSetter, hs *health.Server) *readyFx {
	hs.SetServingStatus("", serving)
	hs.SetServingStatus(HealthLiveness, serving)
	r := newReadiness(h)
	s := &Service{metrics: metrics.New(), readiness: r}
	return &readyFx{r: r, health: hs, admin: s.adminMux()}
}

func newReadyFxPlain() *readyFx {
	hs := health.NewServer()
	return newReadyFx(hs, hs)
}

// readyView is everything an outsider can see of readiness at one moment.
type readyView struct {
	readiness, extproc, liveness, root healthpb.HealthCheckResponse_ServingStatus
	code                               int
	body, contentType                  string
	closed                             bool // Service.Ready()
}

func (v readyView) String() string {
	return fmt.Sprintf("health readiness=%v ext_proc=%v liveness=%v \"\"=%v; /readyz %d %q (%s); Ready() closed=%v",
		v.readiness, v.extproc, v.liveness, v.root, v.code, v.body, v.contentType, v.closed)
}

// wantView is what each state must look like. The 503 bodies end in two
// newlines: http.Error adds one to the reason's own, as it always did.
func wantView(st readyState, closed bool) readyView {
	v := readyView{readiness: notServing, extproc: notServing, liveness: serving, root: serving,
		code: http.StatusServiceUnavailable, contentType: "text/plain; charset=utf-8", closed: closed}
	switch st {
	case stateStarting:
		v.body = "not ready: waiting for the first fleet poll round\n\n"
	case stateReady:
		v.readiness, v.extproc = serving, serving
		v.code, v.body = http.StatusOK, "ready\n"
	case stateDraining:
		v.body = "draining\n\n"
	}
	return v
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (fx *readyFx) check(t *testing.T, svc string) healthpb.HealthCheckResponse_ServingStatus {
	t.Helper()
	r, err := fx.health.Check(context.Background(), &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		t.Errorf("health check %q: %v", svc, err)
		return healthpb.HealthCheckResponse_UNKNOWN
	}
	return r.Status
}

// observe reads the channel first, then gRPC health, then /readyz.
func (fx *readyFx) observe(t *testing.T) readyView {
	t.Helper()
	v := readyView{closed: isClosed(fx.r.Done())}
	v.readiness = fx.check(t, HealthReadiness)
	v.extproc = fx.check(t, HealthExtProc)
	v.liveness = fx.check(t, HealthLiveness)
	v.root = fx.check(t, "")
	rec := httptest.NewRecorder()
	fx.admin.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
	v.code, v.body, v.contentType = rec.Code, rec.Body.String(), rec.Header().Get("Content-Type")
	return v
}

// TestReadinessSequences walks the transitions a running instance can
// take, including a shutdown that begins before the first poll round ends
// and a poll round that ends during the shutdown; after each step gRPC
// health, /readyz, State and Service.Ready() must all say the same.
func TestReadinessSequences(t *testing.T) {
	type step struct {
		do      string // "", "ready" or "drain"
		changed bool   // what the transition method returns
		want    readyState
		closed  bool
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"poll round, then shutdown", []step{
			{"", false, stateStarting, false},
			{"ready", true, stateReady, true},
			{"ready", false, stateReady, true}, // a second Ready is harmless
			{"drain", true, stateDraining, true},
			{"ready", false, stateDraining, true}, // never ready again
			{"drain", false, stateDraining, true},
		}},
		{"shutdown before the first poll round ends", []step{
			{"", false, stateStarting, false},
			{"drain", true, stateDraining, false},
			{"ready", false, stateDraining, false}, // the round finishes during the shutdown
			{"ready", false, stateDraining, false},
			{"drain", false, stateDraining, false},
			{"ready", false, stateDraining, false},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newReadyFxPlain()
			done := fx.r.Done()
			for i, s := range tc.steps {
				var changed bool
				switch s.do {
				case "ready":
					changed = fx.r.Ready()
				case "drain":
					changed = fx.r.Drain()
				}
				if changed != s.changed {
					t.Errorf("step %d %s: returned %v, want %v", i, s.do, changed, s.changed)
				}
				st, reason := fx.r.State()
				if st != s.want || reason != s.want.reason() {
					t.Errorf("step %d %s: state %v %q, want %v", i, s.do, st, reason, s.want)
				}
				if got, want := fx.observe(t), wantView(s.want, s.closed); got != want {
					t.Errorf("step %d %s:\n got %v\nwant %v", i, s.do, got, want)
				}
				if fx.r.Done() != done {
					t.Errorf("step %d %s: Done returned another channel", i, s.do)
				}
			}
		})
	}
}

// orderedHealth is a real health server that notes, at each status change
// readiness makes, whether Service.Ready() was already closed and whether
// readers of the state (/readyz) were still held off.
type orderedHealth struct {
	*health.Server
	r     *readiness // nil during newReadiness
	calls []string
}

func (o *orderedHealth) SetServingStatus(svc string, st healthpb.HealthCheckResponse_ServingStatus) {
	o.Server.SetServingStatus(svc, st)
	if o.r == nil {
		o.calls = append(o.calls, fmt.Sprintf("%s=%v new", svc, st))
		return
	}
	held := !o.r.mu.TryLock()
	if !held {
		o.r.mu.Unlock()
	}
	o.calls = append(o.calls, fmt.Sprintf("%s=%v closed=%v readers-held=%v", svc, st, isClosed(o.r.Done()), held))
}

// TestReadinessClosesReadyAfterHealthSaysServing: whoever wakes on
// Service.Ready() and then asks gRPC health must already get SERVING, for
// both services (the end-to-end tests rely on it); and no reader of the
// state (/readyz) sees a transition before gRPC health has made it, which
// a probe racing the transition could otherwise catch.
func TestReadinessClosesReadyAfterHealthSaysServing(t *testing.T) {
	oh := &orderedHealth{Server: health.NewServer()}
	fx := newReadyFx(oh, oh.Server)
	oh.r = fx.r
	fx.r.Ready()
	fx.r.Ready()
	fx.r.Drain()
	want := []string{
		HealthReadiness + "=NOT_SERVING new",
		HealthExtProc + "=NOT_SERVING new",
		HealthReadiness + "=SERVING closed=false readers-held=true", // Ready: health first...
		HealthExtProc + "=SERVING closed=false readers-held=true",
		HealthReadiness + "=NOT_SERVING closed=true readers-held=true", // ...then the channel; Drain
		HealthExtProc + "=NOT_SERVING closed=true readers-held=true",
	}
	if !slices.Equal(oh.calls, want) {
		t.Errorf("health status changes:\n got %q\nwant %q", oh.calls, want)
	}
}

// TestReadinessConcurrent runs Ready, Drain and every kind of read at once,
// 50 times over (meant for -race). Whatever the interleaving: a state read
// twice with the same answer brackets gRPC health and /readyz answers that
// match it; states only move forward; a closed Service.Ready() means ready
// or draining, and wakes its waiter to SERVING unless the drain began; the
// channel closes at most once (a second close would panic); exactly one
// Drain does the transition, at most one Ready; and it all ends draining.
func TestReadinessConcurrent(t *testing.T) {
	const writers, readers, reads = 4, 4, 20
	for rep := range 50 {
		fx := newReadyFxPlain()
		var readyWins, drainWins atomic.Int32
		start, writersDone := make(chan struct{}), make(chan struct{})
		var ww, rw sync.WaitGroup
		for range writers {
			ww.Add(2)
			go func() {
				defer ww.Done()
				<-start
				if fx.r.Ready() {
					readyWins.Add(1)
				}
			}()
			go func() {
				defer ww.Done()
				<-start
				if fx.r.Drain() {
					drainWins.Add(1)
				}
			}()
		}
		for range readers {
			rw.Add(1)
			go func() {
				defer rw.Done()
				<-start
				for range reads {
					closedBefore := isClosed(fx.r.Done())
					st1, _ := fx.r.State()
					closedAfter := isClosed(fx.r.Done())
					v := fx.observe(t)
					st2, _ := fx.r.State()
					if closedBefore && st1 == stateStarting {
						t.Errorf("rep %d: Ready() closed while State still says starting", rep)
					}
					if st1 == stateReady && !closedAfter {
						t.Errorf("rep %d: State ready while Ready() still open", rep)
					}
					if st2 < st1 {
						t.Errorf("rep %d: state went back from %v to %v", rep, st1, st2)
					}
					if st1 != st2 {
						continue // a transition happened while we looked
					}
					want := wantView(st1, st1 == stateReady || (st1 == stateDraining && v.closed))
					if v != want {
						t.Errorf("rep %d, state %v throughout:\n got %v\nwant %v", rep, st1, v, want)
					}
				}
			}()
		}
		rw.Add(1)
		go func() { // what Service.Ready()'s callers do
			defer rw.Done()
			select {
			case <-fx.r.Done():
				h := fx.check(t, HealthReadiness)
				if st, _ := fx.r.State(); h != serving && st != stateDraining {
					t.Errorf("rep %d: woken by Ready() to health %v in state %v", rep, h, st)
				}
			case <-writersDone:
			}
		}()
		close(start)
		ww.Wait()
		close(writersDone)
		rw.Wait()

		if n := readyWins.Load(); n > 1 {
			t.Errorf("rep %d: %d Ready calls made the transition", rep, n)
		}
		if n := drainWins.Load(); n != 1 {
			t.Errorf("rep %d: %d Drain calls made the transition, want 1", rep, n)
		}
		if st, _ := fx.r.State(); st != stateDraining {
			t.Errorf("rep %d: ends %v, want draining", rep, st)
		}
		if got, want := fx.observe(t), wantView(stateDraining, readyWins.Load() == 1); got != want {
			t.Errorf("rep %d: at the end:\n got %v\nwant %v", rep, got, want)
		}
		if t.Failed() {
			return
		}
	}
}
