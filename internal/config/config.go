// Package config loads cortex-extproc.toml (contract.md) through Viper:
// TOML, YAML or JSON by extension, CORTEX_-prefixed environment overrides
// with sections joined by "__", Go durations.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/pelletier/go-toml/v2"
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
	XDS          XDS            `mapstructure:"xds"`
	Anthropic    Anthropic      `mapstructure:"anthropic"`
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
	// ShutdownDelay is how long new streams are still served on SIGTERM
	// after readiness goes NOT_SERVING, so that Envoy's health checks take
	// the instance out before its listener closes.
	ShutdownDelay time.Duration `mapstructure:"shutdown_delay"`
	// DrainTimeout bounds the graceful stop that follows: open streams get
	// this long to finish.
	DrainTimeout time.Duration `mapstructure:"drain_timeout"`
}

// The ext_proc cluster health check of the Envoy configs we ship
// (envoy/*.yaml, deploy/compose/envoy.yaml, deploy/kubernetes, the Helm chart);
// the deploy tests hold every one of them to these numbers or better.
const (
	EnvoyHealthCheckInterval = 5 * time.Second
	EnvoyHealthCheckTimeout  = time.Second
	EnvoyUnhealthyThreshold  = 3

	// DefaultShutdownDelay is extproc.shutdown_delay's default:
	// ShutdownDelayFor the shipped health check, 20s.
	DefaultShutdownDelay = EnvoyHealthCheckInterval*EnvoyUnhealthyThreshold + EnvoyHealthCheckTimeout + shutdownDelayMargin

	shutdownDelayMargin = 4 * time.Second
)

// ShutdownDelayFor is the shutdown_delay an Envoy health-checking the
// ext_proc cluster every interval, with this timeout and
// unhealthy_threshold, needs: after the first check that sees NOT_SERVING
// (or, worse, that cannot connect), Envoy may go on opening streams to
// this instance until threshold checks have failed, each up to timeout
// long, interval apart; a few seconds more cover a check that started
// just before readiness went off and a busy host.
func ShutdownDelayFor(interval, timeout time.Duration, unhealthyThreshold int) time.Duration {
	return interval*time.Duration(unhealthyThreshold) + timeout + shutdownDelayMargin
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

// XDS serves the neuron clusters to Envoy over ADS on the extproc port
// (envoy/envoy-xds.yaml) instead of listing them in Envoy's config.
type XDS struct {
	Enabled bool `mapstructure:"enabled"`
}

// Neuron is one [[neurons]] entry, as in the existing cortex.toml.
type Neuron struct {
	Name     string `mapstructure:"name"`
	Endpoint string `mapstructure:"endpoint"`
	Cluster  string `mapstructure:"cluster"`
	// AnthropicNative: this neuron serves POST /v1/messages itself, so
	// with anthropic.translate = "per_neuron" such requests reach it
	// unchanged.
	AnthropicNative bool `mapstructure:"anthropic_native"`
}

// Anthropic is how Anthropic Messages requests (POST /v1/messages) reach
// the neurons.
type Anthropic struct {
	// Translate is one of TranslateAlways (default: the fleet's neurons
	// speak only OpenAI; requests go as /v1/chat/completions and answers
	// come back in Anthropic's shape), TranslateNever (every neuron serves
	// /v1/messages: forward them unchanged but for the model id) and
	// TranslatePerNeuron (translate except for neurons marked
	// anthropic_native).
	Translate string `mapstructure:"translate"`
}

// anthropic.translate values.
const (
	TranslateAlways    = "always"
	TranslateNever     = "never"
	TranslatePerNeuron = "per_neuron"
)

// TranslatesAnthropic reports whether a /v1/messages request routed to the
// neuron named node is translated.
func (c *Config) TranslatesAnthropic(node string) bool {
	switch c.Anthropic.Translate {
	case TranslateNever:
		return false
	case TranslatePerNeuron:
		for _, n := range c.Neurons {
			if n.Name == node {
				return !n.AnthropicNative
			}
		}
	}
	return true
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
	v.SetDefault("extproc.shutdown_delay", DefaultShutdownDelay)
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
	v.SetDefault("xds.enabled", false)
	v.SetDefault("anthropic.translate", TranslateAlways)
}

// Result is a loaded config plus what was found wrong with it.
type Result struct {
	Config Config
	// Unknown lists keys the file sets that cortex-extproc does not know,
	// with their full path (`poll.intervall`, `neurons[1].endpont`): an
	// error for validate, a warning for serve.
	Unknown []string
	// UnknownEnv lists CORTEX_-prefixed environment variables that match
	// no key (`CORTEX_EXTPROC_LISTEN` with one underscore): always a
	// warning, as other software may share the prefix.
	UnknownEnv []string
}

// LoadError is a config that could not be read or decoded. It lists every
// problem found, each named by its key where one is known.
type LoadError struct {
	File     string // "" for embedded defaults with environment overrides
	Problems []Problem
}

func (e *LoadError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "config %s", displayPath(e.File))
	for i, p := range e.Problems {
		if i == 0 {
			b.WriteString(": ")
		} else {
			b.WriteString("; ")
		}
		b.WriteString(p.String())
	}
	return b.String()
}

