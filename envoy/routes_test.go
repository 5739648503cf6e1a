package envoy

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"
)

// route is the route a shipped config picks for method and path, after
// the connection manager's path normalization.
func route(t *testing.T, rt *RouteTable, method, path string) (*routev3.Route, bool) {
	t.Helper()
	return rt.Match(map[string]string{
		":method":    method,
		":path":      rt.NormalizePath(path),
		":authority": "cortex.example:8080",
		":scheme":    "http",
	})
}

// TestShippedConfigsRouteOnlyInference: in every config we ship, Envoy
// itself forwards only the inference paths (POST) and the model list
// (GET); the neurons' management API and every other request gets a local
// 404 JSON with ext_proc switched off, so it reaches neither
// cortex-extproc nor a neuron.
func TestShippedConfigsRouteOnlyInference(t *testing.T) {
	configs := shippedConfigs(t)
	if len(configs) < 6 {
		t.Fatalf("found %d shipped configs, want at least 6", len(configs))
	}
	for _, c := range configs {
		t.Run(filepath.ToSlash(c.name), func(t *testing.T) {
			b, err := ParseBootstrapYAML(c.data)
			if err != nil {
				t.Fatal(err)
			}
			rt, err := InferenceRouteTable(b)
			if err != nil {
				t.Fatal(err)
			}

			var first *routev3.RouteAction
			forwards := func(method, path string) {
				t.Helper()
				r, extProc := route(t, rt, method, path)
				switch {
				case r.GetRoute() == nil:
					t.Errorf("%s %s: not forwarded (route %v)", method, path, r.GetMatch())
					return
				case !extProc:
					t.Errorf("%s %s: forwarded without ext_proc", method, path)
				case first == nil:
					first = r.GetRoute()
				case !proto.Equal(first, r.GetRoute()):
					t.Errorf("%s %s: route action %v differs from the other forwarding routes' %v", method, path, r.GetRoute(), first)
				}
			}
			for _, p := range InferencePaths() {
				forwards("POST", p)
				forwards("POST", p+"?api-version=2024-10-21") // `path` ignores the query
			}
			for _, p := range []string{"/v1/models", "/v1/models?limit=5", "/v1/models/Qwen/Qwen3-8B", "/v1/models/helexa%2Fsmall"} {
				forwards("GET", p)
			}

			for _, req := range [][2]string{
				{"POST", "/models/load"}, {"POST", "/models/unload"}, {"POST", "/models/load?model=x"},
				{"GET", "/models"}, {"GET", "/health"}, {"GET", "/discovery"}, {"GET", "/models/Qwen/Qwen3-8B/endpoint"},
				{"POST", "/foo"}, {"GET", "/foo"}, {"GET", "/"}, {"PUT", "/"},
				{"GET", "/v1/chat/completions"}, {"POST", "/v1/chat/completions/"}, {"POST", "/V1/CHAT/COMPLETIONS"},
				{"POST", "/v1//chat/completions"}, {"POST", "/v1/models"}, {"DELETE", "/v1/models/x"},
				{"POST", "/v1/chat/completions/../../models/load"},
				{"GET", "/v1/models/../../models/load"}, {"GET", "/v1/models/%2e%2e/%2E%2E/models/load"},
			} {
				notFound(t, rt, req[0], req[1], func(t *testing.T, body []byte) {
					var e struct {
						Error struct{ Message, Type, Code string }
					}
					if err := json.Unmarshal(body, &e); err != nil {
						t.Fatalf("404 body is not JSON: %v\n%s", err, body)
					}
					if e.Error.Code != "not_found" || e.Error.Type != "invalid_request_error" {
						t.Errorf("404 body type %q code %q, want invalid_request_error not_found", e.Error.Type, e.Error.Code)
					}
					for _, p := range append(InferencePaths(), "GET /v1/models") {
						if !strings.Contains(e.Error.Message, p) {
							t.Errorf("404 message %q does not name %s", e.Error.Message, p)
						}
					}
				})
			}
			notFound(t, rt, "POST", "/v1/messages/count_tokens", func(t *testing.T, body []byte) {
				var e struct {
					Type  string
					Error struct{ Type, Message string }
				}
				if err := json.Unmarshal(body, &e); err != nil {
					t.Fatalf("404 body is not JSON: %v\n%s", err, body)
				}
				if e.Type != "error" || e.Error.Type != "not_found_error" || !strings.Contains(e.Error.Message, "usage.input_tokens") {
					t.Errorf("count_tokens 404 is not Anthropic's not_found_error with advice: %s", body)
				}
			})
		})
	}
}

