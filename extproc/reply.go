package extproc

import (
	"net/url"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

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

// dynamicMetadata is {"envoy.lb": {key: value}} in endpoint-picker mode
// (Gateway API Inference Extension), nil otherwise. The access log reads
// model, node and cold start from the x-cortex-* request headers instead:
// marshalling a Struct costs dozens of allocations per request.
func dynamicMetadata(lbKey, value string) *structpb.Struct {
	if lbKey == "" {
		return nil
	}
	return &structpb.Struct{Fields: map[string]*structpb.Value{
		LBNamespace: structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			lbKey: structpb.NewStringValue(value),
		}}),
	}}
}

// unescapePath decodes a model id from a URL path segment ("Qwen%2FQwen3-8B").
func unescapePath(s string) string {
	if u, err := url.PathUnescape(s); err == nil {
		return u
	}
	return s
}
