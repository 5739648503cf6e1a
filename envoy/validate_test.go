package envoy

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"sigs.k8s.io/yaml"
)

// shippedConfig is one Envoy bootstrap found in the repository.
type shippedConfig struct {
	name string // file, or file#key for a ConfigMap entry
	data []byte
}

// shippedConfigs finds every Envoy bootstrap under envoy/, deploy/ and
// deploy/compose/: files named envoy*.yaml or containing static_resources, and
// ConfigMap entries (in Kubernetes manifests) that hold one.
func shippedConfigs(t *testing.T) []shippedConfig {
	t.Helper()
	var out []shippedConfig
	for _, root := range []string{".", "../deploy"} {
		err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
			if err != nil {
				return err
			}
			// A Helm chart's templates are not YAML until rendered; the
			// deploy tests render the chart and validate its Envoy config.
			if d.IsDir() && d.Name() == "templates" {
				if _, err := os.Stat(filepath.Join(filepath.Dir(path), "Chart.yaml")); err == nil {
					return filepath.SkipDir
				}
			}
			ext := filepath.Ext(path)
			if d.IsDir() || (ext != ".yaml" && ext != ".yml") {
				return nil
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			if isKubernetesManifest(data) {
				out = append(out, configMapBootstraps(t, path, data)...)
				return nil
			}
			if strings.HasPrefix(filepath.Base(path), "envoy") || bytes.Contains(data, []byte("static_resources")) {
				out = append(out, shippedConfig{path, data})
			}
			return nil
		})
		if err != nil {
			t.Fatalf("walking %s: %v", root, err)
		}
	}
	return out
}

func isKubernetesManifest(data []byte) bool {
	for _, doc := range splitYAMLDocs(data) {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if yaml.Unmarshal(doc, &head) == nil && head.APIVersion != "" && head.Kind != "" {
			return true
		}
	}
	return false
}

// splitYAMLDocs splits a multi-document YAML stream on "---" lines.
func splitYAMLDocs(data []byte) [][]byte {
	var docs [][]byte
	var cur []string
	for _, line := range strings.Split(string(data), "\n") {
		if strings.TrimRight(line, " \t\r") == "---" {
			docs = append(docs, []byte(strings.Join(cur, "\n")))
			cur = nil
			continue
		}
		cur = append(cur, line)
	}
	return append(docs, []byte(strings.Join(cur, "\n")))
}

func configMapBootstraps(t *testing.T, path string, data []byte) []shippedConfig {
	t.Helper()
	var out []shippedConfig
	for _, doc := range splitYAMLDocs(data) {
		var cm struct {
			Kind string            `json:"kind"`
			Data map[string]string `json:"data"`
		}
		if err := yaml.Unmarshal(doc, &cm); err != nil {
			t.Fatalf("%s: not valid YAML: %v", path, err)
		}
		if cm.Kind != "ConfigMap" {
			continue
		}
		for key, val := range cm.Data {
			if strings.Contains(val, "static_resources") {
				out = append(out, shippedConfig{path + "#" + key, []byte(val)})
			}
		}
	}
	return out
}

