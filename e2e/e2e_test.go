// Package e2e runs cortex-extproc end to end: neuron-sim and cortex-extproc
// as real processes, envoyLite (an in-test stand-in for Envoy's ext_proc
// filter and envoy/envoy.yaml's route table, envoylite_test.go) in front,
// and the official OpenAI Go SDK as the client.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
)

var (
	bins binaries
	// shared is the demo fleet in its start state, for tests that leave
	// it so; tests that load or reload models start their own (freshStack).
	shared *stack
)

// The fleet of the README's demo, with short latencies so the package
// runs in seconds.
var fleet = []simSpec{
	{name: "beast", args: []string{"--devices", "24564,24564", "--models", "Qwen/Qwen3-1.7B",
		"--load-latency", "300ms", "--token-interval", "20ms"}},
	{name: "rig2", args: []string{"--devices", "16384", "--models", "Qwen/Qwen3-4B",
		"--unloaded", "unsloth/Qwen3-0.6B-GGUF", "--load-latency", "300ms", "--token-interval", "20ms"}},
}

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if testing.Short() {
		return m.Run() // the process tests skip themselves
	}
	dir, err := os.MkdirTemp("", "cortex-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if bins, err = buildBinaries(filepath.Join(dir, "bin")); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	sharedDir := filepath.Join(dir, "shared")
	if err := os.Mkdir(sharedDir, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	if shared, err = startStack(bins, sharedDir, fleet, ""); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: starting neuron-sims and cortex-extproc:", err)
		return 1
	}
	code := m.Run()
	shared.close()
	if code != 0 {
		fmt.Fprintln(os.Stderr, shared.logs())
	}
	return code
}

// needStack returns the shared stack, and fails the test if envoyLite saw
// a protocol problem in any request the test made.
func needStack(t *testing.T) *stack {
	t.Helper()
	if shared == nil {
		t.Skip(errNoStack)
	}
	expectCleanProtocol(t, shared.envoy)
	return shared
}

// freshStack starts a private fleet for a test that changes it (loads,
// reloads, stops cortex-extproc), so tests stay independent of order and
// of -count.
func freshStack(t *testing.T, specs []simSpec) *stack {
	t.Helper()
	return freshStackWith(t, specs, stackOptions{})
}

// freshStackWith is freshStack with options.
func freshStackWith(t *testing.T, specs []simSpec, opts stackOptions) *stack {
	t.Helper()
	if shared == nil {
		t.Skip(errNoStack)
	}
	st, err := startStackWith(bins, t.TempDir(), specs, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.close)
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(st.logs())
		}
	})
	expectCleanProtocol(t, st.envoy)
	return st
}

func expectCleanProtocol(t *testing.T, e *envoyLite) {
	before := len(e.Entries())
	t.Cleanup(func() {
		e.bg.Wait() // stream closers report late messages
		for _, ent := range e.Entries()[before:] {
			for _, p := range ent.Problems {
				t.Errorf("ext_proc protocol problem in %s %s (x-request-id %s): %s", ent.Method, ent.Path, ent.RequestID, p)
			}
		}
	})
}

func newClient(st *stack) openai.Client {
	// No retries: a retried 5xx would hide what cortex-extproc answered.
	return openai.NewClient(option.WithBaseURL(st.front.URL+"/v1/"), option.WithAPIKey("x"), option.WithMaxRetries(0))
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func chat(model string) openai.ChatCompletionNewParams {
	return openai.ChatCompletionNewParams{
		Model:    model,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say hello.")},
	}
}

// served checks what a client sees of who served it: the answer (the sim
// says "Hello from <node> serving <model>"), the sim's own x-neuron-name,
// and cortex-extproc's x-cortex-* response headers.
func served(t *testing.T, resp *http.Response, content, node, model string, cold bool) {
	t.Helper()
	if want := "Hello from " + node + " serving " + model; content != want {
		t.Errorf("answer %q, want %q", content, want)
	}
	if resp == nil {
		t.Fatal("no *http.Response captured")
	}
	for h, want := range map[string]string{
		"x-neuron-name":       node,
		"x-cortex-node":       node,
		"x-cortex-model":      model,
		"x-cortex-cold-start": fmt.Sprint(cold),
	} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("response header %s = %q, want %q", h, got, want)
		}
	}
}

