package config

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// write puts content in dir/name and returns its path.
func write(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// catalogueDir is a folder holding an (empty but present) models.toml, so
// models_config validates.
func catalogueDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, "models.toml", "# no models\n")
	return dir
}

func TestDefaultsAreTheContractValues(t *testing.T) {
	res, err := Load("")
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		ExtProc: ExtProc{
			Listen:            "127.0.0.1:9002",
			MaxMessageTimeout: time.Hour,
			MaxRequestBytes:   33554432,
			ShutdownDelay:     20 * time.Second,
			DrainTimeout:      30 * time.Second,
		},
		Admin:     Admin{Listen: "127.0.0.1:9090"},
		Poll:      Poll{Interval: 10 * time.Second, Timeout: 5 * time.Second, FailureThreshold: 3},
		ColdLoad:  ColdLoad{Timeout: 30 * time.Minute, MaxEvictions: 3, MaxWaiters: 10000, FailureCooldown: time.Minute},
		Upstream:  Upstream{Mode: ModeClusterHeader, ClusterHeader: "x-cortex-cluster"},
		Catalogue: CatalogueWatch{PollInterval: 30 * time.Second},
		Log:       Log{Level: "info", Format: "auto"},
		Anthropic: Anthropic{Translate: TranslateAlways},
	}
	if !reflect.DeepEqual(res.Config, want) {
		t.Errorf("defaults:\n got %+v\nwant %+v", res.Config, want)
	}
	if ps := res.Config.Validate(); len(ps) != 0 {
		t.Errorf("the embedded defaults must run as they are; Validate: %v", ps)
	}
	if len(res.Unknown) != 0 {
		t.Errorf("Unknown = %v for no file", res.Unknown)
	}
}

// The same settings in each format give the same Config.
func TestFormatByExtension(t *testing.T) {
	dir := catalogueDir(t)
	files := map[string]string{
		"c.toml": `
models_config = "models.toml"
[extproc]
listen = "0.0.0.0:9102"
max_request_bytes = 1048576
[poll]
interval = "2s"
failure_threshold = 5
[cold_load]
timeout = "10m"
max_evictions = 1
[upstream]
mode = "original_dst"
[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"
[[neurons]]
name = "rig2"
endpoint = "http://rig2.internal:13131"
cluster = "rig2-cluster"
`,
		"c.yaml": `
models_config: models.toml
extproc:
  listen: 0.0.0.0:9102
  max_request_bytes: 1048576
poll:
  interval: 2s
  failure_threshold: 5
cold_load:
  timeout: 10m
  max_evictions: 1
upstream:
  mode: original_dst
neurons:
  - name: beast
    endpoint: http://beast.internal:13131
  - name: rig2
    endpoint: http://rig2.internal:13131
    cluster: rig2-cluster
`,
		"c.json": `{
  "models_config": "models.toml",
  "extproc": {"listen": "0.0.0.0:9102", "max_request_bytes": 1048576},
  "poll": {"interval": "2s", "failure_threshold": 5},
  "cold_load": {"timeout": "10m", "max_evictions": 1},
  "upstream": {"mode": "original_dst"},
  "neurons": [
    {"name": "beast", "endpoint": "http://beast.internal:13131"},
    {"name": "rig2", "endpoint": "http://rig2.internal:13131", "cluster": "rig2-cluster"}
  ]
}`,
	}
	files["c.yml"] = files["c.yaml"]
	for name, content := range files {
		t.Run(name, func(t *testing.T) {
			path := write(t, dir, name, content)
			res, err := Load(path)
			if err != nil {
				t.Fatal(err)
			}
			c := res.Config
			if c.File != path || c.ModelsConfig != filepath.Join(dir, "models.toml") {
				t.Errorf("File %q, ModelsConfig %q", c.File, c.ModelsConfig)
			}
			if c.ExtProc.Listen != "0.0.0.0:9102" || c.ExtProc.MaxRequestBytes != 1048576 {
				t.Errorf("extproc = %+v", c.ExtProc)
			}
			if c.ExtProc.MaxMessageTimeout != time.Hour {
				t.Errorf("an unset key must keep its default; max_message_timeout = %s", c.ExtProc.MaxMessageTimeout)
			}
			if c.Poll.Interval != 2*time.Second || c.Poll.FailureThreshold != 5 || c.Poll.Timeout != 5*time.Second {
				t.Errorf("poll = %+v", c.Poll)
			}
			if c.ColdLoad.Timeout != 10*time.Minute || c.ColdLoad.MaxEvictions != 1 {
				t.Errorf("cold_load = %+v", c.ColdLoad)
			}
			if c.Upstream.Mode != ModeOriginalDst {
				t.Errorf("upstream.mode = %q", c.Upstream.Mode)
			}
			want := []Neuron{
				{Name: "beast", Endpoint: "http://beast.internal:13131"},
				{Name: "rig2", Endpoint: "http://rig2.internal:13131", Cluster: "rig2-cluster"},
			}
			if !reflect.DeepEqual(c.Neurons, want) {
				t.Errorf("neurons = %+v", c.Neurons)
			}
			if c.Neurons[0].ClusterName() != "neuron-beast" || c.Neurons[1].ClusterName() != "rig2-cluster" {
				t.Errorf("cluster names %q %q", c.Neurons[0].ClusterName(), c.Neurons[1].ClusterName())
			}
			if ps := c.Validate(); len(ps) != 0 {
				t.Errorf("Validate: %v", ps)
			}
			if len(res.Unknown) != 0 {
				t.Errorf("Unknown: %v", res.Unknown)
			}
		})
	}
}

