package e2e

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/anthropics/anthropic-sdk-go/v2"
	aoption "github.com/anthropics/anthropic-sdk-go/v2/option"
)

// The official Anthropic Go SDK against neurons that speak only OpenAI
// (neuron-sim answers 404 on /v1/messages, as the fleet's neurons do):
// cortex-extproc translates the request to /v1/chat/completions and the
// answer back, streamed chunk by chunk through envoyLite.

func newAnthropicClient(st *stack) anthropic.Client {
	// No retries: a retried 5xx would hide what cortex-extproc answered.
	return anthropic.NewClient(aoption.WithBaseURL(st.front.URL), aoption.WithAPIKey("x"), aoption.WithMaxRetries(0))
}

func userSays(text string) []anthropic.MessageParam {
	return []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(text))}
}

// translated checks that the request went upstream as a chat completion and
// its answer came back through ext_proc's response body messages.
func translated(t *testing.T, st *stack, resp *http.Response) {
	t.Helper()
	if resp == nil {
		t.Fatal("no *http.Response captured")
	}
	ent := entry(t, st.envoy, resp.Request.Header.Get("x-request-id"))
	if !slices.Contains(ent.Sent, "response_body") {
		t.Errorf("ext_proc messages %v: the answer was not translated through response_body", ent.Sent)
	}
	if got := resp.Header.Get("x-neuron-name"); got == "" {
		t.Error("no x-neuron-name: the answer did not come from a neuron")
	}
}

func withRequestID(id string) aoption.RequestOption { return aoption.WithHeader("x-request-id", id) }

func TestAnthropicSDKMessage(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	var resp *http.Response
	msg, err := c.Messages.New(ctx, anthropic.MessageNewParams{
		Model: "helexa/small", MaxTokens: 64, Messages: userSays("Say hello."),
	}, aoption.WithResponseInto(&resp), withRequestID("anthropic-message"))
	if err != nil {
		t.Fatal(err)
	}
	if len(msg.Content) != 1 || msg.Content[0].Type != "text" {
		t.Fatalf("content %+v, want one text block", msg.Content)
	}
	served(t, resp, msg.Content[0].Text, "beast", "Qwen/Qwen3-1.7B", false)
	if msg.Model != "helexa/small" || msg.Role != "assistant" || msg.StopReason != anthropic.StopReasonEndTurn ||
		!strings.HasPrefix(msg.ID, "msg_") || msg.Usage.OutputTokens == 0 {
		t.Errorf("message %s", msg.RawJSON())
	}
	translated(t, st, resp)
}

