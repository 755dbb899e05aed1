package envoy

import (
	"strconv"
	"strings"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// CORSFilter is Envoy's CORS HTTP filter. Its own config is empty: everything it does
// comes from a CorsPolicy in the route's or virtual host's typed_per_filter_config, and
// without one it passes every request and response through untouched
// (source/extensions/filters/http/cors/cors_filter.cc: enabled() is false when no
// policy was found, and decodeHeaders continues). So it can sit on every policy
// listener and act only on the routes of apps with spec.mcp.cors.
func CORSFilter() (*hcmv3.HttpFilter, error) {
	return httpFilter(FilterCORS, &corsv3.Cors{})
}

// CORSOptions describe the CORS policy of a route.
type CORSOptions struct {
	// Origins are matched exactly against the Origin header; AnyOrigin matches every
	// origin instead.
	Origins          []string
	AnyOrigin        bool
	Methods          []string
	Headers          []string
	ExposeHeaders    []string
	MaxAge           time.Duration // sent in whole seconds
	AllowCredentials bool
}

// CORSPolicy is the per-route config of the CORS filter.
//
// A preflight (OPTIONS with Origin and Access-Control-Request-Method) from an allowed
// origin is answered by the filter itself with 200 and the Access-Control-* headers:
// it never reaches ext_authz, ext_proc or the app, and grants nothing but the browser's
// permission to send the real request, which then goes through every check.
// forward_not_matching_preflights is true: a preflight from any other origin goes on
// down the chain, where ext_authz refuses it as it refuses every request without
// credentials. With false, Envoy would answer it 200 itself (without
// Access-Control-Allow-Origin, so browsers fail it, but a 200 all the same); true is
// also Envoy's default (cors_filter.cc forwardNotMatchingPreflights), set explicitly so
// that the choice is visible and pinned by the golden files.
//
// The policy goes into typed_per_filter_config, not the deprecated RouteAction.cors and
// VirtualHost.cors fields, which the filter reads only when no per-filter policy exists
// (cors_filter.cc initializeCorsPolicies).
func CORSPolicy(o CORSOptions) (*anypb.Any, error) {
	p := &corsv3.CorsPolicy{
		AllowMethods:                 strings.Join(o.Methods, ","),
		AllowHeaders:                 strings.Join(o.Headers, ","),
		ExposeHeaders:                strings.Join(o.ExposeHeaders, ","),
		AllowCredentials:             wrapperspb.Bool(o.AllowCredentials),
		ForwardNotMatchingPreflights: wrapperspb.Bool(true),
	}
	if o.MaxAge > 0 {
		p.MaxAge = strconv.FormatInt(int64(o.MaxAge/time.Second), 10)
	}
	if o.AnyOrigin {
		// Envoy echoes the request's Origin back in Access-Control-Allow-Origin, which is
		// what "*" means without credentials (policy refuses "*" with credentials).
		p.AllowOriginStringMatch = []*matcherv3.StringMatcher{{MatchPattern: &matcherv3.StringMatcher_SafeRegex{
			SafeRegex: &matcherv3.RegexMatcher{Regex: ".*"}}}}
	}
	for _, origin := range o.Origins {
		p.AllowOriginStringMatch = append(p.AllowOriginStringMatch, &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Exact{Exact: origin}})
	}
	return Any(p)
}

// PublicCORSHeaders are the response headers of a public document Envoy answers itself
// (the RFC 9728 metadata document): the CORS filter does nothing on direct-response
// routes (cors_filter.cc decodeHeaders continues when the route has no routeEntry), so a
// browser-based client could not read the document, nor get a preflight to it answered,
// without them. The document is public and read without credentials, so any origin may
// read it ("*", never with credentials); the preflight a client sends first (its GET
// carries MCP-Protocol-Version) is answered by the same direct response, 200 with these
// headers, on any method.
func PublicCORSHeaders(allowHeaders []string, maxAge time.Duration) []*corev3.HeaderValueOption {
	h := map[string]string{
		"access-control-allow-origin":  "*",
		"access-control-allow-methods": "GET,OPTIONS",
		"access-control-allow-headers": strings.Join(allowHeaders, ","),
	}
	if maxAge > 0 {
		h["access-control-max-age"] = strconv.FormatInt(int64(maxAge/time.Second), 10)
	}
	return headers(h)
}