func TestUnsupportedExtension(t *testing.T) {
	path := write(t, t.TempDir(), "cortex.conf", "listen = 1\n")
	_, err := Load(path)
	var le *LoadError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), ".toml, .yaml, .yml or .json") || le.File != path {
		t.Fatalf("err = %v", err)
	}
}

func TestMissingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope.toml")
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("err = %v", err)
	}
}

func TestEnvironmentOverrides(t *testing.T) {
	dir := catalogueDir(t)
	path := write(t, dir, "c.toml", `
models_config = "models.toml"
[extproc]
listen = "127.0.0.1:1"
[poll]
interval = "9s"
[cold_load]
timeout = "9m"
`)
	t.Setenv("CORTEX_EXTPROC__LISTEN", "0.0.0.0:9002")
	t.Setenv("CORTEX_POLL__INTERVAL", "2s")
	t.Setenv("CORTEX_POLL__FAILURE_THRESHOLD", "7")
	// The underscore inside cold_load must not be taken for a separator.
	t.Setenv("CORTEX_COLD_LOAD__TIMEOUT", "12m")
	t.Setenv("CORTEX_COLD_LOAD__MAX_EVICTIONS", "0")
	t.Setenv("CORTEX_UPSTREAM__CLUSTER_HEADER", "x-other")
	// One underscore where two are needed: overrides nothing, reported.
	t.Setenv("CORTEX_ADMIN_LISTEN", "0.0.0.0:1")

	res, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	c := res.Config
	if c.ExtProc.Listen != "0.0.0.0:9002" {
		t.Errorf("extproc.listen = %q, want the environment's", c.ExtProc.Listen)
	}
	if c.Poll.Interval != 2*time.Second || c.Poll.FailureThreshold != 7 {
		t.Errorf("poll = %+v", c.Poll)
	}
	if c.ColdLoad.Timeout != 12*time.Minute || c.ColdLoad.MaxEvictions != 0 {
		t.Errorf("cold_load = %+v", c.ColdLoad)
	}
	if c.Upstream.ClusterHeader != "x-other" {
		t.Errorf("upstream.cluster_header = %q", c.Upstream.ClusterHeader)
	}
	if c.Admin.Listen != "127.0.0.1:9090" {
		t.Errorf("admin.listen = %q: CORTEX_ADMIN_LISTEN must not apply", c.Admin.Listen)
	}
	if !slices.Contains(res.UnknownEnv, "CORTEX_ADMIN_LISTEN") {
		t.Errorf("UnknownEnv = %v, want CORTEX_ADMIN_LISTEN", res.UnknownEnv)
	}
	for _, known := range []string{"CORTEX_EXTPROC__LISTEN", "CORTEX_COLD_LOAD__TIMEOUT"} {
		if slices.Contains(res.UnknownEnv, known) {
			t.Errorf("UnknownEnv lists %s, which applies", known)
		}
	}

	// Without a file too.
	res, err = Load("")
	if err != nil || res.Config.ColdLoad.Timeout != 12*time.Minute {
		t.Errorf("no file: cold_load.timeout = %s, err %v", res.Config.ColdLoad.Timeout, err)
	}

	t.Setenv("CORTEX_POLL__INTERVAL", "soon")
	_, err = Load(path)
	if err == nil || !strings.Contains(err.Error(), `poll.interval: "soon" is not a duration`) {
		t.Errorf("a bad environment value: err = %v", err)
	}
}

