package envoy

import (
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tracev3 "github.com/envoyproxy/go-control-plane/envoy/config/trace/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// StreamIdleTimeout is how long a request stream may be silent. An MCP server may keep a
// Streamable HTTP SSE stream quiet for minutes; Envoy's 5 minute default would cut it.
const StreamIdleTimeout = time.Hour

// ConnectionIdleTimeout closes downstream connections with no active stream.
const ConnectionIdleTimeout = time.Hour

// ListenerOptions describe one listener.
type ListenerOptions struct {
	Name      string
	Address   string
	Port      uint32
	Direction corev3.TrafficDirection
	Chains    []*listenerv3.FilterChain
	// BufferLimit is per_connection_buffer_limit_bytes (0: Envoy's 1 MiB default).
	BufferLimit uint32
}

// Listener builds a TCP listener.
func Listener(o ListenerOptions) *listenerv3.Listener {
	l := &listenerv3.Listener{
		Name:             o.Name,
		Address:          SocketAddress(o.Address, o.Port),
		TrafficDirection: o.Direction,
		FilterChains:     o.Chains,
	}
	if o.BufferLimit > 0 {
		l.PerConnectionBufferLimitBytes = wrapperspb.UInt32(o.BufferLimit)
	}
	return l
}

// SocketAddress is a TCP address.
func SocketAddress(host string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address:       host,
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// HTTPFilters is the HTTP filter chain of every listener that enforces policy. The order
// is the contract with mcpgate and is defined here only:
//  0. cors: first, so that a preflight from an allowed origin is answered before
//     ext_authz would refuse it for having no credentials (browsers never send them on
//     a preflight), and so that its encodeHeaders runs on ext_authz's and ext_proc's
//     local replies too: a 401 then carries Access-Control-Allow-Origin and
//     Access-Control-Expose-Headers, and a browser client can read the
//     WWW-Authenticate challenge (a local reply is encoded through the filters that
//     decoded the request, source/common/http/filter_manager.cc). It acts only on
//     routes with a CorsPolicy (CORSFilter); elsewhere it passes everything through.
//  1. ext_authz: who is calling (mTLS identity, App-ID access control, bearer token). It
//     needs no body, so a refused caller costs no buffering, and it writes the dynamic
//     metadata (envoy.filters.http.ext_authz) that ext_proc reads: Envoy only forwards
//     metadata written by filters that ran before.
//  2. ext_proc: what the caller is doing, decided on the buffered JSON-RPC body with the
//     identity ext_authz established; it fails closed when that metadata is missing.
//  3. router: Envoy requires the terminal filter last.
func HTTPFilters(authzCluster string) ([]*hcmv3.HttpFilter, error) {
	cors, err := CORSFilter()
	if err != nil {
		return nil, err
	}
	authz, err := ExtAuthzFilter(authzCluster)
	if err != nil {
		return nil, err
	}
	proc, err := ExtProcFilter(authzCluster)
	if err != nil {
		return nil, err
	}
	router, err := RouterFilter()
	if err != nil {
		return nil, err
	}
	return []*hcmv3.HttpFilter{cors, authz, proc, router}, nil
}

// OutboundFilters is the filter chain of an App's outbound listener when some of its
// routes reach an HTTPEndpoint whose credentials mcpgate supplies: ext_authz, then the
// router. ext_authz is on for every route, and xds turns it off (ExtAuthzDisabled) on
// each route that needs no credentials, so a route xds forgot fails closed rather than
// open. On the credential routes mcpgate's OK answer sets the upstream's Authorization
// header and removes what the agent sent (OkHttpResponse.headers and
// headers_to_remove, applied by the filter before the router picks the upstream).
// There is no ext_proc: policy is enforced where the call is received (an App's
// sidecar), or by the remote server.
func OutboundFilters(authzCluster string) ([]*hcmv3.HttpFilter, error) {
	authz, err := ExtAuthzFilter(authzCluster)
	if err != nil {
		return nil, err
	}
	router, err := RouterFilter()
	if err != nil {
		return nil, err
	}
	return []*hcmv3.HttpFilter{authz, router}, nil
}

// RouterFilter is the terminal router filter.
func RouterFilter() (*hcmv3.HttpFilter, error) {
	return httpFilter(FilterRouter, &routerv3.Router{})
}

func httpFilter(name string, cfg proto.Message) (*hcmv3.HttpFilter, error) {
	a, err := Any(cfg)
	if err != nil {
		return nil, err
	}
	return &hcmv3.HttpFilter{Name: name, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}, nil
}

// HCMOptions describe an HTTP connection manager.
type HCMOptions struct {
	StatPrefix string
	// RouteConfig is the name of the RouteConfiguration, fetched over ADS (RDS), so a
	// route change does not drain the listener.
	RouteConfig string
	Filters     []*hcmv3.HttpFilter
	// Edge marks a listener facing callers outside the mesh: Envoy trusts no
	// x-forwarded-for from them and uses the peer address.
	Edge bool
}

// TracingOptions configure the HCM's OpenTelemetry tracer (envoy.tracers.opentelemetry:
// api/envoy/config/trace/v3/opentelemetry.proto), exporting over OTLP/gRPC through a
// cluster.
type TracingOptions struct {
	Cluster     string  // an HTTP/2 cluster to the OTLP collector
	ServiceName string  // the resource's service.name: whose sidecar this is
	Percent     float64 // random_sampling of requests without a sampling decision, 0–100
}

// TracerOpenTelemetry is the name of Envoy's OpenTelemetry tracer extension.
const TracerOpenTelemetry = "envoy.tracers.opentelemetry"

// SetTracing makes h trace its requests with Envoy's OpenTelemetry tracer.
func SetTracing(h *hcmv3.HttpConnectionManager, o TracingOptions) error {
	cfg, err := Any(&tracev3.OpenTelemetryConfig{
		GrpcService: &corev3.GrpcService{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
			EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: o.Cluster}}},
		ServiceName: o.ServiceName,
	})
	if err != nil {
		return err
	}
	h.Tracing = &hcmv3.HttpConnectionManager_Tracing{
		Provider: &tracev3.Tracing_Http{Name: TracerOpenTelemetry, ConfigType: &tracev3.Tracing_Http_TypedConfig{TypedConfig: cfg}},
		// Envoy keeps an incoming sampled decision (traceparent) and samples the rest at
		// random_sampling; client_sampling (x-client-trace-id) and overall_sampling stay
		// at their default of 100%.
		RandomSampling: &typev3.Percent{Value: o.Percent},
	}
	return nil
}