func entry(t *testing.T, e *envoyLite, id string) accessEntry {
	t.Helper()
	ent, ok := e.Entry(id)
	if !ok {
		t.Fatalf("no envoylite access log entry for x-request-id %s", id)
	}
	return ent
}

var routedSequence = []string{"request_headers", "request_body", "response_headers"}

func TestChatCompletionWarmAlias(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	id := newUUID()
	var resp *http.Response
	cc, err := c.Chat.Completions.New(testContext(t), chat("helexa/small"),
		option.WithResponseInto(&resp), option.WithHeader("x-request-id", id))
	if err != nil {
		t.Fatalf("chat completion for helexa/small: %v", err)
	}
	if len(cc.Choices) != 1 {
		t.Fatalf("%d choices, want 1", len(cc.Choices))
	}
	served(t, resp, cc.Choices[0].Message.Content, "beast", "Qwen/Qwen3-1.7B", false)
	if cc.Model != "Qwen/Qwen3-1.7B" {
		t.Errorf("the neuron saw model %q, want the alias rewritten to Qwen/Qwen3-1.7B", cc.Model)
	}
	ent := entry(t, st.envoy, id)
	if ent.Cluster != "neuron-beast" || ent.Details != "via_upstream" || ent.Status != 200 {
		t.Errorf("access log: cluster %q details %q status %d, want neuron-beast via_upstream 200", ent.Cluster, ent.Details, ent.Status)
	}
	if !slices.Equal(ent.Sent, routedSequence) {
		t.Errorf("ext_proc messages %v, want %v", ent.Sent, routedSequence)
	}
	if ent.Overrides != 0 {
		t.Errorf("a warm request sent %d override_message_timeout, want 0", ent.Overrides)
	}
	// Access logs read the x-cortex-* request headers; cortex-extproc sends
	// no dynamic metadata in cluster_header mode.
	if len(ent.Metadata) != 0 {
		t.Errorf("dynamic metadata cortex = %v, want none", ent.Metadata)
	}
}

func TestChatCompletionStreaming(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	id := newUUID()
	var resp *http.Response
	stream := c.Chat.Completions.NewStreaming(testContext(t), chat("helexa/small"),
		option.WithResponseInto(&resp), option.WithHeader("x-request-id", id))
	var acc openai.ChatCompletionAccumulator
	chunks := 0
	for stream.Next() {
		acc.AddChunk(stream.Current())
		chunks++
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("stream for helexa/small ended with %v after %d chunks", err, chunks)
	}
	if err := stream.Close(); err != nil {
		t.Errorf("closing the stream: %v", err)
	}
	if len(acc.Choices) != 1 {
		t.Fatalf("%d choices accumulated, want 1", len(acc.Choices))
	}
	served(t, resp, acc.Choices[0].Message.Content, "beast", "Qwen/Qwen3-1.7B", false)
	// One chunk per token plus the role and finish chunks.
	if want := len(strings.Fields("Hello from beast serving Qwen/Qwen3-1.7B")) + 2; chunks < want {
		t.Errorf("%d SSE chunks, want at least %d (one per token)", chunks, want)
	}
	if ct := resp.Header.Get("content-type"); !strings.HasPrefix(ct, "text/event-stream") {
		t.Errorf("content-type %q, want text/event-stream", ct)
	}
	if ent := entry(t, st.envoy, id); !slices.Equal(ent.Sent, routedSequence) || ent.Cluster != "neuron-beast" {
		t.Errorf("ext_proc messages %v to cluster %q, want %v to neuron-beast", ent.Sent, ent.Cluster, routedSequence)
	}
}

