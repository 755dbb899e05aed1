package envoyemu

import (
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/integration/testpki"
)

// fakeSPIRE is a SPIRE agent's SDS API as pkg/agent/endpoints/sdsv3 serves it: the
// requested names from its secrets, an InvalidArgument for a name it has no entry for,
// and a new response on every change.
type fakeSPIRE struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	mu      sync.Mutex
	secrets map[string]*tlsv3.Secret
	version int
	changed chan struct{}
}

func (f *fakeSPIRE) set(ss ...*tlsv3.Secret) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range ss {
		f.secrets[s.GetName()] = s
	}
	f.version++
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeSPIRE) StreamSecrets(stream secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	req, err := stream.Recv()
	if err != nil {
		return err
	}
	go func() { // ACKs and NACKs
		for {
			if _, err := stream.Recv(); err != nil {
				return
			}
		}
	}()
	sent := -1
	for {
		f.mu.Lock()
		v, ch := f.version, f.changed
		var res []*anypb.Any
		for _, n := range req.GetResourceNames() {
			s := f.secrets[n]
			if s == nil {
				f.mu.Unlock()
				return status.Errorf(codes.InvalidArgument, "workload is not authorized for the requested identities %q", n)
			}
			a, err := anypb.New(s)
			if err != nil {
				f.mu.Unlock()
				return err
			}
			res = append(res, a)
		}
		f.mu.Unlock()
		if v != sent {
			if err := stream.Send(&discoveryv3.DiscoveryResponse{TypeUrl: resource.SecretType, VersionInfo: string(rune('0' + v%10)), Nonce: time.Now().String(), Resources: res}); err != nil {
				return err
			}
			sent = v
		}
		select {
		case <-ch:
		case <-stream.Context().Done():
			return nil
		}
	}
}

// spireCert is the SVID secret SPIRE sends (inline PEM, named by the SPIFFE ID).
func spireCert(t testing.TB, ca *testpki.CA, id string) *tlsv3.Secret {
	c, k := ca.IssuePEM(t, id)
	return &tlsv3.Secret{Name: id, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
		CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: c}},
		PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: k}},
	}}}
}

