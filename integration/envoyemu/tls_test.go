package envoyemu

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/integration/testpki"
)

const (
	trustDomain = "example.org"
	inventoryID = "spiffe://example.org/ns/default/inventory"
	agentID     = "spiffe://example.org/ns/default/my-agent"
	bundleName  = "spiffe://example.org"
)

// recordingAuthz allows every request and records the CheckRequests.
type recordingAuthz struct {
	authv3.UnimplementedAuthorizationServer
	mu   sync.Mutex
	reqs []*authv3.CheckRequest
}

func (a *recordingAuthz) Check(_ context.Context, r *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	a.mu.Lock()
	a.reqs = append(a.reqs, r)
	a.mu.Unlock()
	return &authv3.CheckResponse{Status: &status.Status{}}, nil
}

func (a *recordingAuthz) all() []*authv3.CheckRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]*authv3.CheckRequest(nil), a.reqs...)
}

// requireADSNodes serves one fixed snapshot per node cluster over ADS.
func requireADSNodes(t testing.TB, nodes map[string]map[resource.Type][]types.Resource) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cache := cachev3.NewSnapshotCache(true, clusterHash{}, nil)
	for node, res := range nodes {
		snap, err := cachev3.NewSnapshot("v1", res)
		if err != nil {
			t.Fatal(err)
		}
		if err := cache.SetSnapshot(ctx, node, snap); err != nil {
			t.Fatal(err)
		}
	}
	g := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, cache, serverv3.CallbackFuncs{}))
	return requireGRPC(t, g)
}

func meshTLS(id string) envoy.MeshTLS {
	return envoy.MeshTLS{Cert: envoy.SecretRef(id, envoy.ADSConfigSource()), Bundle: envoy.SecretRef(bundleName, envoy.ADSConfigSource())}
}

// certDirSecrets are the secrets mcpgate serves for certDir /certs.
func certDirSecrets(id string) []types.Resource {
	return []types.Resource{envoy.FileCertSecret(id, "/certs"), envoy.FileBundleSecret(bundleName, "/certs")}
}

// mtlsEnv is two emulated nodes built with mcpgate's own envoy builders: "inventory"
// (an mTLS inbound listener: ext_authz then router, to a plaintext app) and "agent" (a
// plaintext outbound listener whose clusters reach inventory's inbound over mTLS:
// /ok expects inventory's SPIFFE ID, /wrong another one).
type mtlsEnv struct {
	ca        *testpki.CA
	authz     *recordingAuthz
	hits      chan *http.Request
	inventory *Emulator
	inbound   string
	agent     *Emulator
	outbound  string
}

func requireMTLS(t *testing.T, requireClient bool) *mtlsEnv {
	t.Helper()
	env := &mtlsEnv{ca: testpki.NewCA(t, trustDomain), authz: &recordingAuthz{}, hits: make(chan *http.Request, 16)}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case env.hits <- r:
		default:
		}
		_, _ = io.WriteString(w, "hello from the app")
	}))
	t.Cleanup(app.Close)
	authzCluster, authzCLA := requireAuthzCluster(t, env.authz)

	// inventory: inbound mTLS listener.
	downstream := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.DownstreamMTLS(meshTLS(inventoryID), trustDomain, requireClient)
	})
	inventory := inboundNode(t, app.Listener.Addr().String(), downstream, authzCluster, authzCLA)
	inventory[resource.SecretType] = certDirSecrets(inventoryID)

	// agent: plaintext outbound listener, mTLS clusters to inventory's sidecar.
	agent := outboundNode(t, []*routev3.Route{
		envoy.Forward("wrong", envoy.Prefix("/wrong"), envoy.ForwardOptions{Cluster: "sidecar|wrong", Timeout: 10 * time.Second}),
		envoy.Forward("ok", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "sidecar|inventory", Timeout: 10 * time.Second}),
	},
		sidecarCluster(t, "sidecar|inventory", meshTLS(agentID), inventoryID),
		sidecarCluster(t, "sidecar|wrong", meshTLS(agentID), "spiffe://example.org/ns/default/somebody-else"),
	)
	agent[resource.SecretType] = certDirSecrets(agentID)

	xdsAddr := requireADSNodes(t, map[string]map[resource.Type][]types.Resource{"inventory": inventory, "agent": agent})
	env.inventory = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "inventory", FileRoot: env.ca.CertDir(t, inventoryID)})
	env.inbound = env.inventory.Listener("inbound")
	if env.inbound == "" {
		t.Fatal("inbound listener not bound")
	}
	env.agent = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "agent", FileRoot: env.ca.CertDir(t, agentID),
		ClusterAddress: map[string]string{"sidecar|inventory": env.inbound, "sidecar|wrong": env.inbound}})
	env.outbound = env.agent.Listener("outbound")
	return env
}

