//go:build integration

package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/envoyemu"
	"github.com/mcpgate/mcpgate/integration/testpki"
	"github.com/mcpgate/mcpgate/xds"
)

// gatewayMesh is the strict-mTLS mesh with a Gateway, edge, routing /mcp to inventory.
type gatewayMesh struct {
	*mtlsMesh
	edge *envoyemu.Emulator
}

func startGatewayMesh(t *testing.T) *gatewayMesh {
	t.Helper()
	if envoyBin != "" {
		t.Skip("per-node certificate files: emulator only (see startMTLSMesh)")
	}
	m := &gatewayMesh{mtlsMesh: &mtlsMesh{mesh: &mesh{iss: bearertest.NewIssuer(t)}, ca: testpki.NewCA(t, "example.org")}}
	roots := map[string]string{
		"inventory": m.ca.CertDir(t, spiffeID("inventory")),
		"my-agent":  m.ca.CertDir(t, spiffeID("my-agent")),
	}
	gatewayPort, edgePort := freePort(t), freePort(t)
	startMeshWith(t, m.mesh, "strict", roots, func() {
		replaceInFile(t, filepath.Join(m.dir, "mesh.yaml"), "spireAgentSocket: /run/spire/agent.sock", "certDir: /certs")
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), fmt.Sprintf("outboundPort: %d\n", m.addrs.inventoryOut),
			fmt.Sprintf("outboundPort: %d\n    gatewayPort: %d\n", m.addrs.inventoryOut, gatewayPort))
		gw := fmt.Sprintf(`apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  listener: {port: %d}
  routes:
    - {path: /mcp, app: inventory}
`, edgePort)
		if err := os.WriteFile(filepath.Join(m.dir, "gateway.yaml"), []byte(gw), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	inv := m.inventory.(*envoyemu.Emulator)
	appPort := m.app.Addr()[strings.LastIndex(m.app.Addr(), ":")+1:]
	e, err := envoyemu.Start(context.Background(), envoyemu.Options{
		XDSAddress: m.addrs.xds, NodeCluster: "edge", NodeID: "edge-1",
		FileRoot: m.ca.CertDir(t, "spiffe://example.org/ns/default/edge"),
		Resolve: func(host string, port uint32) string {
			switch strconv.Itoa(int(port)) {
			case strconv.Itoa(gatewayPort):
				return inv.Listener(xds.ListenerGatewayInbound)
			case appPort:
				// Were the gateway to dial inventory's own port, it would find nothing.
				return "127.0.0.1:1"
			}
			return net.JoinHostPort(host, strconv.Itoa(int(port)))
		},
		Logf: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := e.WaitReady(ctx); err != nil {
		t.Fatalf("edge gateway: %v (NACKs: %v)", err, e.NACKs())
	}
	m.edge = e
	requireEventually(t, 10*time.Second, "inventory's gateway_inbound listener", func() bool {
		return inv.Listener(xds.ListenerGatewayInbound) != "" && e.Listener(xds.ListenerGateway("edge")) != ""
	})
	return m
}

// hop reaches inventory's gateway_inbound listener itself, over TLS, with the given
// certificates (none: a workload without an SVID).
func (m *gatewayMesh) hop(t *testing.T, certs ...tls.Certificate) (*http.Response, error) {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(m.ca.Cert)
	tr := &http.Transport{TLSClientConfig: &tls.Config{
		Certificates: certs, RootCAs: roots,
		InsecureSkipVerify: true, // the server's SVID has a URI SAN only; a valid chain is all this needs
	}}
	defer tr.CloseIdleConnections()
	req := mcpPost(t, "https://"+m.inventory.Listener(xds.ListenerGatewayInbound)+"/mcp", m.token(t, nil), initialize)
	// What a workload would claim if it could reach the app past the policy.
	req.Header.Set(contract.HeaderCallerAppID, "my-agent")
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp, nil
}

// TestGatewayThroughSidecar: with mtls: strict a Gateway reaches the app through its
// sidecar's gateway_inbound listener over mTLS, never the app's own port; it enforces the
// app's policy itself; and no workload but the Gateway can use that listener to get past
// the policy.
func TestGatewayThroughSidecar(t *testing.T) {
	m := startGatewayMesh(t)
	edge := "http://" + m.edge.Listener(xds.ListenerGateway("edge")) + "/mcp"

	t.Run("a call through the gateway reaches the app with the token's caller", func(t *testing.T) {
		s := m.connect(t, edge, map[string]string{
			"Authorization": m.token(t, nil),
			// A caller's own copy of an identity header is dropped at the gateway.
			contract.HeaderCallerAppID: "admin",
		})
		res, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"})
		if err != nil || res.IsError {
			t.Fatalf("get_inventory through the gateway: %v %v", err, res)
		}
		calls := m.app.Calls()
		last := calls[len(calls)-1]
		if got := last.Header.Get(contract.HeaderCallerAppID); last.Tool != "get_inventory" || got != "my-agent" {
			t.Fatalf("the server saw tool %q from caller %q, want my-agent", last.Tool, got)
		}
		// The gateway enforced inventory's policy: a denied tool never reaches the app.
		before := m.app.CallsTo("delete_product")
		res, err = s.CallTool(callCtx(t), "delete_product", map[string]any{"product_id": "SKU-42"})
		if err == nil && !res.IsError {
			t.Fatalf("delete_product through the gateway was allowed: %v", res)
		}
		if m.app.CallsTo("delete_product") != before {
			t.Fatal("delete_product reached the server")
		}
	})

	t.Run("only the gateway's SVID opens gateway_inbound", func(t *testing.T) {
		requests := len(m.app.Requests())
		for name, certs := range map[string][]tls.Certificate{
			"no certificate":            nil,
			"my-agent's SVID":           {m.ca.TLSCert(t, spiffeID("my-agent"))},
			"inventory's own SVID":      {m.ca.TLSCert(t, spiffeID("inventory"))},
			"another gateway's SVID":    {m.ca.TLSCert(t, "spiffe://example.org/ns/default/other-gateway")},
			"edge in another namespace": {m.ca.TLSCert(t, "spiffe://example.org/ns/team-b/edge")},
		} {
			if resp, err := m.hop(t, certs...); err == nil {
				t.Errorf("%s: got %d, want a failed handshake", name, resp.StatusCode)
			}
		}
		if len(m.app.Requests()) != requests {
			t.Fatal("a request reached the server past the policy")
		}
		// Nor in plaintext on the TLS port.
		if resp, err := http.Post("http://"+m.inventory.Listener(xds.ListenerGatewayInbound)+"/mcp", "application/json", strings.NewReader(initialize)); err == nil {
			resp.Body.Close()
			if resp.StatusCode < 400 {
				t.Fatalf("plaintext to gateway_inbound got %d", resp.StatusCode)
			}
		}
		if len(m.app.Requests()) != requests {
			t.Fatal("a plaintext request reached the server")
		}
		// The gateway's own SVID does open it (what the gateway itself uses), and only the
		// MCP endpoint is routed.
		resp, err := m.hop(t, m.ca.TLSCert(t, "spiffe://example.org/ns/default/edge"))
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("with edge's SVID: %v %v", resp, err)
		}
	})
}