// Formats are the config file extensions understood, mapped to Viper's
// config type.
var formats = map[string]string{".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}

// Load reads path ("" = embedded defaults only) and applies CORTEX_
// environment overrides. A file that cannot be read or parsed is a
// *LoadError and an empty Result. Values of the wrong type are a *LoadError
// too, returned with the Result decoded from everything else, so validate
// can still report the rest.
func Load(path string) (Result, error) {
	if path == "" {
		return decode(nil, "")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Result{}, &LoadError{File: path, Problems: []Problem{{Message: readProblem(path, err)}}}
	}
	return Parse(path, data)
}

// Parse is Load for content already read from path: the format comes from
// path's extension and a relative models_config is resolved against path's
// folder. The service's config reloader uses it so the content it hashes
// is the content it applies.
func Parse(path string, data []byte) (Result, error) {
	return decode(data, path)
}

func readProblem(path string, err error) string {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Sprintf("the file does not exist; create it or fix --config (%v)", err)
	case errors.Is(err, syscall.EISDIR):
		return "is a directory; point --config at the cortex-extproc.toml inside it"
	}
	return err.Error()
}

func decode(data []byte, path string) (Result, error) {
	v := viper.NewWithOptions(viper.KeyDelimiter("."))
	defaults(v)
	v.SetEnvPrefix(envPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", envSeparator))
	v.AutomaticEnv()
	if path != "" {
		ext := strings.ToLower(filepath.Ext(path))
		typ, ok := formats[ext]
		if !ok {
			return Result{}, &LoadError{File: path, Problems: []Problem{{
				Message: fmt.Sprintf("unsupported file extension %q: name the file .toml, .yaml, .yml or .json by its format", ext),
			}}}
		}
		v.SetConfigType(typ)
		if err := v.ReadConfig(bytes.NewReader(data)); err != nil {
			return Result{}, &LoadError{File: path, Problems: []Problem{syntaxProblem(err)}}
		}
	}
	var res Result
	opts := func(dc *mapstructure.DecoderConfig) {
		dc.DecodeHook = durationHook
		dc.ErrorUnused = false
		dc.WeaklyTypedInput = true
	}
	var loadErr error
	if err := v.Unmarshal(&res.Config, opts); err != nil {
		loadErr = &LoadError{File: path, Problems: decodeProblems(err)}
	}
	res.Config.File = path
	res.UnknownEnv = unknownEnv(v)
	if path != "" {
		res.Unknown = unknownKeys(v.AllSettings(), reflect.TypeOf(Config{}), "")
		if res.Config.ModelsConfig != "" && !filepath.IsAbs(res.Config.ModelsConfig) {
			res.Config.ModelsConfig = filepath.Join(filepath.Dir(path), res.Config.ModelsConfig)
		}
	}
	return res, loadErr
}

// Environment overrides: CORTEX_ + the key upper-cased, sections joined by
// "__" so that keys with an underscore (cold_load.timeout) stay
// unambiguous: CORTEX_COLD_LOAD__TIMEOUT.
const (
	envPrefix    = "CORTEX"
	envSeparator = "__"
)

// EnvName is the environment variable that overrides key ("poll.interval"
// → CORTEX_POLL__INTERVAL).
func EnvName(key string) string {
	return envPrefix + "_" + strings.ToUpper(strings.ReplaceAll(key, ".", envSeparator))
}

// unknownEnv lists CORTEX_ variables that override nothing.
func unknownEnv(v *viper.Viper) []string {
	known := map[string]bool{}
	for _, k := range v.AllKeys() {
		known[EnvName(k)] = true
	}
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, envPrefix+"_") && !known[name] {
			out = append(out, name)
		}
	}
	sort.Strings(out)
	return out
}

