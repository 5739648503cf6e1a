// Package config loads cortex-extproc.toml (contract.md) through Viper:
// TOML, YAML or JSON by extension, CORTEX_-prefixed environment overrides
// with sections joined by "__", Go durations.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
)

// Config is the whole service configuration.
type Config struct {
	// ModelsConfig is the catalogue path, relative to the config file's folder.
	ModelsConfig string         `mapstructure:"models_config"`
	ExtProc      ExtProc        `mapstructure:"extproc"`
	Admin        Admin          `mapstructure:"admin"`
	Poll         Poll           `mapstructure:"poll"`
	ColdLoad     ColdLoad       `mapstructure:"cold_load"`
	Upstream     Upstream       `mapstructure:"upstream"`
	Catalogue    CatalogueWatch `mapstructure:"catalogue"`
	Log          Log            `mapstructure:"log"`
	Neurons      []Neuron       `mapstructure:"neurons"`

	// File is the config file read ("" for embedded defaults); not a key.
	File string `mapstructure:"-"`
}

// ExtProc is the gRPC listener Envoy talks to.
type ExtProc struct {
	Listen string `mapstructure:"listen"`
	// MaxMessageTimeout must equal Envoy's ext_proc max_message_timeout: it
	// caps the override_message_timeout sent before a cold-load wait.
	MaxMessageTimeout time.Duration `mapstructure:"max_message_timeout"`
	// MaxRequestBytes is the largest body accepted; larger answers 413. Keep
	// it equal to Envoy's buffer limit. The gRPC receive limit is set above it.
	MaxRequestBytes int    `mapstructure:"max_request_bytes"`
	TLSCertFile     string `mapstructure:"tls_cert_file"`
	TLSKeyFile      string `mapstructure:"tls_key_file"`
	ClientCAFile    string `mapstructure:"client_ca_file"`
	// DrainTimeout bounds the graceful stop on SIGTERM.
	DrainTimeout time.Duration `mapstructure:"drain_timeout"`
}

// Admin is the HTTP listener for /metrics, /healthz, /readyz, /debug/fleet.
type Admin struct {
	Listen string `mapstructure:"listen"`
}

// Poll configures the fleet poller.
type Poll struct {
	Interval         time.Duration `mapstructure:"interval"`
	Timeout          time.Duration `mapstructure:"timeout"`
	FailureThreshold int           `mapstructure:"failure_threshold"`
}

// ColdLoad configures catalogue cold loads.
type ColdLoad struct {
	Timeout         time.Duration `mapstructure:"timeout"`
	MaxEvictions    int           `mapstructure:"max_evictions"`
	MaxWaiters      int           `mapstructure:"max_waiters"`
	FailureCooldown time.Duration `mapstructure:"failure_cooldown"`
}

// Upstream says how the chosen neuron is handed to Envoy.
type Upstream struct {
	Mode          string `mapstructure:"mode"` // cluster_header | original_dst
	ClusterHeader string `mapstructure:"cluster_header"`
}

// CatalogueWatch configures the reload backstop.
type CatalogueWatch struct {
	// PollInterval is the content-hash poll that catches edits fsnotify misses.
	PollInterval time.Duration `mapstructure:"poll_interval"`
}

// Log configures log/slog.
type Log struct {
	Level  string `mapstructure:"level"`  // debug | info | warn | error
	Format string `mapstructure:"format"` // auto | json | text
}

// Neuron is one [[neurons]] entry, as in the existing cortex.toml.
type Neuron struct {
	Name     string `mapstructure:"name"`
	Endpoint string `mapstructure:"endpoint"`
	Cluster  string `mapstructure:"cluster"`
}

// ClusterName is the Envoy cluster, default "neuron-<name>".
func (n Neuron) ClusterName() string {
	if n.Cluster != "" {
		return n.Cluster
	}
	return "neuron-" + n.Name
}

// Upstream modes.
const (
	ModeClusterHeader = "cluster_header"
	ModeOriginalDst   = "original_dst"
)

