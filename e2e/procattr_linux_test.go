package e2e

import "syscall"

// procAttr kills child processes when the test binary dies, so a test
// that times out or panics leaves no sims or cortex-extproc behind.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
