package extproc_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/catalogue"
	"github.com/helexa/cortex-extproc/extproc"
	"github.com/helexa/cortex-extproc/internal/apierr"
	"github.com/helexa/cortex-extproc/internal/fleet"
	"github.com/helexa/cortex-extproc/internal/modellist"
	"github.com/helexa/cortex-extproc/routing"
)

// A request counts in flight on its target (so eviction spares the model)
// from the routing decision until the upstream answered, and never after:
// one test per way a stream can end. Each is played many times: a leak of
// one in fifty shows.
const leaseRounds = 50

func warmHarness(t *testing.T, opt extproc.Options) (*harness, *routing.Usage) {
	t.Helper()
	cat, snap := fixture()
	usage := routing.NewUsage()
	r := routing.NewRouter(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap }, nil, usage)
	opt.Models = modellist.New(func() *catalogue.Catalogue { return cat }, func() *fleet.Snapshot { return snap })
	return start(t, r, opt), usage
}

// inFlight waits until the count on rig2's Qwen/Q (the fixture's only
// replica of helexa/q) settles at want.
func inFlight(t *testing.T, u *routing.Usage, want int) {
	t.Helper()
	waitFor(t, func() bool { return u.InFlight("rig2", "Qwen/Q") == want })
}

func TestLeaseEndsAtResponseHeaders(t *testing.T) {
	h, usage := warmHarness(t, extproc.Options{})
	for range leaseRounds {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		s := coldStream(t, ctx, h, "helexa/q")
		if r, err := s.Recv(); err != nil || r.GetRequestBody() == nil {
			t.Fatalf("body reply %v %v", r, err)
		}
		if n := usage.InFlight("rig2", "Qwen/Q"); n != 1 {
			t.Fatalf("routed, not yet answered: in flight %d, want 1", n)
		}
		if err := s.Send(respHeaders()); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
		if n := usage.InFlight("rig2", "Qwen/Q"); n != 0 {
			t.Fatalf("upstream answered: in flight %d, want 0", n)
		}
		s.CloseSend()
		if _, err := s.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("after half-close: %v", err)
		}
		cancel()
	}
	inFlight(t, usage, 0)
}

func TestLeaseEndsWhenTheStreamEndsWithoutAnAnswer(t *testing.T) {
	for _, c := range []struct {
		name string
		end  func(s interface{ CloseSend() error }, cancel context.CancelFunc)
	}{
		{"half-close before the upstream answered", func(s interface{ CloseSend() error }, _ context.CancelFunc) { s.CloseSend() }},
		{"client hang-up", func(_ interface{ CloseSend() error }, cancel context.CancelFunc) { cancel() }},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, usage := warmHarness(t, extproc.Options{})
			for range leaseRounds {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				s := coldStream(t, ctx, h, "helexa/q")
				if r, err := s.Recv(); err != nil || r.GetRequestBody() == nil {
					t.Fatalf("body reply %v %v", r, err)
				}
				c.end(s, cancel)
				inFlight(t, usage, 0)
				cancel()
			}
		})
	}
}

// Routed, but the target cannot be addressed (original_dst with a host
// that does not resolve): the client gets a 503 and nothing stays counted.
func TestLeaseEndsWhenTheTargetCannotBeAddressed(t *testing.T) {
	h, usage := warmHarness(t, extproc.Options{Upstream: unaddressable{}})
	for range leaseRounds {
		body := []byte(`{"model":"helexa/q"}`)
		rs := h.exchange(t, post("/v1/chat/completions", body), bodyMsg(body))
		if rs[1].GetImmediateResponse().GetStatus().GetCode() != 503 {
			t.Fatalf("reply %v, want a 503", rs[1])
		}
	}
	inFlight(t, usage, 0)
}

type unaddressable struct{}

func (unaddressable) Header() string             { return "x-gateway-destination-endpoint" }
func (unaddressable) DynamicMetadataKey() string { return "" }
func (unaddressable) Value(t *routing.Target) (string, *apierr.Error) {
	return "", apierr.Unavailable(2, "%s does not resolve", t.Endpoint)
}

// Held for a cold load, then routed: the waiter counts on the fresh model
// until the upstream answered, the flight's own pin ends once the waiter
// is routed, and nothing is left after.
func TestLeaseAfterAColdLoad(t *testing.T) {
	f := newColdFleet("beast")
	close(f.release)
	usage := routing.NewUsage()
	h, _ := f.startWithUsage(t, 30*time.Minute, usage)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s := coldStream(t, ctx, h, "helexa/cold")
	if r, err := s.Recv(); err != nil || r.GetOverrideMessageTimeout() == nil {
		t.Fatalf("override %v %v", r, err)
	}
	if r, err := s.Recv(); err != nil || r.GetRequestBody() == nil {
		t.Fatalf("body reply %v %v", r, err)
	}
	waitFor(t, func() bool { return usage.InFlight("beast", "Cold/Model") == 1 }) // the waiter alone
	if err := s.Send(respHeaders()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return usage.InFlight("beast", "Cold/Model") == 0 })
	s.CloseSend()
}

// A client that hangs up while held gives its waiter slot back, and the
// load it no longer waits for pins nothing once it finishes.
func TestLeaseWhenTheClientLeavesDuringAColdLoad(t *testing.T) {
	f := newColdFleet("beast")
	usage := routing.NewUsage()
	h, loader := f.startWithUsage(t, 30*time.Minute, usage)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	s := coldStream(t, ctx, h, "helexa/cold")
	if r, err := s.Recv(); err != nil || r.GetOverrideMessageTimeout() == nil {
		t.Fatalf("override %v %v", r, err)
	}
	waitFor(t, func() bool { in := loader.InProgress(); return len(in) == 1 && in[0].Waiters == 1 })
	cancel()
	waitFor(t, func() bool { in := loader.InProgress(); return len(in) == 1 && in[0].Waiters == 0 })
	close(f.release)
	waitFor(t, func() bool { return len(loader.InProgress()) == 0 })
	if n := usage.InFlight("beast", "Cold/Model"); n != 0 {
		t.Fatalf("in flight %d on a load nobody waits for, want 0", n)
	}
}
