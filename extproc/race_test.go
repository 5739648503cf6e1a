//go:build race

package extproc

// raceEnabled: the race detector makes sync.Pool drop items at random, so
// pooled receive buffers are reallocated and byte counts mean nothing.
const raceEnabled = true