// spireBundle is the bundle secret SPIRE sends to Envoy ≥ 1.18: a SPIFFE validator.
func spireBundle(t testing.TB, ca *testpki.CA) *tlsv3.Secret {
	cfg, err := anypb.New(&tlsv3.SPIFFECertValidatorConfig{TrustDomains: []*tlsv3.SPIFFECertValidatorConfig_TrustDomain{{
		Name: trustDomain, TrustBundle: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: ca.PEM}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return &tlsv3.Secret{Name: bundleName, Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
		CustomValidatorConfig: &corev3.TypedExtensionConfig{Name: spiffeValidator, TypedConfig: cfg},
	}}}
}

// requireFakeSPIRE serves a fakeSPIRE holding secrets on a Unix socket until the test
// ends and returns it with the socket's path.
func requireFakeSPIRE(t *testing.T, secrets ...*tlsv3.Secret) (*fakeSPIRE, string) {
	t.Helper()
	f := &fakeSPIRE{secrets: map[string]*tlsv3.Secret{}, changed: make(chan struct{})}
	f.set(secrets...)
	sock := filepath.Join(t.TempDir(), "a.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	secretv3.RegisterSecretDiscoveryServiceServer(g, f)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return f, sock
}

func spireMeshTLS(id string) envoy.MeshTLS {
	return envoy.MeshTLS{Cert: envoy.SecretRef(id, envoy.SpireSDS()), Bundle: envoy.SecretRef(bundleName, envoy.SpireSDS())}
}

// TestSPIRESDS: two nodes whose TLS contexts name secrets on the spire_agent cluster, as
// mcpgate translates spireAgentSocket, take them from an SDS server on a Unix socket;
// the SPIFFE validator checks peers; a rotated SVID applies to new handshakes.
func TestSPIRESDS(t *testing.T) {
	ca := testpki.NewCA(t, trustDomain)
	spire, sock := requireFakeSPIRE(t, spireCert(t, ca, inventoryID), spireCert(t, ca, agentID), spireBundle(t, ca))

	authz := &recordingAuthz{}
	authzCluster, authzCLA := requireAuthzCluster(t, authz)
	downstream := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.DownstreamMTLS(spireMeshTLS(inventoryID), trustDomain, true)
	})
	xdsAddr := requireADSNodes(t, map[string]map[resource.Type][]types.Resource{
		"inventory": inboundNode(t, requireHelloApp(t), downstream, authzCluster, authzCLA),
		"agent": outboundNode(t, []*routev3.Route{
			envoy.Forward("ok", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "sidecar|inventory", Timeout: 10 * time.Second}),
		}, sidecarCluster(t, "sidecar|inventory", spireMeshTLS(agentID), inventoryID)),
	})

	t.Run("without SDSSocket the SPIRE secrets are NACKed", func(t *testing.T) {
		if _, n := startUntilNACK(t, Options{XDSAddress: xdsAddr, NodeCluster: "inventory"}, 5*time.Second); !strings.Contains(n, "SDSSocket") {
			t.Fatalf("NACK %q", n)
		}
	})

	inventory := requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "inventory", SDSSocket: sock})
	in := inventory.Listener("inbound")
	agent := requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "agent", SDSSocket: sock,
		ClusterAddress: map[string]string{"sidecar|inventory": in}})
	out := "http://" + agent.Listener("outbound") + "/"

	get := func(t *testing.T) {
		t.Helper()
		resp, b := getBody(t, http.DefaultClient, out)
		if resp.StatusCode != 200 || b != "hello" {
			t.Fatalf("%d %s", resp.StatusCode, b)
		}
	}
	// serverLeaf is inventory's certificate, seen in a handshake (the server shows it
	// before it asks for the client's).
	serverLeaf := func(t *testing.T, certs ...tls.Certificate) (*x509.Certificate, error) {
		t.Helper()
		var leaf *x509.Certificate
		conn, err := tls.Dial("tcp", in, &tls.Config{InsecureSkipVerify: true, Certificates: certs,
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				leaf, _ = x509.ParseCertificate(raw[0])
				return nil
			}})
		if err == nil {
			// TLS 1.3: the server's verdict on the client certificate arrives with the
			// first read; a request is answered once it is accepted.
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err = io.WriteString(conn, "GET / HTTP/1.1\r\nHost: inventory\r\nConnection: close\r\n\r\n"); err == nil {
				_, err = conn.Read(make([]byte, 1))
			}
			conn.Close()
		}
		return leaf, err
	}

	t.Run("mTLS with SVIDs from SDS, SPIFFE validator", func(t *testing.T) {
		get(t)
		reqs := authz.all()
		if got := reqs[len(reqs)-1].GetAttributes().GetSource().GetPrincipal(); got != agentID {
			t.Fatalf("source principal %q", got)
		}
	})

	t.Run("a certificate of another CA is refused", func(t *testing.T) {
		other := testpki.NewCA(t, trustDomain)
		if _, err := serverLeaf(t, other.TLSCert(t, agentID)); err == nil {
			t.Fatal("handshake with a foreign CA's certificate succeeded")
		}
		if _, err := serverLeaf(t, ca.TLSCert(t, agentID)); err != nil {
			t.Fatalf("handshake with the mesh CA's certificate: %v", err)
		}
	})

	t.Run("a rotated SVID applies to new handshakes", func(t *testing.T) {
		before, _ := serverLeaf(t)
		spire.set(spireCert(t, ca, inventoryID), spireCert(t, ca, agentID))
		requireEventually(t, 5*time.Second, "the rotated SVID", func() bool {
			now, _ := serverLeaf(t)
			return now != nil && before != nil && now.SerialNumber.Cmp(before.SerialNumber) != 0
		})
		get(t)
	})
}
