// Package anthropic translates between Anthropic's Messages API, which
// Claude Code and the Anthropic SDKs speak on POST /v1/messages, and the
// OpenAI chat completions API, which is all the neurons speak.
//
// It is a pure library: no I/O, no logging, no protobuf. The ext_proc
// server calls it at four points of a /v1/messages exchange:
//
//   - TranslateRequest turns the buffered Anthropic request body into an
//     OpenAI chat completions body for the neuron. Bad input is a
//     *RequestError whose Body is Anthropic's 400 invalid_request_error.
//   - TranslateResponse turns a buffered (non-streaming) chat completion
//     into an Anthropic Message.
//   - Stream turns the neuron's chat.completion.chunk SSE stream into
//     Anthropic's message_start / content_block_* / message_delta /
//     message_stop event stream, one upstream body chunk at a time, with
//     chunk boundaries anywhere (Envoy's STREAMED body mode), holding back
//     at most one incomplete line or event.
//   - TranslateError turns an upstream error response (or anything else a
//     failing upstream sends) into Anthropic's error object.
//
// # Where the two APIs differ, and what is chosen here
//
// The rules follow helexa's Rust cortex gateway (cortex-core translate and
// cortex-gateway anthropic_sse), which this service replaces, except where
// noted in the function docs: helexa passed unknown content blocks through
// as JSON, answered non-streaming requests with a single text block (no
// tool_use), ignored reasoning, echoed the upstream model name and ended a
// truncated stream as if it had finished; here unknown blocks are a 400,
// tool calls and reasoning are translated, the model is the name the client
// asked for, and a truncated stream ends with an error event.
package anthropic