// notFound checks that Envoy answers method path itself: 404, a JSON body
// (checked by body), content-type application/json, no ext_proc.
func notFound(t *testing.T, rt *RouteTable, method, path string, body func(*testing.T, []byte)) {
	t.Helper()
	r, extProc := route(t, rt, method, path)
	dr := r.GetDirectResponse()
	if dr == nil || dr.GetStatus() != 404 {
		t.Errorf("%s %s: matched %v, want a direct_response 404", method, path, r.GetMatch())
		return
	}
	if extProc {
		t.Errorf("%s %s: ext_proc runs before the direct response: cortex-extproc would see the request", method, path)
	}
	// Envoy applies the route's response_headers_to_add to a direct
	// response before it defaults content-type to text/plain
	// (source/common/http/utility.cc prepareLocalReply).
	var ct *corev3.HeaderValueOption
	for _, h := range r.GetResponseHeadersToAdd() {
		if strings.EqualFold(h.GetHeader().GetKey(), "content-type") {
			ct = h
		}
	}
	if ct.GetHeader().GetValue() != "application/json" || ct.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
		t.Errorf("%s %s: content-type header %v, want application/json with OVERWRITE_IF_EXISTS_OR_ADD", method, path, ct)
	}
	t.Run(method+" "+path, func(t *testing.T) { body(t, []byte(dr.GetBody().GetInlineString())) })
}

func TestNormalizePath(t *testing.T) {
	rt := &RouteTable{HCM: nil}
	if got := rt.NormalizePath("/v1/models/../x"); got != "/v1/models/../x" {
		t.Errorf("without normalize_path: %q", got)
	}
	b, err := ParseBootstrapYAML([]byte(readFile(t, "envoy.yaml")))
	if err != nil {
		t.Fatal(err)
	}
	if rt, err = InferenceRouteTable(b); err != nil {
		t.Fatal(err)
	}
	for in, want := range map[string]string{
		"/v1/chat/completions":                  "/v1/chat/completions",
		"/v1/models/../../models/load":          "/models/load",
		"/v1/models/%2e%2e/%2E%2E/models/load":  "/models/load",
		"/v1/./models/./x":                      "/v1/models/x",
		"/..":                                   "/",
		"/a/b/..":                               "/a/",
		"/a/b/.":                                "/a/b/",
		"/v1/models/x/../y?q=/../..":            "/v1/models/y?q=/../..",
		"/v1/models/Qwen/Qwen3-8B":              "/v1/models/Qwen/Qwen3-8B",
		"/v1/models/../../../../../models/load": "/models/load",
	} {
		if got := rt.NormalizePath(in); got != want {
			t.Errorf("NormalizePath(%q) = %q, want %q", in, got, want)
		}
	}
}

// A model of Envoy's routing must refuse configs it cannot model rather
// than route them differently from Envoy.
func TestInferenceRouteTableRefusesUnmodelledMatchers(t *testing.T) {
	static := readFile(t, "envoy.yaml")
	for name, data := range map[string][]byte{
		"regex path": mutate(t, static, "path: /v1/chat/completions, headers: &post", `safe_regex: { regex: "/v1/.*" }, headers: &post`),
		"query match": mutate(t, static, "path: /v1/chat/completions, headers: &post",
			"path: /v1/chat/completions, query_parameters: [{ name: x, present_match: true }], headers: &post"),
		"header regex": mutate(t, static, `string_match: { exact: POST }`, `string_match: { prefix: PO }`),
	} {
		b, err := ParseBootstrapYAML(data)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := InferenceRouteTable(b); err == nil || !strings.Contains(err.Error(), "modelled") {
			t.Errorf("%s: InferenceRouteTable = %v, want a not-modelled error", name, err)
		}
	}
}
