package extproc

import (
	"context"
	"errors"
	"testing"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/routing"
)

// brokenStream is a gRPC stream whose client is gone: every Send fails.
type brokenStream struct {
	extprocv3.ExternalProcessor_ProcessServer
}

func (brokenStream) Send(*extprocv3.ProcessingResponse) error {
	return errors.New("transport is closing")
}

// recordingWaiter records what the stream did with its place in a flight.
type recordingWaiter struct{ waited, left int }

func (w *recordingWaiter) Model() string { return "Cold/Model" }
func (w *recordingWaiter) Leave()        { w.left++ }
func (w *recordingWaiter) Wait(context.Context, *routing.Lease) (routing.Target, *apierr.Error) {
	w.waited++
	return routing.Target{Node: "beast", Model: "Cold/Model"}, nil
}

// When the override_message_timeout cannot be sent (the client is gone),
// the request gives its waiter slot back without waiting and without
// taking a lease on a load that may already have finished.
func TestWaitLeavesWhenTheOverrideCannotBeSent(t *testing.T) {
	s := New(nil, Options{})
	st := &stream{srv: s, grpc: brokenStream{}}
	w := &recordingWaiter{}
	_, _, ok := st.wait(context.Background(), w)
	if ok || w.left != 1 || w.waited != 0 || st.lease.Held() {
		t.Fatalf("ok %v, left %d, waited %d, lease held %v; want gone, left once, never waited, no lease", ok, w.left, w.waited, st.lease.Held())
	}
}