// TestColdLoad: helexa/balanced (Qwen/Qwen3-8B) is in the catalogue only
// and fits only beast's 24 GB cards. Concurrent requests share one load.
func TestColdLoad(t *testing.T) {
	st := freshStack(t, fleet)
	c := newClient(st)
	ctx := testContext(t)
	const n = 3
	type result struct {
		id      string
		resp    *http.Response
		content string
		err     error
	}
	results := make([]result, n)
	var wg sync.WaitGroup
	for i := range results {
		results[i].id = newUUID()
		wg.Add(1)
		go func(r *result, streaming bool) {
			defer wg.Done()
			opts := []option.RequestOption{option.WithResponseInto(&r.resp), option.WithHeader("x-request-id", r.id)}
			if streaming {
				s := c.Chat.Completions.NewStreaming(ctx, chat("helexa/balanced"), opts...)
				var acc openai.ChatCompletionAccumulator
				for s.Next() {
					acc.AddChunk(s.Current())
				}
				if r.err = s.Err(); r.err == nil && len(acc.Choices) > 0 {
					r.content = acc.Choices[0].Message.Content
				}
				return
			}
			cc, err := c.Chat.Completions.New(ctx, chat("helexa/balanced"), opts...)
			if r.err = err; err == nil && len(cc.Choices) > 0 {
				r.content = cc.Choices[0].Message.Content
			}
		}(&results[i], i == 0)
	}
	wg.Wait()
	cold := 0
	for _, r := range results {
		if r.err != nil {
			t.Fatalf("request %s for helexa/balanced: %v", r.id, r.err)
		}
		isCold := r.resp.Header.Get("x-cortex-cold-start") == "true"
		served(t, r.resp, r.content, "beast", "Qwen/Qwen3-8B", isCold)
		ent := entry(t, st.envoy, r.id)
		if isCold {
			cold++
			// Held across the load: exactly one standalone override.
			if ent.Overrides != 1 {
				t.Errorf("cold request %s sent %d accepted override_message_timeout, want 1", r.id, ent.Overrides)
			}
		}
	}
	if cold == 0 {
		t.Error("no request reported x-cortex-cold-start: true, though Qwen/Qwen3-8B was loaded nowhere")
	}
	if got := st.sims["beast"].tap.loadCount("Qwen/Qwen3-8B"); got != 1 {
		t.Errorf("beast got %d POST /models/load for Qwen/Qwen3-8B, want exactly 1 for %d concurrent requests", got, n)
	}
	if got := st.sims["rig2"].tap.loadCount("Qwen/Qwen3-8B"); got != 0 {
		t.Errorf("rig2 (16 GB card, min_device_vram_mb 20000) got %d loads of Qwen/Qwen3-8B, want 0", got)
	}
	ms, err := st.sims["beast"].models(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ms["Qwen/Qwen3-8B"] != "loaded" || ms["Qwen/Qwen3-1.7B"] != "loaded" {
		t.Errorf("beast's models after the cold load: %v, want Qwen/Qwen3-8B loaded next to Qwen/Qwen3-1.7B", ms)
	}

	// Now warm: no load, no hold.
	id := newUUID()
	var resp *http.Response
	cc, err := c.Chat.Completions.New(ctx, chat("helexa/balanced"), option.WithResponseInto(&resp), option.WithHeader("x-request-id", id))
	if err != nil {
		t.Fatalf("warm request for helexa/balanced: %v", err)
	}
	served(t, resp, cc.Choices[0].Message.Content, "beast", "Qwen/Qwen3-8B", false)
	if ent := entry(t, st.envoy, id); ent.Overrides != 0 {
		t.Errorf("warm request sent %d override_message_timeout, want 0", ent.Overrides)
	}
	if got := st.sims["beast"].tap.loadCount("Qwen/Qwen3-8B"); got != 1 {
		t.Errorf("beast got %d loads of Qwen/Qwen3-8B after a warm request, want still 1", got)
	}
}

// TestLazyReload: rig2 lists unsloth/Qwen3-0.6B-GGUF as unloaded; the
// request goes to rig2, which reloads it itself (no /models/load).
func TestLazyReload(t *testing.T) {
	st := freshStack(t, fleet)
	c := newClient(st)
	ctx := testContext(t)
	const model = "unsloth/Qwen3-0.6B-GGUF"
	id := newUUID()
	var resp *http.Response
	cc, err := c.Chat.Completions.New(ctx, chat(model), option.WithResponseInto(&resp), option.WithHeader("x-request-id", id))
	if err != nil {
		t.Fatalf("chat completion for %s: %v", model, err)
	}
	served(t, resp, cc.Choices[0].Message.Content, "rig2", model, true)
	if ent := entry(t, st.envoy, id); ent.Cluster != "neuron-rig2" {
		t.Errorf("routed to cluster %q, want neuron-rig2", ent.Cluster)
	}
	for name, s := range st.sims {
		if got := s.tap.loadCount(model); got != 0 {
			t.Errorf("%s got %d POST /models/load for %s, want 0 (rig2 reloads it lazily)", name, got, model)
		}
	}
	ms, err := st.sims["rig2"].models(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ms[model] != "loaded" {
		t.Errorf("rig2 reports %s as %q after serving it, want loaded", model, ms[model])
	}
}

func TestModelsList(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	ctx := testContext(t)
	id := newUUID()
	page, err := c.Models.List(ctx, option.WithHeader("x-request-id", id))
	if err != nil {
		t.Fatalf("GET /v1/models: %v", err)
	}
	var ids []string
	for _, m := range page.Data {
		ids = append(ids, m.ID)
	}
	for _, want := range []string{"helexa/small", "helexa/balanced", "helexa/large",
		"Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "unsloth/Qwen3-0.6B-GGUF"} {
		if !slices.Contains(ids, want) {
			t.Errorf("model list %v lacks %s", ids, want)
		}
	}
	// Answered by cortex-extproc itself at the headers phase.
	if ent := entry(t, st.envoy, id); !slices.Equal(ent.Sent, []string{"request_headers"}) || ent.Details != "cortex_model_list" {
		t.Errorf("GET /v1/models: ext_proc messages %v details %q, want [request_headers] cortex_model_list", ent.Sent, ent.Details)
	}

	m, err := c.Models.Get(ctx, "helexa/small")
	if err != nil {
		t.Fatalf("GET /v1/models/helexa/small: %v", err)
	}
	if m.ID != "helexa/small" {
		t.Errorf("GET /v1/models/helexa/small answered id %q", m.ID)
	}
}

func TestUnknownModel(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	id := newUUID()
	_, err := c.Chat.Completions.New(testContext(t), chat("no-such/model"), option.WithHeader("x-request-id", id))
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) {
		t.Fatalf("unknown model: error %v, want an *openai.Error", err)
	}
	if apiErr.StatusCode != 404 || apiErr.Code != "model_not_found" {
		t.Errorf("unknown model: status %d code %q, want 404 model_not_found", apiErr.StatusCode, apiErr.Code)
	}
	if !strings.Contains(apiErr.Message, "no-such/model") {
		t.Errorf("error message %q does not name the model", apiErr.Message)
	}
	if ent := entry(t, st.envoy, id); ent.Cluster != "" || ent.Details != "cortex_model_not_found" {
		t.Errorf("access log: cluster %q details %q, want no upstream and cortex_model_not_found", ent.Cluster, ent.Details)
	}
}

// TestClientCannotPickCluster: a client-sent x-cortex-cluster must not
// decide the upstream (Envoy cached the route from it at header time).
func TestClientCannotPickCluster(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	id := newUUID()
	var resp *http.Response
	cc, err := c.Chat.Completions.New(testContext(t), chat("helexa/small"), option.WithResponseInto(&resp),
		option.WithHeader("x-request-id", id),
		option.WithHeader("x-cortex-cluster", "neuron-rig2"),
		option.WithHeader("x-cortex-node", "rig2"))
	if err != nil {
		t.Fatalf("chat completion with a spoofed x-cortex-cluster: %v", err)
	}
	served(t, resp, cc.Choices[0].Message.Content, "beast", "Qwen/Qwen3-1.7B", false)
	if ent := entry(t, st.envoy, id); ent.Cluster != "neuron-beast" {
		t.Errorf("routed to cluster %q, want neuron-beast", ent.Cluster)
	}
}

// TestLargeRequestBody: a body above grpc-go's 4 MiB default message size
// is still routed (cortex-extproc raises MaxRecvMsgSize).
func TestLargeRequestBody(t *testing.T) {
	st := needStack(t)
	c := newClient(st)
	params := openai.ChatCompletionNewParams{
		Model:    "helexa/small",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(strings.Repeat("lorem ipsum ", 5<<20/12))},
	}
	var resp *http.Response
	cc, err := c.Chat.Completions.New(testContext(t), params, option.WithResponseInto(&resp))
	if err != nil {
		t.Fatalf("5 MiB chat completion: %v", err)
	}
	served(t, resp, cc.Choices[0].Message.Content, "beast", "Qwen/Qwen3-1.7B", false)
}

