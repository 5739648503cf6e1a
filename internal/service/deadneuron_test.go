package service_test

// Issue 15: a neuron that dies between polls is taken out as soon as a
// request routed to it fails, not after failure_threshold polls. Each test
// plays Envoy over ext_proc against a real service.Service and neuron
// simulators, with poll.interval an hour: after the first round only the
// fast path can notice anything.

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

// dnConfig: one poll round at start, then none for an hour.
func dnConfig(t *testing.T, neurons ...*fxNeuron) config.Config {
	cfg := fxConfig(t, fxCatalogue, neurons...)
	cfg.Poll.Interval = time.Hour
	cfg.Poll.FailureThreshold = 3
	return cfg
}

// dnHeaders is a response_headers message with these headers.
func dnHeaders(kv ...string) *extprocv3.ProcessingRequest {
	hs := &corev3.HeaderMap{}
	for i := 0; i+1 < len(kv); i += 2 {
		hs.Headers = append(hs.Headers, &corev3.HeaderValue{Key: kv[i], RawValue: []byte(kv[i+1])})
	}
	return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: hs}}}
}

// dnEnvoyUF is the response_headers message an Envoy that passes local
// replies through ext_proc (before 1.34) sends when its router cannot
// connect to the neuron: 503 with the UF mapper of envoy/envoy.yaml
// applied (JSON body, retry-after), and nothing an upstream would add.
func dnEnvoyUF() *extprocv3.ProcessingRequest {
	return dnHeaders(":status", "503", "content-length", "279", "content-type", "application/json", "retry-after", "2")
}

// dnFromHTTP turns an upstream's real HTTP answer into the response_headers
// message Envoy would send for it: lower-case names, :status first.
func dnFromHTTP(resp *http.Response) *extprocv3.ProcessingRequest {
	kv := []string{":status", strconv.Itoa(resp.StatusCode)}
	for k, vs := range resp.Header {
		for _, v := range vs {
			kv = append(kv, strings.ToLower(k), v)
		}
	}
	return dnHeaders(kv...)
}

// dnRoute plays Envoy for one chat request for model: headers, body, then
// either the response headers then gives, or (then nil) nothing: the
// stream is half-closed right after the routing reply, as Envoy ≥ 1.34 does
// after a local reply. It returns where the request was routed, once the
// server has ended the stream (so whatever it reported is done).
func dnRoute(t *testing.T, h *fxService, model string, then *extprocv3.ProcessingRequest) fxReply {
	t.Helper()
	return dnRouteThen(t, h, model, func(fxReply) *extprocv3.ProcessingRequest { return then })
}

// dnRouteThen is dnRoute with the response headers chosen once the request
// is routed: what Envoy saw at the neuron it was sent to.
func dnRouteThen(t *testing.T, h *fxService, model string, then func(routed fxReply) *extprocv3.ProcessingRequest) fxReply {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := dnExchange(ctx, h.ep, model, then)
	if err != nil {
		t.Fatalf("request for %q: %v", model, err)
	}
	return r
}

func dnExchange(ctx context.Context, ep extprocv3.ExternalProcessorClient, model string, thenFor func(fxReply) *extprocv3.ProcessingRequest) (fxReply, error) {
	st, err := ep.Process(ctx)
	if err != nil {
		return fxReply{}, err
	}
	body := fxChat(model)
	if err := st.Send(fxHeaders("/v1/chat/completions", body)); err != nil {
		return fxReply{}, err
	}
	if _, err := st.Recv(); err != nil {
		return fxReply{}, err
	}
	if err := st.Send(fxBody(body)); err != nil {
		return fxReply{}, err
	}
	r, err := st.Recv()
	for err == nil && r.GetOverrideMessageTimeout() != nil && r.Response == nil {
		r, err = st.Recv() // held for a cold load
	}
	if err != nil {
		return fxReply{}, err
	}
	var out fxReply
	if ir := r.GetImmediateResponse(); ir != nil {
		return fxImmediate(ir)
	}
	out.Status = 200
	for _, hv := range r.GetRequestBody().GetResponse().GetHeaderMutation().GetSetHeaders() {
		v := string(hv.GetHeader().GetRawValue())
		switch hv.GetHeader().GetKey() {
		case "x-cortex-cluster":
			out.Cluster = v
		case "x-cortex-node":
			out.Node = v
		case "x-cortex-model":
			out.Model = v
		case "x-cortex-cold-start":
			out.ColdStart = v == "true"
		}
	}
	if then := thenFor(out); then != nil {
		if err := st.Send(then); err != nil {
			return fxReply{}, err
		}
		if _, err := st.Recv(); err != nil {
			return fxReply{}, err
		}
	}
	if err := st.CloseSend(); err != nil {
		return fxReply{}, err
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		return fxReply{}, err
	}
	return out, nil
}

