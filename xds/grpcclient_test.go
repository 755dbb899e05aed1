// grpc-go (v1.85.0) as an independent xDS client of mcpgate's ADS server: what it
// accepts of mcpgate's translation, and what it rejects and why.

package xds

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/proto"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/policy"
)

// grpc-go (v1.85.0) as an independent xDS client of mcpgate's ADS server. grpc-go reads
// client listeners only as api_listener, which mcpgate does not generate (its listeners
// are Envoy's socket listeners), so the test adds one api_listener of its own whose HCM
// points over RDS at a RouteConfiguration mcpgate generated; everything behind it (RDS,
// CDS, EDS) is mcpgate's translation as served to Envoy.

// grpcMeshYAML is a mesh whose apps are on loopback IPs, so their clusters are EDS (the
// cluster type grpc-go consumes besides LOGICAL_DNS). echo's sidecar inbound port is the
// test backend: the caller's sidecar|echo cluster reaches it.
func grpcPolicyYAML(mtls string, backendPort int) (mesh, apps string) {
	sds := ""
	if mtls != "disabled" {
		sds = "  sds: {certDir: /var/run/certs}\n"
	}
	mesh = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  mtls: ` + mtls + `
  authz: {address: "127.0.0.1:9001"}
` + sds + `  issuers:
    - name: corp
      issuer: https://login.example.com/
      audiences: [api://mcp]
`
	apps = fmt.Sprintf(`apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: echo}
spec:
  address: "127.0.0.1:8000"
  sidecar: {address: "127.0.0.1", inboundPort: %d, outboundPort: 3500}
  mcp:
    path: /mcp
    resource: https://echo.example.com/mcp
    authentication: {required: true, issuers: [corp], audiences: [api://mcp]}
    resiliency: {retries: 2, circuitBreaker: {maxRequests: 50}}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: caller}
spec:
  address: "127.0.0.1:8080"
  sidecar: {address: "127.0.0.1", inboundPort: 15006, outboundPort: 3501}
`, backendPort)
	return mesh, apps
}

// xdsEvent is one DiscoveryRequest or DiscoveryResponse on an ADS stream.
type xdsEvent struct {
	req  *discoveryv3.DiscoveryRequest
	resp *discoveryv3.DiscoveryResponse
}

// xdsRecorder records every SotW ADS message, as the xDS client and server see them.
type xdsRecorder struct {
	mu     sync.Mutex
	events []xdsEvent
}

func (r *xdsRecorder) interceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	return h(srv, &recordedStream{ServerStream: ss, r: r})
}

func (r *xdsRecorder) add(e xdsEvent) {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
}

func (r *xdsRecorder) snapshot() []xdsEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]xdsEvent(nil), r.events...)
}

type recordedStream struct {
	grpc.ServerStream
	r *xdsRecorder
}

func (s *recordedStream) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	if req, ok := m.(*discoveryv3.DiscoveryRequest); ok && err == nil {
		s.r.add(xdsEvent{req: proto.Clone(req).(*discoveryv3.DiscoveryRequest)})
	}
	return err
}

func (s *recordedStream) SendMsg(m any) error {
	if resp, ok := m.(*discoveryv3.DiscoveryResponse); ok {
		s.r.add(xdsEvent{resp: proto.Clone(resp).(*discoveryv3.DiscoveryResponse)})
	}
	return s.ServerStream.SendMsg(m)
}

// verdict is what the client answered to the last response of one type.
type verdict struct {
	resp   *discoveryv3.DiscoveryResponse
	acked  bool
	nacked string // error_detail of a NACK
}

// verdictOf returns the client's answer to the last response of typeURL, if it answered.
func (r *xdsRecorder) verdictOf(typeURL string) (verdict, bool) {
	events := r.snapshot()
	var v verdict
	answered := false
	for _, e := range events {
		switch {
		case e.resp != nil && e.resp.TypeUrl == typeURL:
			v, answered = verdict{resp: e.resp}, false
		case e.req != nil && e.req.TypeUrl == typeURL && v.resp != nil && e.req.ResponseNonce == v.resp.Nonce:
			answered = true
			if d := e.req.GetErrorDetail(); d != nil {
				v.acked, v.nacked = false, d.GetMessage()
			} else {
				v.acked, v.nacked = e.req.VersionInfo == v.resp.VersionInfo, ""
			}
		}
	}
	return v, answered
}

// responses counts the responses of typeURL sent so far.
func (r *xdsRecorder) responses(typeURL string) int {
	n := 0
	for _, e := range r.snapshot() {
		if e.resp != nil && e.resp.TypeUrl == typeURL {
			n++
		}
	}
	return n
}

// requireVerdict polls until the client has answered the last response of typeURL.
func (r *xdsRecorder) requireVerdict(t *testing.T, typeURL string, within time.Duration) verdict {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if v, ok := r.verdictOf(typeURL); ok {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("grpc-go did not answer a %s response within %s; events: %d", typeURL, within, len(r.snapshot()))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// grpcXDSEnv is mcpgate's ADS server on loopback, recorded, and a gRPC backend standing
// in for echo's sidecar.
type grpcXDSEnv struct {
	store    *policy.Store
	server   *Server
	addr     string
	rec      *xdsRecorder
	mu       sync.Mutex
	received []metadata.MD // calls that reached the backend
}

func requireGRPCXDSEnv(t *testing.T, mtls string) *grpcXDSEnv {
	t.Helper()
	env := &grpcXDSEnv{rec: &xdsRecorder{}}

	backend := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		env.mu.Lock()
		env.received = append(env.received, md)
		env.mu.Unlock()
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(backend, health.NewServer())
	blis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = backend.Serve(blis) }()
	t.Cleanup(backend.Stop)

	dir := t.TempDir()
	mesh, apps := grpcPolicyYAML(mtls, blis.Addr().(*net.TCPAddr).Port)
	for name, body := range map[string]string{"mesh.yaml": mesh, "apps.yaml": apps} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	env.store = policy.NewStore(requireLoad(t, dir))

	ctx, cancel := context.WithCancel(context.Background())
	env.server, err = NewServer(ctx, Options{Store: env.store, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(append(ServerOptions(), grpc.StreamInterceptor(env.rec.interceptor))...)
	env.server.Register(g)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	done := make(chan struct{})
	go func() { _ = env.server.Run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		g.Stop()
		<-done
	})
	env.addr = lis.Addr().String()
	return env
}

// addAPIListener puts into the snapshot cache, for node, mcpgate's translation with its
// listeners replaced by one api_listener named name, whose HCM reads routeConfig over
// RDS, and its routes narrowed to routeConfig; clusters and endpoints are all mcpgate's.
//
// Why narrowed: the cache runs in ADS mode, where go-control-plane answers a request
// naming resources only if it names every resource of that type in the snapshot
// (simple.go respond/superset). Envoy sends wildcard LDS/CDS and names every route and
// assignment it needs; grpc-go only names what it resolves, so extra listeners or routes
// in the group would leave its requests unanswered.
//
// The snapshot carries the version mcpgate computes for node (the content hash of its
// translation), so the server, which skips a group whose version is unchanged, keeps it
// when the client's stream joins instead of replacing it with the translation alone.
func (e *grpcXDSEnv) addAPIListener(t *testing.T, node, name, routeConfig string) Resources {
	t.Helper()
	res, err := Translate(e.store.Current(), node)
	if err != nil {
		t.Fatal(err)
	}
	router, err := envoy.RouterFilter()
	if err != nil {
		t.Fatal(err)
	}
	hcm, err := envoy.Any(&hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource: envoy.ADSConfigSource(), RouteConfigName: routeConfig,
		}},
		HttpFilters: []*hcmv3.HttpFilter{router},
	})
	if err != nil {
		t.Fatal(err)
	}
	byType := res.ByType()
	byType[resource.ListenerType] = []types.Resource{&listenerv3.Listener{Name: name, ApiListener: &listenerv3.ApiListener{ApiListener: hcm}}}
	byType[resource.RouteType] = nil
	for _, rc := range res.Routes {
		if rc.Name == routeConfig {
			byType[resource.RouteType] = append(byType[resource.RouteType], rc)
		}
	}
	// No Consistent(): go-control-plane does not see RDS references inside an
	// api_listener, so it counts the route configuration as unreferenced.
	cs, err := cachev3.NewSnapshot(res.Hash(), byType)
	if err == nil {
		err = e.server.Cache().SetSnapshot(context.Background(), node, cs)
	}
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// requireGRPCClient dials xds:///target with grpc-go's xDS resolver, bootstrapped to
// mcpgate's ADS server as a node of node.cluster node.
func (e *grpcXDSEnv) requireGRPCClient(t *testing.T, node, target string) *grpc.ClientConn {
	t.Helper()
	bootstrap := fmt.Sprintf(`{
  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": "grpc-go-%s", "cluster": %q}
}`, e.addr, node, node)
	rb, err := grpcxds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("xds:///"+target, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(rb))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

func resourceNames(t *testing.T, r *discoveryv3.DiscoveryResponse) []string {
	t.Helper()
	var names []string
	for _, a := range r.Resources {
		var name string
		switch r.TypeUrl {
		case resource.ClusterType:
			var c clusterv3.Cluster
			if err := a.UnmarshalTo(&c); err != nil {
				t.Fatal(err)
			}
			name = c.Name
		case resource.EndpointType:
			var c endpointv3.ClusterLoadAssignment
			if err := a.UnmarshalTo(&c); err != nil {
				t.Fatal(err)
			}
			name = c.ClusterName
		case resource.RouteType:
			var c routev3.RouteConfiguration
			if err := a.UnmarshalTo(&c); err != nil {
				t.Fatal(err)
			}
			name = c.Name
		case resource.ListenerType:
			var c listenerv3.Listener
			if err := a.UnmarshalTo(&c); err != nil {
				t.Fatal(err)
			}
			name = c.Name
		}
		names = append(names, name)
	}
	return names
}

// TestGRPCXDSClientOutbound: grpc-go reads the caller's outbound RouteConfiguration, the
// sidecar|echo Cluster and its ClusterLoadAssignment as mcpgate serves them to Envoy,
// ACKs each at the version sent, and an RPC routed by the dapr-app-id header reaches the
// backend at the EDS endpoint.
func TestGRPCXDSClientOutbound(t *testing.T) {
	start := time.Now()
	env := requireGRPCXDSEnv(t, "disabled")
	res := env.addAPIListener(t, "caller", "caller-outbound", RouteOutbound)
	cc := env.requireGRPCClient(t, "caller", "caller-outbound")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hc := healthpb.NewHealthClient(cc)
	rctx := metadata.AppendToOutgoingContext(ctx, "dapr-app-id", "echo")
	if _, err := hc.Check(rctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("RPC through the xDS-resolved route: %v", err)
	}
	t.Logf("first RPC through xDS in %s", time.Since(start))
	env.mu.Lock()
	got := len(env.received)
	var appID []string
	if got > 0 {
		appID = env.received[0].Get("dapr-app-id")
	}
	env.mu.Unlock()
	if got != 1 || len(appID) != 1 || appID[0] != "echo" {
		t.Fatalf("backend saw %d calls (dapr-app-id %v), want 1 with echo", got, appID)
	}

	version := res.Hash()
	want := map[string]string{
		resource.ListenerType: "caller-outbound",
		resource.RouteType:    RouteOutbound,
		resource.ClusterType:  ClusterSidecar("echo"),
		resource.EndpointType: ClusterSidecar("echo"),
	}
	for _, typeURL := range []string{resource.ListenerType, resource.RouteType, resource.ClusterType, resource.EndpointType} {
		v := env.rec.requireVerdict(t, typeURL, 5*time.Second)
		if !v.acked || v.resp.VersionInfo != version {
			t.Errorf("%s: acked=%v at version %s (want %s), NACK %q", typeURL, v.acked, v.resp.VersionInfo, version, v.nacked)
		}
		if names := resourceNames(t, v.resp); len(names) != 1 || names[0] != want[typeURL] {
			t.Errorf("%s: grpc-go was sent %v, want [%s]", typeURL, names, want[typeURL])
		}
	}
	if n := env.server.Stats().NACKs; n != 0 {
		t.Fatalf("server counted %d NACKs, want 0", n)
	}

	// Nothing unlisted reaches an app: without dapr-app-id the request matches
	// mcpgate's catch-all direct_response route, which grpc-go, having no direct
	// responses, fails as UNAVAILABLE rather than forwarding.
	_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("RPC without dapr-app-id: %v, want UNAVAILABLE", err)
	}
	env.mu.Lock()
	got = len(env.received)
	env.mu.Unlock()
	if got != 1 {
		t.Fatalf("backend saw %d calls, want 1 (the unrouted one must not reach it)", got)
	}
	t.Logf("total %s", time.Since(start))
}

// TestGRPCXDSClientRejects records what grpc-go refuses in mcpgate's translation, and
// checks the server counts each NACK once and does not resend the rejected version.
func TestGRPCXDSClientRejects(t *testing.T) {
	for _, tc := range []struct {
		name, mtls, node, routeConfig, typeURL string
		want                                   string // substring of grpc-go's NACK
	}{
		// mTLS clusters carry an UpstreamTlsContext whose certificates come from SDS
		// (file or SPIRE). grpc-go takes certificates only from certificate-provider
		// plugins named in its bootstrap, not from SDS.
		{"mtls-sidecar-cluster", "strict", "caller", RouteOutbound, resource.ClusterType, "security configuration on the client-side does not contain root certificate provider instance name"},
		// The inbound routes carry ext_authz and ext_proc per-route configs
		// (typed_per_filter_config) not marked optional; grpc-go has neither filter by
		// default and names whichever its map iteration meets first.
		{"inbound-route-ext-authz", "disabled", "echo", RouteInbound, resource.RouteType, `no filter implementation found for "type.googleapis.com/envoy.extensions.filters.http.ext_`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			env := requireGRPCXDSEnv(t, tc.mtls)
			env.addAPIListener(t, tc.node, tc.node+"-api", tc.routeConfig)
			cc := env.requireGRPCClient(t, tc.node, tc.node+"-api")
			cc.Connect()

			v := env.rec.requireVerdict(t, tc.typeURL, 10*time.Second)
			t.Logf("grpc-go answered %s in %s: acked=%v NACK %q", tc.typeURL, time.Since(start), v.acked, v.nacked)
			if v.acked || !strings.Contains(v.nacked, tc.want) {
				t.Fatalf("want a NACK containing %q", tc.want)
			}
			// Counted once, and the rejected version is not sent again (go-control-plane
			// would resend it at once to a client that NACKs it).
			sent := env.rec.responses(tc.typeURL)
			deadline := time.Now().Add(300 * time.Millisecond)
			for time.Now().Before(deadline) {
				if env.rec.responses(tc.typeURL) != sent {
					t.Fatalf("%s resent after a NACK", tc.typeURL)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if n := env.server.Stats().NACKs; n != 1 {
				t.Fatalf("server counted %d NACKs, want 1", n)
			}
		})
	}
}