func TestShippedEnvoyConfigsValidate(t *testing.T) {
	configs := shippedConfigs(t)
	var names []string
	for _, c := range configs {
		names = append(names, filepath.ToSlash(c.name))
		if err := ValidateBootstrapYAML(c.data); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// The walk must find every config we ship; a rename or a broken
	// ConfigMap extraction would otherwise validate nothing.
	for _, want := range []string{
		"envoy.yaml", "envoy-xds.yaml", "envoy-original-dst.yaml", "envoy-local.yaml",
		"../deploy/compose/envoy.yaml",
		"../deploy/kubernetes/envoy-deployment.yaml#envoy.yaml",
		"../deploy/kubernetes/envoy-sidecar.yaml#envoy.yaml",
	} {
		if !slices.Contains(names, want) {
			t.Errorf("config %s not found among %v", want, names)
		}
	}
}

// Fields the go-control-plane v1.40 schema accepts but the Envoy image we
// ship (v1.36) rejects at start-up, or that need a newer Envoy than
// MinEnvoyVersion documents.
var fieldsNewerThanShippedEnvoy = map[string]string{
	"allow_content_length_header": "1.38",
	"emit_client_span":            "1.38 or later",
	"status_on_error":             "1.36 (kept out so configs load on older Envoy)",
	"request_body_buffer_limit":   "1.36 (kept out so configs load on older Envoy)",
}

func TestShippedConfigsAvoidFieldsNewerThanImage(t *testing.T) {
	for _, c := range shippedConfigs(t) {
		js, err := yaml.YAMLToJSON(c.data)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		var v any
		if err := json.Unmarshal(js, &v); err != nil {
			t.Fatal(err)
		}
		walkKeys(v, func(k string) {
			if ver, ok := fieldsNewerThanShippedEnvoy[k]; ok {
				t.Errorf("%s uses %s (Envoy %s); the shipped image and MinEnvoyVersion %s would reject it", c.name, k, ver, MinEnvoyVersion)
			}
		})
	}
}

func walkKeys(v any, f func(string)) {
	switch x := v.(type) {
	case map[string]any:
		for k, vv := range x {
			f(k)
			walkKeys(vv, f)
		}
	case []any:
		for _, vv := range x {
			walkKeys(vv, f)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// mutate replaces old by new in base, failing if old is absent so that a
// drift in the base file cannot turn a case into a no-op.
func mutate(t *testing.T, base, old, new string) []byte {
	t.Helper()
	if !strings.Contains(base, old) {
		t.Fatalf("mutation anchor %q not in base config", old)
	}
	return []byte(strings.Replace(base, old, new, 1))
}

// replaceLast is mutate for the last occurrence of old.
func replaceLast(t *testing.T, base, old, new string) []byte {
	t.Helper()
	i := strings.LastIndex(base, old)
	if i < 0 {
		t.Fatalf("mutation anchor %q not in base config", old)
	}
	return []byte(base[:i] + new + base[i+len(old):])
}

func TestBrokenConfigsFailWithFieldAndReason(t *testing.T) {
	static := readFile(t, "envoy.yaml")
	origDst := readFile(t, "envoy-original-dst.yaml")
	xds := readFile(t, "envoy-xds.yaml")
	cases := []struct {
		name string
		yaml []byte
		want []string // all must appear in the error
	}{
		{"message_timeout above PGV range inside the Any",
			mutate(t, static, "message_timeout: 30s", "message_timeout: 7200s"),
			[]string{"http_filters[0].typed_config", "MessageTimeout", "value must be inside range"}},
		{"misspelled field",
			mutate(t, static, "per_connection_buffer_limit_bytes:", "per_conection_buffer_limit_bytes:"),
			[]string{`unknown field "per_conection_buffer_limit_bytes"`, "YAML line 28"}},
		{"failure_mode_allow true",
			mutate(t, static, "failure_mode_allow: false", "failure_mode_allow: true"),
			[]string{"failure_mode_allow", "x-cortex-cluster"}},
		{"route to an unknown cluster",
			mutate(t, static, "cluster_header: x-cortex-cluster", "cluster: neuron-nope"),
			[]string{"routes[0].route.cluster", `"neuron-nope" is not defined`}},
		{"route timeout left at Envoy's 15s default",
			mutate(t, static, "timeout: 0s          #", "#"),
			[]string{"routes[0].route.timeout", "15s"}},
		{"route idle_timeout shorter than a cold load",
			mutate(t, static, "  idle_timeout: 3900s  #", "  idle_timeout: 300s  #"),
			[]string{"route.idle_timeout", "408"}},
		{"HCM stream_idle_timeout shorter than a cold load",
			mutate(t, static, "stream_idle_timeout: 3900s", "stream_idle_timeout: 60s"),
			[]string{"stream_idle_timeout", "408"}},
		{"overrides disabled",
			mutate(t, static, "max_message_timeout: 3600s", "max_message_timeout: 0s"),
			[]string{"max_message_timeout", "disables override_message_timeout"}},
		{"max_message_timeout below message_timeout",
			mutate(t, static, "max_message_timeout: 3600s", "max_message_timeout: 10s"),
			[]string{"max_message_timeout", "below message_timeout"}},
		{"request body streamed",
			mutate(t, static, "request_body_mode: BUFFERED", "request_body_mode: STREAMED"),
			[]string{"processing_mode.request_body_mode", "BUFFERED"}},
		{"mode override not allowed",
			mutate(t, static, "allow_mode_override: true", "allow_mode_override: false"),
			[]string{"allow_mode_override", "must be true", "Anthropic"}},
		{"allowed_override_modes without the translated mode",
			mutate(t, static, "  response_body_mode: STREAMED", "  response_body_mode: BUFFERED"),
			[]string{"allowed_override_modes", "does not list", "response_body_mode: STREAMED", "allowed_override_modes[0]", "never asks for"}},
		{"request headers skipped",
			mutate(t, static, "request_header_mode: SEND", "request_header_mode: SKIP"),
			[]string{"processing_mode.request_header_mode", "SEND"}},
		{"ext_proc cluster without HTTP/2",
			mutate(t, static, "http2_protocol_options: {}   # gRPC", "http_protocol_options: {}"),
			[]string{"grpc_service.envoy_grpc.cluster_name", `"extproc" speaks HTTP/1.1`}},
		{"ext_proc cluster at default circuit breakers",
			mutate(t, static, "max_requests: 100000", "max_requests: 1024"),
			[]string{"max_requests", "1024"}},
		{"body limit left at 1 MiB default",
			mutate(t, static, "per_connection_buffer_limit_bytes: 33554432", ""),
			[]string{"per_connection_buffer_limit_bytes: unset", "413"}},
		{"body limit above what cortex-extproc accepts",
			mutate(t, static, "per_connection_buffer_limit_bytes: 33554432", "per_connection_buffer_limit_bytes: 134217728"),
			[]string{"per_connection_buffer_limit_bytes", "extproc.max_request_bytes 33554432"}},
		{"max_message_timeout below the overrides cortex-extproc sends",
			mutate(t, static, "max_message_timeout: 3600s", "max_message_timeout: 1800s"),
			[]string{"max_message_timeout", "extproc.max_message_timeout 1h0m0s", "504"}},
		{"route reads another header than cortex-extproc sets",
			mutate(t, static, "cluster_header: x-cortex-cluster", "cluster_header: x-upstream"),
			[]string{"route.cluster_header", `"x-upstream"`, `"x-cortex-cluster"`}},
		{"route cache retained while routing by header",
			mutate(t, static, "route_cache_action: DEFAULT", "route_cache_action: RETAIN"),
			[]string{"route cache", "header"}},
		{"unknown extension type",
			mutate(t, static, "router.v3.Router", "router.v3.Rooter"),
			[]string{"Rooter"}},
		{"duplicate YAML key",
			mutate(t, static, "failure_mode_allow: false", "failure_mode_allow: false\n              failure_mode_allow: false"),
			[]string{"not valid YAML", "failure_mode_allow"}},
		{"ORIGINAL_DST with a normal load balancer",
			mutate(t, origDst, "lb_policy: CLUSTER_PROVIDED", "lb_policy: ROUND_ROBIN"),
			[]string{"inference_original_dst).lb_policy", "CLUSTER_PROVIDED"}},
		{"ORIGINAL_DST header name without use_http_header",
			mutate(t, origDst, "use_http_header: true", "use_http_header: false"),
			[]string{"original_dst_lb_config.http_header_name", "use_http_header: true"}},
		{"ORIGINAL_DST with a load_assignment",
			mutate(t, origDst, "    cleanup_interval: 60s", "    cleanup_interval: 60s\n    load_assignment: {cluster_name: inference_original_dst}"),
			[]string{"inference_original_dst).load_assignment", "must be absent"}},
		{"ADS cluster without HTTP/2",
			replaceLast(t, xds, "http2_protocol_options: {}", "http_protocol_options: {}"),
			[]string{"ads_config.grpc_services[0]", `"xds" speaks HTTP/1.1`}},
		{"catch-all route forwarding again",
			mutate(t, static, "              # Local 404s,", "              - match: { prefix: \"/\" }\n                route: *neuron\n              # Local 404s,"),
			[]string{"routes[8].match", `prefix "/" forwards to an upstream cluster`, "/models/load", "direct_response"}},
		{"management API routed",
			mutate(t, static, "              # Local 404s,", "              - match: { path: /models/load }\n                route: *neuron\n              # Local 404s,"),
			[]string{"routes[8].match", `path "/models/load" forwards`}},
		{"ORIGINAL_DST catch-all forwarding",
			mutate(t, origDst, "              # Local 404s,", "              - match: { prefix: \"/\" }\n                route: *neuron\n              # Local 404s,"),
			[]string{"routes[8].match", `prefix "/" forwards`}},
		{"a prefix instead of exact inference paths",
			mutate(t, static, "path: /v1/chat/completions, headers: &post", "prefix: /v1/, headers: &post"),
			[]string{"routes[0].match", `prefix "/v1/" forwards`, "match each of those paths exactly"}},
		{"models prefix without path normalization",
			mutate(t, static, "normalize_path: true", "normalize_path: false"),
			[]string{"routes[7].match", "../../models/load", "normalize_path: true"}},
		{"404 route still runs ext_proc",
			replaceLast(t, static, "                typed_per_filter_config: *no_ext_proc\n", ""),
			[]string{"routes[9].typed_per_filter_config", "cortex-extproc still sees the request", "disabled: true"}},
		{"ext_proc disabled for the whole virtual host",
			mutate(t, static, `              domains: ["*"]`, `              domains: ["*"]
              typed_per_filter_config:
                envoy.filters.http.ext_proc:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
                  disabled: true`),
			[]string{"routes[0].typed_per_filter_config", "envoy.filters.http.ext_proc is disabled on a route that forwards"}},
		{"forwarding routes with different idle timeouts",
			mutate(t, static, "              - match: { prefix: /v1/models/, headers: *get }\n                route: *neuron",
				"              - match: { prefix: /v1/models/, headers: *get }\n                route: { cluster_header: x-cortex-cluster, timeout: 0s, idle_timeout: 7200s }"),
			[]string{"routes[7].route", "idle_timeout 2h0m0s differ from", "routes[0] (0s / 1h5m0s)"}},
		{"header-routed listener without ext_proc",
			mutate(t, static, "  listeners:\n", `  listeners:
  - name: side_8081
    address: { socket_address: { address: 0.0.0.0, port_value: 8081 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: side
          route_config:
            virtual_hosts:
            - name: side
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster_header: x-cortex-cluster }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
`),
			[]string{"listeners[0](side_8081)", "routes[0].route.cluster_header", "only the client sets it"}},
		{"ADS pointing at a missing cluster",
			mutate(t, xds, "envoy_grpc: { cluster_name: xds }", "envoy_grpc: { cluster_name: xds2 }"),
			[]string{"ads_config.grpc_services[0]", `"xds2"`}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateBootstrapYAML(tc.yaml)
			if err == nil {
				t.Fatal("broken config validated")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q:\n%v", w, err)
				}
			}
		})
	}
}

// The reason for walking Anys: the generated ValidateAll stops at them.
func TestOutOfRangeInsideAnyPassesPlainValidateAllButNotOurs(t *testing.T) {
	data := mutate(t, readFile(t, "envoy.yaml"), "message_timeout: 30s", "message_timeout: 7200s")
	b, err := ParseBootstrapYAML(data)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.ValidateAll(); err != nil {
		t.Fatalf("plain Bootstrap.ValidateAll already fails (%v): this test no longer shows why the Any walk exists", err)
	}
	if err := ValidateMessage(b); err == nil || !strings.Contains(err.Error(), "ExternalProcessor") {
		t.Errorf("ValidateMessage = %v, want the ExternalProcessor range error", err)
	}
}

func TestValidateMessageOnXDSResource(t *testing.T) {
	ep, err := anypb.New(&extprocv3.ExternalProcessor{MessageTimeout: durationpb.New(2 * time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	bad := &clusterv3.Cluster{
		Name:                          "neuron-beast",
		ConnectTimeout:                durationpb.New(5 * time.Second),
		TypedExtensionProtocolOptions: map[string]*anypb.Any{"x": ep},
	}
	err = ValidateMessage(bad)
	if err == nil || !strings.Contains(err.Error(), `typed_extension_protocol_options["x"]`) {
		t.Errorf("ValidateMessage = %v, want an error located at the map entry", err)
	}
	good := &clusterv3.Cluster{Name: "neuron-beast", ConnectTimeout: durationpb.New(5 * time.Second)}
	if err := ValidateMessage(good); err != nil {
		t.Errorf("valid cluster: %v", err)
	}
	if err := ValidateMessage(&clusterv3.Cluster{}); err == nil {
		t.Error("cluster without a name validated (PGV requires one)")
	}
}

func TestCheckClusterOriginalDst(t *testing.T) {
	c := &clusterv3.Cluster{
		Name:                 "inference_original_dst",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
	}
	if err := CheckCluster(c); err == nil || !strings.Contains(err.Error(), "CLUSTER_PROVIDED") {
		t.Errorf("CheckCluster = %v, want the CLUSTER_PROVIDED rule", err)
	}
	c.LbPolicy = clusterv3.Cluster_CLUSTER_PROVIDED
	if err := CheckCluster(c); err != nil {
		t.Errorf("valid ORIGINAL_DST cluster: %v", err)
	}
}

func TestValidateFileNamesTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edge.yaml")
	if err := os.WriteFile(path, mutate(t, readFile(t, "envoy.yaml"), "failure_mode_allow: false", "failure_mode_allow: true"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := ValidateFile(path)
	if err == nil || !strings.HasPrefix(err.Error(), path+": ") {
		t.Errorf("ValidateFile = %v, want an error starting with the file name", err)
	}
	if err := ValidateFile(filepath.Join(t.TempDir(), "missing.yaml")); err == nil {
		t.Error("missing file validated")
	}
}

func TestValidateForServiceSettings(t *testing.T) {
	data := []byte(readFile(t, "envoy.yaml"))
	if err := ValidateBootstrapYAMLFor(data, DefaultExtProcSettings); err != nil {
		t.Fatalf("shipped config with default settings: %v", err)
	}
	custom := ExtProcSettings{MaxRequestBytes: 16 << 20, MaxMessageTimeout: 2 * time.Hour, ClusterHeader: "x-route-to"}
	err := ValidateBootstrapYAMLFor(data, custom)
	if err == nil {
		t.Fatal("envoy.yaml validated against a cortex-extproc with a smaller body cap, longer overrides and another header")
	}
	for _, want := range []string{"max_request_bytes 16777216", "extproc.max_message_timeout 2h0m0s", "idle_timeout", `"x-route-to"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not mention %q:\n%v", want, err)
		}
	}
}

func TestBootstrapWithoutExtProcIsRejected(t *testing.T) {
	err := ValidateBootstrapYAML([]byte("static_resources: {}\n"))
	if err == nil || !strings.Contains(err.Error(), "no envoy.filters.http.ext_proc filter") {
		t.Errorf("err = %v", err)
	}
}

// cut removes base[from:to) where from and to are the first occurrences of
// the two anchors (to searched after from), failing if either is absent.
func cut(t *testing.T, base, from, to string) []byte {
	t.Helper()
	i := strings.Index(base, from)
	if i < 0 {
		t.Fatalf("cut anchor %q not in base config", from)
	}
	j := strings.Index(base[i:], to)
	if j < 0 {
		t.Fatalf("cut anchor %q not after %q in base config", to, from)
	}
	return []byte(base[:i] + base[i+j:])
}

// Envoy's own errors must reach clients as JSON in their SDK's shape, and
// cortex-extproc's own JSON errors must pass the mappers unchanged: each
// way of breaking local_reply_config names what clients would get and the
// fix.
func TestLocalReplyMappersAreRequired(t *testing.T) {
	static := readFile(t, "envoy.yaml")
	cases := []struct {
		name string
		yaml []byte
		want []string
	}{
		{"no local_reply_config",
			cut(t, static, "          # Envoy's own errors as JSON", "          access_log:"),
			[]string{"typed_config.local_reply_config", "no mappers", "text/plain", "503 when a neuron cannot be reached"}},
		{"the 504 mappers removed",
			cut(t, static, "            # 504: a timer", "            # 413: the body"),
			[]string{"local_reply_config.mappers", "no mapper matches Envoy's 504 (a timeout) for an OpenAI client", "for an Anthropic client", "text/plain"}},
		{"the Anthropic shape lost for UF",
			mutate(t, static, "                  type: error\n                  error:\n                    type: overloaded_error",
				"                  error:\n                    type: overloaded_error\n                    code: upstream_unavailable"),
			[]string{"local_reply_config.mappers[0]", "Envoy's 503 UF (the neuron cannot be reached) for an Anthropic client", `is not Anthropic's {"type":"error"`}},
		{"a mapper matching every 503 by status",
			mutate(t, static, "            mappers:\n",
				"            mappers:\n            - filter: { status_code_filter: { comparison: { op: EQ, value: { default_value: 503 } } } }\n"+
					"              body_format_override: { json_format: { error: { message: \"%LOCAL_REPLY_BODY%\", type: api_error, code: unavailable } } }\n"),
			[]string{"local_reply_config.mappers[0]", "matches cortex-extproc's own 503 answers", "response_flag_filter"}},
		{"a body_format for every local reply",
			mutate(t, static, "          local_reply_config:\n", "          local_reply_config:\n            body_format: { text_format: \"%LOCAL_REPLY_BODY%\" }\n"),
			[]string{"local_reply_config.body_format", "cortex-extproc's own JSON errors"}},
		{"a filter the check cannot evaluate",
			mutate(t, static, "- &unreachable { response_flag_filter: { flags: [UF, UC, UH, NC, UO] } }",
				"- &unreachable { duration_filter: { comparison: { op: GE, value: { default_value: 1, runtime_key: d } } } }"),
			[]string{"local_reply_config: cannot be checked", "mappers[0].filter", "duration_filter is not modelled"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateBootstrapYAML(c.yaml)
			if err == nil {
				t.Fatal("validated; want an error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}
