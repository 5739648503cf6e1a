package neuronsim

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	toml "github.com/pelletier/go-toml/v2"
)

// Defaults of Options fields left zero.
const (
	DefaultMaxInFlight     = 4
	DefaultMaxQueueDepth   = 64
	DefaultVRAMMB          = 4000
	DefaultMaxPromptTokens = 32768
	DefaultEndpointHost    = "localhost"
)

// Options configure a Sim. Zero values take the defaults above.
type Options struct {
	// Name is the neuron's hostname in /discovery and the x-neuron-name
	// response header.
	Name string
	// Devices is the VRAM in MB of each GPU, by index.
	Devices []int64
	// Models are resident at start.
	Models []ModelSpec
	// Unloaded are listed with status "unloaded": known, not resident, and
	// reloaded lazily by the first inference request.
	Unloaded []ModelSpec
	// Sizes is the VRAM footprint of models the sim may be asked to load
	// (e.g. from the catalogue); others take DefaultVRAMMB. A model listed
	// here counts as locally known: /models/{id}/capabilities answers for it.
	Sizes map[string]int64
	// Capabilities per model id ("text", "vision", …); default ["text"].
	// A model listed here is also "locally known" for
	// /models/{id}/capabilities.
	Capabilities  map[string][]string
	DefaultVRAMMB int64

	LoadLatency time.Duration
	// LoadFailRate is the probability in [0,1] that a load fails.
	LoadFailRate float64
	// MaxInFlight requests are served concurrently per model; more wait in
	// its queue, up to MaxQueueDepth, beyond which the sim answers 503.
	MaxInFlight   int
	MaxQueueDepth int
	// TokenInterval spaces generated tokens (and so bounds throughput).
	TokenInterval time.Duration
	// CUDAUnavailable non-empty reports a broken GPU stack in /discovery
	// and refuses loads with 503 cuda_unavailable.
	CUDAUnavailable string
	// EndpointHost is the host /models/{id}/endpoint answers. The default,
	// localhost, is what a real neuron says, so that clients exercise their
	// loopback rewrite.
	EndpointHost string
	// EndpointPort is the port /models/{id}/endpoint answers; 0 uses the
	// port the request arrived on.
	EndpointPort    int
	MaxPromptTokens int64
	// Seed seeds the load-failure draw (0: seeded from the clock).
	Seed uint64
	// AnthropicNative serves Anthropic's POST /v1/messages natively, as
	// some inference servers do. Off (the default), the sim is an
	// OpenAI-only neuron: /v1/messages is recorded and answered 404, so
	// Anthropic clients need cortex-extproc to translate.
	AnthropicNative bool
	// LogRequests logs every request received (msg "request", method, uri)
	// at info level before it is handled, so that a test running the sim as
	// a process can tell what reached it.
	LogRequests bool
	Logger      *slog.Logger
}

// ModelSpec is a model and, optionally, its size and device placement.
type ModelSpec struct {
	ID     string
	VRAMMB int64 // 0: from Options.Sizes, else DefaultVRAMMB
	// Devices to place it on; empty: the device with the most free VRAM.
	Devices []int
}

// ParseDevices parses "24564,24564" (VRAM MB per device).
func ParseDevices(s string) ([]int64, error) {
	var out []int64
	for _, f := range splitList(s) {
		mb, err := strconv.ParseInt(f, 10, 64)
		if err != nil || mb <= 0 {
			return nil, fmt.Errorf("device VRAM %q is not a positive number of MB (want e.g. \"24564,24564\")", f)
		}
		out = append(out, mb)
	}
	return out, nil
}

// ParseModelSpecs parses "id[:MB][@dev[,dev…]],…", e.g.
// "Qwen/Qwen3-8B:17800,Qwen/Qwen3-32B:44000@0,1". A bare integer after a
// device list continues that list (model ids are never plain integers).
func ParseModelSpecs(s string) ([]ModelSpec, error) {
	var out []ModelSpec
	for _, f := range splitList(s) {
		if n, err := strconv.Atoi(f); err == nil {
			if len(out) == 0 || len(out[len(out)-1].Devices) == 0 {
				return nil, fmt.Errorf("%q: a bare number must continue a device list such as \"model@0,1\"", f)
			}
			out[len(out)-1].Devices = append(out[len(out)-1].Devices, n)
			continue
		}
		var spec ModelSpec
		if i := strings.LastIndex(f, "@"); i >= 0 {
			dev, err := strconv.Atoi(f[i+1:])
			if err != nil || dev < 0 {
				return nil, fmt.Errorf("%q: device after @ must be an index (e.g. \"model:17800@0,1\")", f)
			}
			spec.Devices = []int{dev}
			f = f[:i]
		}
		if i := strings.LastIndex(f, ":"); i >= 0 {
			if mb, err := strconv.ParseInt(f[i+1:], 10, 64); err == nil {
				if mb <= 0 {
					return nil, fmt.Errorf("%q: VRAM must be a positive number of MB", f)
				}
				spec.VRAMMB = mb
				f = f[:i]
			}
		}
		if f == "" {
			return nil, errors.New("empty model id in model list")
		}
		spec.ID = f
		out = append(out, spec)
	}
	return out, nil
}

// ParseSizes parses "id:MB,…".
func ParseSizes(s string) (map[string]int64, error) {
	specs, err := ParseModelSpecs(s)
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for _, sp := range specs {
		if sp.VRAMMB == 0 {
			return nil, fmt.Errorf("size of %q missing (want \"id:MB\")", sp.ID)
		}
		out[sp.ID] = sp.VRAMMB
	}
	return out, nil
}

