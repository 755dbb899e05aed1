package envoy

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func requireValid(t *testing.T, m proto.Message) {
	t.Helper()
	if err := Validate(m); err != nil {
		t.Fatal(err)
	}
}

func TestFilterOrder(t *testing.T) {
	fs, err := HTTPFilters("mcpgate")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range fs {
		requireValid(t, f)
		names = append(names, f.Name)
	}
	if got := strings.Join(names, ","); got != FilterCORS+","+FilterExtAuthz+","+FilterExtProc+","+FilterRouter {
		t.Fatalf("filter order %s", got)
	}
}

// Every HCM refuses header names with underscores: servers that fold '_' into '-' would
// otherwise read x_mcpgate_caller_app_id as the identity header ext_authz sets.
func TestHCMRejectsUnderscoreHeaders(t *testing.T) {
	for _, edge := range []bool{false, true} {
		h := HTTPConnectionManager(HCMOptions{StatPrefix: "s", RouteConfig: "r", Edge: edge})
		requireValid(t, h)
		if got := h.GetCommonHttpProtocolOptions().GetHeadersWithUnderscoresAction(); got != corev3.HttpProtocolOptions_REJECT_REQUEST {
			t.Errorf("edge=%v: headers_with_underscores_action %v, want REJECT_REQUEST", edge, got)
		}
	}
}

// Every HCM refuses %2F and %5C in the path: an upstream that decodes them before routing
// would take "/api/..%2F..%2Fadmin", which prefix_rewrite put under an HTTPEndpoint's
// baseUrl path with mcpgate's token, for "/admin".
func TestHCMRejectsEscapedSlashes(t *testing.T) {
	for _, edge := range []bool{false, true} {
		h := HTTPConnectionManager(HCMOptions{StatPrefix: "s", RouteConfig: "r", Edge: edge})
		if got := h.GetPathWithEscapedSlashesAction(); got != hcmv3.HttpConnectionManager_REJECT_REQUEST {
			t.Errorf("edge=%v: path_with_escaped_slashes_action %v, want REJECT_REQUEST", edge, got)
		}
	}
}

// An edge HCM says which peers are internal, with ranges that are not empty (an empty
// list falls back to RFC1918 / RFC4193 in Envoy) and hold no private, unique local or
// loopback address: no caller keeps its x-envoy-* headers by coming from one. A sidecar
// HCM says nothing: there Envoy would check the caller's own x-forwarded-for against the
// ranges, and an unset config (Envoy >= 1.33) trusts no address.
func TestHCMInternalAddresses(t *testing.T) {
	if iac := HTTPConnectionManager(HCMOptions{StatPrefix: "s", RouteConfig: "r"}).GetInternalAddressConfig(); iac != nil {
		t.Errorf("sidecar HCM internal_address_config %v: a caller's x-forwarded-for could fall in it", iac)
	}
	peers := []string{"10.0.0.1", "172.16.0.1", "192.168.1.1", "127.0.0.1", "fd00::1", "::1"}
	for _, edge := range []bool{true} {
		h := HTTPConnectionManager(HCMOptions{StatPrefix: "s", RouteConfig: "r", Edge: edge})
		requireValid(t, h)
		iac := h.GetInternalAddressConfig()
		if iac == nil || len(iac.GetCidrRanges()) == 0 {
			t.Fatalf("edge=%v: internal_address_config %v, want cidr_ranges", edge, iac)
		}
		if iac.GetUnixSockets() {
			t.Errorf("edge=%v: unix_sockets on", edge)
		}
		for _, r := range iac.GetCidrRanges() {
			a, err := netip.ParseAddr(r.GetAddressPrefix())
			if err != nil {
				t.Fatalf("edge=%v: cidr range %v: %v", edge, r, err)
			}
			p, err := a.Prefix(int(r.GetPrefixLen().GetValue()))
			if err != nil {
				t.Fatalf("edge=%v: cidr range %v: %v", edge, r, err)
			}
			for _, peer := range peers {
				if p.Contains(netip.MustParseAddr(peer)) {
					t.Errorf("edge=%v: %s is internal (in %s)", edge, peer, p)
				}
			}
		}
	}
}

func TestFailClosed(t *testing.T) {
	if ExtAuthz("c").FailureModeAllow || ExtProc("c").FailureModeAllow {
		t.Fatal("ext_authz and ext_proc must fail closed")
	}
	requireValid(t, ExtAuthz("c"))
	requireValid(t, ExtProc("c"))
}