func TestEnvName(t *testing.T) {
	for key, want := range map[string]string{
		"extproc.listen":    "CORTEX_EXTPROC__LISTEN",
		"cold_load.timeout": "CORTEX_COLD_LOAD__TIMEOUT",
		"models_config":     "CORTEX_MODELS_CONFIG",
	} {
		if got := EnvName(key); got != want {
			t.Errorf("EnvName(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestDurations(t *testing.T) {
	dir := catalogueDir(t)
	res, err := Load(write(t, dir, "ok.toml", `
models_config = "models.toml"
[poll]
interval = "1m30s"
timeout = "250ms"
[extproc]
drain_timeout = 0
`))
	if err != nil {
		t.Fatal(err)
	}
	if res.Config.Poll.Interval != 90*time.Second || res.Config.Poll.Timeout != 250*time.Millisecond || res.Config.ExtProc.DrainTimeout != 0 {
		t.Errorf("poll %+v, drain_timeout %s", res.Config.Poll, res.Config.ExtProc.DrainTimeout)
	}

	for name, tc := range map[string]struct{ content, want string }{
		"bare number toml": {"[poll]\ninterval = 10\n", `poll.interval: 10 has no unit; write a Go duration string such as "10s"`},
		"bare number json": {`{"cold_load": {"timeout": 30}}`, `cold_load.timeout: 30 has no unit`},
		"bare number yaml": {"catalogue:\n  poll_interval: 30\n", `catalogue.poll_interval: 30 has no unit`},
		"not a duration":   {"[poll]\ntimeout = \"5 seconds\"\n", `poll.timeout: "5 seconds" is not a duration`},
	} {
		t.Run(name, func(t *testing.T) {
			ext := ".toml"
			switch {
			case strings.HasSuffix(name, "json"):
				ext = ".json"
			case strings.HasSuffix(name, "yaml"):
				ext = ".yaml"
			}
			_, err := Load(write(t, t.TempDir(), "c"+ext, tc.content))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

func TestModelsConfigRelativeToConfigFolder(t *testing.T) {
	dir := t.TempDir()
	sub := filepath.Join(dir, "etc")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	res, err := Load(write(t, sub, "c.toml", `models_config = "catalogue/models.toml"`))
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(sub, "catalogue", "models.toml"); res.Config.ModelsConfig != want {
		t.Errorf("relative: %q, want %q", res.Config.ModelsConfig, want)
	}
	abs := filepath.Join(dir, "elsewhere.toml")
	res, err = Load(write(t, sub, "d.toml", `models_config = "`+abs+`"`))
	if err != nil {
		t.Fatal(err)
	}
	if res.Config.ModelsConfig != abs {
		t.Errorf("absolute: %q, want %q", res.Config.ModelsConfig, abs)
	}
}

func TestUnknownKeysWithTheirPath(t *testing.T) {
	for name, content := range map[string]string{
		"c.toml": `
models_config = "models.toml"
modles_config = "typo"
[poll]
intervall = "5s"
[[neurons]]
name = "beast"
endpoint = "http://beast:13131"
[[neurons]]
name = "rig2"
endpont = "http://rig2:13131"
[tracing]
enabled = true
`,
		"c.yaml": `
models_config: models.toml
modles_config: typo
poll:
  intervall: 5s
neurons:
  - name: beast
    endpoint: http://beast:13131
  - name: rig2
    endpont: http://rig2:13131
tracing:
  enabled: true
`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := catalogueDir(t)
			res, err := Load(write(t, dir, name, content))
			if err != nil {
				t.Fatalf("unknown keys must not stop loading: %v", err)
			}
			want := []string{"modles_config", "neurons[1].endpont", "poll.intervall", "tracing"}
			if !reflect.DeepEqual(res.Unknown, want) {
				t.Errorf("Unknown = %v, want %v", res.Unknown, want)
			}
			// The known keys still apply.
			if res.Config.Neurons[0].Endpoint != "http://beast:13131" || res.Config.Neurons[1].Name != "rig2" {
				t.Errorf("neurons = %+v", res.Config.Neurons)
			}
		})
	}
}

func TestKeysAreCaseInsensitive(t *testing.T) {
	dir := catalogueDir(t)
	res, err := Load(write(t, dir, "c.toml", `
Models_Config = "models.toml"
[Poll]
Interval = "3s"
[[neurons]]
Name = "beast"
Endpoint = "http://beast:13131"
`))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Unknown) != 0 {
		t.Errorf("Unknown = %v: keys differing only in case are the same key", res.Unknown)
	}
	if res.Config.Poll.Interval != 3*time.Second || len(res.Config.Neurons) != 1 || res.Config.Neurons[0].Name != "beast" {
		t.Errorf("config = %+v", res.Config)
	}
}

func TestLoadErrorsNameTheKey(t *testing.T) {
	dir := catalogueDir(t)
	path := write(t, dir, "c.toml", `
models_config = "models.toml"
[poll]
interval = "banana"
failure_threshold = "three"
[cold_load]
timeout = [1]
[[neurons]]
name = "beast"
endpoint = "http://beast:13131"
`)
	res, err := Load(path)
	var le *LoadError
	if !errors.As(err, &le) {
		t.Fatalf("err = %v, want a *LoadError", err)
	}
	if le.File != path {
		t.Errorf("File = %q", le.File)
	}
	var keys []string
	for _, p := range le.Problems {
		keys = append(keys, p.Key)
	}
	slices.Sort(keys)
	if want := []string{"cold_load.timeout", "poll.failure_threshold", "poll.interval"}; !reflect.DeepEqual(keys, want) {
		t.Errorf("problem keys = %v, want %v (%v)", keys, want, le.Problems)
	}
	// The rest of the file is still decoded, so validate can go on.
	if len(res.Config.Neurons) != 1 || res.Config.ModelsConfig != filepath.Join(dir, "models.toml") {
		t.Errorf("partial config = %+v", res.Config)
	}

	_, err = Load(write(t, dir, "syntax.toml", "models_config = \"models.toml\"\n[poll\ninterval = \"2s\"\n"))
	if err == nil || !strings.Contains(err.Error(), "line 2, column") {
		t.Errorf("syntax error: %v, want the line", err)
	}
	_, err = Load(write(t, dir, "syntax.yaml", "poll:\n  interval: [\n"))
	if !errors.As(err, &le) || len(le.Problems) != 1 || !strings.Contains(err.Error(), "cannot parse") {
		t.Errorf("YAML syntax error: %v", err)
	}
}

// valid is a config every case of the Validate table starts from.
func valid(t *testing.T) Config {
	t.Helper()
	dir := catalogueDir(t)
	res, err := Load(write(t, dir, "c.toml", `
models_config = "models.toml"
[[neurons]]
name = "beast"
endpoint = "http://beast.internal:13131"
[[neurons]]
name = "rig2"
endpoint = "https://rig2.internal"
`))
	if err != nil {
		t.Fatal(err)
	}
	if ps := res.Config.Validate(); len(ps) != 0 {
		t.Fatalf("baseline has problems: %v", ps)
	}
	return res.Config
}

func TestValidateProblems(t *testing.T) {
	cases := []struct {
		name   string
		change func(c *Config)
		key    string
		msg    string
	}{
		{"extproc listen no port", func(c *Config) { c.ExtProc.Listen = "127.0.0.1" }, "extproc.listen", `"127.0.0.1" is not host:port`},
		{"extproc listen bad port", func(c *Config) { c.ExtProc.Listen = "127.0.0.1:grpc" }, "extproc.listen", `port "grpc" is not a number`},
		{"admin listen", func(c *Config) { c.Admin.Listen = "localhost:70000" }, "admin.listen", `port "70000" is not a number from 0 to 65535`},
		{"max_message_timeout zero", func(c *Config) { c.ExtProc.MaxMessageTimeout = 0 }, "extproc.max_message_timeout", "outside Envoy's range (0, 1h]"},
		{"max_message_timeout above 1h", func(c *Config) { c.ExtProc.MaxMessageTimeout = 2 * time.Hour }, "extproc.max_message_timeout", "2h0m0s is outside Envoy's range"},
		{"max_request_bytes", func(c *Config) { c.ExtProc.MaxRequestBytes = 0 }, "extproc.max_request_bytes", "must be positive"},
		{"cert without key", func(c *Config) { c.ExtProc.TLSCertFile = "/etc/tls.crt" }, "extproc.tls_key_file", "not set but tls_cert_file is"},
		{"key without cert", func(c *Config) { c.ExtProc.TLSKeyFile = "/etc/tls.key" }, "extproc.tls_cert_file", "not set but tls_key_file is"},
		{"client CA without TLS", func(c *Config) { c.ExtProc.ClientCAFile = "/etc/ca.pem" }, "extproc.client_ca_file", "mTLS needs tls_cert_file and tls_key_file"},
		{"drain_timeout negative", func(c *Config) { c.ExtProc.DrainTimeout = -time.Second }, "extproc.drain_timeout", "is negative"},
		{"shutdown_delay negative", func(c *Config) { c.ExtProc.ShutdownDelay = -time.Second }, "extproc.shutdown_delay", "-1s is negative; use 0 to close the listener at once"},
		{"poll interval", func(c *Config) { c.Poll.Interval = 0 }, "poll.interval", "must be a positive duration"},
		{"poll timeout", func(c *Config) { c.Poll.Timeout = -time.Second }, "poll.timeout", "must be a positive duration"},
		{"failure_threshold", func(c *Config) { c.Poll.FailureThreshold = 0 }, "poll.failure_threshold", "must be at least 1"},
		{"cold_load timeout", func(c *Config) { c.ColdLoad.Timeout = 0 }, "cold_load.timeout", "must be a positive duration"},
		{"cold_load above max_message_timeout", func(c *Config) { c.ColdLoad.Timeout = 61 * time.Minute }, "cold_load.timeout", "exceeds extproc.max_message_timeout 1h0m0s"},
		{"max_evictions", func(c *Config) { c.ColdLoad.MaxEvictions = -1 }, "cold_load.max_evictions", "must be 0 (never evict) or more"},
		{"max_waiters", func(c *Config) { c.ColdLoad.MaxWaiters = 0 }, "cold_load.max_waiters", "must be at least 1"},
		{"failure_cooldown", func(c *Config) { c.ColdLoad.FailureCooldown = -time.Minute }, "cold_load.failure_cooldown", "is negative"},
		{"upstream mode", func(c *Config) { c.Upstream.Mode = "header" }, "upstream.mode", `"header" is not one of cluster_header, original_dst`},
		{"cluster_header empty", func(c *Config) { c.Upstream.ClusterHeader = "" }, "upstream.cluster_header", "must name the header"},
		{"cluster_header upper case", func(c *Config) { c.Upstream.ClusterHeader = "X-Cortex-Cluster" }, "upstream.cluster_header", "is not a lowercase HTTP header name"},
		{"cluster_header pseudo-header", func(c *Config) { c.Upstream.ClusterHeader = ":authority" }, "upstream.cluster_header", "is not a lowercase HTTP header name"},
		{"catalogue poll", func(c *Config) { c.Catalogue.PollInterval = 0 }, "catalogue.poll_interval", "must be a positive duration"},
		{"log level", func(c *Config) { c.Log.Level = "verbose" }, "log.level", `"verbose" is not one of debug, info, warn, error`},
		{"log format", func(c *Config) { c.Log.Format = "logfmt" }, "log.format", `"logfmt" is not one of auto, json, text`},
		{"models_config unset", func(c *Config) { c.ModelsConfig = "" }, "models_config", "not set"},
		{"models_config missing", func(c *Config) { c.ModelsConfig = filepath.Join(filepath.Dir(c.ModelsConfig), "gone.toml") }, "models_config", "gone.toml does not exist"},
		{"models_config directory", func(c *Config) { c.ModelsConfig = filepath.Dir(c.ModelsConfig) }, "models_config", "is a directory"},
		{"neuron name", func(c *Config) { c.Neurons[1].Name = "" }, "neurons[1].name", "required"},
		{"neuron duplicate", func(c *Config) { c.Neurons[1].Name = "beast" }, "neurons[1].name", `duplicate name "beast", first at neurons[0]`},
		{"cluster duplicate", func(c *Config) { c.Neurons[1].Cluster = "neuron-beast" }, "neurons[1].cluster", `duplicate Envoy cluster "neuron-beast", first at neurons[0]`},
		{"endpoint missing", func(c *Config) { c.Neurons[0].Endpoint = "" }, "neurons[0].endpoint", "required, e.g. http://beast.internal:13131"},
		{"endpoint scheme", func(c *Config) { c.Neurons[0].Endpoint = "beast:13131" }, "neurons[0].endpoint", "scheme must be http or https"},
		{"endpoint host", func(c *Config) { c.Neurons[0].Endpoint = "http://:13131" }, "neurons[0].endpoint", "has no host"},
		{"endpoint query", func(c *Config) { c.Neurons[0].Endpoint = "http://beast:13131/?x=1" }, "neurons[0].endpoint", "must not have a query or fragment"},
		{"endpoint not a URL", func(c *Config) { c.Neurons[0].Endpoint = "http://beast:13131/%zz" }, "neurons[0].endpoint", "is not a URL"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := valid(t)
			tc.change(&c)
			ps := c.Validate()
			if len(ps) != 1 {
				t.Fatalf("got %d problems, want 1: %v", len(ps), ps)
			}
			if ps[0].Key != tc.key || !strings.Contains(ps[0].Message, tc.msg) {
				t.Errorf("got %q\nwant key %q, message containing %q", ps[0], tc.key, tc.msg)
			}
		})
	}

	// All problems come out together, not just the first.
	c := valid(t)
	c.ExtProc.Listen = "nowhere"
	c.Poll.Interval = 0
	c.Log.Level = "loud"
	c.ModelsConfig = ""
	c.Neurons[1].Endpoint = ""
	if ps := c.Validate(); len(ps) != 5 {
		t.Errorf("got %d problems, want 5: %v", len(ps), ps)
	}
}

func TestColdLoadSettingsForTheLoader(t *testing.T) {
	for _, tc := range []struct {
		max       int
		wantLimit int
	}{{0, -1}, {1, 1}, {3, 3}} {
		if got := (ColdLoad{MaxEvictions: tc.max}).EvictionLimit(); got != tc.wantLimit {
			t.Errorf("max_evictions %d → EvictionLimit %d, want %d", tc.max, got, tc.wantLimit)
		}
	}
	if got := (ColdLoad{}).Cooldown(); got >= 0 {
		t.Errorf("failure_cooldown 0 must mean no cool-down (negative for the loader), got %s", got)
	}
	if got := (ColdLoad{FailureCooldown: time.Minute}).Cooldown(); got != time.Minute {
		t.Errorf("Cooldown = %s", got)
	}
}

func TestChangedKeys(t *testing.T) {
	a := valid(t)
	if got := ChangedKeys(a, a); len(got) != 0 {
		t.Errorf("same config: %v", got)
	}
	b := a
	b.Neurons = append([]Neuron(nil), a.Neurons...)
	b.Neurons[1].Endpoint = "http://elsewhere:13131"
	b.Poll.Interval = time.Second
	b.ExtProc.Listen = "0.0.0.0:9002"
	b.ModelsConfig = "/other/models.toml"
	b.File = "/other/c.toml" // not a key
	want := []string{"extproc.listen", "models_config", "neurons", "poll.interval"}
	if got := ChangedKeys(a, b); !reflect.DeepEqual(got, want) {
		t.Errorf("ChangedKeys = %v, want %v", got, want)
	}
}

func TestLoadErrorMessage(t *testing.T) {
	e := &LoadError{File: "/etc/c.toml", Problems: []Problem{{Key: "poll.interval", Message: "bad"}, {Message: "whole file"}}}
	if got, want := e.Error(), "config /etc/c.toml: poll.interval: bad; whole file"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}

// The default shutdown_delay covers the shipped Envoy health check: 3
// failed checks 5 s apart, each up to 1 s, plus the margin.
func TestShutdownDelayDefaultFollowsEnvoyHealthCheck(t *testing.T) {
	if got := ShutdownDelayFor(EnvoyHealthCheckInterval, EnvoyHealthCheckTimeout, EnvoyUnhealthyThreshold); got != DefaultShutdownDelay {
		t.Errorf("ShutdownDelayFor(shipped health check) = %s, DefaultShutdownDelay = %s", got, DefaultShutdownDelay)
	}
	if DefaultShutdownDelay != 20*time.Second {
		t.Errorf("DefaultShutdownDelay = %s, want 20s (5s × 3 + 1s + 4s)", DefaultShutdownDelay)
	}
	if got := ShutdownDelayFor(10*time.Second, 2*time.Second, 2); got != 26*time.Second {
		t.Errorf("ShutdownDelayFor(10s, 2s, 2) = %s, want 26s", got)
	}
}

func TestShutdownDelayFromFileAndEnvironment(t *testing.T) {
	dir := catalogueDir(t)
	path := write(t, dir, "c.toml", "models_config = \"models.toml\"\n[extproc]\nshutdown_delay = \"45s\"\n")
	res, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if res.Config.ExtProc.ShutdownDelay != 45*time.Second || len(res.Unknown) != 0 {
		t.Errorf("shutdown_delay = %s (unknown keys %v), want 45s", res.Config.ExtProc.ShutdownDelay, res.Unknown)
	}

	t.Setenv("CORTEX_EXTPROC__SHUTDOWN_DELAY", "0s")
	if res, err = Load(path); err != nil {
		t.Fatal(err)
	}
	if res.Config.ExtProc.ShutdownDelay != 0 || len(res.UnknownEnv) != 0 {
		t.Errorf("with CORTEX_EXTPROC__SHUTDOWN_DELAY=0s: shutdown_delay = %s (unknown env %v), want 0", res.Config.ExtProc.ShutdownDelay, res.UnknownEnv)
	}

	t.Setenv("CORTEX_EXTPROC__SHUTDOWN_DELAY", "20")
	_, err = Load(path)
	if err == nil || !strings.Contains(err.Error(), `extproc.shutdown_delay: "20" is not a duration; write a Go duration such as "10s"`) {
		t.Errorf("CORTEX_EXTPROC__SHUTDOWN_DELAY=20: %v, want an error naming the key and the format", err)
	}
}

// anthropic.translate picks which neurons get /v1/messages translated to
// chat completions; anthropic_native means something only per neuron.
func TestAnthropicTranslation(t *testing.T) {
	dir := catalogueDir(t)
	load := func(body string) Config {
		t.Helper()
		res, err := Parse(write(t, dir, "c.toml", "models_config = \"models.toml\"\n"+body), []byte("models_config = \"models.toml\"\n"+body))
		if err != nil {
			t.Fatal(err)
		}
		return res.Config
	}
	neurons := "[[neurons]]\nname = \"a\"\nendpoint = \"http://a:13131\"\n[[neurons]]\nname = \"b\"\nendpoint = \"http://b:13131\"\nanthropic_native = true\n"
	c := load("[anthropic]\ntranslate = \"per_neuron\"\n" + neurons)
	if ps := c.Validate(); len(ps) != 0 {
		t.Fatalf("per_neuron: %v", ps)
	}
	if !c.TranslatesAnthropic("a") || c.TranslatesAnthropic("b") {
		t.Error("per_neuron: a (OpenAI only) must be translated, b (native) not")
	}
	c = load("[anthropic]\ntranslate = \"never\"\n")
	if c.TranslatesAnthropic("a") {
		t.Error("never: translated")
	}
	if c = load(""); !c.TranslatesAnthropic("a") {
		t.Error("default: not translated")
	}
	c = load(neurons)
	ps := c.Validate()
	if len(ps) != 1 || ps[0].Key != "neurons[1].anthropic_native" || !strings.Contains(ps[0].Message, "per_neuron") {
		t.Errorf("anthropic_native without per_neuron: %v", ps)
	}
	c = load("[anthropic]\ntranslate = \"sometimes\"\n")
	if ps := c.Validate(); len(ps) != 1 || ps[0].Key != "anthropic.translate" {
		t.Errorf("unknown translate value: %v", ps)
	}
}
