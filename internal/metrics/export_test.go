package metrics

import "time"

// SetLogClock replaces the log rate limiter's clock (before any Decided).
func (m *Metrics) SetLogClock(now func() time.Time) { m.limiter.now = now }
