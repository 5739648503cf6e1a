package service

import (
	"sync/atomic"

	"github.com/helexa/cortex-extproc/internal/config"
)

// anthropicRoutes answers, for the ext_proc server, whether a POST
// /v1/messages routed to a neuron is translated to a chat completion: by
// anthropic.translate as the service started, and each neuron's
// anthropic_native from the [[neurons]] in force (they reload live).
type anthropicRoutes struct {
	cfg atomic.Pointer[config.Config]
}

func newAnthropicRoutes(cfg config.Config) *anthropicRoutes {
	a := &anthropicRoutes{}
	a.cfg.Store(&cfg)
	return a
}

// setNeurons takes the [[neurons]] of a reload.
func (a *anthropicRoutes) setNeurons(ns []config.Neuron) {
	c := *a.cfg.Load()
	c.Neurons = ns
	a.cfg.Store(&c)
}

func (a *anthropicRoutes) translates(node string) bool { return a.cfg.Load().TranslatesAnthropic(node) }
