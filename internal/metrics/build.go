package metrics

import (
	"runtime"
	"runtime/debug"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

var build struct {
	sync.Mutex
	version, revision string
}

// SetBuild records the version and VCS revision that build_info reports
// (cmd/cortex-extproc sets those of its -ldflags). Without it, both come
// from the binary's embedded build information.
func SetBuild(version, revision string) {
	build.Lock()
	defer build.Unlock()
	build.version, build.revision = version, revision
}

// buildInfo is cortex_extproc_build_info: 1, labelled with the version,
// VCS revision and Go version, so a dashboard can tell replicas apart.
func buildInfo() prometheus.Collector {
	build.Lock()
	version, revision := build.version, build.revision
	build.Unlock()
	if info, ok := debug.ReadBuildInfo(); ok {
		if version == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
			version = info.Main.Version
		}
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && revision == "" {
				revision = s.Value
			}
		}
	}
	if version == "" {
		version = "dev"
	}
	if revision == "" {
		revision = "unknown"
	}
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: ns, Name: "build_info",
		Help:        "1, labelled with the version, VCS revision and Go version cortex-extproc was built from.",
		ConstLabels: prometheus.Labels{"version": version, "revision": revision, "goversion": runtime.Version()}},
		func() float64 { return 1 })
}