// dnModelsCalls counts the GET /models a neuron received.
func dnModelsCalls(n *fxNeuron) int {
	c := 0
	for _, u := range n.requestURIs() {
		if u == "/models" {
			c++
		}
	}
	return c
}

// dnTakenOut checks what a neuron taken out by the fast path looks like.
func dnTakenOut(t *testing.T, h *fxService, node, signal string) {
	t.Helper()
	fxEventually(t, node+" marked unhealthy", func() bool { return !h.nodeHealthy(t, node) })
	if r := h.pollRound(t); r != 1 {
		t.Errorf("poll round %d: a regular poll ran, so this proves nothing about the fast path", r)
	}
	if got := h.metric(t, "cortex_extproc_neuron_suspect_signals_total", "node", node, "signal", signal); got != 1 {
		t.Errorf("neuron_suspect_signals_total{node=%s,signal=%s} = %v, want 1", node, signal, got)
	}
	if got := h.metric(t, "cortex_extproc_neuron_fast_unhealthy_total", "node", node); got != 1 {
		t.Errorf("neuron_fast_unhealthy_total{node=%s} = %v, want 1", node, got)
	}
	if !strings.Contains(h.logs.String(), "suspect after a failed request, re-poll failed") {
		t.Errorf("the log does not say why %s was taken out:\n%s", node, h.logs)
	}
	_, fleetJSON := h.get(t, "/debug/fleet")
	if !strings.Contains(fleetJSON, "suspect after a failed request, re-poll failed") {
		t.Errorf("/debug/fleet last_error does not say why %s is unhealthy:\n%s", node, fleetJSON)
	}
}

// (a) Envoy answers 503 itself (connect failure) and shows it to ext_proc:
// the node is re-polled at once, the re-poll fails, and the next request
// for its model is cold-loaded on the other neuron.
func TestDeadNeuronEnvoyLocalReply(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	b := fxStartNeuron(t, "b")
	h := fxStart(t, dnConfig(t, a, b))
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

	a.srv.Close() // the neuron process is gone: connections are refused
	// Nobody knows yet: routed to a, where Envoy cannot connect.
	fxWantRouted(t, dnRoute(t, h, "fx/warm", dnEnvoyUF()), "a", "Org/Warm")
	dnTakenOut(t, h, "a", "envoy_local_reply")

	r := h.route(t, "fx/warm")
	if r.Status != 200 || r.Node != "b" || r.Model != "Org/Warm" || !r.ColdStart {
		t.Fatalf("next request: %s; want Org/Warm cold-loaded on b", r)
	}
	if got := b.sim.LoadCalls(); got != 1 {
		t.Errorf("b got %d loads, want 1", got)
	}
}

// (b) Envoy ≥ 1.34 does not show its local reply to ext_proc: the stream
// ends after the routing reply without response headers. Same outcome.
func TestDeadNeuronStreamEndsWithoutResponseHeaders(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	b := fxStartNeuron(t, "b")
	h := fxStart(t, dnConfig(t, a, b))
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

	a.srv.Close()
	fxWantRouted(t, dnRoute(t, h, "fx/warm", nil), "a", "Org/Warm")
	dnTakenOut(t, h, "a", "no_response_headers")

	r := h.route(t, "fx/warm")
	if r.Status != 200 || r.Node != "b" || !r.ColdStart {
		t.Fatalf("next request: %s; want Org/Warm cold-loaded on b", r)
	}
}

// A stream that ends early is also what a client hanging up before the
// answer looks like: the neuron answers its re-poll and stays in.
func TestLiveNeuronSurvivesSuspicion(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, dnConfig(t, a))
	before := dnModelsCalls(a)
	fxWantRouted(t, dnRoute(t, h, "fx/warm", nil), "a", "Org/Warm")
	fxEventually(t, "a re-polled", func() bool { return dnModelsCalls(a) == before+2 }) // probe, then a full poll
	fxEventually(t, "suspicion cleared", func() bool {
		_, text := h.get(t, "/debug/fleet")
		return strings.Contains(text, `"suspect": false`)
	})
	if !h.nodeHealthy(t, "a") {
		t.Fatal("a answered its re-poll but was taken out")
	}
	if got := h.metric(t, "cortex_extproc_neuron_fast_unhealthy_total", "node", "a"); got != 0 {
		t.Errorf("neuron_fast_unhealthy_total{a} = %v, want 0", got)
	}
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")
}

