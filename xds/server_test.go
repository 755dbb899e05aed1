package xds

import (
	"context"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/mcpgate/mcpgate/policy"
)

// testEnv is an ADS server on loopback over a policy directory the test may edit.
type testEnv struct {
	dir    string
	store  *policy.Store
	server *Server
	addr   string
	logs   *observer.ObservedLogs
}

func requireADSServer(t testing.TB) *testEnv {
	t.Helper()
	return requireADSServerWith(t, nil)
}

// requireADSServerWith is requireADSServer with outbound tokens (nil: none).
func requireADSServerWith(t testing.TB, tokens TokenSource) *testEnv {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	env := startADS(t, zap.New(core), tokens)
	env.logs = logs
	return env
}

// startADS copies testdata/demo to a new directory and serves its policy over ADS on
// loopback, with tokens (nil: none), logging to logger, with ServerOptions and opts,
// until the test ends.
func startADS(t testing.TB, logger *zap.Logger, tokens TokenSource, opts ...grpc.ServerOption) *testEnv {
	t.Helper()
	dir := t.TempDir()
	requireCopyDir(t, "../testdata/demo", dir)
	store := policy.NewStore(requireLoad(t, dir))
	ctx, cancel := context.WithCancel(context.Background())
	srv, err := NewServer(ctx, Options{Store: store, Logger: logger, Tokens: tokens})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(append(ServerOptions(), opts...)...)
	srv.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	done := make(chan struct{})
	go func() { _ = srv.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		g.Stop()
		<-done
	})
	return &testEnv{dir: dir, store: store, server: srv, addr: lis.Addr().String()}
}

// edit rewrites a policy file and publishes the result through the Store, as the
// watcher does.
func (e *testEnv) edit(t testing.TB, file, old, new string) {
	t.Helper()
	p := filepath.Join(e.dir, file)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s does not contain %q", file, old)
	}
	if err := os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	e.store.Set(requireLoad(t, e.dir))
}