// TestDrainOnSIGTERM: on SIGTERM cortex-extproc reports not ready, lets a
// request held for a cold load finish, and exits 0 within drain_timeout.
// Its fleet is one empty neuron.
func TestDrainOnSIGTERM(t *testing.T) {
	st := freshStack(t, []simSpec{{name: "solo",
		args: []string{"--devices", "24564", "--load-latency", "300ms", "--token-interval", "20ms"}}})
	ctx := testContext(t)
	c := newClient(st)
	tap := st.sims["solo"].tap
	release := tap.holdLoads()
	defer release()

	type result struct {
		resp    *http.Response
		content string
		err     error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		cc, err := c.Chat.Completions.New(ctx, chat("helexa/small"), option.WithResponseInto(&r.resp))
		if r.err = err; err == nil && len(cc.Choices) > 0 {
			r.content = cc.Choices[0].Message.Content
		}
		done <- r
	}()
	select {
	case m := <-tap.loadSeen:
		if m != "Qwen/Qwen3-1.7B" {
			t.Fatalf("solo was asked to load %q, want Qwen/Qwen3-1.7B", m)
		}
	case r := <-done:
		t.Fatalf("request finished before the cold load started: %+v", r)
	case <-ctx.Done():
		t.Fatal("cortex-extproc never asked solo to load Qwen/Qwen3-1.7B")
	}

	if err := st.cortex.proc.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	// Draining: /readyz answers 503 while the held request is still open.
	for {
		code, body, err := st.cortex.admin(ctx, "/readyz")
		if err == nil && code == http.StatusServiceUnavailable && strings.Contains(string(body), "draining") {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("/readyz never reported draining after SIGTERM (last: %d %q %v)", code, body, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	release()

	r := <-done
	if r.err != nil {
		t.Fatalf("request held across SIGTERM failed: %v", r.err)
	}
	served(t, r.resp, r.content, "solo", "Qwen/Qwen3-1.7B", true)

	const drainTimeout = 10 * time.Second // cortexConfig's extproc.drain_timeout
	if !st.cortex.proc.exited(drainTimeout + 5*time.Second) {
		t.Fatalf("cortex-extproc still running %s after SIGTERM (drain_timeout %s)", time.Since(sent).Round(time.Millisecond), drainTimeout)
	}
	if code := st.cortex.proc.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("cortex-extproc exited with %d after SIGTERM, want 0", code)
	}

	// With ext_proc gone and failure_mode_allow false, nothing reaches a
	// neuron unprocessed: the client gets Envoy's 500.
	_, err := c.Chat.Completions.New(ctx, chat("helexa/small"))
	var apiErr *openai.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != http.StatusInternalServerError {
		t.Errorf("request after cortex-extproc exited: %v, want HTTP 500 from the proxy", err)
	}
}

// TestAnthropicMessages: /v1/messages is routed the same way, and its
// errors come in Anthropic's shape.
func TestAnthropicMessages(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	post := func(model string) (*http.Response, map[string]any) {
		t.Helper()
		body := fmt.Sprintf(`{"model":%q,"max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}`, model)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, st.front.URL+"/v1/messages", strings.NewReader(body))
		req.Header.Set("content-type", "application/json")
		req.Header.Set("anthropic-version", "2023-06-01")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var v map[string]any
		if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
			t.Fatalf("/v1/messages for %s: %d with a body that is not JSON: %v", model, resp.StatusCode, err)
		}
		return resp, v
	}

	resp, v := post("helexa/small")
	if resp.StatusCode != 200 {
		t.Fatalf("/v1/messages for helexa/small: %d %v", resp.StatusCode, v)
	}
	content, _ := v["content"].([]any)
	text := ""
	if len(content) > 0 {
		text, _ = content[0].(map[string]any)["text"].(string)
	}
	served(t, resp, text, "beast", "Qwen/Qwen3-1.7B", false)

	resp, v = post("no-such/model")
	errObj, _ := v["error"].(map[string]any)
	if resp.StatusCode != 404 || v["type"] != "error" || errObj["type"] != "not_found_error" {
		t.Errorf("/v1/messages for an unknown model: %d %v, want 404 with Anthropic's not_found_error", resp.StatusCode, v)
	}
}