// (c) A neuron's own 503 (its queue is full) is its answer, not Envoy's:
// no suspicion, no re-poll. The headers are the simulator's real ones.
func TestNeuronQueueFull503IsNotSuspect(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartSim(t, neuronsim.Options{Name: "a", Devices: []int64{24000},
		Models: []neuronsim.ModelSpec{{ID: "Org/Warm", VRAMMB: 4000}}, MaxInFlight: 1, MaxQueueDepth: 1})
	h := fxStart(t, dnConfig(t, a))

	// Fill a's queue: one request served (held), one queued.
	release := a.sim.HoldInference()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer release()
	post := func() (*http.Response, error) {
		return http.Post(a.srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(string(fxChat("Org/Warm"))))
	}
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if resp, err := post(); err == nil {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
	}
	fxEventually(t, "a's queue full", func() bool {
		resp, err := http.Get(a.srv.URL + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return strings.Contains(string(b), `"in_flight":1`) && strings.Contains(string(b), `"queue_depth":1`)
	})
	resp, err := post()
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 {
		t.Fatalf("a answered %d with its queue full, want its own 503", resp.StatusCode)
	}

	before := dnModelsCalls(a)
	for range 20 {
		fxWantRouted(t, dnRoute(t, h, "fx/warm", dnFromHTTP(resp)), "a", "Org/Warm")
	}
	if got := h.metric(t, "cortex_extproc_neuron_suspect_signals_total", "node", "a"); got != 0 {
		t.Errorf("neuron_suspect_signals_total{a} = %v after the neuron's own 503s, want 0", got)
	}
	if got := dnModelsCalls(a) - before; got != 0 {
		t.Errorf("a was re-polled %d times for its own 503s, want 0", got)
	}
	if !h.nodeHealthy(t, "a") {
		t.Error("a full queue took a out")
	}
}

// (d) 500 failed requests at once cause one re-poll, not 500: while it is
// in flight (the dead neuron's /models hangs, like a host that dropped off
// the network) every further signal joins it.
func TestDeadNeuronStormCausesOneRepoll(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	b := fxStartNeuron(t, "b")
	cfg := dnConfig(t, a, b)
	cfg.Poll.Timeout = time.Minute // the re-poll waits for the gate, however slow the storm
	h := fxStart(t, cfg)
	fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

	probes := make(chan struct{}, 1000)
	gate := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(gate) }) }
	defer open()
	a.setHook(func(w http.ResponseWriter, r *http.Request) bool {
		if !fxIsPoll(r) {
			return false
		}
		probes <- struct{}{}
		select {
		case <-gate:
		case <-r.Context().Done():
		case <-a.closing:
		}
		http.Error(w, `{"error":"gone"}`, http.StatusBadGateway)
		return true
	})

	const storm = 500
	errs := make(chan error, storm)
	var wg sync.WaitGroup
	for range storm {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			r, err := dnExchange(ctx, h.ep, "fx/warm", func(fxReply) *extprocv3.ProcessingRequest { return nil })
			if err == nil && r.Node != "a" {
				err = errors.New("routed to " + r.Node + " while a was still healthy")
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := h.metric(t, "cortex_extproc_neuron_suspect_signals_total", "node", "a"); got != storm {
		t.Fatalf("neuron_suspect_signals_total{a} = %v, want %d", got, storm)
	}
	<-probes // the one re-poll, still in flight
	open()
	fxEventually(t, "a marked unhealthy", func() bool { return !h.nodeHealthy(t, "a") })
	if n := len(probes); n != 0 {
		t.Errorf("%d more /models re-polls of a after the first, want 0 for %d failed requests", n, storm)
	}
	if got := h.metric(t, "cortex_extproc_neuron_fast_unhealthy_total", "node", "a"); got != 1 {
		t.Errorf("neuron_fast_unhealthy_total{a} = %v, want 1", got)
	}
	r := h.route(t, "fx/warm")
	if r.Status != 200 || r.Node != "b" {
		t.Fatalf("after the storm: %s, want routed to b", r)
	}
}

// A neuron whose host stopped answering (Envoy's connect or request timed
// out) is re-polled at once, and the re-poll itself can take up to
// poll.timeout. Meanwhile requests for a model another neuron also holds go
// there, not to the suspect one; once it answers its re-poll it is used
// again. Repeated: the sequence an operator's fleet produces when a node
// flaps.
func TestSuspectNeuronIsAvoidedWhileItsRepollRuns(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	b := fxStartNeuron(t, "b", "Org/Warm")
	cfg := dnConfig(t, a, b)
	cfg.Poll.Timeout = time.Hour // the re-poll ends when the test lets a answer
	h := fxStart(t, cfg)
	suspectIs := func(node string, want bool) func() bool {
		return func() bool {
			_, text := h.get(t, "/debug/fleet")
			var f struct {
				Nodes []struct {
					Name    string `json:"name"`
					Suspect bool   `json:"suspect"`
				} `json:"nodes"`
			}
			if err := json.Unmarshal([]byte(text), &f); err != nil {
				t.Fatalf("/debug/fleet: %v", err)
			}
			for _, n := range f.Nodes {
				if n.Name == node {
					return n.Suspect == want
				}
			}
			return false
		}
	}
	for round := range 5 {
		// Both idle: ties go to the first name.
		fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

		gate := make(chan struct{})
		a.setHook(func(_ http.ResponseWriter, r *http.Request) bool {
			select {
			case <-gate:
				return false // answers again
			case <-r.Context().Done():
				return true
			}
		})
		// Every request Envoy cannot deliver to a says so; a is re-polled
		// at most once per second (fleet.DefaultSuspectGap), so right after
		// the previous round it may take a few failed requests.
		fxEventually(t, "a suspect", func() bool {
			dnRouteThen(t, h, "fx/warm", func(r fxReply) *extprocv3.ProcessingRequest {
				if r.Node == "a" {
					return dnEnvoyUF()
				}
				return dnHeaders(":status", "200", "date", "Fri, 04 Dec 2026 09:00:00 GMT")
			})
			return suspectIs("a", true)()
		})
		for i := range 20 {
			if r := h.route(t, "fx/warm"); r.Node != "b" || r.Status != 200 {
				t.Fatalf("round %d, request %d while a's re-poll hangs: %s; want routed to b, which holds the model too", round, i, r)
			}
		}
		close(gate)
		a.setHook(nil)
		fxEventually(t, "a's suspicion cleared", suspectIs("a", false))
		if !h.nodeHealthy(t, "a") {
			t.Fatalf("round %d: a answered its re-poll but was taken out", round)
		}
	}
	if got := b.sim.LoadCalls(); got != 0 {
		t.Errorf("b got %d loads; it held the model all along", got)
	}
}

// A neuron that no longer holds a model cortex-extproc routes to (it
// restarted, or someone unloaded the model behind its back) answers 404.
// That answer makes the node's listing stale, so the node is re-polled at
// once (it stays healthy) and the next request for the model is cold-loaded
// instead of meeting the same 404 until the next poll round, an hour away
// here. Repeated: the model comes and goes several times (within a second
// of the previous re-poll, fleet.DefaultSuspectGap, it takes a few 404s,
// as clients retrying would send them).
func TestModelUnloadedBehindOurBackIsNoticedAtOnce(t *testing.T) {
	fxLeakCheck(t)
	a := fxStartNeuron(t, "a", "Org/Warm")
	h := fxStart(t, dnConfig(t, a))
	for round := range 5 {
		fxWantRouted(t, h.route(t, "fx/warm"), "a", "Org/Warm")

		// Unloaded behind our back.
		resp, err := http.Post(a.srv.URL+"/models/unload", "application/json", strings.NewReader(`{"model_id":"Org/Warm"}`))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("unload: %d", resp.StatusCode)
		}
		// What a request routed on the stale view meets: the neuron's own 404.
		resp, err = http.Post(a.srv.URL+"/v1/chat/completions", "application/json", strings.NewReader(string(fxChat("Org/Warm"))))
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Fatalf("round %d: the neuron answered %d for an unloaded model, want its 404", round, resp.StatusCode)
		}
		missing := dnFromHTTP(resp)

		stale := 0
		fxEventually(t, "Org/Warm cold-loaded again after the neuron's 404", func() bool {
			r := dnRouteThen(t, h, "fx/warm", func(r fxReply) *extprocv3.ProcessingRequest {
				if r.ColdStart {
					return dnHeaders(":status", "200", "date", "Fri, 04 Dec 2026 09:00:00 GMT")
				}
				return missing
			})
			if r.Status != 200 || r.Node != "a" {
				t.Fatalf("round %d: %s; want routed to a", round, r)
			}
			if !r.ColdStart {
				stale++
			}
			return r.ColdStart
		})
		if stale == 0 {
			t.Fatalf("round %d: no request met the stale view; the test proves nothing", round)
		}
		if !h.nodeHealthy(t, "a") {
			t.Fatalf("round %d: a answered its re-poll but was taken out", round)
		}
	}
	if got := h.metric(t, "cortex_extproc_neuron_suspect_signals_total", "node", "a", "signal", "model_missing"); got < 5 {
		t.Errorf("neuron_suspect_signals_total{a, model_missing} = %v, want at least one per round (5)", got)
	}
	if got := h.metric(t, "cortex_extproc_neuron_fast_unhealthy_total", "node", "a"); got != 0 {
		t.Errorf("neuron_fast_unhealthy_total{a} = %v, want 0: the neuron answered", got)
	}
}
