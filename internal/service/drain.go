package service

import (
	"context"
	"sync"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"

	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// holds counts the requests held for a cold load that Envoy has not yet
// received an answer for, so that the drain can cancel the loads and then
// close the remaining streams as soon as, and not before, every held request
// has its 503 (or its route, when a load finished in that instant).
//
// A request is counted from the moment the router hands out its waiter
// (before the stream tells Envoy to wait) until one of:
//   - it gives its waiter up without waiting (the stream was already gone);
//   - its reply routes it (the stream then carries on as any other);
//   - its stream ends: after an immediate response (our 503) Envoy closes
//     the stream, which proves the reply arrived (grpc.Server.Stop drops
//     frames still queued), or the client went away while it waited.
//
// Each request's count ends exactly once (countedWaiter.end).
//
// Once the cold loader is closed no new waiter is handed out, so the count
// only goes down and idle() is the moment the drain may stop.
type holds struct {
	mu   sync.Mutex
	n    int
	zero chan struct{} // closed while n == 0
}

func newHolds() *holds {
	h := &holds{zero: make(chan struct{})}
	close(h.zero)
	return h
}

func (h *holds) add() {
	h.mu.Lock()
	if h.n == 0 {
		h.zero = make(chan struct{})
	}
	h.n++
	h.mu.Unlock()
}

func (h *holds) done() {
	h.mu.Lock()
	h.n--
	if h.n == 0 {
		close(h.zero)
	}
	h.mu.Unlock()
}

// count is the number of held requests not yet answered.
func (h *holds) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// idle is closed once no held request is waiting for its answer.
func (h *holds) idle() <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.zero
}

// router counts every waiter r hands out.
func (h *holds) router(r extproc.Router) extproc.Router { return holdingRouter{r, h} }

type holdingRouter struct {
	extproc.Router
	h *holds
}

func (r holdingRouter) Route(model string, lease *routing.Lease) (routing.Target, routing.Waiter, *apierr.Error) {
	t, w, err := r.Router.Route(model, lease)
	if w != nil {
		r.h.add()
		w = &countedWaiter{Waiter: w, h: r.h}
	}
	return t, w, err
}

// countedWaiter is one held request's count, ended exactly once.
type countedWaiter struct {
	routing.Waiter
	h    *holds
	once sync.Once
}

func (w *countedWaiter) end() { w.once.Do(w.h.done) }

func (w *countedWaiter) Leave() {
	w.Waiter.Leave()
	w.end()
}

// Wait hands the count to the request's stream, which ends it once Envoy
// has the answer.
func (w *countedWaiter) Wait(ctx context.Context, lease *routing.Lease) (routing.Target, *apierr.Error) {
	t, err := w.Waiter.Wait(ctx, lease)
	if ws, ok := ctx.Value(watchedKey{}).(*watchedStream); ok {
		ws.waiter = w
	} else {
		w.end()
	}
	return t, err
}

type watchedKey struct{}

// intercept watches each ext_proc stream, so that a held request's count
// ends when its answer has reached Envoy. One allocation per stream: the
// wrapper is also the stream's context.
func (h *holds) intercept(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if info.FullMethod != extprocv3.ExternalProcessor_Process_FullMethodName {
		return handler(srv, ss)
	}
	ws := &watchedStream{ServerStream: ss, parent: ss.Context()}
	err := handler(srv, ws)
	if ws.waiter != nil {
		ws.waiter.end()
	}
	return err
}

// watchedStream is one ext_proc stream. Only its handler goroutine sends
// on it and waits on it, so its fields need no lock.
type watchedStream struct {
	grpc.ServerStream
	parent context.Context
	// waiter is set when a wait has returned and its answer is the next
	// message sent; cleared once the answer routed the request.
	waiter *countedWaiter
}

func (s *watchedStream) Context() context.Context { return (*watchedContext)(s) }

// watchedContext is the stream's context with the stream as the value of
// watchedKey. Everything else is the parent's, so contexts derived from it
// find gRPC's cancellation directly (no propagation goroutine).
type watchedContext watchedStream

func (c *watchedContext) Deadline() (time.Time, bool) { return c.parent.Deadline() }
func (c *watchedContext) Done() <-chan struct{}       { return c.parent.Done() }
func (c *watchedContext) Err() error                  { return c.parent.Err() }
func (c *watchedContext) Value(key any) any {
	if key == (watchedKey{}) {
		return (*watchedStream)(c)
	}
	return c.parent.Value(key)
}

func (s *watchedStream) SendMsg(m any) error {
	err := s.ServerStream.SendMsg(m)
	if s.waiter == nil || err != nil {
		return err
	}
	if extproc.IsImmediateResponse(m) {
		// Our 503: Envoy closes the stream once it has it; the count ends
		// then (in intercept), as a stream cut now could lose the reply.
		return nil
	}
	// Routed: from here on it is an ordinary stream.
	s.waiter.end()
	s.waiter = nil
	return nil
}

// waitHeldAnswered waits until every held request has its answer, the
// streams are all gone (done), or ctx ends; it reports how many were still
// unanswered.
func (h *holds) waitHeldAnswered(ctx context.Context, done <-chan struct{}) int {
	select {
	case <-h.idle():
	case <-done:
	case <-ctx.Done():
	}
	return h.count()
}
