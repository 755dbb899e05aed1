package envoyemu

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/mcpgate/mcpgate/envoy"
)

// ConnectionManagerUtility::maybeNormalizePath: a fragment, then escaped slashes by
// path_with_escaped_slashes_action (in the path, not the query), then normalize_path,
// then merge_slashes.
func TestMaybeNormalizePath(t *testing.T) {
	const (
		keep    = hcmv3.HttpConnectionManager_KEEP_UNCHANGED
		reject  = hcmv3.HttpConnectionManager_REJECT_REQUEST
		forward = hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD
		refused = "(refused)"
	)
	for _, c := range []struct {
		in     string
		action hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction
		want   string
	}{
		{"/api/..%2F..%2Fadmin", reject, refused},
		{"/api/..%2f..%2fadmin", reject, refused},
		{"/api/..%5C..%5Cadmin", reject, refused},
		{"/api/..%5c..%5cadmin", reject, refused},
		{"/api/x%2Fy?q=1", reject, refused},
		{"/api/tools?next=%2Fadmin%5C&x=%2f%5c", reject, "/api/tools?next=%2Fadmin%5C&x=%2f%5c"}, // the query is not the path
		{"/api/%252F", reject, "/api/%252F"},                                                     // an escaped '%', then "2F"
		{"/api/tools", reject, "/api/tools"},
		{"/api/..%2F..%2Fadmin", keep, "/api/..%2F..%2Fadmin"}, // one segment, no dot segment
		{"/api/..%5c..%5cadmin", keep, "/api/..%5c..%5cadmin"},
		{"/a/b/..%2F..%2Fadmin?q=%2F", forward, "/admin?q=%2F"}, // decoded, then normalized
		{"/a/b/..%5C..%5Cadmin", forward, "/admin"},             // a backslash separates segments
		{"/mcp#frag", keep, refused},
		{"/mcp?x=1#frag", reject, refused},
		{"/mcp#", forward, refused},
		{"/a//../b", keep, "/a/b"}, // normalize_path before merge_slashes
		{"/a/b/%2E%2E/c", keep, "/a/c"},
		{"/a/b/%2e./c", keep, "/a/c"},
		{"/a/b/%2E/c", keep, "/a/b/c"},
		{"/a/..\\c", keep, "/c"},
		{"/a/...", keep, "/a/..."},
	} {
		got, ok := maybeNormalizePath(c.in, c.action, true, true)
		if !ok {
			got = refused
		}
		if got != c.want {
			t.Errorf("maybeNormalizePath(%q, %s) = %q, want %q", c.in, c.action, got, c.want)
		}
	}
	if p, ok := maybeNormalizePath("/a//../b", keep, true, false); !ok || p != "/a/b" {
		t.Errorf("normalize_path only: %q", p)
	}
	if p, ok := maybeNormalizePath("/a/..%2F/b", keep, false, false); !ok || p != "/a/..%2F/b" {
		t.Errorf("neither: %q", p)
	}
}

func TestParseEscapedSlashes(t *testing.T) {
	if a, err := parseEscapedSlashes(hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT); err != nil || a != hcmv3.HttpConnectionManager_KEEP_UNCHANGED {
		t.Errorf("default: %v %v, want KEEP_UNCHANGED", a, err)
	}
	for _, a := range []hcmv3.HttpConnectionManager_PathWithEscapedSlashesAction{hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT, 9} {
		if _, err := parseEscapedSlashes(a); err == nil {
			t.Errorf("%v: want an error", a)
		}
	}
	// Through ADS: the redirect is NACKed as not emulated.
	hcm := envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "main", RouteConfig: "main",
		Filters: []*hcmv3.HttpFilter{must(t, envoy.RouterFilter)}})
	hcm.PathWithEscapedSlashesAction = hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT
	chain := must(t, func() (*listenerv3.FilterChain, error) { return envoy.HTTPFilterChain("main", hcm, nil) })
	lis := envoy.Listener(envoy.ListenerOptions{Name: "main", Address: "127.0.0.1", Port: 10000, Chains: []*listenerv3.FilterChain{chain}})
	rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, nil))
	addr := requireADS(t, map[resource.Type][]types.Resource{resource.ListenerType: {lis}, resource.RouteType: {rc}})
	if _, n := startUntilNACK(t, Options{XDSAddress: addr, NodeCluster: "test"}, 5*time.Second); !strings.Contains(n, "UNESCAPE_AND_REDIRECT") {
		t.Fatalf("NACK %q", n)
	}
}

// requireNoHeaders fails the test if the upstream got a request.
func requireNoHeaders(t *testing.T, hits chan http.Header) {
	t.Helper()
	select {
	case h := <-hits:
		t.Fatalf("a refused request reached the upstream: %v", h)
	default:
	}
}

