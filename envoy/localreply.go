package envoy

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/structpb"
)

// Envoy's own errors (a 503 when it cannot reach a neuron, a 504 when a
// timer fires, 413 above the buffer limit, 408 for an idle stream) are
// text/plain by default, which the OpenAI and Anthropic SDKs cannot parse.
// The HTTP connection manager's local_reply_config rewrites them: each
// mapper has an access-log filter, and the first mapper whose filter
// matches a local reply sets its status, headers and body format
// (LocalReplyImpl::rewrite). Only local replies are rewritten, never an
// upstream's answer, but cortex-extproc's own errors are local replies too
// (ext_proc immediate responses): they are already JSON and must pass
// unchanged.
//
// LocalReplies models that rewrite for the filters and formats our configs
// use, so that the validator can check what clients will see and the e2e
// Envoy stand-in can apply the shipped config. A config using anything else
// is refused with what is not modelled, so the model cannot silently
// differ from Envoy.

// LocalReplies is a modelled local_reply_config.
type LocalReplies struct {
	cfg *hcmv3.LocalReplyConfig
}

// LocalReply is one reply Envoy generates itself, before the rewrite.
type LocalReply struct {
	Status int
	// Flags are the response flags set, short names (UF, UH, NC, …).
	Flags []string
	// Details is %RESPONSE_CODE_DETAILS%.
	Details string
	// Body is the body before the rewrite (%LOCAL_REPLY_BODY%).
	Body string
	// ContentType is the content-type the reply already has ("" none):
	// an ext_proc immediate response may set one.
	ContentType string
	// Request holds the request headers by lower-case name, pseudo-headers
	// included, as Envoy has them when it replies (after ext_proc's
	// mutations).
	Request map[string]string
}

// RewrittenReply is what the client gets.
type RewrittenReply struct {
	Status      int
	Body        string
	ContentType string      // "" when the reply has none (no body)
	Headers     [][2]string // added by the mapper, in order
	// Mapper is the index of the mapper that matched, -1 for none.
	Mapper int
}