// HTTPConnectionManager builds an HCM that takes its routes from ADS.
func HTTPConnectionManager(o HCMOptions) *hcmv3.HttpConnectionManager {
	h := &hcmv3.HttpConnectionManager{
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		StatPrefix: o.StatPrefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    ADSConfigSource(),
			RouteConfigName: o.RouteConfig,
		}},
		HttpFilters:       o.Filters,
		StreamIdleTimeout: duration(StreamIdleTimeout),
		CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{
			IdleTimeout: duration(ConnectionIdleTimeout),
			// Many servers read "x_mcpgate_caller_app_id" as "x-mcpgate-caller-app-id"
			// (CGI-style environment variables, frameworks that fold '_' into '-'), so a
			// caller could forge an identity header under its underscore spelling. Envoy
			// refuses such requests in the codec, before any filter: 400 on HTTP/1, a
			// stream reset on HTTP/2 (api/envoy/config/core/v3/protocol.proto
			// HeadersWithUnderscoresAction). ext_authz strips both spellings as well
			// (contract.IsInternalHeader), in case an Envoy is configured otherwise.
			HeadersWithUnderscoresAction: corev3.HttpProtocolOptions_REJECT_REQUEST,
		},
		// Routes match exact paths and carry the target App ID for ext_authz: normalize
		// "/a/../mcp" and "//mcp" first so that no spelling of a path escapes its route.
		NormalizePath: wrapperspb.Bool(true),
		MergeSlashes:  true,
		// Envoy's default keeps %2F and %5C as they are, and normalize_path does not decode
		// them, so "/v1.0/invoke/tokened/method/..%2F..%2Fadmin" would reach an HTTPEndpoint
		// as "/api/..%2F..%2Fadmin" (prefix_rewrite) with mcpgate's Authorization, and an
		// upstream that decodes before routing would serve "/admin", outside its baseUrl
		// path. No MCP path needs an encoded slash or backslash: refuse them with a 400
		// from the HCM, before any filter (source/common/http/conn_manager_utility.cc
		// maybeNormalizePath, PathUtil::unescapeSlashes; in the path only, not the query).
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_REJECT_REQUEST,
		UseRemoteAddress:             wrapperspb.Bool(o.Edge),
		ForwardClientCertDetails:     hcmv3.HttpConnectionManager_SANITIZE,
	}
	if o.Edge {
		h.InternalAddressConfig = noInternalAddresses()
		// Virtual hosts match host names; "host:8443" from a browser must match too.
		h.StripPortMode = &hcmv3.HttpConnectionManager_StripAnyHostPort{StripAnyHostPort: true}
	}
	return h
}

