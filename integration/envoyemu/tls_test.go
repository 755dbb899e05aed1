package envoyemu

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
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
)

const (
	trustDomain = "example.org"
	inventoryID = "spiffe://example.org/ns/default/inventory"
	agentID     = "spiffe://example.org/ns/default/my-agent"
	bundleName  = "spiffe://example.org"
)

// testCA is a self-signed CA issuing X509-SVIDs (one URI SAN, as SPIFFE's X509-SVID
// spec requires; both TLS key usages, as SPIRE issues them).
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name + " test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

var serial sync.Mutex
var nextSerial int64 = 100

// issue returns the PEM certificate and key of an SVID for id.
func (ca *testCA) issue(t testing.TB, id string) (certPEM, keyPEM []byte) {
	t.Helper()
	u, err := url.Parse(id)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial.Lock()
	nextSerial++
	n := nextSerial
	serial.Unlock()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(n), Subject: pkix.Name{CommonName: u.Path},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		URIs:        []*url.URL{u},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kb})
}

// certDir writes id's SVID, key and ca's bundle as spiffe-helper does, under
// <root>/certs, and returns root (an emulator's FileRoot).
func (ca *testCA) certDir(t testing.TB, id string) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "certs")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c, k := ca.issue(t, id)
	for name, b := range map[string][]byte{envoy.CertDirCert: c, envoy.CertDirKey: k, envoy.CertDirBundle: ca.pem} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// clientCert is a tls.Certificate for id, issued by ca.
func (ca *testCA) clientCert(t testing.TB, id string) tls.Certificate {
	t.Helper()
	c, k := ca.issue(t, id)
	cert, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

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
	ca        *testCA
	authz     *recordingAuthz
	hits      chan *http.Request
	inventory *Emulator
	inbound   string
	agent     *Emulator
	outbound  string
}

func requireMTLS(t *testing.T, requireClient bool) *mtlsEnv {
	t.Helper()
	env := &mtlsEnv{ca: newTestCA(t, trustDomain), authz: &recordingAuthz{}, hits: make(chan *http.Request, 16)}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case env.hits <- r:
		default:
		}
		_, _ = io.WriteString(w, "hello from the app")
	}))
	t.Cleanup(app.Close)
	g := grpc.NewServer()
	authv3.RegisterAuthorizationServer(g, env.authz)
	authzAddr := requireGRPC(t, g)

	// inventory: inbound mTLS listener.
	authzFilter := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("authz") })
	router := must(t, envoy.RouterFilter)
	downstream := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.DownstreamMTLS(meshTLS(inventoryID), trustDomain, requireClient)
	})
	chain := must(t, func() (*listenerv3.FilterChain, error) {
		return envoy.HTTPFilterChain("inbound", envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "inbound", RouteConfig: "inbound",
			Filters: []*hcmv3.HttpFilter{authzFilter, router}}), downstream)
	})
	inbound := envoy.Listener(envoy.ListenerOptions{Name: "inbound", Address: "0.0.0.0", Port: 15006, Chains: []*listenerv3.FilterChain{chain}})
	appHost, appPort := splitHostPort(t, app.Listener.Addr().String())
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: appHost, Port: appPort})
	authzHost, authzPort := splitHostPort(t, authzAddr)
	authzCluster, authzCLA := mustCluster(t, envoy.ClusterOptions{Name: "authz", Host: authzHost, Port: authzPort, Protocol: envoy.HTTP2})
	inRoutes := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		envoy.Forward("all", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "app", Timeout: 10 * time.Second}),
	}))

	// agent: plaintext outbound listener, mTLS clusters to inventory's sidecar.
	upstream := func(peer string) *corev3.TransportSocket {
		return must(t, func() (*corev3.TransportSocket, error) { return envoy.UpstreamMTLS(meshTLS(agentID), peer) })
	}
	okCluster, _ := mustCluster(t, envoy.ClusterOptions{Name: "sidecar|inventory", Host: "inventory-envoy", Port: 15006,
		Protocol: envoy.HTTPAuto, TransportSocket: upstream(inventoryID)})
	wrongCluster, _ := mustCluster(t, envoy.ClusterOptions{Name: "sidecar|wrong", Host: "inventory-envoy", Port: 15006,
		Protocol: envoy.HTTPAuto, TransportSocket: upstream("spiffe://example.org/ns/default/somebody-else")})
	outChain := must(t, func() (*listenerv3.FilterChain, error) {
		return envoy.HTTPFilterChain("outbound", envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "outbound", RouteConfig: "outbound",
			Filters: []*hcmv3.HttpFilter{router}}), nil)
	})
	outbound := envoy.Listener(envoy.ListenerOptions{Name: "outbound", Address: "127.0.0.1", Port: 3500, Chains: []*listenerv3.FilterChain{outChain}})
	outRoutes := envoy.RouteConfiguration("outbound", envoy.VirtualHost("outbound", []string{"*"}, []*routev3.Route{
		envoy.Forward("wrong", envoy.Prefix("/wrong"), envoy.ForwardOptions{Cluster: "sidecar|wrong", Timeout: 10 * time.Second}),
		envoy.Forward("ok", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "sidecar|inventory", Timeout: 10 * time.Second}),
	}))

	xdsAddr := requireADSNodes(t, map[string]map[resource.Type][]types.Resource{
		"inventory": {
			resource.ListenerType: {inbound},
			resource.RouteType:    {inRoutes},
			resource.ClusterType:  {appCluster, authzCluster},
			resource.EndpointType: {appCLA, authzCLA},
			resource.SecretType:   certDirSecrets(inventoryID),
		},
		"agent": {
			resource.ListenerType: {outbound},
			resource.RouteType:    {outRoutes},
			resource.ClusterType:  {okCluster, wrongCluster},
			resource.SecretType:   certDirSecrets(agentID),
		},
	})
	env.inventory = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "inventory", FileRoot: env.ca.certDir(t, inventoryID)})
	env.inbound = env.inventory.Listener("inbound")
	if env.inbound == "" {
		t.Fatal("inbound listener not bound")
	}
	env.agent = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "agent", FileRoot: env.ca.certDir(t, agentID),
		ClusterAddress: map[string]string{"sidecar|inventory": env.inbound, "sidecar|wrong": env.inbound}})
	env.outbound = env.agent.Listener("outbound")
	return env
}

