package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"net/url"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/mcpgate/mcpgate/policy"
)

// testCA issues X.509 SVIDs for the identity tests.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert: cert, key: key, pool: pool}
}

// svid issues a certificate for spiffeID (empty: no URI SAN), usable by clients and servers.
func (ca *testCA) svid(t *testing.T, spiffeID string, serial int64) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "workload"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	if spiffeID != "" {
		u, _ := url.Parse(spiffeID)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestADSAuthorizesNodeByIdentity: over TLS, an Envoy may fetch only the configuration of
// the App its certificate names.
func TestADSAuthorizesNodeByIdentity(t *testing.T) {
	ca := newTestCA(t)
	dir := t.TempDir()
	requireCopyDir(t, "../testdata/demo", dir)
	store := policy.NewStore(requireLoad(t, dir))
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := NewServer(ctx, Options{Store: store, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{ca.svid(t, "spiffe://example.org/ns/default/mcpgate", 2)},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: ca.pool, MinVersion: tls.VersionTLS12,
	})
	g := grpc.NewServer(append(ServerOptions(), grpc.Creds(creds))...)
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	done := make(chan struct{})
	go func() { _ = srv.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); g.Stop(); <-done })

	fetch := func(t *testing.T, cert tls.Certificate, cluster string) (*discoveryv3.DiscoveryResponse, error) {
		t.Helper()
		conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{cert}, RootCAs: ca.pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12,
		})))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer scancel()
		stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
		if err != nil {
			return nil, err
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &corev3.Node{Id: cluster + "-1", Cluster: cluster}, TypeUrl: resource.ClusterType}); err != nil {
			return nil, err
		}
		return stream.Recv()
	}

	agent := ca.svid(t, "spiffe://example.org/ns/default/my-agent", 3)
	if resp, err := fetch(t, agent, "my-agent"); err != nil || len(resp.GetResources()) == 0 {
		t.Fatalf("my-agent's own configuration: %v %v", resp, err)
	}
	for name, tc := range map[string]struct {
		cert    tls.Certificate
		cluster string
	}{
		"another app's configuration":           {agent, "inventory"},
		"a certificate without a SPIFFE ID":     {ca.svid(t, "", 4), "my-agent"},
		"an identity from another trust domain": {ca.svid(t, "spiffe://evil.org/ns/default/my-agent", 5), "my-agent"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := fetch(t, tc.cert, tc.cluster)
			if status.Code(err) != codes.PermissionDenied {
				t.Fatalf("want PermissionDenied, got %v", err)
			}
		})
	}
}
