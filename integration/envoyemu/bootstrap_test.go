package envoyemu

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/integration/testpki"
)

const mcpgateID = "spiffe://example.org/ns/mcpgate/mcpgate"

// tlsControlPlane is mcpgate's side of SPIFFE mTLS (serve --spiffe-socket): ADS and
// ext_authz on one gRPC server that presents mcpgate's SVID, requires a client
// certificate of the mesh CA and records the URI SAN of every client that handshakes.
type tlsControlPlane struct {
	addr  string
	authz *recordingAuthz
	cache cachev3.SnapshotCache
	mu    sync.Mutex
	peers []string
}

// set serves res to node cluster node.
func (cp *tlsControlPlane) set(t *testing.T, node string, res map[resource.Type][]types.Resource) {
	t.Helper()
	snap, err := cachev3.NewSnapshot("v1", res)
	if err != nil {
		t.Fatal(err)
	}
	if err := cp.cache.SetSnapshot(context.Background(), node, snap); err != nil {
		t.Fatal(err)
	}
}

func (cp *tlsControlPlane) clients() []string {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return slices.Clone(cp.peers)
}

func requireTLSControlPlane(t *testing.T, ca *testpki.CA) *tlsControlPlane {
	t.Helper()
	cp := &tlsControlPlane{authz: &recordingAuthz{}}
	certPEM, keyPEM := ca.IssuePEM(t, mcpgateID)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
		VerifyPeerCertificate: func(_ [][]byte, chains [][]*x509.Certificate) error {
			cp.mu.Lock()
			cp.peers = append(cp.peers, principal(chains[0][0]))
			cp.mu.Unlock()
			return nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cp.cache = cachev3.NewSnapshotCache(true, clusterHash{}, nil)
	g := grpc.NewServer(grpc.Creds(creds))
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, cp.cache, serverv3.CallbackFuncs{}))
	authv3.RegisterAuthorizationServer(g, cp.authz)
	cp.addr = requireGRPC(t, g)
	return cp
}

// TestBootstrapMTLSToControlPlane: an emulator started from `mcpgate bootstrap`'s
// bootstrap (envoy.Bootstrap with XDSTLS) reaches ADS over SPIFFE mTLS with the SVID the
// SPIRE agent serves, and reaches ext_authz on the "mcpgate" cluster over mTLS too; a
// control plane with another SPIFFE ID is never trusted; CDS cannot replace a static
// cluster.
func TestBootstrapMTLSToControlPlane(t *testing.T) {
	ca := testpki.NewCA(t, trustDomain)
	_, sock := requireFakeSPIRE(t, spireCert(t, ca, inventoryID), spireBundle(t, ca))

	cp := requireTLSControlPlane(t, ca)
	host, port := splitHostPort(t, cp.addr)
	toGate := must(t, func() (*corev3.TransportSocket, error) {
		return envoy.UpstreamMTLS(spireMeshTLS(inventoryID), mcpgateID)
	})
	gateCluster, gateCLA := mustCluster(t, envoy.ClusterOptions{Name: "mcpgate", Host: host, Port: port, Protocol: envoy.HTTP2, TransportSocket: toGate})
	clash, _ := mustCluster(t, envoy.ClusterOptions{Name: envoy.XDSCluster, Host: host, Port: port, Protocol: envoy.HTTP2, Static: true})
	cp.set(t, "inventory", inboundNode(t, requireHelloApp(t), nil, gateCluster, gateCLA))
	cp.set(t, "clash", map[resource.Type][]types.Resource{resource.ClusterType: {clash}})
	boot := func(t *testing.T, node, serverID string) *bootstrapv3.Bootstrap {
		t.Helper()
		b, err := envoy.Bootstrap(envoy.BootstrapOptions{NodeCluster: node, XDSAddress: cp.addr, SpireAgentSocket: sock,
			XDSTLS: &envoy.XDSTLS{SVID: inventoryID, Bundle: bundleName, ServerID: serverID}})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	t.Run("ADS and ext_authz over SPIFFE mTLS from the bootstrap", func(t *testing.T) {
		e := requireEmulator(t, Options{Bootstrap: boot(t, "inventory", mcpgateID)})
		resp, b := getBody(t, http.DefaultClient, "http://"+e.Listener("inbound")+"/")
		if resp.StatusCode != 200 || b != "hello" || len(cp.authz.all()) != 1 {
			t.Fatalf("%d %s, %d checks", resp.StatusCode, b, len(cp.authz.all()))
		}
		// Both connections, ADS and ext_authz, presented inventory's SVID.
		if got := cp.clients(); len(got) < 2 || slices.ContainsFunc(got, func(p string) bool { return p != inventoryID }) {
			t.Fatalf("client certificates seen by the control plane: %v", got)
		}
	})

	t.Run("a control plane with another SPIFFE ID is not trusted", func(t *testing.T) {
		e, err := Start(context.Background(), Options{Bootstrap: boot(t, "inventory", "spiffe://example.org/ns/other/mcpgate"), Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := e.WaitReady(ctx); err == nil || e.Version(resource.ClusterType) != "" {
			t.Fatalf("configured by an untrusted control plane (version %q)", e.Version(resource.ClusterType))
		}
	})

	t.Run("CDS cannot replace a static cluster", func(t *testing.T) {
		if _, n := startUntilNACK(t, Options{Bootstrap: boot(t, "clash", mcpgateID)}, 10*time.Second); !strings.Contains(n, "static cluster") {
			t.Fatalf("NACK %q", n)
		}
	})

	t.Run("a bootstrap without the SPIRE cluster cannot start xDS TLS", func(t *testing.T) {
		b := boot(t, "inventory", mcpgateID)
		b.StaticResources.Clusters = slices.DeleteFunc(b.StaticResources.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == SpireCluster })
		if _, err := Start(context.Background(), Options{Bootstrap: b}); err == nil || !strings.Contains(err.Error(), "SDSSocket") {
			t.Fatalf("Start: %v", err)
		}
	})
}
