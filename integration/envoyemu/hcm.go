package envoyemu

import (
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
)

// What the HCM does to a request before routing and before any filter sees it
// (source/common/http/conn_manager_impl.cc ActiveStream::decodeHeaders): normalize the
// path or refuse it (ConnectionManagerUtility::maybeNormalizePath), then tell internal
// requests from external ones and take the headers only internal ones may carry from the
// others (ConnectionManagerUtility::mutateRequestHeaders).

// parseEscapedSlashes reads path_with_escaped_slashes_action. Its default comes from
// runtime (http_connection_manager.path_with_escaped_slashes_action), KEEP_UNCHANGED
// unless set (source/extensions/filters/network/http_connection_manager/config.cc
// getPathWithEscapedSlashesAction). A redirect is not emulated.
func parseEscapedSlashes(a hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction) (hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction, error) {
	switch a {
	case hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT:
		return hcmv3.HttpConnectionManager_KEEP_UNCHANGED, nil
	case hcmv3.HttpConnectionManager_KEEP_UNCHANGED, hcmv3.HttpConnectionManager_REJECT_REQUEST,
		hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD:
		return a, nil
	case hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT:
		return 0, errors.New("path_with_escaped_slashes_action UNESCAPE_AND_REDIRECT is not emulated")
	}
	// Envoy's config validation accepts defined values only (enum defined_only).
	return 0, fmt.Errorf("path_with_escaped_slashes_action %d is not defined", a)
}