var durationType = reflect.TypeFor[time.Duration]()

// durationHook decodes Go duration strings ("10s", "30m") and rejects a
// bare number: TOML `interval = 10` would otherwise decode as 10
// nanoseconds and poll in a tight loop. Zero is unambiguous and allowed;
// the defaults, already durations, pass.
func durationHook(from, to reflect.Type, data any) (any, error) {
	if to != durationType || from == durationType {
		return data, nil
	}
	switch from.Kind() {
	case reflect.String:
		d, err := time.ParseDuration(strings.TrimSpace(data.(string)))
		if err != nil {
			return nil, fmt.Errorf("%q is not a duration; write a Go duration such as \"10s\", \"5m\" or \"1h\"", data)
		}
		return d, nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64:
		if reflect.ValueOf(data).IsZero() {
			return time.Duration(0), nil
		}
		return nil, fmt.Errorf("%v has no unit; write a Go duration string such as \"10s\", \"5m\" or \"1h\"", data)
	}
	return data, nil
}

// syntaxProblem turns a parse error into a Problem, with the position when
// the parser gives one.
func syntaxProblem(err error) Problem {
	var te *toml.DecodeError
	if errors.As(err, &te) {
		line, col := te.Position()
		p := Problem{Message: fmt.Sprintf("line %d, column %d: %s; fix the TOML there", line, col, strings.TrimPrefix(te.Error(), "toml: "))}
		if k := te.Key(); len(k) > 0 {
			p.Key = strings.Join(k, ".")
		}
		return p
	}
	msg := err.Error()
	var pe viper.ConfigParseError
	if errors.As(err, &pe) && errors.Unwrap(pe) != nil {
		msg = errors.Unwrap(pe).Error()
	}
	return Problem{Message: "cannot parse: " + msg}
}

// decodeProblems splits mapstructure's joined error into one Problem per
// offending key.
func decodeProblems(err error) []Problem {
	var ps []Problem
	var walk func(error)
	walk = func(err error) {
		// A DecodeError may wrap further ones (a table's fields); only a
		// leaf names the key and the reason.
		if de, ok := err.(*mapstructure.DecodeError); ok && !hasDecodeError(de.Unwrap()) {
			ps = append(ps, Problem{Key: de.Name(), Message: decodeMessage(de.Unwrap())})
			return
		}
		switch u := err.(type) {
		case interface{ Unwrap() []error }:
			for _, e := range u.Unwrap() {
				walk(e)
			}
		case interface{ Unwrap() error }:
			if inner := u.Unwrap(); inner != nil {
				walk(inner)
				return
			}
			ps = append(ps, Problem{Message: err.Error()})
		default:
			ps = append(ps, Problem{Message: err.Error()})
		}
	}
	walk(err)
	return ps
}

func hasDecodeError(err error) bool {
	var de *mapstructure.DecodeError
	return errors.As(err, &de)
}

func decodeMessage(err error) string {
	var ue *mapstructure.UnconvertibleTypeError
	if errors.As(err, &ue) {
		return fmt.Sprintf("wrong type: expected %s, got %T %v", friendlyType(ue.Expected.Type()), ue.Value, ue.Value)
	}
	return err.Error()
}

func friendlyType(t reflect.Type) string {
	switch {
	case t == durationType:
		return "a duration such as \"10s\""
	case t.Kind() == reflect.Struct:
		return "a table"
	case t.Kind() == reflect.Slice:
		return "a list"
	}
	return t.String()
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
		// Viper lower-cases table keys but not always those inside arrays
		// of tables; mapstructure matches either.
		ft, ok := known[strings.ToLower(k)]
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
	// Key is the full key path (`poll.interval`, `neurons[1].endpoint`);
	// empty for a problem with the whole file.
	Key     string
	Message string
}

