package metrics

import (
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// ReasonColdStart is the rate-limit key (and log_lines_dropped_total
// reason) of "routed after a cold start" lines; error lines use their
// apierr reason.
const ReasonColdStart = "cold_start"

// Per-request info lines: up to LogBurst at once per reason, then one per
// LogEvery (a token bucket per reason). An operator sees the first requests of any new failure at
// once, and a steady flood costs one line a second per reason.
const (
	LogBurst = 10
	LogEvery = time.Second
)

// MaxLogValue bounds a client-supplied value (x-request-id, traceparent,
// …) in a log line; longer ones are cut with a marker saying how long they
// were.
const MaxLogValue = 128

// BoundLogValue returns s, or its first MaxLogValue bytes (cut at a rune
// boundary) followed by "…[truncated, N bytes]" when it is longer.
func BoundLogValue(s string) string {
	if len(s) <= MaxLogValue {
		return s
	}
	cut := MaxLogValue
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…[truncated, " + strconv.Itoa(len(s)) + " bytes]"
}

// logLimiter is one token bucket per key. Keys are bounded (apierr reasons
// and cold_start), so the map is too.
type logLimiter struct {
	burst float64
	every time.Duration
	now   func() time.Time

	mu      sync.Mutex
	buckets map[string]*logBucket
}

type logBucket struct {
	tokens     float64
	last       time.Time
	suppressed int64 // dropped since the last line written
}

func newLogLimiter(burst int, every time.Duration, now func() time.Time) *logLimiter {
	return &logLimiter{burst: float64(burst), every: every, now: now, buckets: map[string]*logBucket{}}
}

// allow takes a token for key. When it is granted, suppressed is how many
// were refused since the previous grant (and is reset).
func (l *logLimiter) allow(key string) (ok bool, suppressed int64) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[key]
	if b == nil {
		b = &logBucket{tokens: l.burst, last: now}
		l.buckets[key] = b
	}
	if elapsed := now.Sub(b.last); elapsed > 0 {
		b.tokens = min(l.burst, b.tokens+float64(elapsed)/float64(l.every))
		b.last = now
	}
	if b.tokens < 1 {
		b.suppressed++
		return false, 0
	}
	b.tokens--
	suppressed, b.suppressed = b.suppressed, 0
	return true, suppressed
}