func TestAnthropicSDKStreaming(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	var resp *http.Response
	stream := c.Messages.NewStreaming(ctx, anthropic.MessageNewParams{
		Model: "helexa/small", MaxTokens: 64, Messages: userSays("Say hello."),
	}, aoption.WithResponseInto(&resp), withRequestID("anthropic-stream"))
	var msg anthropic.Message
	var events []string
	deltas := 0
	for stream.Next() {
		ev := stream.Current()
		events = append(events, ev.Type)
		if ev.Type == "content_block_delta" {
			deltas++
		}
		if err := msg.Accumulate(ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.Err(); err != nil {
		t.Fatal(err)
	}
	if len(events) < 5 || events[0] != "message_start" || events[1] != "content_block_start" ||
		events[len(events)-2] != "message_delta" || events[len(events)-1] != "message_stop" {
		t.Errorf("events %v", events)
	}
	if deltas < 2 {
		t.Errorf("%d text deltas: the answer was not streamed token by token", deltas)
	}
	if len(msg.Content) != 1 {
		t.Fatalf("content %+v", msg.Content)
	}
	served(t, resp, msg.Content[0].Text, "beast", "Qwen/Qwen3-1.7B", false)
	if msg.StopReason != anthropic.StopReasonEndTurn || msg.Usage.OutputTokens == 0 {
		t.Errorf("accumulated message %+v", msg)
	}
	translated(t, st, resp)
}

// A tool call and its result, both ways: the neuron answers with an
// OpenAI tool call, the client gets a tool_use block, sends back a
// tool_result, and gets the model's answer about it. Streamed too: the
// call's arguments arrive as input_json_delta fragments.
func TestAnthropicSDKToolUseRoundTrip(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	tools := []anthropic.ToolUnionParam{anthropic.ToolUnionParamOfTool(anthropic.ToolInputSchemaParam{
		Properties: map[string]any{"location": map[string]any{"type": "string"}},
		Required:   []string{"location"},
	}, "get_weather")}
	params := anthropic.MessageNewParams{
		Model: "helexa/small", MaxTokens: 256, Tools: tools,
		Messages: userSays("What is the weather in Paris?"),
	}
	for _, streamed := range []bool{false, true} {
		var msg *anthropic.Message
		if streamed {
			stream := c.Messages.NewStreaming(ctx, params)
			acc := anthropic.Message{}
			for stream.Next() {
				if err := acc.Accumulate(stream.Current()); err != nil {
					t.Fatal(err)
				}
			}
			if err := stream.Err(); err != nil {
				t.Fatal(err)
			}
			msg = &acc
		} else {
			var err error
			if msg, err = c.Messages.New(ctx, params); err != nil {
				t.Fatal(err)
			}
		}
		i := slices.IndexFunc(msg.Content, func(b anthropic.ContentBlockUnion) bool { return b.Type == "tool_use" })
		if i < 0 || msg.StopReason != anthropic.StopReasonToolUse {
			t.Fatalf("streamed %v: content %+v stop %q, want a tool_use block and stop_reason tool_use", streamed, msg.Content, msg.StopReason)
		}
		call := msg.Content[i]
		var input map[string]any
		if err := json.Unmarshal(call.Input, &input); err != nil || call.Name != "get_weather" || call.ID == "" || input["location"] == nil {
			t.Fatalf("streamed %v: tool_use %s %s input %s (%v)", streamed, call.ID, call.Name, call.Input, err)
		}

		// The result goes back; the neuron answers about it.
		next := params
		next.Messages = append(slices.Clone(params.Messages), msg.ToParam(),
			anthropic.NewUserMessage(anthropic.NewToolResultBlock(call.ID, "18 degrees and sunny", false)))
		answer, err := c.Messages.New(ctx, next)
		if err != nil {
			t.Fatalf("streamed %v: answer after the tool result: %v", streamed, err)
		}
		if len(answer.Content) == 0 || !strings.Contains(answer.Content[0].Text, "get_weather") || answer.StopReason != anthropic.StopReasonEndTurn {
			t.Errorf("streamed %v: answer %s, want text about the get_weather result", streamed, answer.RawJSON())
		}
	}
}

// An image block reaches the neuron as an image_url part.
func TestAnthropicSDKImageBlock(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	png := base64.StdEncoding.EncodeToString([]byte("\x89PNG\r\n\x1a\n not really an image"))
	msg, err := c.Messages.New(ctx, anthropic.MessageNewParams{
		Model: "helexa/small", MaxTokens: 64,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(
			anthropic.NewImageBlockBase64("image/png", png), anthropic.NewTextBlock("What is in this picture?"))},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(msg.Content) == 0 || !strings.Contains(msg.Content[0].Text, "1 image") {
		t.Errorf("answer %s, want the neuron to have seen one image", msg.RawJSON())
	}
}

func TestAnthropicSDKErrors(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	var apiErr *anthropic.Error

	_, err := c.Messages.New(ctx, anthropic.MessageNewParams{Model: "no-such/model", MaxTokens: 16, Messages: userSays("hi")})
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Type() != "not_found_error" {
		t.Errorf("unknown model: %v, want 404 not_found_error", err)
	}
	// Not offered, and said so, rather than forwarded to a neuron.
	_, err = c.Messages.CountTokens(ctx, anthropic.MessageCountTokensParams{Model: "helexa/small", Messages: userSays("hi")})
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || !strings.Contains(apiErr.Message, "count_tokens") {
		t.Errorf("count_tokens: %v, want a 404 that says it is not offered", err)
	}
}

func TestAnthropicSDKModels(t *testing.T) {
	st := needStack(t)
	ctx := testContext(t)
	c := newAnthropicClient(st)
	page, err := c.Models.List(ctx, anthropic.ModelListParams{})
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(page.Data, func(m anthropic.ModelInfo) bool { return m.ID == "helexa/small" })
	if i < 0 || page.Data[i].DisplayName == "" || page.Data[i].CreatedAt.IsZero() || page.HasMore {
		t.Fatalf("models page %s", page.RawJSON())
	}
	if page.FirstID != page.Data[0].ID || page.LastID != page.Data[len(page.Data)-1].ID {
		t.Errorf("first_id %q last_id %q, want the page's ends", page.FirstID, page.LastID)
	}
	m, err := c.Models.Get(ctx, "Qwen/Qwen3-1.7B", anthropic.ModelGetParams{})
	if err != nil || m.ID != "Qwen/Qwen3-1.7B" || m.Type != "model" {
		t.Fatalf("get: %+v %v", m, err)
	}
	var apiErr *anthropic.Error
	_, err = c.Models.Get(ctx, "no-such-model", anthropic.ModelGetParams{})
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Type() != "not_found_error" {
		t.Errorf("unknown model: %v, want 404 not_found_error", err)
	}
}