func (p Problem) String() string {
	if p.Key == "" {
		return p.Message
	}
	return p.Key + ": " + p.Message
}

// Validate reports every problem in the config (not the catalogue).
func (c *Config) Validate() []Problem {
	var ps []Problem
	add := func(key, format string, args ...any) {
		ps = append(ps, Problem{Key: key, Message: fmt.Sprintf(format, args...)})
	}
	if err := checkListen(c.ExtProc.Listen); err != nil {
		add("extproc.listen", "%v", err)
	}
	if err := checkListen(c.Admin.Listen); err != nil {
		add("admin.listen", "%v", err)
	}
	if c.ExtProc.MaxMessageTimeout <= 0 || c.ExtProc.MaxMessageTimeout > time.Hour {
		add("extproc.max_message_timeout", "%s is outside Envoy's range (0, 1h]; set it to Envoy's ext_proc max_message_timeout", c.ExtProc.MaxMessageTimeout)
	}
	if c.ExtProc.MaxRequestBytes <= 0 {
		add("extproc.max_request_bytes", "must be positive (Envoy's buffer limit, e.g. 33554432)")
	}
	switch {
	case c.ExtProc.TLSCertFile != "" && c.ExtProc.TLSKeyFile == "":
		add("extproc.tls_key_file", "not set but tls_cert_file is; set both to serve TLS, or neither")
	case c.ExtProc.TLSCertFile == "" && c.ExtProc.TLSKeyFile != "":
		add("extproc.tls_cert_file", "not set but tls_key_file is; set both to serve TLS, or neither")
	}
	if c.ExtProc.ClientCAFile != "" && c.ExtProc.TLSCertFile == "" {
		add("extproc.client_ca_file", "mTLS needs tls_cert_file and tls_key_file too")
	}
	if c.ExtProc.ShutdownDelay < 0 {
		add("extproc.shutdown_delay", "%s is negative; use 0 to close the listener at once (only without a load balancer in front), or at least Envoy's health-check interval × unhealthy_threshold + timeout (default %s)", c.ExtProc.ShutdownDelay, DefaultShutdownDelay)
	}
	if c.ExtProc.DrainTimeout < 0 {
		add("extproc.drain_timeout", "%s is negative; use 0 to close open streams at once, or a duration such as 30s", c.ExtProc.DrainTimeout)
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
		add("cold_load.max_evictions", "must be 0 (never evict) or more")
	}
	if c.ColdLoad.MaxWaiters < 1 {
		add("cold_load.max_waiters", "must be at least 1")
	}
	if c.ColdLoad.FailureCooldown < 0 {
		add("cold_load.failure_cooldown", "%s is negative; use 0 for no cool-down, or a duration such as 1m", c.ColdLoad.FailureCooldown)
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
	} else if c.Upstream.Mode == ModeClusterHeader && !isHeaderName(c.Upstream.ClusterHeader) {
		add("upstream.cluster_header", "%q is not a lowercase HTTP header name (letters a-z, digits, '-', '_', '.'); Envoy's route must match it exactly, e.g. x-cortex-cluster", c.Upstream.ClusterHeader)
	}
	if c.Catalogue.PollInterval <= 0 {
		add("catalogue.poll_interval", "must be a positive duration such as 30s: it catches the catalogue (and [[neurons]]) edits file notifications miss")
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
	switch c.Anthropic.Translate {
	case TranslateAlways, TranslateNever, TranslatePerNeuron:
	default:
		add("anthropic.translate", "%q is not one of always (neurons speak only OpenAI), never (every neuron serves /v1/messages), per_neuron (translate except for neurons with anthropic_native = true)", c.Anthropic.Translate)
	}
	for i, n := range c.Neurons {
		if n.AnthropicNative && c.Anthropic.Translate != TranslatePerNeuron {
			add(fmt.Sprintf("neurons[%d].anthropic_native", i), "has no effect while anthropic.translate is %q; set anthropic.translate = \"per_neuron\" to send /v1/messages to this neuron unchanged", c.Anthropic.Translate)
		}
	}
	if c.File != "" && c.ModelsConfig == "" {
		add("models_config", "not set: point it at the catalogue (models.toml), relative to this file's folder")
	}
	if c.ModelsConfig != "" {
		st, err := os.Stat(c.ModelsConfig)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			add("models_config", "catalogue file %s does not exist; create it or fix models_config (a relative path is relative to the config file's folder)", c.ModelsConfig)
		case err != nil:
			add("models_config", "%v", err)
		case st.IsDir():
			add("models_config", "%s is a directory; point it at the models.toml file", c.ModelsConfig)
		}
	}
	names := map[string]int{}
	clusters := map[string]int{}
	for i, n := range c.Neurons {
		key := fmt.Sprintf("neurons[%d]", i)
		dupName := false
		if n.Name == "" {
			add(key+".name", "required: the neuron's name (routing logs, metrics and pinned_on use it)")
		} else if j, dup := names[n.Name]; dup {
			add(key+".name", "duplicate name %q, first at neurons[%d]", n.Name, j)
			dupName = true
		} else {
			names[n.Name] = i
		}
		// A duplicate name already explains its duplicate default cluster.
		if (n.Name != "" || n.Cluster != "") && !(dupName && n.Cluster == "") {
			if j, dup := clusters[n.ClusterName()]; dup {
				add(key+".cluster", "duplicate Envoy cluster %q, first at neurons[%d]; give each neuron its own cluster", n.ClusterName(), j)
			} else {
				clusters[n.ClusterName()] = i
			}
		}
		if err := checkEndpoint(n.Endpoint); err != nil {
			add(key+".endpoint", "%v", err)
		}
	}
	return ps
}