// client is an HTTPS client trusting ca, presenting certs, offering h2 and HTTP/1.1.
func (env *mtlsEnv) client(t *testing.T, certs ...tls.Certificate) *http.Client {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(env.ca.Cert)
	tr := &http.Transport{ForceAttemptHTTP2: true, TLSClientConfig: &tls.Config{
		Certificates: certs, RootCAs: roots,
		// The server's SVID has a URI SAN only; check it as a SPIFFE client would.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			m := &material{roots: roots, validation: &tlsv3.CertificateValidationContext{}}
			return m.verify(raw)
		},
	}}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func (env *mtlsEnv) requireNoHit(t *testing.T) {
	t.Helper()
	select {
	case r := <-env.hits:
		t.Fatalf("the app was reached: %s %s", r.Method, r.URL)
	default:
	}
	if n := len(env.authz.all()); n != 0 {
		t.Fatalf("ext_authz was called %d times", n)
	}
}

// Strict (require_client_certificate): a client without a certificate fails the
// handshake; nothing reaches ext_authz or the app.
func TestTLSStrictRejectsClientWithoutCertificate(t *testing.T) {
	env := requireMTLS(t, true)
	_, err := env.client(t).Get("https://" + env.inbound + "/mcp")
	if err == nil {
		t.Fatal("a client without a certificate got through a strict listener")
	}
	t.Logf("refused as expected: %v", err)
	env.requireNoHit(t)
}

// A client SVID reaches ext_authz as source.principal (its URI SAN), the listener's own
// as destination.principal, over h2 negotiated by ALPN, with :scheme https.
func TestTLSPrincipalReachesExtAuthz(t *testing.T) {
	env := requireMTLS(t, true)
	resp, b := getBody(t, env.client(t, env.ca.TLSCert(t, agentID)), "https://"+env.inbound+"/mcp")
	if resp.StatusCode != 200 || b != "hello from the app" {
		t.Fatalf("got %d %q", resp.StatusCode, b)
	}
	if resp.ProtoMajor != 2 {
		t.Errorf("protocol %s, want h2 by ALPN", resp.Proto)
	}
	reqs := env.authz.all()
	if len(reqs) != 1 {
		t.Fatalf("%d CheckRequests", len(reqs))
	}
	a := reqs[0].GetAttributes()
	if got := a.GetSource().GetPrincipal(); got != agentID {
		t.Errorf("source.principal = %q, want %q", got, agentID)
	}
	if got := a.GetDestination().GetPrincipal(); got != inventoryID {
		t.Errorf("destination.principal = %q, want %q", got, inventoryID)
	}
	if h := a.GetRequest().GetHttp(); h.GetScheme() != "https" || h.GetHeaders()["x-forwarded-proto"] != "https" || h.GetProtocol() != "HTTP/2" {
		t.Errorf("scheme %q, x-forwarded-proto %q, protocol %q", h.GetScheme(), h.GetHeaders()["x-forwarded-proto"], h.GetProtocol())
	}
}

// A certificate from another CA fails chain verification; one from the trusted CA but of
// another trust domain fails the listener's URI SAN prefix matcher. Both at the
// handshake.
func TestTLSRefusesForeignCertificates(t *testing.T) {
	env := requireMTLS(t, false) // even where a certificate is optional, a bad one is refused
	other := testpki.NewCA(t, "other.org")
	for name, cert := range map[string]tls.Certificate{
		"other CA":           other.TLSCert(t, "spiffe://other.org/ns/default/my-agent"),
		"other trust domain": env.ca.TLSCert(t, "spiffe://other.org/ns/default/my-agent"),
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := env.client(t, cert).Get("https://" + env.inbound + "/mcp"); err == nil {
				t.Fatal("the handshake succeeded")
			}
			env.requireNoHit(t)
		})
	}
}

