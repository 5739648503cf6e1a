// Command neuron-sim serves a simulated neuron (the GPU-host agent
// cortex-extproc routes to): the neuron management API and streaming
// OpenAI-shaped inference (tool calls and images included; Anthropic's
// /v1/messages only with --anthropic-native), with simulated VRAM, load
// latency and queues. See package neuronsim and `neuron-sim -h`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/helexa/cortex-extproc/internal/neuronsim"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "neuron-sim:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	cmd, err := neuronsim.ParseCommandLine(args, os.Stderr)
	if err != nil {
		return err
	}
	if cmd.ShowVersion {
		fmt.Println("neuron-sim", version)
		return nil
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	opts := cmd.Options
	opts.Logger = log
	if cmd.CataloguePath != "" {
		data, err := os.ReadFile(cmd.CataloguePath)
		if err != nil {
			return fmt.Errorf("--catalogue: %w", err)
		}
		sizes, caps, err := neuronsim.CatalogueInfo(data)
		if err != nil {
			return fmt.Errorf("--catalogue %s: %w", cmd.CataloguePath, err)
		}
		// Explicit --sizes win over the catalogue.
		for id, mb := range opts.Sizes {
			sizes[id] = mb
		}
		opts.Sizes, opts.Capabilities = sizes, caps
	}
	sim, err := neuronsim.New(opts)
	if err != nil {
		return err
	}
	defer sim.Close()

	ln, err := net.Listen("tcp", cmd.Listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	srv := &http.Server{Handler: sim, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	log.Info("neuron-sim serving", "node", sim.Name(), "listen", ln.Addr().String(), "version", version)

	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	log.Info("neuron-sim shutting down", "node", sim.Name())
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return srv.Shutdown(shutdownCtx)
}
