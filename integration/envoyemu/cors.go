package envoyemu

import (
	"errors"
	"fmt"
	"net/http"
	"regexp"

	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
)

// The CORS filter (envoy.filters.http.cors), as source/extensions/filters/http/cors/
// cors_filter.cc implements it: its own config (Cors) is empty, and what it does comes
// from the CorsPolicy of the route and of the virtual host (typed_per_filter_config).

// checkCORSPolicy accepts the CorsPolicy fields the emulator implements.
func checkCORSPolicy(p *corsv3.CorsPolicy) error {
	if p.GetFilterEnabled() != nil || p.GetShadowEnabled() != nil || p.GetAllowPrivateNetworkAccess() != nil {
		return errors.New("filter_enabled, shadow_enabled and allow_private_network_access are not emulated")
	}
	for _, m := range p.GetAllowOriginStringMatch() {
		if re := m.GetSafeRegex(); re != nil {
			if _, err := regexp.Compile(re.GetRegex()); err != nil {
				return fmt.Errorf("allow_origin_string_match: %w", err)
			}
		}
	}
	return nil
}

// corsState is what the filter latched in decodeHeaders for encodeHeaders.
type corsState struct {
	policies []*corsv3.CorsPolicy // the route's first, then the virtual host's
	origin   string               // the request's Origin if it is allowed, else ""
}

// corsPolicies are the route's CorsPolicy, then the virtual host's: the most specific
// first (cors_filter.cc initializeCorsPolicies reverses getAllPerFilterConfig, which
// lists the virtual host's first). Each setting is taken from the first policy that
// has it.
func (s *stream) corsPolicies(filter string) []*corsv3.CorsPolicy {
	var out []*corsv3.CorsPolicy
	for _, m := range []map[string]proto.Message{s.route.own, s.route.vh.perFilter} {
		if p, ok := m[filter].(*corsv3.CorsPolicy); ok {
			out = append(out, p)
		}
	}
	return out
}

// corsDecode is CorsFilter::decodeHeaders. Without a route entry (no route, or a
// direct response) or without a policy it does nothing; nor for a request without
// Origin. A preflight (OPTIONS, Origin, a non-empty Access-Control-Request-Method) is
// answered here with 200 when the origin is allowed, or when it is not and
// forward_not_matching_preflights is false (default true: the preflight goes on down
// the chain). The answer is the filter's own (decoder_callbacks_->encodeHeaders, end of
// stream): nothing after the filter sees the request.
func (s *stream) corsDecode(f *filterCfg) *response {
	if s.route == nil || s.route.r.GetRoute() == nil {
		return nil
	}
	policies := s.corsPolicies(f.name)
	// enabled(): policies_[0].enabled(), filter_enabled defaulting to 100%; no policy
	// at all means disabled.
	if len(policies) == 0 {
		return nil
	}
	origin := s.req.value("origin")
	if origin == "" {
		return nil
	}
	st := &corsState{policies: policies}
	allowed := st.originAllowed(origin)
	if allowed {
		st.origin = origin
	}
	s.cors = st // is_cors_request_
	if s.req.value(":method") != http.MethodOptions || s.req.value("access-control-request-method") == "" {
		return nil
	}
	if !allowed && st.forwardNotMatching() {
		return nil
	}
	h := &headerMap{}
	if allowed {
		h.set("access-control-allow-origin", origin)
	}
	if st.allowCredentials() {
		h.set("access-control-allow-credentials", "true")
	}
	if m := st.first((*corsv3.CorsPolicy).GetAllowMethods); m == "*" {
		h.set("access-control-allow-methods", s.req.value("access-control-request-method"))
	} else if m != "" {
		h.set("access-control-allow-methods", m)
	}
	if hs := st.first((*corsv3.CorsPolicy).GetAllowHeaders); hs == "*" {
		h.set("access-control-allow-headers", s.req.value("access-control-request-headers"))
	} else if hs != "" {
		h.set("access-control-allow-headers", hs)
	}
	if a := st.first((*corsv3.CorsPolicy).GetMaxAge); a != "" {
		h.set("access-control-max-age", a)
	}
	// Headers only, end of stream: the codec writes content-length: 0 on HTTP/1.
	h.set("content-length", "0")
	s.e.opts.Logf("envoyemu: %s cors_response (preflight from %q)", s, origin)
	return &response{status: http.StatusOK, h: h, length: 0}
}

// corsEncode is CorsFilter::encodeHeaders: on a CORS request from an allowed origin,
// every response gets Access-Control-Allow-Origin (the request's origin),
// Access-Control-Allow-Credentials when allowed, and Access-Control-Expose-Headers. It
// runs on every response that goes through the filter's encoder side: the upstream's,
// and the local replies of the filters after it (ext_authz's 401, ext_proc's
// immediate responses), since a local reply is encoded through the filters that
// decoded the request (source/common/http/filter_manager.cc).
func (s *stream) corsEncode(resp *response) {
	st := s.cors
	if st == nil || st.origin == "" || resp == nil {
		return
	}
	resp.h.set("access-control-allow-origin", st.origin)
	if st.allowCredentials() {
		resp.h.set("access-control-allow-credentials", "true")
	}
	if e := st.first((*corsv3.CorsPolicy).GetExposeHeaders); e != "" {
		resp.h.set("access-control-expose-headers", e)
	}
}

// originAllowed is CorsFilter::isOriginAllowed: the first policy with origins decides;
// a matcher that matches the string "*" allows every origin.
func (st *corsState) originAllowed(origin string) bool {
	for _, p := range st.policies {
		ms := p.GetAllowOriginStringMatch()
		if len(ms) == 0 {
			continue
		}
		for _, m := range ms {
			if originMatches(m, "*") || originMatches(m, origin) {
				return true
			}
		}
		return false
	}
	return false
}

// originMatches is a StringMatcher with safe_regex as well (a full match, as Envoy's
// RE2 matcher does: source/common/common/regex.cc CompiledGoogleReMatcher::match).
func originMatches(m *matcherv3.StringMatcher, v string) bool {
	if re := m.GetSafeRegex(); re != nil {
		r, err := regexp.Compile(`^(?:` + re.GetRegex() + `)$`)
		return err == nil && r.MatchString(v)
	}
	return stringMatches(m, v)
}

func (st *corsState) first(get func(*corsv3.CorsPolicy) string) string {
	for _, p := range st.policies {
		if v := get(p); v != "" {
			return v
		}
	}
	return ""
}

func (st *corsState) allowCredentials() bool {
	for _, p := range st.policies {
		if v := p.GetAllowCredentials(); v != nil {
			return v.GetValue()
		}
	}
	return false
}

// forwardNotMatching is forwardNotMatchingPreflights(): the first policy that sets it,
// true by default.
func (st *corsState) forwardNotMatching() bool {
	for _, p := range st.policies {
		if v := p.GetForwardNotMatchingPreflights(); v != nil {
			return v.GetValue()
		}
	}
	return true
}
