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

// GRPCProcessingMode is the processing mode of routes to apps serving gRPC MCP
// (mcp.transport grpc), set per route by [ExtProcGRPC]:
//   - request headers (the method is the path) and the request body STREAMED: a gRPC
//     call is a stream of length-prefixed messages, a Session one that never ends, so it
//     cannot be buffered. In STREAMED mode Envoy sends each body chunk to the processor
//     as it arrives and forwards it only after the processor's reply, the reply's
//     body_mutation replacing that chunk (ext_proc.proto ProcessingMode.BodySendMode
//     STREAMED, "Stream the body to the server in pieces as they are seen";
//     external_processor.proto CommonResponse.body_mutation, "simply replace or clear the
//     body chunk that was sent with that request"; ext_proc.cc onData/handleBodyResponse).
//     mcpgate reassembles messages across chunks and forwards only those it allowed, so
//     nothing reaches the app before it is decided, and a message's size is bounded by
//     ext_proc (limits.maxRequestBytes), not by Envoy's buffer: a full chunk queue pauses
//     the client (flow control) rather than failing the call.
//   - response headers, and no response body: mcpgate asks for it STREAMED with a
//     mode_override when it must filter ListTools or redact a result, as on Streamable
//     HTTP routes. The filter allows the override (allow_mode_override, with no
//     allowed_override_modes list, so any mode including STREAMED).
//   - no trailers either way: grpc-status travels in them, and mcpgate has nothing to
//     decide on them.
func GRPCProcessingMode() *extprocv3.ProcessingMode {
	return &extprocv3.ProcessingMode{
		RequestHeaderMode:   extprocv3.ProcessingMode_SEND,
		RequestBodyMode:     extprocv3.ProcessingMode_STREAMED,
		ResponseHeaderMode:  extprocv3.ProcessingMode_SEND,
		ResponseBodyMode:    extprocv3.ProcessingMode_NONE,
		RequestTrailerMode:  extprocv3.ProcessingMode_SKIP,
		ResponseTrailerMode: extprocv3.ProcessingMode_SKIP,
	}
}

// ExtProcGRPC is the per-route ext_proc config of gRPC MCP routes: the filter's
// processing mode replaced by [GRPCProcessingMode] (ExtProcPerRoute.overrides
// .processing_mode); everything else (cluster, timeouts, metadata forwarding, failing
// closed) stays the filter's.
func ExtProcGRPC() (*anypb.Any, error) {
	return Any(&extprocv3.ExtProcPerRoute{Override: &extprocv3.ExtProcPerRoute_Overrides{
		Overrides: &extprocv3.ExtProcOverrides{ProcessingMode: GRPCProcessingMode()},
	}})
}

// ExtProcFilter is the ext_proc HTTP filter with a validated typed_config.
func ExtProcFilter(cluster string) (*hcmv3.HttpFilter, error) {
	return httpFilter(FilterExtProc, ExtProc(cluster))
}

// ExtProcDisabled turns ext_proc off on a route (public documents, Envoy's own 404).
func ExtProcDisabled() (*anypb.Any, error) {
	return Any(&extprocv3.ExtProcPerRoute{Override: &extprocv3.ExtProcPerRoute_Disabled{Disabled: true}})
}
