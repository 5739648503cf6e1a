package extproc

import (
	"net/url"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/helexa/cortex-extproc/routing"
)

// MetadataNamespace is the dynamic metadata namespace cortex-extproc writes
// (Envoy drops it unless listed in metadata_options.receiving_namespaces).
const MetadataNamespace = "cortex"

// LBNamespace is where the endpoint-picker protocol puts the destination.
const LBNamespace = "envoy.lb"

// immediateResponse is a local reply with a JSON body. Setting content-type
// here keeps Envoy from defaulting it to text/plain.
func immediateResponse(code int, body []byte, details string) *extprocv3.ImmediateResponse {
	return &extprocv3.ImmediateResponse{
		Status: &typev3.HttpStatus{Code: typev3.StatusCode(code)},
		Headers: &extprocv3.HeaderMutation{SetHeaders: []*corev3.HeaderValueOption{
			setHeader("content-type", "application/json"),
		}},
		Body:    body,
		Details: details,
	}
}

// dynamicMetadata is {"cortex": {model, node, cold_start}} for access logs,
// plus {"envoy.lb": {key: value}} in endpoint-picker mode.
func dynamicMetadata(t *routing.Target, lbKey, value string) *structpb.Struct {
	fields := make(map[string]*structpb.Value, 2)
	fields[MetadataNamespace] = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
		"model":      structpb.NewStringValue(t.Model),
		"node":       structpb.NewStringValue(t.Node),
		"cold_start": structpb.NewBoolValue(t.ColdStart),
	}})
	if lbKey != "" {
		fields[LBNamespace] = structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			lbKey: structpb.NewStringValue(value),
		}})
	}
	return &structpb.Struct{Fields: fields}
}

// unescapePath decodes a model id from a URL path segment ("Qwen%2FQwen3-8B").
func unescapePath(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}
