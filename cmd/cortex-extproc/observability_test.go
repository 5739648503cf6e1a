package main

import (
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/helexa/cortex-extproc/internal/config"
)

// JSON logs write durations as Go writes them, not as nanoseconds, and cut
// client-supplied values (request ids, trace headers) whichever line logs
// them.
func TestLoggerDurationsAndClientValues(t *testing.T) {
	for _, format := range []string{"json", "text"} {
		t.Run(format, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "log"))
			if err != nil {
				t.Fatal(err)
			}
			log, err := newLogger(config.Log{Level: "info", Format: format}, f)
			if err != nil {
				t.Fatal(err)
			}
			long := strings.Repeat("r", 1<<20)
			log.Info("cold load finished", "duration", 1500*time.Millisecond, "request_id", long, "traceparent", long, "model", "m")
			log.With("request_id", long).Info("client went away while waiting for a cold load", slog.Duration("timeout", 30*time.Second))
			f.Close()
			b, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			out := string(b)
			if len(out) > 4096 {
				t.Errorf("%d bytes logged for two lines with 1 MiB client values", len(out))
			}
			if strings.Count(out, "…[truncated, 1048576 bytes]") != 3 {
				t.Errorf("want the three client values truncated with a marker:\n%s", out)
			}
			if format == "json" {
				lines := strings.Split(strings.TrimSpace(out), "\n")
				var first, second map[string]any
				if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
					t.Fatal(err)
				}
				if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
					t.Fatal(err)
				}
				if first["duration"] != "1.5s" || second["timeout"] != "30s" {
					t.Errorf("durations logged as %v and %v, want \"1.5s\" and \"30s\"", first["duration"], second["timeout"])
				}
				if first["model"] != "m" {
					t.Errorf("model = %v: other values must pass unchanged", first["model"])
				}
			} else if !strings.Contains(out, "duration=1.5s") || !strings.Contains(out, "timeout=30s") {
				t.Errorf("text log:\n%s", out)
			}
		})
	}
}

// validate names each pinned_on entry that is not a configured neuron,
// together with the neurons the config has. It is a warning: one
// catalogue may serve gateways with different neurons.
func TestValidateWarnsAboutPinnedOnUnknownNeurons(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "models.toml", `
[[models]]
id = "Qwen/Qwen3-8B"
harness = "candle"
pinned_on = ["beast", "rgi2"]

[[models]]
id = "Big/Model"
harness = "candle"
pinned_on = ["ghost"]

[[models]]
id = "Fine/Model"
harness = "candle"
pinned_on = ["rig2"]
`)
	cfg := writeFile(t, dir, "cortex-extproc.toml", "models_config = \"models.toml\"\n[[neurons]]\nname = \"beast\"\nendpoint = \"http://beast:13131\"\n[[neurons]]\nname = \"rig2\"\nendpoint = \"http://rig2:13131\"\n")
	out, err := run(t, "validate", "--config", cfg)
	if err != nil {
		t.Fatalf("err %v (a warning must not fail validate); output:\n%s", err, out)
	}
	cat := filepath.Join(dir, "models.toml")
	for _, want := range []string{
		"warning: " + cat + `: models (id "Qwen/Qwen3-8B").pinned_on: "rgi2" is not a neuron in ` + cfg + " (it configures beast, rig2); cold loads use only the others",
		"warning: " + cat + `: models (id "Big/Model").pinned_on: "ghost" is not a neuron in ` + cfg + " (it configures beast, rig2), so Big/Model can never be cold-loaded",
		"ok: 2 neuron(s), 3 catalogue model(s)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "Fine/Model") {
		t.Errorf("a pinned_on naming a configured neuron was reported:\n%s", out)
	}

	// A catalogue checked alone has no neurons to compare with.
	out, err = run(t, "validate", "--catalogue", cat)
	if err != nil || strings.Contains(out, "pinned_on") {
		t.Errorf("--catalogue alone: err %v, output:\n%s", err, out)
	}
}

// route says why a request would fail with the reason /metrics counts.
func TestRouteShowsTheReason(t *testing.T) {
	cfg := standardFleet(t, "")
	out, err := run(t, "route", "--config", cfg, "--model", "nobody/has-this")
	if !errors.Is(err, errProblems) || !strings.Contains(out, "reason:     unknown_model\n") {
		t.Errorf("err %v, output:\n%s", err, out)
	}
	out, _ = run(t, "route", "--config", cfg, "--model", "nobody/has-this", "--json")
	var d decisionView
	if err := json.Unmarshal([]byte(out), &d); err != nil || d.Error == nil || d.Error.Reason != "unknown_model" {
		t.Errorf("route --json error %+v (%v):\n%s", d.Error, err, out)
	}
}
