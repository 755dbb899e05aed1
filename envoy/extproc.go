package envoy

import (
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"google.golang.org/protobuf/types/known/anypb"
)

// ExtProcMessageTimeout bounds each ext_proc message exchange. Envoy's 200ms default
// would cut off a Rego decision on a large body; a timeout fails the request closed.
const ExtProcMessageTimeout = 5 * time.Second

// ExtProc is the ext_proc filter calling mcpgate's ExternalProcessor on the named cluster,
// with the processing mode mcpgate's ext_proc server expects:
//   - request headers and the whole request body (BUFFERED: a JSON-RPC message is decided
//     on as a whole; the route's request_body_buffer_limit bounds it),
//   - response headers, so mcpgate can ask for the body with a mode_override when it must
//     filter tools/list or redact a result (allow_mode_override), and no body otherwise,
//     which keeps long-lived SSE streams out of the processor,
//   - no trailers.
//
// It fails closed (failure_mode_allow false, 503 on error).
func ExtProc(cluster string) *extprocv3.ExternalProcessor {
	return &extprocv3.ExternalProcessor{
		GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: cluster}},
		},
		FailureModeAllow: false,
		ProcessingMode: &extprocv3.ProcessingMode{
			RequestHeaderMode:   extprocv3.ProcessingMode_SEND,
			RequestBodyMode:     extprocv3.ProcessingMode_BUFFERED,
			ResponseHeaderMode:  extprocv3.ProcessingMode_SEND,
			ResponseBodyMode:    extprocv3.ProcessingMode_NONE,
			RequestTrailerMode:  extprocv3.ProcessingMode_SKIP,
			ResponseTrailerMode: extprocv3.ProcessingMode_SKIP,
		},
		AllowModeOverride: true,
		MessageTimeout:    duration(ExtProcMessageTimeout),
		MetadataOptions: &extprocv3.MetadataOptions{
			ForwardingNamespaces: &extprocv3.MetadataOptions_MetadataNamespaces{Untyped: []string{contract.MetadataNamespace}},
		},
		StatusOnError: &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable},
	}
}

// ExtProcFilter is the ext_proc HTTP filter with a validated typed_config.
func ExtProcFilter(cluster string) (*hcmv3.HttpFilter, error) {
	return httpFilter(FilterExtProc, ExtProc(cluster))
}

// ExtProcDisabled turns ext_proc off on a route (public documents, Envoy's own 404).
func ExtProcDisabled() (*anypb.Any, error) {
	return Any(&extprocv3.ExtProcPerRoute{Override: &extprocv3.ExtProcPerRoute_Disabled{Disabled: true}})
}