// CatalogueInfo reads vram_mb and capabilities of every [[models]] entry of
// a cortex models.toml, so a sim can know the sizes of models it may be
// asked to cold-load. Other keys are ignored.
func CatalogueInfo(data []byte) (sizes map[string]int64, caps map[string][]string, err error) {
	var file struct {
		Models []struct {
			ID           string   `toml:"id"`
			VRAMMB       int64    `toml:"vram_mb"`
			Capabilities []string `toml:"capabilities"`
		} `toml:"models"`
	}
	if err := toml.Unmarshal(data, &file); err != nil {
		return nil, nil, fmt.Errorf("catalogue: %w", err)
	}
	sizes, caps = map[string]int64{}, map[string][]string{}
	for _, m := range file.Models {
		if m.VRAMMB > 0 {
			sizes[m.ID] = m.VRAMMB
		}
		if len(m.Capabilities) > 0 {
			caps[m.ID] = m.Capabilities
		}
	}
	return sizes, caps, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// Command is a parsed neuron-sim command line.
type Command struct {
	Listen string
	// CataloguePath, when set, is a models.toml whose sizes and
	// capabilities the caller reads with CatalogueInfo into Options.
	CataloguePath string
	ShowVersion   bool
	Options       Options
}

// ParseCommandLine parses neuron-sim's flags (stdlib flag syntax; -flag
// and --flag both work). Usage and errors go to out.
func ParseCommandLine(args []string, out io.Writer) (*Command, error) {
	fs := flag.NewFlagSet("neuron-sim", flag.ContinueOnError)
	fs.SetOutput(out)
	c := &Command{}
	o := &c.Options
	var devices, models, unloaded, sizes string
	fs.StringVar(&c.Listen, "listen", "127.0.0.1:13131", "address to serve the neuron API and inference on")
	fs.StringVar(&o.Name, "name", "sim", "neuron hostname (reported in /discovery and the x-neuron-name header)")
	fs.StringVar(&o.Name, "hostname", "sim", "same as --name")
	fs.StringVar(&devices, "devices", "24564", "VRAM in MB of each GPU, comma-separated")
	fs.StringVar(&models, "models", "", "models resident at start: id[:MB][@dev,dev],…")
	fs.StringVar(&unloaded, "unloaded", "", "models known but not resident (reloaded on first inference): id[:MB],…")
	fs.StringVar(&sizes, "sizes", "", "VRAM of models that may be loaded later: id:MB,…")
	fs.StringVar(&c.CataloguePath, "catalogue", "", "cortex models.toml to read model sizes and capabilities from")
	fs.Int64Var(&o.DefaultVRAMMB, "default-vram-mb", DefaultVRAMMB, "VRAM of a model whose size is not known")
	fs.DurationVar(&o.LoadLatency, "load-latency", 2*time.Second, "how long POST /models/load (and a lazy reload) takes")
	fs.Float64Var(&o.LoadFailRate, "load-fail-rate", 0, "probability in [0,1] that a load fails with 500")
	fs.IntVar(&o.MaxInFlight, "max-in-flight", DefaultMaxInFlight, "requests served concurrently per model; more are queued")
	fs.IntVar(&o.MaxQueueDepth, "max-queue-depth", DefaultMaxQueueDepth, "queued requests per model before answering 503")
	fs.DurationVar(&o.TokenInterval, "token-interval", 200*time.Millisecond, "time between generated tokens")
	fs.StringVar(&o.CUDAUnavailable, "cuda-unavailable", "", "report the GPU stack as broken with this reason (loads fail)")
	fs.StringVar(&o.EndpointHost, "endpoint-host", DefaultEndpointHost, "host answered by /models/{id}/endpoint")
	fs.IntVar(&o.EndpointPort, "endpoint-port", 0, "port answered by /models/{id}/endpoint (0: the port the request arrived on)")
	fs.Int64Var(&o.MaxPromptTokens, "max-prompt-tokens", DefaultMaxPromptTokens, "max_prompt_tokens in /discovery")
	fs.Uint64Var(&o.Seed, "seed", 0, "seed for the load-failure draw (0: random)")
	fs.BoolVar(&o.AnthropicNative, "anthropic-native", false, "also serve Anthropic's POST /v1/messages (off: 404, like an OpenAI-only neuron)")
	fs.BoolVar(&o.LogRequests, "log-requests", false, "log every request received (method and URI)")
	fs.BoolVar(&c.ShowVersion, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q (all settings are flags; see -h)", fs.Args())
	}
	var err error
	if o.Devices, err = ParseDevices(devices); err != nil {
		return nil, fmt.Errorf("--devices: %w", err)
	}
	if o.Models, err = ParseModelSpecs(models); err != nil {
		return nil, fmt.Errorf("--models: %w", err)
	}
	if o.Unloaded, err = ParseModelSpecs(unloaded); err != nil {
		return nil, fmt.Errorf("--unloaded: %w", err)
	}
	if o.Sizes, err = ParseSizes(sizes); err != nil {
		return nil, fmt.Errorf("--sizes: %w", err)
	}
	if o.LoadFailRate < 0 || o.LoadFailRate > 1 {
		return nil, fmt.Errorf("--load-fail-rate %v must be between 0 and 1", o.LoadFailRate)
	}
	return c, nil
}
