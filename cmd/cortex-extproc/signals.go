package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/helexa/cortex-extproc/internal/service"
)

// runUntilSignalled runs svc until ctx ends or SIGTERM / Ctrl-C arrives,
// then lets it shut down gracefully (readiness off, shutdown_delay, drain).
// A second signal skips what is left of shutdown_delay: someone at a
// terminal, or a supervisor that is not behind a health-checking Envoy,
// need not wait for it.
func runUntilSignalled(ctx context.Context, svc *service.Service) error {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	ran := make(chan struct{})
	defer close(ran)
	go func() {
		select {
		case <-sigs:
			stop()
		case <-runCtx.Done():
		case <-ran:
			return
		}
		select {
		case <-sigs:
			svc.SkipShutdownDelay()
		case <-ran:
		}
	}()
	return svc.Run(runCtx)
}
