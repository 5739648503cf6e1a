package service

import (
	"net/http"
	"sync"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// readyState is where an instance is in its one-way readiness life:
// starting → ready → draining. draining is terminal, and may also be
// reached straight from starting (a shutdown before the first poll round).
type readyState int

const (
	stateStarting readyState = iota // catalogue or first fleet poll round not done
	stateReady                      // serving; Envoy may send traffic
	stateDraining                   // shutting down; never ready again
)

func (st readyState) String() string {
	switch st {
	case stateStarting:
		return "starting"
	case stateReady:
		return "ready"
	case stateDraining:
		return "draining"
	}
	return "unknown"
}

// reason is what /readyz answers in each state (without the newline).
func (st readyState) reason() string {
	switch st {
	case stateReady:
		return "ready"
	case stateDraining:
		return "draining"
	}
	return "not ready: waiting for the first fleet poll round"
}

// servingStatus is what gRPC health answers for HealthReadiness and
// HealthExtProc in each state.
func (st readyState) servingStatus() healthpb.HealthCheckResponse_ServingStatus {
	if st == stateReady {
		return healthpb.HealthCheckResponse_SERVING
	}
	return healthpb.HealthCheckResponse_NOT_SERVING
}

// readiness is the instance's readiness as one small state machine: the
// only writer of the gRPC health statuses of HealthReadiness and
// HealthExtProc, the source of /readyz and of Service.Ready(), so that the
// three never disagree. Each transition happens under one lock, in this
// order: state, then gRPC health, then (on the first Ready) the channel; a
// reader of State therefore never sees a state gRPC health does not answer
// yet, and whoever wakes on Done and then asks gRPC health sees SERVING
// (or, if a Drain came in between, NOT_SERVING with State draining).
//
// The liveness and "" health services are not its business: they stay
// SERVING until the health server shuts down.
type readiness struct {
	health healthSetter

	mu    sync.Mutex
	state readyState
	ready chan struct{} // closed on the first (and only) move to ready
}

// healthSetter is the part of grpc-go's *health.Server that readiness
// drives (an interface so a test can watch the order of its calls).
type healthSetter interface {
	SetServingStatus(service string, st healthpb.HealthCheckResponse_ServingStatus)
}

// newReadiness starts in stateStarting and sets both services it drives
// NOT_SERVING on h.
func newReadiness(h healthSetter) *readiness {
	r := &readiness{health: h, ready: make(chan struct{})}
	r.setHealth(stateStarting)
	return r
}

// Ready moves starting → ready: gRPC health goes SERVING, then Done is
// closed. It is ignored (false) when already ready or draining: a poll
// round that finishes after a shutdown began must not make the instance
// ready again.
func (r *readiness) Ready() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state != stateStarting {
		return false
	}
	r.state = stateReady
	r.setHealth(stateReady)
	close(r.ready) // only after gRPC health says SERVING
	return true
}

// Drain moves starting or ready → draining, for good: gRPC health goes
// NOT_SERVING. It reports whether this call did it (false if already
// draining). Done is left as it is: closed if the instance was ready.
func (r *readiness) Drain() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == stateDraining {
		return false
	}
	r.state = stateDraining
	r.setHealth(stateDraining)
	return true
}

// State is the current state and the reason /readyz gives for it.
func (r *readiness) State() (readyState, string) {
	r.mu.Lock()
	st := r.state
	r.mu.Unlock()
	return st, st.reason()
}

// Done is closed once the instance first became ready (and gRPC health
// said so); never, if it was drained before.
func (r *readiness) Done() <-chan struct{} { return r.ready }

// ServeHTTP is GET /readyz: 200 "ready" when ready, else 503 with the
// reason ("draining", or still waiting for the first poll round).
func (r *readiness) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	st, reason := r.State()
	if st != stateReady {
		http.Error(w, reason+"\n", http.StatusServiceUnavailable)
		return
	}
	w.Write([]byte(reason + "\n"))
}

// setHealth sets the gRPC health statuses st stands for; r.mu held (or r
// not yet shared).
func (r *readiness) setHealth(st readyState) {
	s := st.servingStatus()
	r.health.SetServingStatus(HealthReadiness, s)
	r.health.SetServingStatus(HealthExtProc, s)
}