// TestHangUpDuringColdLoad: a client that hangs up while held stops only
// its own wait; the load goes on and serves the next request.
func TestHangUpDuringColdLoad(t *testing.T) {
	st := freshStack(t, fleet)
	ctx := testContext(t)
	c := newClient(st)
	tap := st.sims["beast"].tap
	release := tap.holdLoads()
	defer release()

	actx, hangUp := context.WithCancel(ctx)
	aDone := make(chan error, 1)
	go func() {
		_, err := c.Chat.Completions.New(actx, chat("helexa/balanced"))
		aDone <- err
	}()
	select {
	case <-tap.loadSeen:
	case err := <-aDone:
		t.Fatalf("request finished before the cold load started: %v", err)
	case <-ctx.Done():
		t.Fatal("cortex-extproc never asked beast to load Qwen/Qwen3-8B")
	}
	hangUp()
	if err := <-aDone; !errors.Is(err, context.Canceled) {
		t.Fatalf("hung-up request: %v, want context.Canceled", err)
	}
	// The waiter leaves once Envoy resets the stream; the load stays.
	waitFlight(t, ctx, st, func(waiters int, found bool) bool { return found && waiters == 0 })

	bDone := make(chan error, 1)
	var resp *http.Response
	var content string
	go func() {
		cc, err := c.Chat.Completions.New(ctx, chat("helexa/balanced"), option.WithResponseInto(&resp))
		if err == nil && len(cc.Choices) > 0 {
			content = cc.Choices[0].Message.Content
		}
		bDone <- err
	}()
	waitFlight(t, ctx, st, func(waiters int, found bool) bool { return found && waiters == 1 })
	release()
	if err := <-bDone; err != nil {
		t.Fatalf("request after the hang-up: %v", err)
	}
	served(t, resp, content, "beast", "Qwen/Qwen3-8B", true)
	if got := tap.loadCount("Qwen/Qwen3-8B"); got != 1 {
		t.Errorf("beast got %d loads of Qwen/Qwen3-8B, want 1: the hang-up must not cancel or restart the load", got)
	}
}

// waitFlight polls /debug/fleet until the load of Qwen/Qwen3-8B matches.
func waitFlight(t *testing.T, ctx context.Context, st *stack, ok func(waiters int, found bool) bool) {
	t.Helper()
	var last string
	for {
		_, body, err := st.cortex.admin(ctx, "/debug/fleet")
		if err == nil {
			var v struct {
				Loads []struct {
					Model   string `json:"model"`
					Waiters int    `json:"waiters"`
				} `json:"loads_in_progress"`
			}
			if json.Unmarshal(body, &v) == nil {
				waiters, found := 0, false
				for _, l := range v.Loads {
					if l.Model == "Qwen/Qwen3-8B" {
						waiters, found = l.Waiters, true
					}
				}
				if ok(waiters, found) {
					return
				}
				last = fmt.Sprintf("%+v", v.Loads)
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("/debug/fleet loads_in_progress never reached the expected state; last %s", last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