func defaults(v *viper.Viper) {
	v.SetDefault("models_config", "")
	v.SetDefault("extproc.listen", "127.0.0.1:9002")
	v.SetDefault("extproc.max_message_timeout", time.Hour)
	v.SetDefault("extproc.max_request_bytes", 32<<20)
	v.SetDefault("extproc.tls_cert_file", "")
	v.SetDefault("extproc.tls_key_file", "")
	v.SetDefault("extproc.client_ca_file", "")
	v.SetDefault("extproc.drain_timeout", 30*time.Second)
	v.SetDefault("admin.listen", "127.0.0.1:9090")
	v.SetDefault("poll.interval", 10*time.Second)
	v.SetDefault("poll.timeout", 5*time.Second)
	v.SetDefault("poll.failure_threshold", 3)
	v.SetDefault("cold_load.timeout", 30*time.Minute)
	v.SetDefault("cold_load.max_evictions", 3)
	v.SetDefault("cold_load.max_waiters", 10000)
	v.SetDefault("cold_load.failure_cooldown", time.Minute)
	v.SetDefault("upstream.mode", ModeClusterHeader)
	v.SetDefault("upstream.cluster_header", "x-cortex-cluster")
	v.SetDefault("catalogue.poll_interval", 30*time.Second)
	v.SetDefault("log.level", "info")
	v.SetDefault("log.format", "auto")
}

// Result is a loaded config plus what was found wrong with it.
type Result struct {
	Config Config
	// Unknown lists keys the file sets that cortex-extproc does not know:
	// an error for validate, a warning for serve.
	Unknown []string
}

// Load reads path ("" = embedded defaults only) and applies CORTEX_
// environment overrides. The error names the file and what to fix.
func Load(path string) (Result, error) {
	v := viper.NewWithOptions(viper.KeyDelimiter("."))
	defaults(v)
	v.SetEnvPrefix("CORTEX")
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "__"))
	v.AutomaticEnv()
	if path != "" {
		v.SetConfigFile(path)
		if err := v.ReadInConfig(); err != nil {
			return Result{}, fmt.Errorf("config %s: %w", path, err)
		}
	}
	var res Result
	dec := func(dc *mapstructure.DecoderConfig) {
		dc.DecodeHook = mapstructure.ComposeDecodeHookFunc(
			mapstructure.StringToTimeDurationHookFunc(),
			mapstructure.StringToSliceHookFunc(","),
		)
		dc.ErrorUnused = false
		dc.WeaklyTypedInput = true
	}
	if err := v.Unmarshal(&res.Config, dec); err != nil {
		return Result{}, fmt.Errorf("config %s: %w", displayPath(path), err)
	}
	res.Config.File = path
	if path != "" {
		res.Unknown = unknownKeys(v.AllSettings(), reflect.TypeOf(Config{}), "")
		if res.Config.ModelsConfig != "" && !filepath.IsAbs(res.Config.ModelsConfig) {
			res.Config.ModelsConfig = filepath.Join(filepath.Dir(path), res.Config.ModelsConfig)
		}
	}
	return res, nil
}

func displayPath(path string) string {
	if path == "" {
		return "(embedded defaults)"
	}
	return path
}

