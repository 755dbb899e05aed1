package envoy

import (
	"sort"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Retry conditions (Envoy's x-envoy-retry-on values).
const (
	// RetryOnUnsent retries only when the request never reached the upstream
	// application (no connection, stream refused, reset before the request was sent):
	// safe for non-idempotent requests such as a JSON-RPC tools/call POST.
	RetryOnUnsent = "connect-failure,refused-stream,reset-before-request"
	// RetryOnIdempotent also retries resets and gateway errors: only for GET.
	RetryOnIdempotent = "connect-failure,refused-stream,reset,gateway-error"
)

// RouteConfiguration builds a route configuration (served over RDS).
func RouteConfiguration(name string, vhosts ...*routev3.VirtualHost) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{Name: name, VirtualHosts: vhosts, ValidateClusters: wrapperspb.Bool(false)}
}

// VirtualHost builds a virtual host.
func VirtualHost(name string, domains []string, routes []*routev3.Route) *routev3.VirtualHost {
	return &routev3.VirtualHost{Name: name, Domains: domains, Routes: routes}
}

// ExactPath matches one path (the query string is ignored by Envoy).
func ExactPath(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Path{Path: p}}
}

// Prefix matches a path prefix.
func Prefix(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: p}}
}

// PathSeparatedPrefix matches p and p/..., but not p-other.
func PathSeparatedPrefix(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_PathSeparatedPrefix{PathSeparatedPrefix: p}}
}

// GRPCPrefix matches the gRPC requests whose path starts with p (a service's methods,
// "/<package>.<service>/"): Content-Type application/grpc or application/grpc+<codec>, in
// any case, as ext_proc reads it. Other requests on those paths fall through (to the 404
// route) instead of reaching a gRPC server as something else. Envoy's RouteMatch.grpc
// makes the same test case-sensitively (source/common/grpc/common.cc
// hasGrpcContentType); the prefix also admits application/grpc-web, which ext_proc then
// refuses as a POST that is neither gRPC nor JSON.
func GRPCPrefix(p string) *routev3.RouteMatch {
	m := Prefix(p)
	m.Headers = append(m.Headers, &routev3.HeaderMatcher{
		Name: "content-type",
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "application/grpc"},
			IgnoreCase:   true,
		}},
	})
	return m
}

// WithHeader adds an exact header match to m and returns it.
func WithHeader(m *routev3.RouteMatch, name, value string) *routev3.RouteMatch {
	m.Headers = append(m.Headers, &routev3.HeaderMatcher{
		Name: name,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Exact{Exact: value},
		}},
	})
	return m
}

// ForwardOptions describe a route to a cluster.
type ForwardOptions struct {
	Cluster string
	// Timeout is the whole-response timeout; 0 disables it (long-lived streams).
	Timeout time.Duration
	// IdleTimeout bounds silence on the stream (0: the listener's stream idle timeout).
	IdleTimeout   time.Duration
	Retries       int
	RetryOn       string
	PrefixRewrite string
	HostRewrite   string
	// BodyLimit is request_body_buffer_limit: how much of a request body Envoy buffers
	// (ext_proc BUFFERED mode); larger bodies get 413.
	BodyLimit    uint64
	HeadersToAdd map[string]string
	// HeadersToRemove are removed by the router, after every filter ran (so a header a
	// filter set is removed too).
	HeadersToRemove []string
	PerFilter       map[string]*anypb.Any
}

// Forward builds a route to a cluster.
func Forward(name string, m *routev3.RouteMatch, o ForwardOptions) *routev3.Route {
	a := &routev3.RouteAction{
		ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: o.Cluster},
		Timeout:          duration(o.Timeout),
		PrefixRewrite:    o.PrefixRewrite,
	}
	if o.IdleTimeout > 0 {
		a.IdleTimeout = duration(o.IdleTimeout)
	}
	if o.HostRewrite != "" {
		a.HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: o.HostRewrite}
	}
	if o.Retries > 0 {
		a.RetryPolicy = &routev3.RetryPolicy{
			RetryOn:    o.RetryOn,
			NumRetries: wrapperspb.UInt32(uint32(o.Retries)),
		}
	}
	r := &routev3.Route{
		Name:                   name,
		Match:                  m,
		Action:                 &routev3.Route_Route{Route: a},
		TypedPerFilterConfig:   o.PerFilter,
		RequestHeadersToAdd:    headers(o.HeadersToAdd),
		RequestHeadersToRemove: o.HeadersToRemove,
	}
	if o.BodyLimit > 0 {
		r.RequestBodyBufferLimit = wrapperspb.UInt64(o.BodyLimit)
	}
	return r
}

// DirectResponse builds a route Envoy answers itself.
func DirectResponse(name string, m *routev3.RouteMatch, status uint32, contentType, body string, perFilter map[string]*anypb.Any) *routev3.Route {
	dr := &routev3.DirectResponseAction{Status: status}
	if body != "" {
		dr.Body = &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: body}}
	}
	r := &routev3.Route{
		Name:                 name,
		Match:                m,
		Action:               &routev3.Route_DirectResponse{DirectResponse: dr},
		TypedPerFilterConfig: perFilter,
	}
	if contentType != "" {
		r.ResponseHeadersToAdd = []*corev3.HeaderValueOption{{
			Header:       &corev3.HeaderValue{Key: "content-type", Value: contentType},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		}}
	}
	return r
}

// headers turns a map into header options in a stable order (sorted by name), replacing
// any value the caller sent.
func headers(h map[string]string) []*corev3.HeaderValueOption {
	if len(h) == 0 {
		return nil
	}
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, k)
	}
	sort.Strings(names)
	out := make([]*corev3.HeaderValueOption, 0, len(h))
	for _, k := range names {
		out = append(out, &corev3.HeaderValueOption{
			Header:       &corev3.HeaderValue{Key: k, Value: h[k]},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
		})
	}
	return out
}