// client is an HTTPS client trusting ca, presenting certs, offering h2 and HTTP/1.1.
func (env *mtlsEnv) client(t *testing.T, certs ...tls.Certificate) *http.Client {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(env.ca.cert)
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
	resp, err := env.client(t, env.ca.clientCert(t, agentID)).Get("https://" + env.inbound + "/mcp")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "hello from the app" {
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
	other := newTestCA(t, "other.org")
	for name, cert := range map[string]tls.Certificate{
		"other CA":           other.clientCert(t, "spiffe://other.org/ns/default/my-agent"),
		"other trust domain": env.ca.clientCert(t, "spiffe://other.org/ns/default/my-agent"),
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
	for _, certs := range [][]tls.Certificate{nil, {env.ca.clientCert(t, agentID)}} {
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
	router := must(t, envoy.RouterFilter)
	downstream := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.DownstreamMTLS(meshTLS(inventoryID), trustDomain, true)
	})
	chain := must(t, func() (*listenerv3.FilterChain, error) {
		return envoy.HTTPFilterChain("inbound", envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "inbound", RouteConfig: "inbound",
			Filters: []*hcmv3.HttpFilter{router}}), downstream)
	})
	lis := envoy.Listener(envoy.ListenerOptions{Name: "inbound", Address: "0.0.0.0", Port: 15006, Chains: []*listenerv3.FilterChain{chain}})
	rc := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		envoy.DirectResponse("ok", envoy.Prefix("/"), 200, "", "ok", nil)}))
	addr := requireADSNodes(t, map[string]map[resource.Type][]types.Resource{"test": {
		resource.ListenerType: {lis}, resource.RouteType: {rc}, resource.SecretType: certDirSecrets(inventoryID),
	}})
	e, err := Start(context.Background(), Options{XDSAddress: addr, NodeCluster: "test", FileRoot: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Wait(ctx, func(e *Emulator) bool { return len(e.NACKs()) > 0 }); err != nil {
		t.Fatal(err)
	}
	if n := e.NACKs()[0]; !strings.Contains(n, "secret") || !strings.Contains(n, "no such file") {
		t.Fatalf("NACK %q", n)
	}
	if e.Listener("inbound") != "" {
		t.Fatal("a listener without its secrets was bound")
	}
}