func checkListen(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return fmt.Errorf("%q is not host:port (e.g. 127.0.0.1:9002): %v", s, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port %q is not a number from 0 to 65535", s, port)
	}
	return nil
}

// checkEndpoint accepts what neuron.New accepts, so a config validate
// passes is one serve can start with.
func checkEndpoint(s string) error {
	const eg = "e.g. http://beast.internal:13131"
	if s == "" {
		return errors.New("required, " + eg)
	}
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("%q is not a URL (%v); %s", s, err, eg)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("%q: scheme must be http or https, %s", s, eg)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("%q has no host, %s", s, eg)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return fmt.Errorf("%q must not have a query or fragment, %s", s, eg)
	}
	return nil
}

// EvictionLimit is max_evictions as the cold loader and placement take it:
// the config's 0 means "never evict", which they spell as a negative
// number (their 0 means "default").
func (c ColdLoad) EvictionLimit() int {
	if c.MaxEvictions == 0 {
		return -1
	}
	return c.MaxEvictions
}

// Cooldown is failure_cooldown as the cold loader takes it: the config's 0
// means "no cool-down", which it spells as a negative duration.
func (c ColdLoad) Cooldown() time.Duration {
	if c.FailureCooldown == 0 {
		return -1
	}
	return c.FailureCooldown
}

// ChangedKeys lists the keys whose values differ between a and b, in key
// order: leaf keys (`poll.interval`), and `neurons` as one key for any
// change to the list. The reloader uses it to name what needs a restart.
func ChangedKeys(a, b Config) []string {
	var out []string
	var walk func(av, bv reflect.Value, prefix string)
	walk = func(av, bv reflect.Value, prefix string) {
		t := av.Type()
		for i := 0; i < t.NumField(); i++ {
			tag := t.Field(i).Tag.Get("mapstructure")
			if tag == "" || tag == "-" {
				continue
			}
			fa, fb := av.Field(i), bv.Field(i)
			if fa.Kind() == reflect.Struct && fa.Type() != durationType {
				walk(fa, fb, prefix+tag+".")
				continue
			}
			if !reflect.DeepEqual(fa.Interface(), fb.Interface()) {
				out = append(out, prefix+tag)
			}
		}
	}
	walk(reflect.ValueOf(a), reflect.ValueOf(b), "")
	sort.Strings(out)
	return out
}

// isHeaderName reports whether s is a lowercase HTTP header name Envoy
// matches and mutates as is (no pseudo-headers, no upper case).
func isHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return false
		}
	}
	return true
}