func TestAnyRejectsInvalid(t *testing.T) {
	// An empty cluster name is invalid (min_len 1): Any must refuse to pack it.
	if _, err := ExtAuthzFilter(""); err == nil {
		t.Fatal("want a validation error for an empty cluster name")
	}
}

func TestBootstrap(t *testing.T) {
	b, err := Bootstrap(BootstrapOptions{NodeCluster: "inventory", XDSAddress: "127.0.0.1:18000", SpireAgentSocket: "/run/spire/agent.sock"})
	if err != nil {
		t.Fatal(err)
	}
	if b.Node.Id != "inventory" || b.Node.Cluster != "inventory" {
		t.Errorf("node %v", b.Node)
	}
	if a := b.Admin.Address.GetSocketAddress(); a.Address != "127.0.0.1" {
		t.Errorf("admin must listen on loopback, got %v", a)
	}
	cs := b.StaticResources.Clusters
	if len(cs) != 2 || cs[0].Name != XDSCluster || cs[1].Name != SpireAgentCluster {
		t.Fatalf("clusters %v", cs)
	}
	if p := cs[1].LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetPipe().GetPath(); p != "/run/spire/agent.sock" {
		t.Errorf("spire socket %q", p)
	}
	if b.DynamicResources.AdsConfig.ApiType != corev3.ApiConfigSource_GRPC {
		t.Errorf("ads config %v", b.DynamicResources.AdsConfig)
	}
	for _, bad := range []BootstrapOptions{{NodeCluster: "x", XDSAddress: "nope"}, {XDSAddress: "a:1"}, {NodeCluster: "x", XDSAddress: "a:0"}} {
		if _, err := Bootstrap(bad); err == nil {
			t.Errorf("want an error for %+v", bad)
		}
	}
}

func TestBootstrapXDSTLS(t *testing.T) {
	o := BootstrapOptions{NodeCluster: "inventory", XDSAddress: "mcpgate:18000", SpireAgentSocket: "/run/spire/agent.sock",
		XDSTLS: &XDSTLS{SVID: "spiffe://example.org/ns/default/inventory", Bundle: "spiffe://example.org", ServerID: "spiffe://example.org/ns/mcpgate/mcpgate"}}
	b, err := Bootstrap(o)
	if err != nil {
		t.Fatal(err)
	}
	ts := b.StaticResources.Clusters[0].GetTransportSocket()
	if ts == nil {
		t.Fatal("xds_cluster has no transport socket")
	}
	up := &tlsv3.UpstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(up); err != nil {
		t.Fatal(err)
	}
	c := up.CommonTlsContext
	if n := c.TlsCertificateSdsSecretConfigs[0]; n.Name != o.XDSTLS.SVID || n.SdsConfig.GetApiConfigSource().GrpcServices[0].GetEnvoyGrpc().ClusterName != SpireAgentCluster {
		t.Errorf("certificate secret %v", n)
	}
	v := c.GetCombinedValidationContext()
	if v.ValidationContextSdsSecretConfig.Name != o.XDSTLS.Bundle {
		t.Errorf("bundle secret %v", v.ValidationContextSdsSecretConfig)
	}
	if san := v.DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher.GetExact(); san != o.XDSTLS.ServerID {
		t.Errorf("server SAN %q, want exactly %q", san, o.XDSTLS.ServerID)
	}

	o.SpireAgentSocket = ""
	if _, err := Bootstrap(o); err == nil {
		t.Error("want an error: xDS TLS without the SPIRE agent SDS cluster")
	}
	plain, err := Bootstrap(BootstrapOptions{NodeCluster: "inventory", XDSAddress: "mcpgate:18000"})
	if err != nil {
		t.Fatal(err)
	}
	if plain.StaticResources.Clusters[0].TransportSocket != nil {
		t.Error("plaintext stays the default")
	}
}

