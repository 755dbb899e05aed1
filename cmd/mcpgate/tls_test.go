package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/mcpgate/mcpgate/integration/testpki"
)

// testCA is a SPIFFE trust domain for the tests (testpki), with go-spiffe's views of it.
type testCA struct{ *testpki.CA }

func requireTestCA(t *testing.T, td string) testCA { return testCA{testpki.NewCA(t, td)} }

// bundle is the trust domain's X.509 bundle, a static x509bundle.Source.
func (ca testCA) bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(spiffeid.RequireTrustDomainFromString(ca.TrustDomain), []*x509.Certificate{ca.Cert})
}

// requireSVID issues an X.509 SVID for id (which may lie outside ca's trust domain, to
// forge one) and parses it with x509svid, so it is checked as a real SVID would be.
func (ca testCA) requireSVID(t *testing.T, id string) *x509svid.SVID {
	t.Helper()
	der, key := ca.DER(t, spiffeid.RequireFromString(id).String())
	svid, err := x509svid.ParseRaw(der, key)
	if err != nil {
		t.Fatal(err)
	}
	return svid
}

const (
	mcpgateID   = "spiffe://example.org/ns/mcpgate/mcpgate"
	inventoryID = "spiffe://example.org/ns/default/inventory"
	agentID     = "spiffe://example.org/ns/default/my-agent"
)

// peerRecorder is an ext_authz server that allows everything and records the SPIFFE ID of
// each caller, so a test can tell a refused handshake from a refused request.
type peerRecorder struct {
	authv3.UnimplementedAuthorizationServer
	mu    sync.Mutex
	peers []string
}

func (p *peerRecorder) Check(ctx context.Context, _ *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	id := "<none>"
	if pr, ok := peer.FromContext(ctx); ok {
		if ti, ok := pr.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			if sid, err := x509svid.IDFromCert(ti.State.PeerCertificates[0]); err == nil {
				id = sid.String()
			}
		}
	}
	p.mu.Lock()
	p.peers = append(p.peers, id)
	p.mu.Unlock()
	return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.OK)}}, nil
}

func (p *peerRecorder) seen() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.peers...)
}

// requireMTLSServer serves ext_authz (and ext_proc) through newGRPCServer, as serve does,
// on 127.0.0.1:0 behind serverCredentials, and returns its address.
func requireMTLSServer(t *testing.T, svid x509svid.Source, bundle x509bundle.Source, allowed string) (string, *peerRecorder) {
	t.Helper()
	allow, err := parseAllowedClientIDs(allowed)
	if err != nil {
		t.Fatal(err)
	}
	rec := &peerRecorder{}
	srv := newGRPCServer(rec, extprocv3.UnimplementedExternalProcessorServer{}, grpc.Creds(serverCredentials(svid, bundle, allow)))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	t.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return lis.Addr().String(), rec
}

// check calls Check once over a fresh connection with the client TLS config.
func check(t *testing.T, addr string, cfg *tls.Config) error {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = authv3.NewAuthorizationClient(conn).Check(ctx, &authv3.CheckRequest{})
	return err
}

func TestMTLSServerCredentials(t *testing.T) {
	ca := requireTestCA(t, "example.org")
	evil := requireTestCA(t, "evil.org")
	serverSVID := ca.requireSVID(t, mcpgateID)
	// mcpgate trusts only example.org: the bundle source has no bundle for evil.org.
	addr, rec := requireMTLSServer(t, serverSVID, ca.bundle(), inventoryID+", spiffe://evil.org/ns/default/inventory")
	// Clients verify mcpgate's SVID too, as Envoy's UpstreamTlsContext does.
	trustMcpgate := tlsconfig.AuthorizeID(spiffeid.RequireFromString(mcpgateID))
	clientBundles := x509bundle.NewSet(ca.bundle(), evil.bundle())

	if err := check(t, addr, tlsconfig.MTLSClientConfig(ca.requireSVID(t, inventoryID), clientBundles, trustMcpgate)); err != nil {
		t.Fatalf("allowed SVID: Check: %v", err)
	}
	if got := rec.seen(); len(got) != 1 || got[0] != inventoryID {
		t.Fatalf("server saw peers %v, want [%s]", got, inventoryID)
	}

	refused := []struct {
		name string
		cfg  *tls.Config
	}{
		{"SVID of the trust domain not on the allow-list",
			tlsconfig.MTLSClientConfig(ca.requireSVID(t, agentID), clientBundles, trustMcpgate)},
		{"no client certificate",
			tlsconfig.TLSClientConfig(clientBundles, trustMcpgate)},
		{"allowed ID of another trust domain, whose bundle mcpgate does not have",
			tlsconfig.MTLSClientConfig(evil.requireSVID(t, "spiffe://evil.org/ns/default/inventory"), clientBundles, trustMcpgate)},
		{"allowed ID forged by another trust domain's CA",
			tlsconfig.MTLSClientConfig(evil.requireSVID(t, inventoryID), clientBundles, trustMcpgate)},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			err := check(t, addr, tc.cfg)
			// The server aborts the handshake; gRPC reports the broken connection as
			// Unavailable, and no request reaches the handler.
			if status.Code(err) != codes.Unavailable {
				t.Fatalf("Check: got %v, want code Unavailable (refused at the handshake)", err)
			}
			t.Logf("refused: %v", err)
			if got := rec.seen(); len(got) != 1 {
				t.Fatalf("a refused client reached the handler: peers %v", got)
			}
		})
	}
}

