//go:build !linux

package e2e

import "syscall"

// procAttr: without Pdeathsig, cleanup relies on stop() alone.
func procAttr() *syscall.SysProcAttr { return nil }