// The HCM mcpgate builds refuses an escaped slash or backslash in the path, and a
// fragment, with a 400 of its own before any filter; in the query they pass.
func TestEscapedSlashesRejected(t *testing.T) {
	addr, hits := hcmNode(t, envoy.HCMOptions{}, nil)

	// HTTP/1: 400, no body, and the connection closes (a 400 on HTTP/1).
	for _, target := range []string{"/api/..%2F..%2Fadmin", "/api/..%5c..%5cadmin", "/api/tools#frag"} {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(conn, "GET "+target+" HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		rd := bufio.NewReader(conn)
		resp, err := http.ReadResponse(rd, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || len(body) != 0 || !resp.Close {
			t.Fatalf("%s: got %d %q (close %v), want 400 with no body and connection: close", target, resp.StatusCode, body, resp.Close)
		}
		if _, err := rd.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
			t.Fatalf("%s: connection still open after the 400: %v", target, err)
		}
		conn.Close()
	}
	// HTTP/2: a 400 response, not a reset.
	req, _ := http.NewRequest("POST", "http://"+addr+"/api/x%2F..%2F..%2Fadmin", strings.NewReader("{}"))
	resp, err := h2cClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("HTTP/2: got %d, want 400", resp.StatusCode)
	}
	requireNoHeaders(t, hits)

	if resp, body := do(t, "GET", "http://"+addr+"/api/tools?next=%2Fadmin%5C", ""); resp.StatusCode != 200 || body != "hello" {
		t.Fatalf("escaped slashes in the query: %d %q", resp.StatusCode, body)
	}
	<-hits
}