// TestExtProcGRPC pins the per-route processing mode of gRPC MCP routes and that the
// filter lets mcpgate override the response body mode to STREAMED.
func TestExtProcGRPC(t *testing.T) {
	a, err := ExtProcGRPC()
	if err != nil {
		t.Fatal(err)
	}
	var per extprocv3.ExtProcPerRoute
	if err := a.UnmarshalTo(&per); err != nil {
		t.Fatal(err)
	}
	requireValid(t, &per)
	pm := per.GetOverrides().GetProcessingMode()
	if pm.GetRequestHeaderMode() != extprocv3.ProcessingMode_SEND || pm.GetRequestBodyMode() != extprocv3.ProcessingMode_STREAMED ||
		pm.GetResponseHeaderMode() != extprocv3.ProcessingMode_SEND || pm.GetResponseBodyMode() != extprocv3.ProcessingMode_NONE ||
		pm.GetRequestTrailerMode() != extprocv3.ProcessingMode_SKIP || pm.GetResponseTrailerMode() != extprocv3.ProcessingMode_SKIP {
		t.Errorf("gRPC processing mode %v", pm)
	}
	if f := ExtProc("c"); !f.AllowModeOverride || len(f.AllowedOverrideModes) != 0 {
		t.Errorf("the filter must allow any mode_override (STREAMED responses): %v", f)
	}
}

func TestGRPCPrefix(t *testing.T) {
	m := GRPCPrefix("/pkg.Svc/")
	requireValid(t, m)
	if m.GetPrefix() != "/pkg.Svc/" || len(m.Headers) != 1 || m.Headers[0].Name != "content-type" ||
		m.Headers[0].GetStringMatch().GetPrefix() != "application/grpc" || !m.Headers[0].GetStringMatch().GetIgnoreCase() {
		t.Errorf("match %v", m)
	}
}

func TestUpstreamMTLSHTTP2(t *testing.T) {
	m := MeshTLS{Cert: SecretRef("spiffe://example.org/ns/default/a", SpireSDS()), Bundle: SecretRef("spiffe://example.org", SpireSDS())}
	for _, tc := range []struct {
		build func(MeshTLS, string) (*corev3.TransportSocket, error)
		alpn  string
	}{{UpstreamMTLSHTTP2, "h2"}, {UpstreamMTLS, "h2,http/1.1"}} {
		ts, err := tc.build(m, "spiffe://example.org/ns/default/b")
		if err != nil {
			t.Fatal(err)
		}
		up := &tlsv3.UpstreamTlsContext{}
		if err := ts.GetTypedConfig().UnmarshalTo(up); err != nil {
			t.Fatal(err)
		}
		c := up.CommonTlsContext
		if got := strings.Join(c.AlpnProtocols, ","); got != tc.alpn {
			t.Errorf("ALPN %s, want %s", got, tc.alpn)
		}
		if san := c.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].Matcher.GetExact(); san != "spiffe://example.org/ns/default/b" {
			t.Errorf("peer SAN %q", san)
		}
	}
}

// TestCORSPolicy pins the per-route CORS policy: exact origins, or one regex for "*",
// the lists joined as Envoy sends them, max_age in seconds, and non-matching preflights
// forwarded down the chain (to ext_authz, which refuses them) rather than answered.
func TestCORSPolicy(t *testing.T) {
	for _, tt := range []struct {
		name string
		o    CORSOptions
		want *corsv3.CorsPolicy
	}{{
		name: "exact origins",
		o: CORSOptions{Origins: []string{"https://a.example.com", "http://localhost:5173"}, Methods: []string{"GET", "POST"},
			Headers: []string{"content-type", "authorization"}, ExposeHeaders: []string{"mcp-session-id"}, MaxAge: 10 * time.Minute, AllowCredentials: true},
		want: &corsv3.CorsPolicy{
			AllowOriginStringMatch: []*matcherv3.StringMatcher{
				{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "https://a.example.com"}},
				{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "http://localhost:5173"}},
			},
			AllowMethods: "GET,POST", AllowHeaders: "content-type,authorization", ExposeHeaders: "mcp-session-id", MaxAge: "600",
			AllowCredentials: wrapperspb.Bool(true), ForwardNotMatchingPreflights: wrapperspb.Bool(true),
		},
	}, {
		name: "any origin",
		o:    CORSOptions{AnyOrigin: true, Methods: []string{"POST"}},
		want: &corsv3.CorsPolicy{
			AllowOriginStringMatch: []*matcherv3.StringMatcher{{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: ".*"}}}},
			AllowMethods:           "POST", AllowCredentials: wrapperspb.Bool(false), ForwardNotMatchingPreflights: wrapperspb.Bool(true),
		},
	}} {
		t.Run(tt.name, func(t *testing.T) {
			a, err := CORSPolicy(tt.o)
			if err != nil {
				t.Fatal(err)
			}
			var got corsv3.CorsPolicy
			if err := a.UnmarshalTo(&got); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, &got, protocmp.Transform()); diff != "" {
				t.Errorf("CorsPolicy (-want +got):\n%s", diff)
			}
		})
	}
}