func requireCopyDir(t testing.TB, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// adsClient is one Envoy's ADS stream, driven by hand.
type adsClient struct {
	node   *corev3.Node
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	resps  chan *discoveryv3.DiscoveryResponse
}

func requireADSClient(t testing.TB, addr, cluster, id string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &adsClient{node: &corev3.Node{Id: id, Cluster: cluster}, stream: stream, resps: make(chan *discoveryv3.DiscoveryResponse, 16)}
	go func() {
		defer close(c.resps)
		for {
			r, err := stream.Recv()
			if err != nil {
				return
			}
			c.resps <- r
		}
	}()
	t.Cleanup(func() { cancel(); _ = conn.Close() })
	return c
}

func (c *adsClient) send(t testing.TB, typeURL, version, nonce string, nack *status.Status) {
	t.Helper()
	if err := c.stream.Send(&discoveryv3.DiscoveryRequest{
		Node: c.node, TypeUrl: typeURL, VersionInfo: version, ResponseNonce: nonce, ErrorDetail: nack,
	}); err != nil {
		t.Fatal(err)
	}
}

func (c *adsClient) recv(t testing.TB, within time.Duration) *discoveryv3.DiscoveryResponse {
	t.Helper()
	select {
	case r, ok := <-c.resps:
		if !ok {
			t.Fatal("stream closed")
		}
		return r
	case <-time.After(within):
		t.Fatalf("no response within %s", within)
		return nil
	}
}

// quiet reports whether no response arrives for d.
func (c *adsClient) quiet(d time.Duration) bool {
	select {
	case <-c.resps:
		return false
	case <-time.After(d):
		return true
	}
}

func clusterNamed(t testing.TB, r *discoveryv3.DiscoveryResponse, name string) *clusterv3.Cluster {
	t.Helper()
	for _, a := range r.Resources {
		var c clusterv3.Cluster
		if err := a.UnmarshalTo(&c); err != nil {
			t.Fatal(err)
		}
		if c.Name == name {
			return &c
		}
	}
	t.Fatalf("no cluster %s in version %s", name, r.VersionInfo)
	return nil
}

func TestADSEditACKNACK(t *testing.T) {
	env := requireADSServer(t)
	c := requireADSClient(t, env.addr, "inventory", "inventory-1")

	c.send(t, resource.ClusterType, "", "", nil)
	r1 := c.recv(t, 5*time.Second)
	if got := clusterNamed(t, r1, ClusterApp("inventory")).GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue(); got != 1000 {
		t.Fatalf("max_requests %d, want 1000", got)
	}
	c.send(t, resource.ClusterType, r1.VersionInfo, r1.Nonce, nil) // ACK

	// An edit reaches the connected Envoy within a second.
	start := time.Now()
	env.edit(t, "inventory.yaml", "maxRequests: 1000", "maxRequests: 500")
	r2 := c.recv(t, time.Second)
	t.Logf("edit → new version in %s", time.Since(start))
	if r2.VersionInfo == r1.VersionInfo {
		t.Fatal("same version after an edit")
	}
	if got := clusterNamed(t, r2, ClusterApp("inventory")).GetCircuitBreakers().GetThresholds()[0].GetMaxRequests().GetValue(); got != 500 {
		t.Fatalf("max_requests %d, want 500", got)
	}

	// Envoy rejects it: logged at error level, counted, and not sent again.
	c.send(t, resource.ClusterType, r1.VersionInfo, r2.Nonce, &status.Status{Code: 3, Message: "cluster rejected: test"})
	if !c.quiet(300 * time.Millisecond) {
		t.Fatal("the NACKed version was sent again")
	}
	if got := env.server.Stats().NACKs; got != 1 {
		t.Fatalf("NACKs counted %d, want 1", got)
	}
	nacks := env.logs.FilterMessageSnippet("NACK").All()
	if len(nacks) != 1 || nacks[0].Level != zap.ErrorLevel || nacks[0].ContextMap()["error_detail"] != "cluster rejected: test" ||
		nacks[0].ContextMap()["version"] != r2.VersionInfo {
		t.Fatalf("NACK log: %+v", nacks)
	}

	// The next good edit is sent as usual.
	env.edit(t, "inventory.yaml", "maxRequests: 500", "maxRequests: 700")
	r3 := c.recv(t, time.Second)
	if r3.VersionInfo == r2.VersionInfo || r3.VersionInfo == r1.VersionInfo {
		t.Fatalf("want a new version, got %s", r3.VersionInfo)
	}
	c.send(t, resource.ClusterType, r3.VersionInfo, r3.Nonce, nil)

	// A policy the translator refuses changes nothing: the last good snapshot stays,
	// the error is counted.
	bad := *env.store.Current()
	mesh := *bad.Mesh
	mesh.AuthzAddress = "no port"
	bad.Mesh, bad.Version = &mesh, "bad"
	env.store.Set(&bad)
	deadline := time.Now().Add(2 * time.Second)
	for env.server.Stats().TranslationErrors == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if env.server.Stats().TranslationErrors == 0 {
		t.Fatal("translation error not counted")
	}
	if snap, err := env.server.Cache().GetSnapshot("inventory"); err != nil || snap.GetVersion(resource.ClusterType) != r3.VersionInfo {
		t.Fatalf("the last good snapshot was not kept: %v", err)
	}
	if !c.quiet(100 * time.Millisecond) {
		t.Fatal("a refused translation was sent")
	}
}

func TestADSReplicasShareSnapshot(t *testing.T) {
	env := requireADSServer(t)
	a := requireADSClient(t, env.addr, "inventory", "inventory-a")
	b := requireADSClient(t, env.addr, "inventory", "inventory-b")
	a.send(t, resource.ListenerType, "", "", nil)
	b.send(t, resource.ListenerType, "", "", nil)
	ra, rb := a.recv(t, 5*time.Second), b.recv(t, 5*time.Second)
	if ra.VersionInfo != rb.VersionInfo || len(ra.Resources) != 2 {
		t.Fatalf("replicas got versions %s and %s (%d listeners)", ra.VersionInfo, rb.VersionInfo, len(ra.Resources))
	}
	if keys := env.server.Cache().GetStatusKeys(); len(keys) != 1 || keys[0] != "inventory" {
		t.Fatalf("cache keys %v, want one per node.cluster", keys)
	}
	// Both see an edit.
	a.send(t, resource.ListenerType, ra.VersionInfo, ra.Nonce, nil)
	b.send(t, resource.ListenerType, rb.VersionInfo, rb.Nonce, nil)
	env.edit(t, "inventory.yaml", "inboundPort: 15006", "inboundPort: 15007")
	if a.recv(t, time.Second).VersionInfo != b.recv(t, time.Second).VersionInfo {
		t.Fatal("replicas diverged after an edit")
	}
}

func TestADSUnknownNodeAndRemovedApp(t *testing.T) {
	env := requireADSServer(t)
	c := requireADSClient(t, env.addr, "nobody", "x")
	c.send(t, resource.ClusterType, "", "", nil)
	if r := c.recv(t, 5*time.Second); len(r.Resources) != 0 {
		t.Fatalf("an unknown node got %d clusters", len(r.Resources))
	}
	if len(env.logs.FilterMessageSnippet("names no App").All()) == 0 {
		t.Fatal("no warning for an unknown node")
	}

	// Removing an app removes its resources from its own Envoy and from its callers'.
	inv := requireADSClient(t, env.addr, "inventory", "inv")
	agent := requireADSClient(t, env.addr, "my-agent", "agent")
	inv.send(t, resource.ClusterType, "", "", nil)
	agent.send(t, resource.ClusterType, "", "", nil)
	ri, ra := inv.recv(t, 5*time.Second), agent.recv(t, 5*time.Second)
	clusterNamed(t, ra, ClusterSidecar("inventory"))
	inv.send(t, resource.ClusterType, ri.VersionInfo, ri.Nonce, nil)
	agent.send(t, resource.ClusterType, ra.VersionInfo, ra.Nonce, nil)
	if err := os.WriteFile(filepath.Join(env.dir, "inventory.yaml"), []byte(myAgentOnly), 0o644); err != nil {
		t.Fatal(err)
	}
	env.store.Set(requireLoad(t, env.dir))
	if r := inv.recv(t, time.Second); len(r.Resources) != 0 {
		t.Fatalf("a removed app's Envoy still gets %d clusters", len(r.Resources))
	}
	for _, a := range agent.recv(t, time.Second).Resources {
		if strings.Contains(string(a.Value), "sidecar|inventory") {
			t.Fatal("the caller still has a cluster to the removed app")
		}
	}
}

const myAgentOnly = `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata:
  name: my-agent
spec:
  address: my-agent:8080
  sidecar: {address: my-agent-envoy, inboundPort: 15006, outboundPort: 3500}
`

func TestADSDelta(t *testing.T) {
	env := requireADSServer(t)
	conn, err := grpc.NewClient(env.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &corev3.Node{Id: "d", Cluster: "inventory"}
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	r, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	// mcpgate, app|inventory, sidecar|inventory; not endpoint|github-mcp, which only
	// my-agent may call (spec.callers).
	if len(r.Resources) != 3 {
		t.Fatalf("delta: %d clusters, want 3", len(r.Resources))
	}
	// NACK: logged and counted.
	if err := stream.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, ResponseNonce: r.Nonce,
		ErrorDetail: &status.Status{Code: 3, Message: "nope"}}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for env.server.Stats().NACKs == 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if env.server.Stats().NACKs != 1 {
		t.Fatal("delta NACK not counted")
	}
}