// escapedSlashes are what PathUtil::unescapeSlashes decodes (source/common/http/
// path_utility.cc), in both cases of the hex digit.
var escapedSlashes = strings.NewReplacer("%2F", "/", "%2f", "/", "%5C", `\`, "%5c", `\`)

// maybeNormalizePath is ConnectionManagerUtility::maybeNormalizePath: the path the request
// is routed and forwarded on, or false when the HCM refuses it. First a '#' anywhere
// refuses it (runtime guard envoy.reloadable_features.http_reject_path_with_fragment, on
// by default); then, unless escaped is KEEP_UNCHANGED, %2F and %5C in the path (not the
// query) are decoded, and REJECT_REQUEST refuses a path that had one while
// UNESCAPE_AND_FORWARD goes on with the decoded path; then normalize_path
// (PathUtil::canonicalPath); then merge_slashes, after normalizing on purpose ("to catch
// potential edge cases with percent encoding").
func maybeNormalizePath(p string, escaped hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction, normalize, merge bool) (string, bool) {
	if strings.Contains(p, "#") {
		return "", false
	}
	if escaped != hcmv3.HttpConnectionManager_KEEP_UNCHANGED {
		path, query, hasQuery := strings.Cut(p, "?")
		if u := escapedSlashes.Replace(path); u != path {
			if escaped == hcmv3.HttpConnectionManager_REJECT_REQUEST {
				return "", false
			}
			p = u
			if hasQuery {
				p += "?" + query
			}
		}
	}
	if normalize {
		p = canonicalPath(p)
	}
	if merge {
		p = mergeSlashes(p)
	}
	return p, true
}

// canonicalPath removes dot segments (RFC 3986 5.2.4) from the path, not the query, as
// PathUtil::canonicalPath does with Chromium's url::CanonicalizePath: a backslash
// separates segments as '/' does, and "%2e" (either case) counts as a dot in a dot
// segment (test/common/http/path_utility_test.cc: "/a/..\\c" is "/c", "/a/b/%2E%2E/c" is
// "/a/c"). Not emulated: the canonicalizer's other rewrites (decoding escaped unreserved
// characters, escaping the characters a path may not hold) and its refusals ("%00" in a
// dot segment).
func canonicalPath(p string) string {
	path, query, hasQuery := strings.Cut(p, "?")
	segs := strings.Split(strings.ReplaceAll(path, `\`, "/"), "/")
	var out []string
	for i, seg := range segs {
		last := i == len(segs)-1
		switch dots(seg) {
		case 1:
			if last {
				out = append(out, "")
			}
		case 2:
			if len(out) > 1 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		default:
			out = append(out, seg)
		}
	}
	path = strings.Join(out, "/")
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	if hasQuery {
		return path + "?" + query
	}
	return path
}

// dots is 1 for a "." segment, 2 for a ".." one, each dot spelled '.' or "%2e", else 0.
func dots(seg string) int {
	n := 0
	for seg != "" {
		switch {
		case seg[0] == '.':
			seg = seg[1:]
		case len(seg) >= 3 && strings.EqualFold(seg[:3], "%2e"):
			seg = seg[3:]
		default:
			return 0
		}
		if n++; n > 2 {
			return 0
		}
	}
	return n
}

// mergeSlashes collapses runs of '/' in the path, not the query (PathUtil::mergeSlashes).
func mergeSlashes(p string) string {
	path, query, hasQuery := strings.Cut(p, "?")
	for strings.Contains(path, "//") {
		path = strings.ReplaceAll(path, "//", "/")
	}
	if hasQuery {
		return path + "?" + query
	}
	return path
}

// normalizePath applies normalize_path and merge_slashes, in Envoy's order.
func normalizePath(p string, normalize, merge bool) string {
	p, _ = maybeNormalizePath(p, hcmv3.HttpConnectionManager_KEEP_UNCHANGED, normalize, merge)
	return p
}

// rejectPath answers a request whose path the HCM refused: 400 with no body, details
// path_normalization_failed (counted as downstream_rq_failed_path_normalization), sent
// by the HCM before it made the filter chain, so no filter sees the request nor encodes
// the reply. A 400 on HTTP/1 closes the connection (ActiveStream::onLocalReply); to a
// gRPC request it is trailers-only (localResponse).
func (s *stream) rejectPath(w http.ResponseWriter) {
	s.e.opts.Logf("envoyemu: %s rejected: path_normalization_failed %q", s, s.req.value(":path"))
	if s.r.ProtoMajor < 2 {
		w.Header().Set("connection", "close")
	}
	s.write(w, s.localResponse(&localReply{status: http.StatusBadRequest, details: "path_normalization_failed"}))
}

// internalAddresses is internal_address_config.
type internalAddresses struct {
	unixSockets bool // the emulator's listeners are TCP only
	ranges      []netip.Prefix
}

// parseInternalAddresses reads internal_address_config; nil when it is unset. A range
// whose prefix is not an IP address, or whose length exceeds its address's, refuses the
// config, as Envoy's IpList does; the address is masked to the length
// (source/common/network/cidr_range.cc CidrRange::create).
func parseInternalAddresses(c *hcmv3.HttpConnectionManager_InternalAddressConfig) (*internalAddresses, error) {
	if c == nil {
		return nil, nil
	}
	ia := &internalAddresses{unixSockets: c.GetUnixSockets()}
	for _, r := range c.GetCidrRanges() {
		p, err := cidrRange(r)
		if err != nil {
			return nil, fmt.Errorf("internal_address_config: %w", err)
		}
		ia.ranges = append(ia.ranges, p)
	}
	return ia, nil
}

func cidrRange(r *corev3.CidrRange) (netip.Prefix, error) {
	a, err := netip.ParseAddr(r.GetAddressPrefix())
	if err != nil || a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("cidr range %q is not an IP address", r.GetAddressPrefix())
	}
	p, err := a.Prefix(int(r.GetPrefixLen().GetValue()))
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("cidr range %s/%d: %w", r.GetAddressPrefix(), r.GetPrefixLen().GetValue(), err)
	}
	return p, nil
}

// contains is InternalAddressConfig::isInternalAddress for an IP address
// (source/extensions/filters/network/http_connection_manager/config.h): unset, no
// address is internal (Envoy 1.33 on: http_connection_manager.proto); with ranges, those
// in them; with none, the RFC1918 / RFC4193 ones.
func (ia *internalAddresses) contains(a netip.Addr) bool {
	switch {
	case ia == nil:
		return false
	case len(ia.ranges) == 0:
		return privateAddress(a)
	}
	for _, p := range ia.ranges {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

var (
	privateV4 = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("172.16.0.0/12"),
		netip.MustParsePrefix("192.168.0.0/16"), netip.MustParsePrefix("127.0.0.1/32")}
	privateV6 = []netip.Prefix{netip.MustParsePrefix("fd00::/8"), netip.MustParsePrefix("::1/128")}
)

// privateAddress is Network::Utility::isInternalAddress (source/common/network/
// utility.cc): RFC1918 and 127.0.0.1 itself (not all of 127/8), fd00::/8 and ::1.
func privateAddress(a netip.Addr) bool {
	ps := privateV6
	if a.Is4() {
		ps = privateV4
	}
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// lastForwardedFor is Utility::getLastAddressFromXFF with no hop to skip
// (source/common/http/utility.cc): the address after the last comma of x-forwarded-for
// (every value joined, as Envoy's inline header holds them), blanks trimmed, and whether
// it is the only entry; no address when there is no header or that text is not one.
func lastForwardedFor(h *headerMap) (a netip.Addr, only bool) {
	xff, ok := h.joined("x-forwarded-for")
	if !ok {
		return netip.Addr{}, false
	}
	last := strings.LastIndex(xff, ",")
	if last >= 0 && last+1 < len(xff) {
		xff = xff[last+1:]
	}
	a, err := netip.ParseAddr(strings.Trim(xff, " \t\f\v\n\r"))
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, false
	}
	return a, last < 0
}

// isInternal is how mutateRequestHeaders tells an internal request: with
// use_remote_address, by the connection's peer, and only when the request came without
// x-forwarded-for; without it, by the last x-forwarded-for entry, and only when it is
// the only one (the XFF original IP detection extension, xff_num_trusted_hops 0:
// source/extensions/http/original_ip_detection/xff/xff.cc). Either way the address must
// be internal by internal_address_config.
func isInternal(ia *internalAddresses, useRemote bool, peer string, h *headerMap) bool {
	if useRemote {
		if _, ok := h.get("x-forwarded-for"); ok {
			return false
		}
		ap, err := netip.ParseAddrPort(peer)
		return err == nil && ia.contains(ap.Addr().Unmap())
	}
	a, only := lastForwardedFor(h)
	return only && ia.contains(a)
}

// internalOnlyHeaders are the headers cleanInternalHeaders removes from every external
// request (source/common/http/conn_manager_utility.cc), besides the route
// configuration's internal_only_headers; edgeOnlyHeaders go too when the HCM uses the
// remote address (an edge request).
var (
	internalOnlyHeaders = []string{"x-envoy-retriable-status-codes", "x-envoy-retriable-header-names",
		"x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries", "x-envoy-upstream-alt-stat-name",
		"x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
		"x-envoy-upstream-rq-timeout-alt-response", "x-envoy-expected-rq-timeout-ms", "x-envoy-force-trace",
		"x-envoy-ip-tags", "x-envoy-original-url", "x-envoy-hedge-on-per-try-timeout"}
	edgeOnlyHeaders = []string{"x-envoy-decorator-operation", "x-envoy-downstream-service-cluster",
		"x-envoy-downstream-service-node"}
)

// sanitize is the internal/external part of mutateRequestHeaders: x-envoy-internal is
// removed from every request, then set on an internal one; an external one loses the
// headers only internal requests may carry (cleanInternalHeaders). The router sets
// x-envoy-expected-rq-timeout-ms later, after this. Not emulated: appending the peer to
// x-forwarded-for and x-envoy-external-address under use_remote_address, and a new
// x-request-id for edge requests.
func (s *stream) sanitize() {
	s.req.del("x-envoy-internal")
	if isInternal(s.l.internal, s.l.useRemote, s.r.RemoteAddr, s.req) {
		s.req.set("x-envoy-internal", "true")
		return
	}
	drop := [][]string{internalOnlyHeaders}
	if s.l.useRemote {
		drop = append(drop, edgeOnlyHeaders)
	}
	if rc := s.routeConfig(); rc != nil {
		drop = append(drop, rc.internalOnly)
	}
	for _, ks := range drop {
		for _, k := range ks {
			s.req.del(k)
		}
	}
}