// NewLocalReplies checks that every mapper uses only modelled filters and
// formats. cfg may be nil (no local_reply_config).
func NewLocalReplies(cfg *hcmv3.LocalReplyConfig) (*LocalReplies, error) {
	var errs []error
	for i, m := range cfg.GetMappers() {
		if err := filterModelled(m.GetFilter()); err != nil {
			errs = append(errs, fmt.Errorf("mappers[%d].filter: %w", i, err))
		}
		if err := formatModelled(m.GetBodyFormatOverride()); err != nil {
			errs = append(errs, fmt.Errorf("mappers[%d].body_format_override: %w", i, err))
		}
		if b := m.GetBody(); b != nil && b.GetInlineString() == "" {
			errs = append(errs, fmt.Errorf("mappers[%d].body: only inline_string is modelled", i))
		}
		for _, h := range m.GetHeadersToAdd() {
			if err := textModelled(h.GetHeader().GetValue()); err != nil {
				errs = append(errs, fmt.Errorf("mappers[%d].headers_to_add %s: %w", i, h.GetHeader().GetKey(), err))
			}
		}
	}
	if err := formatModelled(cfg.GetBodyFormat()); err != nil {
		errs = append(errs, fmt.Errorf("body_format: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &LocalReplies{cfg: cfg}, nil
}

// Rewrite applies the config to r as Envoy does: the first matching
// mapper's status, headers_to_add and body, then its body_format_override
// (else the config's body_format, else the body as is). The content type
// becomes the format's when the body changed, else stays the reply's.
func (l *LocalReplies) Rewrite(r LocalReply) RewrittenReply {
	out := RewrittenReply{Status: r.Status, Body: r.Body, ContentType: r.ContentType, Mapper: -1}
	format := l.cfg.GetBodyFormat()
	for i, m := range l.cfg.GetMappers() {
		if !filterMatches(m.GetFilter(), r) {
			continue
		}
		out.Mapper = i
		if sc := m.GetStatusCode(); sc != nil {
			out.Status = int(sc.GetValue())
		}
		if b := m.GetBody(); b != nil {
			out.Body = b.GetInlineString()
		}
		r.Status, r.Body = out.Status, out.Body
		for _, h := range m.GetHeadersToAdd() {
			out.Headers = append(out.Headers, [2]string{strings.ToLower(h.GetHeader().GetKey()), substitute(h.GetHeader().GetValue(), r)})
		}
		if f := m.GetBodyFormatOverride(); f != nil {
			format = f
		}
		break
	}
	if format != nil {
		var contentType string
		out.Body, contentType = render(format, r)
		if out.Body != r.Body || out.ContentType == "" {
			out.ContentType = contentType
		}
	} else if out.ContentType == "" && out.Body != "" {
		out.ContentType = "text/plain"
	}
	return out
}

// filterModelled reports what of an access-log filter Rewrite cannot
// evaluate.
func filterModelled(f *accesslogv3.AccessLogFilter) error {
	switch x := f.GetFilterSpecifier().(type) {
	case *accesslogv3.AccessLogFilter_StatusCodeFilter:
		// A runtime_key's value is not modelled: default_value counts.
		c := x.StatusCodeFilter.GetComparison()
		if op := c.GetOp(); op != accesslogv3.ComparisonFilter_EQ && op != accesslogv3.ComparisonFilter_GE && op != accesslogv3.ComparisonFilter_LE {
			return fmt.Errorf("status_code_filter op %s is not modelled", op)
		}
	case *accesslogv3.AccessLogFilter_ResponseFlagFilter, *accesslogv3.AccessLogFilter_NotHealthCheckFilter:
	case *accesslogv3.AccessLogFilter_HeaderFilter:
		return headerMatcherModelled(x.HeaderFilter.GetHeader())
	case *accesslogv3.AccessLogFilter_AndFilter:
		return filtersModelled(x.AndFilter.GetFilters())
	case *accesslogv3.AccessLogFilter_OrFilter:
		return filtersModelled(x.OrFilter.GetFilters())
	default:
		return fmt.Errorf("%s is not modelled (status_code_filter, response_flag_filter, header_filter, and_filter, or_filter, not_health_check_filter are)", oneofName(f, "filter_specifier"))
	}
	return nil
}

func filtersModelled(fs []*accesslogv3.AccessLogFilter) error {
	var errs []error
	for _, f := range fs {
		errs = append(errs, filterModelled(f))
	}
	return errors.Join(errs...)
}

func headerMatcherModelled(h *routev3.HeaderMatcher) error {
	if h.GetInvertMatch() || h.GetTreatMissingHeaderAsEmpty() {
		return fmt.Errorf("header_filter %s: invert_match and treat_missing_header_as_empty are not modelled", h.GetName())
	}
	switch x := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
	case *routev3.HeaderMatcher_StringMatch:
		switch x.StringMatch.GetMatchPattern().(type) {
		case *matcherv3.StringMatcher_Exact, *matcherv3.StringMatcher_Prefix, *matcherv3.StringMatcher_Suffix, *matcherv3.StringMatcher_Contains:
		default:
			return fmt.Errorf("header_filter %s: string_match.%s is not modelled (exact, prefix, suffix, contains are)", h.GetName(), oneofName(x.StringMatch, "match_pattern"))
		}
	default:
		return fmt.Errorf("header_filter %s: %s is not modelled (present_match and string_match are)", h.GetName(), oneofName(h, "header_match_specifier"))
	}
	return nil
}

func filterMatches(f *accesslogv3.AccessLogFilter, r LocalReply) bool {
	switch x := f.GetFilterSpecifier().(type) {
	case *accesslogv3.AccessLogFilter_StatusCodeFilter:
		c := x.StatusCodeFilter.GetComparison()
		v := int(c.GetValue().GetDefaultValue())
		switch c.GetOp() {
		case accesslogv3.ComparisonFilter_GE:
			return r.Status >= v
		case accesslogv3.ComparisonFilter_LE:
			return r.Status <= v
		default:
			return r.Status == v
		}
	case *accesslogv3.AccessLogFilter_ResponseFlagFilter:
		want := x.ResponseFlagFilter.GetFlags()
		if len(want) == 0 {
			return len(r.Flags) > 0 // any flag
		}
		return slices.ContainsFunc(r.Flags, func(f string) bool { return slices.Contains(want, f) })
	case *accesslogv3.AccessLogFilter_NotHealthCheckFilter:
		return true
	case *accesslogv3.AccessLogFilter_HeaderFilter:
		return headerMatches(x.HeaderFilter.GetHeader(), r.Request)
	case *accesslogv3.AccessLogFilter_AndFilter:
		for _, sub := range x.AndFilter.GetFilters() {
			if !filterMatches(sub, r) {
				return false
			}
		}
		return true
	case *accesslogv3.AccessLogFilter_OrFilter:
		for _, sub := range x.OrFilter.GetFilters() {
			if filterMatches(sub, r) {
				return true
			}
		}
		return false
	}
	return false
}

func headerMatches(h *routev3.HeaderMatcher, req map[string]string) bool {
	v, present := req[strings.ToLower(h.GetName())]
	switch x := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
		return present == x.PresentMatch
	case *routev3.HeaderMatcher_StringMatch:
		if !present {
			return false
		}
		sm := x.StringMatch
		if sm.GetIgnoreCase() {
			v = strings.ToLower(v)
		}
		lower := func(s string) string {
			if sm.GetIgnoreCase() {
				return strings.ToLower(s)
			}
			return s
		}
		switch p := sm.GetMatchPattern().(type) {
		case *matcherv3.StringMatcher_Exact:
			return v == lower(p.Exact)
		case *matcherv3.StringMatcher_Prefix:
			return strings.HasPrefix(v, lower(p.Prefix))
		case *matcherv3.StringMatcher_Suffix:
			return strings.HasSuffix(v, lower(p.Suffix))
		case *matcherv3.StringMatcher_Contains:
			return strings.Contains(v, lower(p.Contains))
		}
	}
	return false
}

// formatModelled reports what of a body format Rewrite cannot render.
func formatModelled(f *corev3.SubstitutionFormatString) error {
	if f == nil {
		return nil
	}
	if len(f.GetFormatters()) > 0 {
		return errors.New("formatters (extensions) are not modelled")
	}
	switch x := f.GetFormat().(type) {
	case *corev3.SubstitutionFormatString_TextFormat:
		//lint:ignore SA1019 the deprecated text_format is still honoured by Envoy.
		return textModelled(x.TextFormat)
	case *corev3.SubstitutionFormatString_TextFormatSource:
		if x.TextFormatSource.GetInlineString() == "" {
			return errors.New("text_format_source: only inline_string is modelled")
		}
		return textModelled(x.TextFormatSource.GetInlineString())
	case *corev3.SubstitutionFormatString_JsonFormat:
		var errs []error
		walkStrings(structpb.NewStructValue(x.JsonFormat), func(s string) { errs = append(errs, textModelled(s)) })
		return errors.Join(errs...)
	default:
		return fmt.Errorf("%s is not modelled", oneofName(f, "format"))
	}
}

// oneofName is the field name set in a oneof, for messages that say which
// part of a config is not modelled.
func oneofName(m proto.Message, oneof string) string {
	r := m.ProtoReflect()
	od := r.Descriptor().Oneofs().ByName(protoreflect.Name(oneof))
	if od == nil {
		return oneof
	}
	if fd := r.WhichOneof(od); fd != nil {
		return string(fd.Name())
	}
	return oneof + " (unset)"
}

func walkStrings(v *structpb.Value, f func(string)) {
	switch x := v.GetKind().(type) {
	case *structpb.Value_StringValue:
		f(x.StringValue)
	case *structpb.Value_StructValue:
		for _, fv := range x.StructValue.GetFields() {
			walkStrings(fv, f)
		}
	case *structpb.Value_ListValue:
		for _, lv := range x.ListValue.GetValues() {
			walkStrings(lv, f)
		}
	}
}

// operatorRE finds command operators: %NAME%, %NAME(arg)%, %NAME(arg):len%.
var operatorRE = regexp.MustCompile(`%([A-Z_]+)(?:\(([^)]*)\))?(?::\d+)?%`)

// modelledOperators are the command operators substitute knows.
var modelledOperators = map[string]bool{
	"LOCAL_REPLY_BODY": true, "RESPONSE_CODE": true, "RESPONSE_FLAGS": true, "RESPONSE_CODE_DETAILS": true, "REQ": true,
}

func textModelled(s string) error {
	var errs []error
	for _, m := range operatorRE.FindAllStringSubmatch(s, -1) {
		if !modelledOperators[m[1]] {
			errs = append(errs, fmt.Errorf("command operator %%%s%% is not modelled", m[1]))
		}
	}
	return errors.Join(errs...)
}

// substitute expands the command operators in s for r.
func substitute(s string, r LocalReply) string {
	return operatorRE.ReplaceAllStringFunc(s, func(op string) string {
		m := operatorRE.FindStringSubmatch(op)
		switch m[1] {
		case "LOCAL_REPLY_BODY":
			return r.Body
		case "RESPONSE_CODE":
			return strconv.Itoa(r.Status)
		case "RESPONSE_FLAGS":
			if len(r.Flags) == 0 {
				return "-"
			}
			return strings.Join(r.Flags, ",")
		case "RESPONSE_CODE_DETAILS":
			return r.Details
		case "REQ":
			name, _, _ := strings.Cut(m[2], "?")
			if v, ok := r.Request[strings.ToLower(name)]; ok {
				return v
			}
			return "-"
		}
		return op
	})
}

// render formats the body and returns it with the format's content type
// (application/json for json_format, text/plain for text, unless set).
func render(f *corev3.SubstitutionFormatString, r LocalReply) (body, contentType string) {
	switch x := f.GetFormat().(type) {
	case *corev3.SubstitutionFormatString_JsonFormat:
		contentType = "application/json"
		v := renderJSON(structpb.NewStructValue(x.JsonFormat), r)
		b, _ := json.Marshal(v)
		body = string(b) + "\n" // Envoy's JSON formatter ends the line
	case *corev3.SubstitutionFormatString_TextFormat:
		//lint:ignore SA1019 the deprecated text_format is still honoured by Envoy.
		contentType, body = "text/plain", substitute(x.TextFormat, r)
	case *corev3.SubstitutionFormatString_TextFormatSource:
		contentType, body = "text/plain", substitute(x.TextFormatSource.GetInlineString(), r)
	}
	if f.GetContentType() != "" {
		contentType = f.GetContentType()
	}
	return body, contentType
}

// renderJSON renders a json_format value: strings are substituted, and a
// string that is exactly %RESPONSE_CODE% becomes a number, as in Envoy.
func renderJSON(v *structpb.Value, r LocalReply) any {
	switch x := v.GetKind().(type) {
	case *structpb.Value_StringValue:
		if x.StringValue == "%RESPONSE_CODE%" {
			return r.Status
		}
		return substitute(x.StringValue, r)
	case *structpb.Value_StructValue:
		out := map[string]any{}
		for k, fv := range x.StructValue.GetFields() {
			out[k] = renderJSON(fv, r)
		}
		return out
	case *structpb.Value_ListValue:
		var out []any
		for _, lv := range x.ListValue.GetValues() {
			out = append(out, renderJSON(lv, r))
		}
		return out
	default:
		return v.AsInterface()
	}
}
