package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
)

// The first SIGTERM starts the graceful shutdown (readiness off, then
// shutdown_delay); a second one skips the rest of the delay. The delay here
// is an hour, so only the second signal can end the run.
func TestSecondSignalSkipsShutdownDelay(t *testing.T) {
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	cfg := res.Config
	cfg.ExtProc.Listen, cfg.Admin.Listen = "127.0.0.1:0", "127.0.0.1:0"
	cfg.ExtProc.ShutdownDelay = time.Hour
	svc, err := service.New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ran := make(chan error, 1)
	go func() { ran <- runUntilSignalled(context.Background(), svc) }()
	select {
	case <-svc.Ready(): // Run has started, so the signals are being caught
	case err := <-ran:
		t.Fatalf("run ended before it was ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("not ready after 30s")
	}

	readyz := func() int {
		resp, err := http.Get("http://" + svc.AdminAddr() + "/readyz")
		if err != nil {
			t.Fatalf("/readyz: %v", err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	if err := syscall.Kill(syscall.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for readyz() != http.StatusServiceUnavailable {
		if time.Now().After(deadline) {
			t.Fatal("/readyz still 200 after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-ran:
		t.Fatalf("run ended inside an hour-long shutdown_delay after one signal: %v", err)
	default:
	}

	if err := syscall.Kill(syscall.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ran:
		if err != nil {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("a second SIGTERM did not end the shutdown delay")
	}
}
