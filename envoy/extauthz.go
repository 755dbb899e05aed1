package envoy

import (
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// ExtAuthzTimeout bounds one Check. Envoy's 200ms default is too short for the first token
// of an issuer, which may fetch its JWKS; later Checks hit mcpgate's caches.
const ExtAuthzTimeout = 2 * time.Second

// ExtAuthz is the ext_authz filter calling mcpgate's Authorization service over gRPC on
// the named cluster. It fails closed: failure_mode_allow is false and an unreachable or
// erroring mcpgate answers 503 (status_on_error), never lets the request through.
func ExtAuthz(cluster string) *extauthzv3.ExtAuthz {
	return &extauthzv3.ExtAuthz{
		Services: &extauthzv3.ExtAuthz_GrpcService{GrpcService: &corev3.GrpcService{
			TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: cluster}},
			Timeout:         duration(ExtAuthzTimeout),
		}},
		TransportApiVersion: corev3.ApiVersion_V3,
		FailureModeAllow:    false,
		// 503 rather than 403: the caller is not refused, mcpgate could not decide; clients
		// may retry. Either way nothing reaches the app.
		StatusOnError: &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable},
		// mcpgate reads the caller's SPIFFE ID from source.principal, which Envoy fills
		// from the peer certificate's URI SAN; the PEM itself is not needed.
		IncludePeerCertificate: false,
	}
}

// ExtAuthzFilter is the ext_authz HTTP filter with a validated typed_config.
func ExtAuthzFilter(cluster string) (*hcmv3.HttpFilter, error) {
	return httpFilter(FilterExtAuthz, ExtAuthz(cluster))
}

// ExtAuthzContext is the per-route ext_authz config naming the target: mcpgate learns which
// app a request is for only from these context_extensions (never from the caller).
func ExtAuthzContext(ext map[string]string) (*anypb.Any, error) {
	return Any(&extauthzv3.ExtAuthzPerRoute{Override: &extauthzv3.ExtAuthzPerRoute_CheckSettings{
		CheckSettings: &extauthzv3.CheckSettings{ContextExtensions: ext},
	}})
}

// ExtAuthzDisabled turns ext_authz off on a route: only for public documents (RFC 9728
// metadata) and Envoy's own 404, which must be reachable without credentials.
func ExtAuthzDisabled() (*anypb.Any, error) {
	return Any(&extauthzv3.ExtAuthzPerRoute{Override: &extauthzv3.ExtAuthzPerRoute_Disabled{Disabled: true}})
}
