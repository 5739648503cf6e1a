package fleet

import (
	"context"
	"maps"
	"slices"
	"time"
)

// Dead neurons noticed from failed requests.
//
// A neuron that dies between two polls would keep being routed to until
// failure_threshold polls have failed (30 s with the defaults), and every
// request for its models would get Envoy's 503 meanwhile. cortex-extproc
// sees each routed request fail (extproc.Options.UpstreamFailed) and calls
// Suspect; the owner then re-polls that node at once, and a failed re-poll
// marks it unhealthy without waiting for the threshold: the next request
// for its models goes to another replica, or is cold-loaded elsewhere.
//
// A failed request is a hint, not a verdict (a client that hangs up before
// the neuron answered looks the same from ext_proc), so only the neuron's
// own silence counts: a re-poll that answers clears the suspicion and
// changes nothing else. And it is cheap to ask: a storm of failures costs
// at most one re-poll in flight per node, and one per SuspectGap.

// msgSuspectUnhealthy is logged when a failed re-poll takes a node out.
const msgSuspectUnhealthy = "neuron unhealthy: suspect after a failed request, re-poll failed; no longer routing to it"

// Suspect reports that a request routed to node failed in a way that
// suggests the neuron is gone (Envoy could not reach it). It never blocks:
// the owner re-polls the node at once, unless a re-poll of it is in flight
// or started less than SuspectGap ago, or the node is already unhealthy
// (its regular polls bring it back) or not configured. A re-poll that
// fails marks the node unhealthy at once; one that answers is applied like
// any poll.
func (p *Poller) Suspect(node string) {
	p.suspectMu.Lock()
	p.suspects[node] = struct{}{}
	p.suspectMu.Unlock()
	select {
	case p.suspectWake <- struct{}{}:
	default: // the owner is already due to look
	}
}

// takeSuspects starts the re-polls Suspect asked for.
func (p *Poller) takeSuspects() {
	p.suspectMu.Lock()
	names := slices.Sorted(maps.Keys(p.suspects))
	clear(p.suspects)
	p.suspectMu.Unlock()
	started := false
	for _, name := range names {
		ns := p.nodes[name]
		if ns == nil || !ns.healthy || ns.suspect {
			continue
		}
		now := p.cfg.Now()
		if !ns.lastRepoll.IsZero() && now.Sub(ns.lastRepoll) < p.cfg.SuspectGap {
			continue
		}
		p.startRepoll(ns, now)
		started = true
	}
	if started {
		p.publish() // Node.Suspect
	}
}

func (p *Poller) startRepoll(ns *nodeState, now time.Time) {
	p.seq++
	ns.suspect, ns.lastRepoll, ns.dirty = true, now, true
	in := ns.pollInput(p.seq)
	p.log.Debug("neuron suspect after a failed request; re-polling it now", "node", ns.cfg.Name)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		res := repollNode(p.runCtx, in, p.cfg.Timeout)
		select {
		case p.repolled <- res:
		case <-p.runCtx.Done():
		}
	}()
}

// repollNode asks /models first, the call that decides health: a dead
// neuron is known after one call (one timeout at worst) rather than after
// /health and /models both failed. If it answers, the node gets a full
// poll, so the snapshot is as fresh as after a round.
func repollNode(ctx context.Context, in pollInput, timeout time.Duration) pollResult {
	at := time.Now()
	cctx, cancel := context.WithTimeout(ctx, timeout)
	_, err := in.api.Models(cctx)
	cancel()
	if err != nil {
		return pollResult{key: in.key, seq: in.seq, modelsAt: at, modelsErr: err, probeFailed: true}
	}
	return pollNode(ctx, in, timeout)
}

// finishRepoll applies a re-poll: a failed probe takes the node out at
// once; anything else is applied as a poll.
func (p *Poller) finishRepoll(res pollResult) {
	ns, ok := p.nodes[res.key.cfg.Name]
	if !ok || ns != res.key {
		return // removed or replaced by a config reload meanwhile
	}
	ns.suspect, ns.dirty = false, true
	if res.seq < ns.appliedSeq {
		// A poll started after this re-poll already answered: it is
		// the truth now.
		p.publish()
		return
	}
	if !res.probeFailed {
		p.apply(ns, res)
		p.log.Debug("neuron answered its re-poll; suspicion cleared", "node", ns.cfg.Name, "healthy", ns.healthy)
		p.publish()
		return
	}
	name, msg := ns.cfg.Name, res.modelsErr.Error()
	ns.appliedSeq = res.seq
	ns.lastPoll = time.Now()
	ns.failures++
	ns.lastErr = "suspect after a failed request, re-poll failed: " + msg
	if ns.healthy {
		ns.healthy = false
		p.log.Warn(msgSuspectUnhealthy, "node", name, "error", msg, "consecutive_failures", ns.failures)
		p.fireHealth(name, false)
		if p.cfg.OnSuspectUnhealthy != nil {
			p.cfg.OnSuspectUnhealthy(name)
		}
	}
	if p.cfg.OnPoll != nil {
		p.cfg.OnPoll(name, false)
	}
	p.publish()
}