// How mutateRequestHeaders tells an internal request, by internal_address_config.
func TestIsInternal(t *testing.T) {
	// The edge HCM's: a sidecar HCM has none (unset: no address is internal).
	mcpgate, err := parseInternalAddresses(envoy.HTTPConnectionManager(envoy.HCMOptions{Edge: true}).GetInternalAddressConfig())
	if err != nil || mcpgate == nil {
		t.Fatalf("mcpgate's internal_address_config: %v %v", mcpgate, err)
	}
	rfc1918 := &internalAddresses{} // set, without cidr_ranges
	ranges, err := parseInternalAddresses(&hcmv3.HttpConnectionManager_InternalAddressConfig{
		CidrRanges: []*corev3.CidrRange{{AddressPrefix: "10.1.2.3", PrefixLen: wrapperspb.UInt32(16)}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		ia        *internalAddresses
		useRemote bool
		peer      string
		xff       []string
		want      bool
	}{
		{"unset: none", nil, false, "127.0.0.1:1", []string{"10.0.0.1"}, false},
		{"unset, remote: none", nil, true, "10.0.0.1:1", nil, false},
		{"rfc1918 by xff", rfc1918, false, "127.0.0.1:1", []string{"10.0.0.1"}, true},
		{"rfc1918 by xff, v6", rfc1918, false, "127.0.0.1:1", []string{" fd00::1 "}, true},
		{"rfc1918: 127.0.0.1 only", rfc1918, false, "127.0.0.1:1", []string{"127.0.0.2"}, false},
		{"rfc1918: public", rfc1918, false, "127.0.0.1:1", []string{"8.8.8.8"}, false},
		{"rfc1918: two entries", rfc1918, false, "127.0.0.1:1", []string{"8.8.8.8, 10.0.0.1"}, false},
		{"rfc1918: two headers", rfc1918, false, "127.0.0.1:1", []string{"10.0.0.2", "10.0.0.1"}, false},
		{"rfc1918: trailing comma", rfc1918, false, "127.0.0.1:1", []string{"10.0.0.1,"}, false},
		{"rfc1918: no xff", rfc1918, false, "10.0.0.1:1", nil, false},
		{"rfc1918 by peer", rfc1918, true, "127.0.0.1:1", nil, true},
		{"rfc1918, remote: xff present", rfc1918, true, "127.0.0.1:1", []string{"10.0.0.1"}, false},
		{"ranges", ranges, false, "127.0.0.1:1", []string{"10.1.200.1"}, true},
		{"ranges: outside", ranges, false, "127.0.0.1:1", []string{"10.0.0.1"}, false},
		{"mcpgate edge: loopback peer", mcpgate, true, "127.0.0.1:1", nil, false},
		{"mcpgate edge: private peer", mcpgate, true, "10.0.0.1:1", nil, false},
		{"mcpgate edge: v6 peer", mcpgate, true, "[::1]:1", nil, false},
		// Were it on a sidecar, the caller's x-forwarded-for could name an address of any
		// range (envoy.noInternalAddresses): that is why sidecars leave it unset.
		{"edge ranges on a sidecar: unspecified xff", mcpgate, false, "127.0.0.1:1", []string{"0.0.0.0"}, true},
		{"sidecar (unset): unspecified xff", nil, false, "127.0.0.1:1", []string{"0.0.0.0"}, false},
	} {
		h := &headerMap{}
		for _, v := range c.xff {
			h.add("x-forwarded-for", v)
		}
		if got := isInternal(c.ia, c.useRemote, c.peer, h); got != c.want {
			t.Errorf("%s: internal %v, want %v", c.name, got, c.want)
		}
	}
	for _, bad := range []*corev3.CidrRange{{AddressPrefix: "10.0.0.0", PrefixLen: wrapperspb.UInt32(33)}, {AddressPrefix: "example.com"}} {
		if _, err := parseInternalAddresses(&hcmv3.HttpConnectionManager_InternalAddressConfig{CidrRanges: []*corev3.CidrRange{bad}}); err == nil {
			t.Errorf("%v: want an error", bad)
		}
	}
}

// An external request reaches the upstream without the caller's x-envoy-* headers that
// steer Envoy (cleanInternalHeaders), whatever x-forwarded-for claims, through the HCM
// mcpgate builds for sidecars and for the edge; the router still sets its own
// x-envoy-expected-rq-timeout-ms. With internal_address_config's RFC1918 fallback the
// same request would be internal.
func TestInternalHeadersSanitized(t *testing.T) {
	steering := []string{"x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-upstream-rq-timeout-ms",
		"x-envoy-upstream-rq-per-try-timeout-ms", "x-envoy-retriable-status-codes", "x-envoy-force-trace",
		"x-envoy-hedge-on-per-try-timeout", "x-envoy-original-url", "x-envoy-internal"}
	hdr := []string{"x-forwarded-for", "10.0.0.1", "x-envoy-expected-rq-timeout-ms", "1",
		"x-envoy-downstream-service-cluster", "forged", "x-plain", "kept"}
	for _, k := range steering {
		hdr = append(hdr, k, "forged")
	}
	rfc1918 := func(h *hcmv3.HttpConnectionManager) {
		h.InternalAddressConfig = &hcmv3.HttpConnectionManager_InternalAddressConfig{}
	}
	for _, c := range []struct {
		name     string
		o        envoy.HCMOptions
		edit     func(*hcmv3.HttpConnectionManager)
		hdr      []string
		internal bool
	}{
		{"sidecar", envoy.HCMOptions{}, nil, hdr, false},
		{"edge", envoy.HCMOptions{Edge: true}, nil, hdr, false},
		{"edge without x-forwarded-for", envoy.HCMOptions{Edge: true}, nil, hdr[2:], false},
		{"sidecar, rfc1918 fallback", envoy.HCMOptions{}, rfc1918, hdr, true},
		{"edge, rfc1918 fallback (loopback peer)", envoy.HCMOptions{Edge: true}, rfc1918, hdr[2:], true},
	} {
		t.Run(c.name, func(t *testing.T) {
			addr, hits := hcmNode(t, c.o, c.edit)
			if resp, body := do(t, "GET", "http://"+addr+"/x", "", c.hdr...); resp.StatusCode != 200 || body != "hello" {
				t.Fatalf("got %d %q", resp.StatusCode, body)
			}
			got := <-hits
			if got.Get("x-plain") != "kept" {
				t.Errorf("x-plain lost: %v", got)
			}
			if v := got.Get("x-envoy-expected-rq-timeout-ms"); v != "10000" {
				t.Errorf("x-envoy-expected-rq-timeout-ms %q, want the router's 10000", v)
			}
			if c.internal {
				if got.Get("x-envoy-max-retries") != "forged" || got.Get("x-envoy-internal") != "true" {
					t.Errorf("an internal request lost its headers: %v", got)
				}
				return
			}
			for _, k := range steering {
				if v, ok := got[http.CanonicalHeaderKey(k)]; ok {
					t.Errorf("the upstream got the caller's %s %q", k, v)
				}
			}
			// The downstream-service headers go from edge requests only.
			if v := got.Get("x-envoy-downstream-service-cluster"); (v == "") != c.o.Edge {
				t.Errorf("x-envoy-downstream-service-cluster %q (edge %v)", v, c.o.Edge)
			}
		})
	}
}

// The route configuration's internal_only_headers leave external requests too.
func TestSanitizeInternalOnlyHeaders(t *testing.T) {
	for _, internal := range []bool{false, true} {
		l := &listenerCfg{inline: &routeCfg{internalOnly: []string{"x-internal-secret"}}}
		if internal {
			l.internal = &internalAddresses{}
		}
		s := &stream{l: l, r: &http.Request{RemoteAddr: "127.0.0.1:1"}, req: &headerMap{}}
		s.req.add("x-forwarded-for", "10.0.0.1")
		s.req.add("x-internal-secret", "forged")
		s.req.add("x-envoy-internal", "forged")
		s.sanitize()
		if _, ok := s.req.get("x-internal-secret"); ok == !internal {
			t.Errorf("internal %v: x-internal-secret kept %v", internal, ok)
		}
		want := "" // the caller's is removed from every request
		if internal {
			want = "true"
		}
		if v, _ := s.req.joined("x-envoy-internal"); v != want {
			t.Errorf("internal %v: x-envoy-internal %q, want %q", internal, v, want)
		}
	}
}