// unknownKeys walks the settings against the struct's mapstructure tags.
func unknownKeys(settings map[string]any, t reflect.Type, prefix string) []string {
	known := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("mapstructure")
		if tag == "" || tag == "-" {
			continue
		}
		known[tag] = f.Type
	}
	var out []string
	for k, val := range settings {
		ft, ok := known[k]
		if !ok {
			out = append(out, prefix+k)
			continue
		}
		switch sub := val.(type) {
		case map[string]any:
			if ft.Kind() == reflect.Struct {
				out = append(out, unknownKeys(sub, ft, prefix+k+".")...)
			}
		case []any:
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
				for i, item := range sub {
					if m, ok := item.(map[string]any); ok {
						out = append(out, unknownKeys(m, ft.Elem(), fmt.Sprintf("%s%s[%d].", prefix, k, i))...)
					}
				}
			}
		case []map[string]any:
			if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct {
				for i, m := range sub {
					out = append(out, unknownKeys(m, ft.Elem(), fmt.Sprintf("%s%s[%d].", prefix, k, i))...)
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// Problem is one thing wrong with the configuration, named by its key.
type Problem struct {
	Key     string
	Message string
}

func (p Problem) String() string { return p.Key + ": " + p.Message }

// Validate reports every problem in the config (not the catalogue).
func (c *Config) Validate() []Problem {
	var ps []Problem
	add := func(key, format string, args ...any) {
		ps = append(ps, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
	}
	if _, _, err := net.SplitHostPort(c.ExtProc.Listen); err != nil {
		add("extproc.listen", "%q is not host:port: %v", c.ExtProc.Listen, err)
	}
	if _, _, err := net.SplitHostPort(c.Admin.Listen); err != nil {
		add("admin.listen", "%q is not host:port: %v", c.Admin.Listen, err)
	}
	if c.ExtProc.MaxMessageTimeout <= 0 || c.ExtProc.MaxMessageTimeout > time.Hour {
		add("extproc.max_message_timeout", "%s is outside Envoy's range (0, 1h]; set it to Envoy's ext_proc max_message_timeout", c.ExtProc.MaxMessageTimeout)
	}
	if c.ExtProc.MaxRequestBytes <= 0 {
		add("extproc.max_request_bytes", "must be positive (Envoy's buffer limit, e.g. 33554432)")
	}
	if (c.ExtProc.TLSCertFile == "") != (c.ExtProc.TLSKeyFile == "") {
		add("extproc.tls_cert_file", "tls_cert_file and tls_key_file must be set together")
	}
	if c.ExtProc.ClientCAFile != "" && c.ExtProc.TLSCertFile == "" {
		add("extproc.client_ca_file", "mTLS needs tls_cert_file and tls_key_file too")
	}
	if c.Poll.Interval <= 0 {
		add("poll.interval", "must be a positive duration such as 10s")
	}
	if c.Poll.Timeout <= 0 {
		add("poll.timeout", "must be a positive duration such as 5s")
	}
	if c.Poll.FailureThreshold < 1 {
		add("poll.failure_threshold", "must be at least 1")
	}
	if c.ColdLoad.Timeout <= 0 {
		add("cold_load.timeout", "must be a positive duration such as 30m")
	}
	if c.ColdLoad.MaxEvictions < 0 {
		add("cold_load.max_evictions", "must be 0 or more")
	}
	if c.ColdLoad.MaxWaiters < 1 {
		add("cold_load.max_waiters", "must be at least 1")
	}
	if c.ColdLoad.Timeout > c.ExtProc.MaxMessageTimeout && c.ExtProc.MaxMessageTimeout > 0 {
		add("cold_load.timeout", "%s exceeds extproc.max_message_timeout %s: Envoy would cut the wait; requests get 503 when the Envoy budget runs out", c.ColdLoad.Timeout, c.ExtProc.MaxMessageTimeout)
	}
	switch c.Upstream.Mode {
	case ModeClusterHeader, ModeOriginalDst:
	default:
		add("upstream.mode", "%q is not one of cluster_header, original_dst", c.Upstream.Mode)
	}
	if c.Upstream.Mode == ModeClusterHeader && c.Upstream.ClusterHeader == "" {
		add("upstream.cluster_header", "must name the header Envoy's route reads (x-cortex-cluster)")
	}
	switch strings.ToLower(c.Log.Level) {
	case "debug", "info", "warn", "warning", "error":
	default:
		add("log.level", "%q is not one of debug, info, warn, error", c.Log.Level)
	}
	switch c.Log.Format {
	case "auto", "json", "text":
	default:
		add("log.format", "%q is not one of auto, json, text", c.Log.Format)
	}
	if c.File != "" && c.ModelsConfig == "" {
		add("models_config", "not set: point it at the catalogue (models.toml)")
	}
	if c.ModelsConfig != "" {
		if st, err := os.Stat(c.ModelsConfig); err != nil {
			add("models_config", "%v", err)
		} else if st.IsDir() {
			add("models_config", "%s is a directory; point it at the models.toml file", c.ModelsConfig)
		}
	}
	names := map[string]int{}
	clusters := map[string]int{}
	for i, n := range c.Neurons {
		key := fmt.Sprintf("neurons[%d]", i)
		if n.Name == "" {
			add(key+".name", "required")
		} else if j, dup := names[n.Name]; dup {
			add(key+".name", "duplicate name %q, first at neurons[%d]", n.Name, j)
		} else {
			names[n.Name] = i
		}
		if j, dup := clusters[n.ClusterName()]; dup && n.Name != "" {
			add(key+".cluster", "duplicate Envoy cluster %q, first at neurons[%d]", n.ClusterName(), j)
		} else {
			clusters[n.ClusterName()] = i
		}
		if err := checkEndpoint(n.Endpoint); err != nil {
			add(key+".endpoint", "%v", err)
		}
	}
	return ps
}

func checkEndpoint(s string) error {
	if s == "" {
		return errors.New("required, e.g. http://beast.internal:13131")
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q is not a URL: %v", s, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("%q: scheme must be http or https, e.g. http://beast.internal:13131", s)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("%q has no host", s)
	}
	return nil
}
