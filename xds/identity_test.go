package xds

import (
	"context"
	"crypto/tls"
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

	"github.com/mcpgate/mcpgate/integration/testpki"
)

// startTLSADS serves ADS over TLS with mcpgate's SVID, requiring client certificates of
// the returned CA.
func startTLSADS(t *testing.T) (string, *testpki.CA) {
	t.Helper()
	ca := testpki.NewCA(t, "example.org")
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{ca.TLSCert(t, "spiffe://example.org/ns/default/mcpgate", testpki.WithIP("127.0.0.1"))},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool, MinVersion: tls.VersionTLS12,
	})
	addr := startADS(t, zap.NewNop(), nil, grpc.Creds(creds)).addr
	return addr, ca
}

// dialTLSADS connects to a startTLSADS server with cert.
func dialTLSADS(t *testing.T, addr string, ca *testpki.CA, cert tls.Certificate) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12,
	})))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// TestADSAuthorizesNodeByIdentity: over TLS, an Envoy may fetch only the configuration of
// the App its certificate names.
func TestADSAuthorizesNodeByIdentity(t *testing.T) {
	addr, ca := startTLSADS(t)

	fetch := func(t *testing.T, cert tls.Certificate, cluster string) (*discoveryv3.DiscoveryResponse, error) {
		t.Helper()
		conn := dialTLSADS(t, addr, ca, cert)
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

	agent := ca.TLSCert(t, "spiffe://example.org/ns/default/my-agent")
	if resp, err := fetch(t, agent, "my-agent"); err != nil || len(resp.GetResources()) == 0 {
		t.Fatalf("my-agent's own configuration: %v %v", resp, err)
	}
	for name, tc := range map[string]struct {
		cert    tls.Certificate
		cluster string
	}{
		"another app's configuration":           {agent, "inventory"},
		"a certificate without a SPIFFE ID":     {ca.TLSCert(t, ""), "my-agent"},
		"an identity from another trust domain": {ca.TLSCert(t, "spiffe://evil.org/ns/default/my-agent"), "my-agent"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := fetch(t, tc.cert, tc.cluster)
			if status.Code(err) != codes.PermissionDenied {
				t.Fatalf("want PermissionDenied, got %v", err)
			}
		})
	}
}
