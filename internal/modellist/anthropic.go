package modellist

import (
	"encoding/json"
	"slices"
	"time"
)

// The model list in Anthropic's shape, for clients that send an
// anthropic-version header (Claude Code, the Anthropic SDKs).
//
// The entries and their order are the OpenAI list's. The official SDKs
// decode a model object strictly: every field their ModelInfo marks as
// required is sent, the nullable ones as null. Capabilities say what a
// request translated to a neuron can really use: image input for a
// "vision" model, thinking (enabled, adaptive, disabled) for a "reasoning"
// model, and nothing that needs Anthropic's own servers (batches, PDFs,
// server tools, citations, effort levels, context management).

// anthropicPage is the list page (the SDKs' pagination.Page).
type anthropicPage struct {
	Data    []anthropicModel `json:"data"`
	HasMore bool             `json:"has_more"`
	FirstID *string          `json:"first_id"`
	LastID  *string          `json:"last_id"`
}

// anthropicModel is Anthropic's model object (the SDKs' ModelInfo).
type anthropicModel struct {
	Type        string `json:"type"`
	ID          string `json:"id"`
	DisplayName string `json:"display_name"`
	// CreatedAt is RFC 3339, from the same instant as the OpenAI entry's
	// created.
	CreatedAt    string                `json:"created_at"`
	Capabilities anthropicCapabilities `json:"capabilities"`
	// MaxInputTokens and MaxTokens come from the model's limit (input, else
	// context; output, else context); 0 when nobody declared one.
	MaxInputTokens int64  `json:"max_input_tokens"`
	MaxTokens      int64  `json:"max_tokens"`
	Lifecycle      string `json:"lifecycle"`
	// Line is a Claude model line (opus, sonnet, …): never one of ours.
	Line         *string `json:"line"`
	DeprecatedAt *string `json:"deprecated_at"`
	RetiresAt    *string `json:"retires_at"`
}

type support struct {
	Supported bool `json:"supported"`
}

type anthropicCapabilities struct {
	Batch             support `json:"batch"`
	Citations         support `json:"citations"`
	CodeExecution     support `json:"code_execution"`
	ContextManagement struct {
		ClearThinking20251015 support `json:"clear_thinking_20251015"`
		ClearToolUses20250919 support `json:"clear_tool_uses_20250919"`
		Compact20260112       support `json:"compact_20260112"`
		Supported             bool    `json:"supported"`
	} `json:"context_management"`
	Effort struct {
		High      support `json:"high"`
		Low       support `json:"low"`
		Max       support `json:"max"`
		Medium    support `json:"medium"`
		Supported bool    `json:"supported"`
		Xhigh     support `json:"xhigh"`
	} `json:"effort"`
	ImageInput  support `json:"image_input"`
	PDFInput    support `json:"pdf_input"`
	ServerTools struct {
		CodeExecution support `json:"code_execution"`
		Supported     bool    `json:"supported"`
		WebSearch     support `json:"web_search"`
	} `json:"server_tools"`
	StructuredOutputs support `json:"structured_outputs"`
	Thinking          struct {
		Supported bool `json:"supported"`
		Types     struct {
			Adaptive     support `json:"adaptive"`
			BetweenTools support `json:"between_tools"`
			Disabled     support `json:"disabled"`
			Enabled      support `json:"enabled"`
		} `json:"types"`
	} `json:"thinking"`
}

// AnthropicList returns the JSON of GET /v1/models for an Anthropic client:
// {"data": [...], "has_more": false, "first_id": …, "last_id": …}, one page
// holding every entry of List, in the same order.
func (l *List) AnthropicList() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refresh()
	l.refreshAnthropic()
	return l.aList
}

// AnthropicGet returns the JSON of GET /v1/models/{id} for an Anthropic
// client, false when id is unknown (the same ids as Get).
func (l *List) AnthropicGet(id string) ([]byte, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refresh()
	l.refreshAnthropic()
	b, ok := l.aItems[id]
	return b, ok
}

// refreshAnthropic builds the Anthropic bodies of the current entries, on
// first use after a snapshot change: OpenAI clients never pay for them.
// Caller holds mu, after refresh.
func (l *List) refreshAnthropic() {
	if l.aList != nil {
		return
	}
	page := anthropicPage{Data: make([]anthropicModel, 0, len(l.entries))}
	l.aItems = make(map[string][]byte, len(l.entries))
	for _, e := range l.entries {
		m := anthropicEntry(e)
		page.Data = append(page.Data, m)
		l.aItems[e.ID], _ = json.Marshal(m)
	}
	if n := len(l.entries); n > 0 {
		page.FirstID, page.LastID = &l.entries[0].ID, &l.entries[n-1].ID
	}
	l.aList, _ = json.Marshal(page)
}

func anthropicEntry(e Entry) anthropicModel {
	m := anthropicModel{
		Type:        "model",
		ID:          e.ID,
		DisplayName: e.ID,
		CreatedAt:   time.Unix(e.Created, 0).UTC().Format(time.RFC3339),
		Lifecycle:   "active",
	}
	if e.AliasOf != "" {
		m.DisplayName = e.ID + " (" + e.AliasOf + ")"
	}
	if e.Limit != nil {
		m.MaxInputTokens = cmpOr(e.Limit.Input, e.Limit.Context)
		m.MaxTokens = cmpOr(e.Limit.Output, e.Limit.Context)
	}
	c := &m.Capabilities
	c.ImageInput.Supported = slices.Contains(e.Capabilities, "vision")
	// Thinking is switched with the chat template's enable_thinking, which
	// only a reasoning model honours; "disabled" is accepted by every model.
	thinks := slices.Contains(e.Capabilities, "reasoning")
	c.Thinking.Supported = thinks
	c.Thinking.Types.Enabled.Supported = thinks
	c.Thinking.Types.Adaptive.Supported = thinks
	c.Thinking.Types.Disabled.Supported = true
	return m
}

func cmpOr(a, b int64) int64 {
	if a != 0 {
		return a
	}
	return b
}