// Permissive (certificate optional): a client without one gets through with no
// principal; one with an SVID is named by it.
func TestTLSPermissive(t *testing.T) {
	env := requireMTLS(t, false)
	for _, certs := range [][]tls.Certificate{nil, {env.ca.TLSCert(t, agentID)}} {
		resp, err := env.client(t, certs...).Get("https://" + env.inbound + "/mcp")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("got %d", resp.StatusCode)
		}
	}
	reqs := env.authz.all()
	if len(reqs) != 2 || reqs[0].GetAttributes().GetSource().GetPrincipal() != "" || reqs[1].GetAttributes().GetSource().GetPrincipal() != agentID {
		t.Fatalf("principals: %v", reqs)
	}
}

// Upstream mTLS between two emulated nodes: the agent presents its SVID (from its own
// FileRoot) and accepts inventory's only if the URI SAN is exactly the expected one.
func TestUpstreamMTLS(t *testing.T) {
	env := requireMTLS(t, true)
	resp, body := do(t, "GET", "http://"+env.outbound+"/mcp", "")
	if resp.StatusCode != 200 || body != "hello from the app" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	reqs := env.authz.all()
	if len(reqs) != 1 || reqs[0].GetAttributes().GetSource().GetPrincipal() != agentID {
		t.Fatalf("CheckRequests %v", reqs)
	}
	<-env.hits

	resp, body = do(t, "GET", "http://"+env.outbound+"/wrong", "")
	if resp.StatusCode != 503 || !strings.Contains(body, "transport failure reason") || !strings.Contains(body, "ssl.fail_verify_san") {
		t.Fatalf("a server with another SPIFFE ID: got %d %q", resp.StatusCode, body)
	}
	if n := len(env.authz.all()); n != 1 {
		t.Fatalf("ext_authz called %d times", n)
	}
}

// Secrets whose files are missing are NACKed (sds_api.cc rejects the update) and the
// listener never binds.
func TestSDSMissingFilesNACK(t *testing.T) {
	downstream := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.DownstreamMTLS(meshTLS(inventoryID), trustDomain, true)
	})
	lis := httpListener(t, "inbound", "0.0.0.0", 15006, downstream)
	rc := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		envoy.DirectResponse("ok", envoy.Prefix("/"), 200, "", "ok", nil)}))
	addr := requireADSNodes(t, map[string]map[resource.Type][]types.Resource{"test": {
		resource.ListenerType: {lis}, resource.RouteType: {rc}, resource.SecretType: certDirSecrets(inventoryID),
	}})
	e, n := startUntilNACK(t, Options{XDSAddress: addr, NodeCluster: "test", FileRoot: t.TempDir()}, 5*time.Second)
	if !strings.Contains(n, "secret") || !strings.Contains(n, "no such file") {
		t.Fatalf("NACK %q", n)
	}
	if e.Listener("inbound") != "" {
		t.Fatal("a listener without its secrets was bound")
	}
}

// TestParseSecretGeneric: a generic secret is read once, on receipt, as Envoy's generic
// secret provider reads it on each update: an inline value, a file under FileRoot, an
// unset source (the empty value); an unreadable file rejects the secret.
func TestParseSecretGeneric(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "tokens"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "tokens", "api"), []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	e := &Emulator{opts: Options{FileRoot: root}}
	generic := func(src *corev3.DataSource) *tlsv3.Secret {
		return &tlsv3.Secret{Name: "s", Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{Secret: src}}}
	}
	for _, c := range []struct {
		name string
		src  *corev3.DataSource
		want string
	}{
		{"inline_string", &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: "tok"}}, "tok"},
		{"inline_bytes", &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: []byte("tok")}}, "tok"},
		{"filename", &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/tokens/api"}}, "from-file\n"},
		{"unset", nil, ""},
	} {
		s, err := e.parseSecret(generic(c.src))
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := string(s.GetGenericSecret().GetSecret().GetInlineBytes()); got != c.want {
			t.Errorf("%s: value %q, want %q", c.name, got, c.want)
		}
	}
	if _, err := e.parseSecret(generic(&corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: "/tokens/missing"}})); err == nil {
		t.Error("an unreadable generic secret was accepted")
	}
}
