// Package envoy checks Envoy configuration for a cortex-extproc deployment
// without an Envoy binary (envoy-ext-proc.md §10), in three layers:
//
//  1. schema: YAML → JSON → protojson into a v3 Bootstrap, strictly, so a
//     misspelled field or an unknown "@type" fails;
//  2. field rules: protoc-gen-validate ValidateAll on every message,
//     including those packed in google.protobuf.Any (typed_config), which
//     the generated code never looks into;
//  3. the semantics cortex-extproc relies on and PGV cannot express: modes
//     and timeouts of the ext_proc filter, route timeouts long enough for
//     cold loads and SSE streams, routes naming existing clusters, the
//     ORIGINAL_DST rules, HTTP/2 to the ext_proc server, and that only
//     inference paths and the model list are forwarded (everything else,
//     the neurons' /models/load and /models/unload included, must get a
//     direct response with ext_proc off).
//
// The schema is go-control-plane's envoy module (v1.40 at the time of
// writing). It accepts fields newer than an older Envoy knows; the configs
// we ship avoid fields newer than MinEnvoyVersion.
package envoy

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"

	// Every extension type a config may name in "@type" must be linked in,
	// or protojson answers `unable to resolve "type.googleapis.com/…"`.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/health_check/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/override_host/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/round_robin/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// MinEnvoyVersion is the oldest Envoy our shipped configs load on
// (route_cache_action arrived in 1.31).
const MinEnvoyVersion = "1.31"

// ValidateFile reads and validates an Envoy bootstrap file; errors name it.
func ValidateFile(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("envoy config: %w", err)
	}
	if err := ValidateBootstrapYAML(data); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// ValidateBootstrapYAML validates an Envoy v3 bootstrap (YAML or JSON) meant
// to front a cortex-extproc with default settings: schema, field rules
// inside every Any, and the semantic checks of CheckBootstrap. All problems
// found are joined.
func ValidateBootstrapYAML(data []byte) error {
	return ValidateBootstrapYAMLFor(data, DefaultExtProcSettings)
}

// ValidateBootstrapYAMLFor is ValidateBootstrapYAML for a cortex-extproc
// configured with s (e.g. from `cortex-extproc validate`).
func ValidateBootstrapYAMLFor(data []byte, s ExtProcSettings) error {
	b, err := ParseBootstrapYAML(data)
	if err != nil {
		return err
	}
	return errors.Join(ValidateMessage(b), CheckBootstrapFor(b, s))
}

var (
	jsonPosRE      = regexp.MustCompile(`\(line \d+:\d+\): `)
	unknownFieldRE = regexp.MustCompile(`unknown field "([^"]+)"`)
)

// ParseBootstrapYAML decodes a bootstrap strictly: unknown fields, bad enum
// names, unresolvable "@type"s and duplicate YAML keys are errors.
func ParseBootstrapYAML(data []byte) (*bootstrapv3.Bootstrap, error) {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML: %w", err)
	}
	b := &bootstrapv3.Bootstrap{}
	if err := protojson.Unmarshal(js, b); err != nil {
		// protojson positions refer to the converted one-line JSON, which
		// the operator never sees: point at the YAML line instead.
		msg := jsonPosRE.ReplaceAllString(err.Error(), "")
		if strings.Contains(msg, "unable to resolve") {
			msg += " (a misspelled \"@type\", or an extension this validator does not link: add its Go package to the imports of envoy/validate.go)"
		}
		if m := unknownFieldRE.FindStringSubmatch(msg); m != nil {
			if line := yamlLineOf(data, m[1]); line > 0 {
				msg += fmt.Sprintf(" (YAML line %d; check its spelling and that this Envoy version has it)", line)
			}
		}
		return nil, fmt.Errorf("not a valid Envoy v3 bootstrap: %s", msg)
	}
	return b, nil
}

// yamlLineOf returns the first 1-based line that has key as a mapping key.
func yamlLineOf(data []byte, key string) int {
	re := regexp.MustCompile(`^\s*(?:-\s*)?["']?` + regexp.QuoteMeta(key) + `["']?\s*:`)
	for i, line := range strings.Split(string(data), "\n") {
		if re.MatchString(line) {
			return i + 1
		}
	}
	return 0
}

type validatorAll interface{ ValidateAll() error }

// ValidateMessage runs protoc-gen-validate's ValidateAll on m and on every
// message packed in a google.protobuf.Any below it (recursively: HCM →
// http_filters[].typed_config is two levels deep). Errors carry the field
// path of the Any they were found in. Use it for xDS resources before
// serving them: Envoy NACKs what fails here.
func ValidateMessage(m proto.Message) error {
	var errs []error
	validateAt(m, "", &errs)
	return errors.Join(errs...)
}

func validateAt(m proto.Message, path string, errs *[]error) {
	if v, ok := m.(validatorAll); ok {
		if err := v.ValidateAll(); err != nil {
			where := string(m.ProtoReflect().Descriptor().FullName())
			if path != "" {
				where = path + " (" + where + ")"
			}
			*errs = append(*errs, fmt.Errorf("%s: %w", where, err))
		}
	}
	walkAnys(m.ProtoReflect(), path, errs)
}

func walkAnys(m protoreflect.Message, path string, errs *[]error) {
	if m.Descriptor().FullName() == "google.protobuf.Any" {
		a, ok := m.Interface().(*anypb.Any)
		if !ok {
			return
		}
		inner, err := anypb.UnmarshalNew(a, proto.UnmarshalOptions{})
		if err != nil {
			*errs = append(*errs, fmt.Errorf("%s: cannot unpack %s: %w", path, a.GetTypeUrl(), err))
			return
		}
		validateAt(inner, path, errs)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		if fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		name := joinPath(path, string(fd.Name()))
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walkAnys(l.Get(i).Message(), fmt.Sprintf("%s[%d]", name, i), errs)
			}
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
					walkAnys(mv.Message(), fmt.Sprintf("%s[%q]", name, k.String()), errs)
					return true
				})
			}
		default:
			walkAnys(v.Message(), name, errs)
		}
		return true
	})
}

func joinPath(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}
