package deploy

import (
	"bufio"
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/config"
	"github.com/helexa/cortex-extproc/internal/service"
)

// Every supervisor we ship waits for cortex-extproc's whole shutdown
// (shutdown_delay + drain_timeout + service.ShutdownOverhead) before it
// kills the process: otherwise requests held for a cold load lose their
// answer. (Kubernetes: TestKubernetesManifestsAgree.)

func TestComposeStopGracePeriodCoversTheShutdown(t *testing.T) {
	svc := loadCompose(t).Services["cortex-extproc"]
	cfgPath := svc.hostPath("/etc/cortex-extproc/cortex-extproc.toml")
	if cfgPath == "" {
		t.Fatal("docker-compose.yaml mounts no cortex-extproc.toml")
	}
	cfg := parseServiceConfig(t, cfgPath, readFile(t, cfgPath))
	grace, err := time.ParseDuration(svc.StopGracePeriod)
	if err != nil {
		t.Fatalf("cortex-extproc stop_grace_period %q (Docker's default is 10s): %v", svc.StopGracePeriod, err)
	}
	if need := shutdownBudget(t, cfg); grace < need {
		t.Errorf("cortex-extproc stop_grace_period %s < shutdown_delay + drain_timeout + %s = %s", grace, service.ShutdownOverhead, need)
	}
}

func TestSystemdTimeoutStopCoversTheShutdown(t *testing.T) {
	unit := readFile(t, filepath.Join("systemd", "cortex-extproc.service"))
	var stop time.Duration
	sc := bufio.NewScanner(bytes.NewReader(unit))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "TimeoutStopSec="); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("TimeoutStopSec=%s: write whole seconds", v)
			}
			stop = time.Duration(n) * time.Second
		}
	}
	// The unit runs the operator's config; hold it to the defaults.
	res, err := config.Load("")
	if err != nil {
		t.Fatal(err)
	}
	need := res.Config.ExtProc.ShutdownDelay + res.Config.ExtProc.DrainTimeout + service.ShutdownOverhead
	if stop < need {
		t.Errorf("TimeoutStopSec %s < the default shutdown_delay + drain_timeout + %s = %s", stop, service.ShutdownOverhead, need)
	}
}
