package benchtool

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
)

// ParseSize reads a body size: "2KB", "64KiB", "1MB", "512" (bytes).
// K and M are binary (1024-based), as in "a 1 MB body".
func ParseSize(s string) (int, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	mult := 1
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"KIB", 1 << 10}, {"MIB", 1 << 20}, {"KB", 1 << 10}, {"MB", 1 << 20}, {"K", 1 << 10}, {"M", 1 << 20}, {"B", 1}} {
		if num, ok := strings.CutSuffix(t, u.suffix); ok {
			t, mult = strings.TrimSpace(num), u.mult
			break
		}
	}
	n, err := strconv.Atoi(t)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("body size %q: want a positive size such as 2KB, 64KB or 1MB", s)
	}
	return n * mult, nil
}

// FormatSize is the inverse of ParseSize for table labels.
func FormatSize(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.Itoa(n>>20) + " MB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.Itoa(n>>10) + " KB"
	}
	return strconv.Itoa(n) + " B"
}

// words make message text that looks like a prompt to a JSON scanner: mostly
// prose, some code, escaped newlines and quotes, and multi-byte UTF-8, so a
// parser walking the string meets the escapes it meets in real traffic.
var words = []string{
	"the", "model", "should", "answer", "with", "a", "short", "summary", "of", "this",
	"function", "and", "explain", "why", "it", "returns", "an", "error", "when", "input",
	"is", "empty", "context", "window", "tokens", "please", "refactor", "code", "below",
	`\n`, `\n\n`, `\"quoted\"`, "func", "main()", "{", "}", "return", "nil", "if", "err",
	"!=", "café", "naïve", "日本語", "résumé", `\t`, "for", "i", ":=", "range", "items",
}

// ChatBody builds an OpenAI chat-completions request of exactly size bytes
// when size allows (a minimal body otherwise): "model" first, as many
// clients send it, then a messages array of long contents. Deterministic.
func ChatBody(model string, size int) []byte {
	m, _ := json.Marshal(model)
	buf := make([]byte, 0, size+64)
	buf = append(buf, `{"model":`...)
	buf = append(buf, m...)
	buf = append(buf, `,"stream":true,"max_tokens":1024,"temperature":0.7,"messages":[`...)
	return appendMessages(buf, size, `]}`)
}

// ChatBodyModelLast is ChatBody with "model" after the messages, where the
// OpenAI and Anthropic SDKs put it: a server that looks for "model" from
// the start of the body walks all of it first.
func ChatBodyModelLast(model string, size int) []byte {
	m, _ := json.Marshal(model)
	suffix := `],"model":` + string(m) + `}`
	buf := make([]byte, 0, size+64)
	buf = append(buf, `{"stream":true,"max_tokens":1024,"temperature":0.7,"messages":[`...)
	return appendMessages(buf, size, suffix)
}

// appendMessages fills buf with messages up to size bytes in all, then
// appends suffix (which closes the messages array and the object).
func appendMessages(buf []byte, size int, suffix string) []byte {
	const maxChunk = 16 << 10 // one message's content at most
	roles := []string{"system", "user", "assistant"}
	w := 0 // word cursor, so every body of a size is the same
	for i := 0; ; i++ {
		role := roles[0]
		if i > 0 {
			role = roles[1+(i-1)%2]
		}
		open := `{"role":"` + role + `","content":"`
		closing := `"}`
		sep := 0
		if i > 0 {
			sep = 1
		}
		room := size - len(buf) - sep - len(open) - len(closing) - len(suffix)
		if room <= 0 && i > 0 {
			break
		}
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, open...)
		n := min(max(room, 2), maxChunk)
		if i == 0 {
			n = min(n, 1<<10) // a realistic system prompt, then the conversation
		}
		end := len(buf) + n
		for len(buf) < end {
			word := words[w%len(words)]
			w++
			if len(buf)+len(word)+1 > end {
				// Fill with plain letters so an escape or a UTF-8
				// sequence is never cut.
				for len(buf) < end {
					buf = append(buf, 'x')
				}
				break
			}
			buf = append(buf, word...)
			buf = append(buf, ' ')
		}
		buf = append(buf, closing...)
		if room <= maxChunk && i > 0 {
			break
		}
	}
	return append(buf, suffix...)
}