// noInternalAddresses is the HCM's internal_address_config, one that no peer is in. Envoy
// keeps the x-envoy-* request headers that steer its router (x-envoy-retry-on,
// x-envoy-max-retries, x-envoy-upstream-rq-timeout-ms, ...), and adds x-envoy-internal,
// only on internal requests (source/common/http/conn_manager_utility.cc
// mutateRequestHeaders, cleanInternalHeaders), and which those are depends on the Envoy
// version when nothing says: before 1.33 an unset internal_address_config trusted RFC1918
// addresses (runtime guard envoy.reloadable_features.explicit_internal_address_config,
// since removed), and an InternalAddressConfig without cidr_ranges still falls back to
// RFC1918 / RFC4193 (source/extensions/filters/network/http_connection_manager/config.h
// InternalAddressConfig::isInternalAddress). Ranges that hold only the unspecified
// addresses, 0.0.0.0/32 and ::/128, are not empty and match no connection's peer, which
// is what an edge HCM (use_remote_address) checks, on every version. Sidecar HCMs (no
// use_remote_address) do not get it: there Envoy checks a lone x-forwarded-for entry,
// which the caller writes ("x-forwarded-for: 0.0.0.0" is in these ranges, as some
// address is in any non-empty range), and only an unset config on Envoy 1.33 or later,
// which mcpgate requires, trusts no address at all.
func noInternalAddresses() *hcmv3.HttpConnectionManager_InternalAddressConfig {
	return &hcmv3.HttpConnectionManager_InternalAddressConfig{
		UnixSockets: false,
		CidrRanges: []*corev3.CidrRange{
			{AddressPrefix: "0.0.0.0", PrefixLen: wrapperspb.UInt32(32)},
			{AddressPrefix: "::", PrefixLen: wrapperspb.UInt32(128)},
		},
	}
}

// HTTPFilterChain wraps an HCM in a filter chain, with a transport socket (TLS) or none
// (plaintext).
func HTTPFilterChain(name string, hcm *hcmv3.HttpConnectionManager, ts *corev3.TransportSocket) (*listenerv3.FilterChain, error) {
	a, err := Any(hcm)
	if err != nil {
		return nil, err
	}
	return &listenerv3.FilterChain{
		Name: name,
		Filters: []*listenerv3.Filter{{
			Name:       FilterHCM,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a},
		}},
		TransportSocket: ts,
	}, nil
}

// ADSConfigSource says "over the ADS stream this Envoy already has".
func ADSConfigSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}
