package xds

import (
	"slices"
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/mcpgate/mcpgate/envoy"
)

// TestGatewayReachesAppThroughSidecar: with mesh mTLS a Gateway never has a cluster to an
// app's own address, whose port would then have to be open to the network (anyone who
// reaches it skips ext_authz and ext_proc and names any caller). It reaches the app's
// sidecar on gatewayPort over mTLS, presenting the Gateway's SVID and accepting only the
// app's; that listener requires a client certificate and accepts only the Gateways that
// route to the app. Without mTLS the Gateway goes to the address (nothing to
// authenticate the hop), and the sidecar has no gateway_inbound listener.
func TestGatewayReachesAppThroughSidecar(t *testing.T) {
	snap := requireLoad(t, goldenCases["authz-mtls"])
	for _, gw := range []string{"edge", "plain"} {
		res, err := Translate(snap, gw)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range res.Clusters {
			if c.Name == ClusterApp("inventory") {
				t.Errorf("gateway %s has a cluster to inventory's own address", gw)
			}
		}
		hop := clusterOf(t, res, ClusterSidecarGateway("inventory"))
		sa := hop.GetLoadAssignment().GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress()
		if sa.GetAddress() != "inventory-envoy" || sa.GetPortValue() != 15008 {
			t.Errorf("gateway %s reaches inventory at %s:%d, want its sidecar's gatewayPort", gw, sa.GetAddress(), sa.GetPortValue())
		}
		var up tlsv3.UpstreamTlsContext
		requireUnpack(t, hop.GetTransportSocket().GetTypedConfig(), &up)
		cert := up.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs()
		if len(cert) != 1 || cert[0].GetName() != "spiffe://example.org/ns/default/"+gw {
			t.Errorf("gateway %s presents %v, want its own SVID", gw, cert)
		}
		if got := sanExacts(up.GetCommonTlsContext()); !slices.Equal(got, []string{"spiffe://example.org/ns/default/inventory"}) {
			t.Errorf("gateway %s accepts %v as inventory's sidecar", gw, got)
		}
	}

	res, err := Translate(snap, "inventory")
	if err != nil {
		t.Fatal(err)
	}
	var down tlsv3.DownstreamTlsContext
	found := false
	for _, l := range res.Listeners {
		if l.Name != ListenerGatewayInbound {
			continue
		}
		found = true
		if l.GetAddress().GetSocketAddress().GetPortValue() != 15008 {
			t.Errorf("gateway_inbound on %v", l.GetAddress())
		}
		requireUnpack(t, l.FilterChains[0].GetTransportSocket().GetTypedConfig(), &down)
	}
	if !found {
		t.Fatal("inventory's sidecar has no gateway_inbound listener")
	}
	if !down.GetRequireClientCertificate().GetValue() {
		t.Error("gateway_inbound does not require a client certificate")
	}
	want := []string{"spiffe://example.org/ns/default/edge", "spiffe://example.org/ns/default/plain"}
	if got := sanExacts(down.GetCommonTlsContext()); !slices.Equal(got, want) {
		t.Errorf("gateway_inbound accepts %v, want exactly %v", got, want)
	}
	hcm := requireHCM(t, res, ListenerGatewayInbound)
	if len(hcm.HttpFilters) != 1 || hcm.HttpFilters[0].Name != envoy.FilterRouter {
		t.Errorf("gateway_inbound filters %v: the gateway has enforced, the router alone forwards", hcm.HttpFilters)
	}

	// mtls: disabled.
	snap = requireLoad(t, goldenCases["disabled"])
	res, err = Translate(snap, "edge")
	if err != nil {
		t.Fatal(err)
	}
	clusterOf(t, res, ClusterApp("server"))
	if res, err = Translate(snap, "server"); err != nil {
		t.Fatal(err)
	}
	for _, l := range res.Listeners {
		if l.Name == ListenerGatewayInbound {
			t.Error("a gateway_inbound listener without mTLS would let anyone past the policy")
		}
	}
}

// sanExacts lists the exact URI SANs a TLS context accepts; a prefix or other matcher
// fails the caller's comparison by showing up as "?".
func sanExacts(c *tlsv3.CommonTlsContext) []string {
	var out []string
	for _, m := range c.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		if e := m.GetMatcher().GetExact(); e != "" && m.GetSanType() == tlsv3.SubjectAltNameMatcher_URI {
			out = append(out, e)
		} else {
			out = append(out, "?")
		}
	}
	return out
}
