package service

import (
	"context"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// The held-request count behind the drain: a request held for a cold load
// counts from the moment the router hands out its waiter until Envoy has
// its answer, whichever way its stream goes.

type stubWaiter struct{ left, waited int }

func (w *stubWaiter) Model() string { return "m" }
func (w *stubWaiter) Leave()        { w.left++ }
func (w *stubWaiter) Wait(context.Context, *routing.Lease) (routing.Target, *apierr.Error) {
	w.waited++
	return routing.Target{}, nil
}

type stubRouter struct{ w routing.Waiter }

func (r stubRouter) Route(string, *routing.Lease) (routing.Target, routing.Waiter, *apierr.Error) {
	return routing.Target{}, r.w, nil
}

type stubStream struct {
	grpc.ServerStream
	ctx  context.Context
	sent []any
}

func (s *stubStream) Context() context.Context { return s.ctx }
func (s *stubStream) SendMsg(m any) error      { s.sent = append(s.sent, m); return nil }

var (
	override  = &extprocv3.ProcessingResponse{OverrideMessageTimeout: durationpb.New(1)}
	immediate = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{}}}
	routed    = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
)

func isIdle(h *holds) bool {
	select {
	case <-h.idle():
		return true
	default:
		return false
	}
}

// runStream runs one ext_proc stream through the interceptor: the handler
// gets the request's waiter from the router, then runs body with it.
func runStream(t *testing.T, h *holds, body func(ss grpc.ServerStream, w routing.Waiter)) {
	t.Helper()
	r := h.router(stubRouter{w: &stubWaiter{}})
	info := &grpc.StreamServerInfo{FullMethod: extprocv3.ExternalProcessor_Process_FullMethodName}
	err := h.intercept(nil, &stubStream{ctx: context.Background()}, info, func(_ any, ss grpc.ServerStream) error {
		_, w, _ := r.Route("m", nil)
		if h.count() != 1 || isIdle(h) {
			t.Fatalf("count %d after the router handed out a waiter, want 1", h.count())
		}
		body(ss, w)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestHeldRequestAnsweredWith503CountsUntilItsStreamEnds(t *testing.T) {
	h := newHolds()
	runStream(t, h, func(ss grpc.ServerStream, w routing.Waiter) {
		ss.SendMsg(override)
		w.Wait(ss.Context(), nil)
		if h.count() != 1 {
			t.Fatalf("count %d while waiting, want 1", h.count())
		}
		ss.SendMsg(immediate)
		// Handed to gRPC is not received by Envoy: Stop now could drop it.
		if h.count() != 1 || isIdle(h) {
			t.Fatalf("count %d after the 503 was sent but before the stream ended, want 1", h.count())
		}
	})
	if h.count() != 0 || !isIdle(h) {
		t.Fatalf("count %d after the stream ended, want 0", h.count())
	}
}

func TestHeldRequestRoutedStopsCountingAtItsRoute(t *testing.T) {
	h := newHolds()
	runStream(t, h, func(ss grpc.ServerStream, w routing.Waiter) {
		ss.SendMsg(override)
		w.Wait(ss.Context(), nil)
		ss.SendMsg(routed)
		if h.count() != 0 || !isIdle(h) {
			t.Fatalf("count %d once routed: the stream is an ordinary one now", h.count())
		}
		ss.SendMsg(routed) // response headers: nothing to count
	})
	if h.count() != 0 {
		t.Fatalf("count %d after the stream ended, want 0", h.count())
	}
}

func TestHeldRequestWhoseClientLeftOrWhichLeftCountsOnce(t *testing.T) {
	h := newHolds()
	// The client went away during the wait: no answer is sent.
	runStream(t, h, func(ss grpc.ServerStream, w routing.Waiter) {
		ss.SendMsg(override)
		w.Wait(ss.Context(), nil)
	})
	if h.count() != 0 {
		t.Fatalf("count %d after a client left mid-wait, want 0", h.count())
	}
	// The override could not be sent: the stream leaves the flight.
	runStream(t, h, func(ss grpc.ServerStream, w routing.Waiter) {
		w.Leave()
		w.Leave() // a second Leave must not count twice
	})
	if h.count() != 0 || !isIdle(h) {
		t.Fatalf("count %d after Leave, want 0", h.count())
	}
}

func TestHeldCountOutsideAWatchedStreamEndsAfterWait(t *testing.T) {
	h := newHolds()
	_, w, _ := h.router(stubRouter{w: &stubWaiter{}}).Route("m", nil)
	w.Wait(context.Background(), nil)
	if h.count() != 0 {
		t.Fatalf("count %d after Wait with no ext_proc stream around it, want 0", h.count())
	}
}

func TestRoutedRequestsAreNotCounted(t *testing.T) {
	h := newHolds()
	if _, w, _ := h.router(stubRouter{}).Route("m", nil); w != nil || h.count() != 0 {
		t.Fatalf("a request routed without a wait was counted (%d) or got a waiter", h.count())
	}
}

func TestWaitHeldAnsweredReturnsWhenTheLastAnswerArrives(t *testing.T) {
	h := newHolds()
	_, w, _ := h.router(stubRouter{w: &stubWaiter{}}).Route("m", nil)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if n := h.waitHeldAnswered(ctx, nil); n != 1 {
		t.Fatalf("waitHeldAnswered with its bound already over = %d, want 1 unanswered", n)
	}
	got := make(chan int)
	go func() { got <- h.waitHeldAnswered(context.Background(), nil) }()
	w.Leave()
	if n := <-got; n != 0 {
		t.Fatalf("waitHeldAnswered = %d after the last held request ended, want 0", n)
	}
}

// The wrapper is the stream's context too: one allocation per stream, and
// contexts derived from it are cancelled with the stream.
func TestWatchedStreamCostsOneAllocationAndKeepsCancellation(t *testing.T) {
	h := newHolds()
	info := &grpc.StreamServerInfo{FullMethod: extprocv3.ExternalProcessor_Process_FullMethodName}
	ss := &stubStream{ctx: context.Background()}
	handler := func(_ any, s grpc.ServerStream) error { _ = s.Context(); return nil }
	if n := testing.AllocsPerRun(100, func() { _ = h.intercept(nil, ss, info, handler) }); n > 1 {
		t.Errorf("intercept allocates %v times per stream, want 1", n)
	}

	parent, cancel := context.WithCancel(context.WithValue(context.Background(), stubKey{}, "v"))
	var derived context.Context
	var derivedCancel context.CancelFunc
	_ = h.intercept(nil, &stubStream{ctx: parent}, info, func(_ any, s grpc.ServerStream) error {
		derived, derivedCancel = context.WithTimeout(s.Context(), time.Hour)
		if s.Context().Value(stubKey{}) != "v" {
			t.Error("the stream context lost its parent's values")
		}
		return nil
	})
	defer derivedCancel()
	cancel()
	select {
	case <-derived.Done():
	case <-time.After(time.Minute):
		t.Fatal("a context derived from the stream's was not cancelled with it")
	}
}

type stubKey struct{}