func TestMTLSServerTrustDomainWideAllowList(t *testing.T) {
	ca := requireTestCA(t, "example.org")
	addr, rec := requireMTLSServer(t, ca.requireSVID(t, mcpgateID), ca.bundle(), "spiffe://example.org")
	trustMcpgate := tlsconfig.AuthorizeID(spiffeid.RequireFromString(mcpgateID))
	for _, id := range []string{inventoryID, agentID} {
		if err := check(t, addr, tlsconfig.MTLSClientConfig(ca.requireSVID(t, id), ca.bundle(), trustMcpgate)); err != nil {
			t.Fatalf("%s: Check: %v", id, err)
		}
	}
	if got := rec.seen(); len(got) != 2 {
		t.Fatalf("server saw peers %v, want 2", got)
	}
}

func TestParseAllowedClientIDs(t *testing.T) {
	a, err := parseAllowedClientIDs(" spiffe://example.org/ns/default/inventory ,spiffe://other.org,")
	if err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{
		inventoryID: true,
		agentID:     false, // same trust domain, not listed
		"spiffe://example.org/ns/default/inventory/x": false, // exact IDs are not prefixes
		"spiffe://other.org/anything":                 true,
		"spiffe://evil.org/ns/default/inventory":      false,
	} {
		if got := a.match(spiffeid.RequireFromString(id)) == nil; got != want {
			t.Errorf("match(%s) = %v, want %v", id, got, want)
		}
	}
	if got, want := strings.Join(a.strings(), ","), inventoryID+",spiffe://other.org"; got != want { // sorted
		t.Errorf("strings() = %s, want %s", got, want)
	}

	// Every bad entry is reported at once.
	_, err = parseAllowedClientIDs("example.org,spiffe://example.org/ns/default/inventory,https://example.org/x")
	if err == nil || !strings.Contains(err.Error(), `"example.org"`) || !strings.Contains(err.Error(), `"https://example.org/x"`) {
		t.Fatalf("got %v, want both bad entries named", err)
	}
	if _, err := parseAllowedClientIDs(" , "); err != errAllowListRequired {
		t.Fatalf("empty list: got %v, want errAllowListRequired", err)
	}
}

func TestParseTransportSecurity(t *testing.T) {
	for _, tc := range []struct {
		name, socket, allowed string
		wantErr               string // empty: ok
		wantAddr              string
	}{
		{name: "plaintext default"},
		{name: "uri socket", socket: "unix:///run/spire/agent.sock", allowed: inventoryID, wantAddr: "unix:///run/spire/agent.sock"},
		{name: "bare path", socket: "/run/spire/agent.sock", allowed: inventoryID, wantAddr: "unix:///run/spire/agent.sock"},
		{name: "socket without allow-list", socket: "unix:///run/spire/agent.sock", wantErr: "--spiffe-socket requires --allowed-client-ids"},
		{name: "allow-list without socket", allowed: inventoryID, wantErr: "--allowed-client-ids needs --spiffe-socket"},
		{name: "relative socket", socket: "agent.sock", allowed: inventoryID, wantErr: "--spiffe-socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts, err := parseTransportSecurity(&serveFlags{spiffeSocket: tc.socket, allowedClientIDs: tc.allowed})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if ts.workloadAPI != tc.wantAddr {
				t.Fatalf("workloadAPI = %q, want %q", ts.workloadAPI, tc.wantAddr)
			}
		})
	}
}

// TestServeFailsClosedWithoutAllowList runs the real command: it must exit at startup,
// before any listener is bound or the Workload API is dialled.
func TestServeFailsClosedWithoutAllowList(t *testing.T) {
	_, errOut, code := run(t, "serve", "--grpc-addr", "127.0.0.1:0", "--xds-addr", "127.0.0.1:0", "--admin-addr", "",
		"--spiffe-socket", "unix:///nonexistent/agent.sock")
	if code != 1 || !strings.Contains(errOut, "--spiffe-socket requires --allowed-client-ids") {
		t.Fatalf("code %d, stderr %q", code, errOut)
	}
}
