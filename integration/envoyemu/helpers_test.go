package envoyemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/mcpgate/mcpgate/envoy"
)

// requireEventually polls cond until it holds or the deadline passes.
func requireEventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not a readiness wait
	}
}

// requireGRPC serves g on loopback until the test ends.
func requireGRPC(t testing.TB, g *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

// scripted is an ext_proc server that logs every message it receives and answers with
// a script (CONTINUE by default).
type scripted struct {
	extprocv3.UnimplementedExternalProcessorServer
	mu     sync.Mutex
	log    []string
	script func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse
	delay  time.Duration
}

func (s *scripted) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := srv.Recv()
		if err != nil {
			s.record("<eof>")
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		s.record(describe(req))
		var resp *extprocv3.ProcessingResponse
		if s.script != nil {
			resp = s.script(req)
		}
		if resp == nil {
			resp = continueFor(req)
		}
		if s.delay > 0 {
			time.Sleep(s.delay) // simulates a slow processor (message_timeout test)
		}
		if err := srv.Send(resp); err != nil {
			return err
		}
	}
}

func (s *scripted) record(e string) {
	s.mu.Lock()
	s.log = append(s.log, e)
	s.mu.Unlock()
}

func (s *scripted) messages() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.log...)
}

func describe(r *extprocv3.ProcessingRequest) string {
	switch m := r.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return fmt.Sprintf("request_headers eos=%v", m.RequestHeaders.GetEndOfStream())
	case *extprocv3.ProcessingRequest_RequestBody:
		return fmt.Sprintf("request_body %q eos=%v", m.RequestBody.GetBody(), m.RequestBody.GetEndOfStream())
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return fmt.Sprintf("response_headers eos=%v", m.ResponseHeaders.GetEndOfStream())
	case *extprocv3.ProcessingRequest_ResponseBody:
		return fmt.Sprintf("response_body %q eos=%v", m.ResponseBody.GetBody(), m.ResponseBody.GetEndOfStream())
	}
	return fmt.Sprintf("%T", r.GetRequest())
}

func continueFor(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	c := &extprocv3.CommonResponse{}
	switch r.GetRequest().(type) {
	case *extprocv3.ProcessingRequest_RequestHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: c}}}
	case *extprocv3.ProcessingRequest_RequestBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{Response: c}}}
	case *extprocv3.ProcessingRequest_ResponseHeaders:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{Response: c}}}
	case *extprocv3.ProcessingRequest_ResponseBody:
		return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{Response: c}}}
	}
	return nil
}

// rig is an emulator with one listener ("main": ext_proc then router, built with
// mcpgate's own envoy builders) in front of an upstream, and a scripted ext_proc server.
type rig struct {
	emu      *Emulator
	addr     string
	proc     *scripted
	upstream *httptest.Server
	hits     chan *http.Request
}

type rigOptions struct {
	upstream http.HandlerFunc
	extProc  func(*extprocfilterv3.ExternalProcessor)
	route    func(*routev3.Route)
}

// requireADS serves a fixed snapshot to node cluster "test" over ADS.
func requireADS(t testing.TB, res map[resource.Type][]types.Resource) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cache := cachev3.NewSnapshotCache(true, clusterHash{}, nil)
	snap, err := cachev3.NewSnapshot("v1", res)
	if err != nil {
		t.Fatal(err)
	}
	if err := snap.Consistent(); err != nil {
		t.Fatal(err)
	}
	if err := cache.SetSnapshot(ctx, "test", snap); err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, cache, serverv3.CallbackFuncs{}))
	return requireGRPC(t, g)
}

type clusterHash struct{}

func (clusterHash) ID(n *corev3.Node) string { return n.GetCluster() }

func requireRig(t *testing.T, o rigOptions) *rig {
	t.Helper()
	rg := &rig{proc: &scripted{}, hits: make(chan *http.Request, 16)}
	up := o.upstream
	if up == nil {
		up = func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "hello") }
	}
	rg.upstream = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case rg.hits <- r:
		default:
		}
		up(w, r)
	}))
	t.Cleanup(rg.upstream.Close)
	g := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(g, rg.proc)
	procAddr := requireGRPC(t, g)

	procFilter := extProcFilter(t, o.extProc)
	lis := httpListener(t, "main", "0.0.0.0", 10000, nil, procFilter)
	upHost, upPort := splitHostPort(t, rg.upstream.Listener.Addr().String())
	upCluster, upCLA := mustCluster(t, envoy.ClusterOptions{Name: "upstream", Host: upHost, Port: upPort})
	procHost, procPort := splitHostPort(t, procAddr)
	procCluster, procCLA := mustCluster(t, envoy.ClusterOptions{Name: "proc", Host: procHost, Port: procPort, Protocol: envoy.HTTP2})
	route := envoy.Forward("all", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "upstream", Timeout: 10 * time.Second, BodyLimit: 64})
	if o.route != nil {
		o.route(route)
	}
	rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, []*routev3.Route{route}))
	xdsAddr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis},
		resource.RouteType:    {rc},
		resource.ClusterType:  {upCluster, procCluster},
		resource.EndpointType: {upCLA, procCLA},
	})
	rg.emu = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "test"})
	rg.addr = rg.emu.Listener("main")
	if rg.addr == "" {
		t.Fatal("listener main not bound")
	}
	return rg
}

func requireEmulator(t testing.TB, o Options) *Emulator {
	t.Helper()
	o.Logf = t.Logf
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if err := e.WaitReady(ctx); err != nil {
		t.Fatalf("%v (NACKs: %v)", err, e.NACKs())
	}
	return e
}

func mustCluster(t testing.TB, o envoy.ClusterOptions) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment) {
	t.Helper()
	c, cla, err := envoy.Cluster(o)
	if err != nil {
		t.Fatal(err)
	}
	return c, cla
}

func must[T any](t testing.TB, f func() (T, error)) T {
	t.Helper()
	v, err := f()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func splitHostPort(t testing.TB, addr string) (string, uint32) {
	t.Helper()
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return h, uint32(n)
}

// requireMessages waits until the processor has logged want (the stream's end included)
// and checks nothing else came.
func (rg *rig) requireMessages(t *testing.T, want ...string) {
	t.Helper()
	requireEventually(t, 5*time.Second, "the ext_proc stream to end", func() bool {
		m := rg.proc.messages()
		return len(m) > 0 && m[len(m)-1] == "<eof>"
	})
	got := rg.proc.messages()
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("ext_proc messages:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// httpListener is a listener name on address:port (over ts; nil for plaintext) with one
// HTTP filter chain, its stat prefix and route configuration also name, that runs
// filters and then the router.
func httpListener(t testing.TB, name, address string, port uint32, ts *corev3.TransportSocket, filters ...*hcmv3.HttpFilter) *listenerv3.Listener {
	t.Helper()
	router := must(t, envoy.RouterFilter)
	chain := must(t, func() (*listenerv3.FilterChain, error) {
		return envoy.HTTPFilterChain(name, envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: name, RouteConfig: name,
			Filters: append(filters, router)}), ts)
	})
	return envoy.Listener(envoy.ListenerOptions{Name: name, Address: address, Port: port, Chains: []*listenerv3.FilterChain{chain}})
}

// requireHelloApp serves "hello" on loopback until the test ends and returns its address.
func requireHelloApp(t testing.TB) string {
	t.Helper()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "hello") }))
	t.Cleanup(app.Close)
	return app.Listener.Addr().String()
}

// requireAuthzCluster serves a over gRPC on loopback until the test ends and returns the
// HTTP/2 cluster "authz" that reaches it.
func requireAuthzCluster(t testing.TB, a *recordingAuthz) (*clusterv3.Cluster, *endpointv3.ClusterLoadAssignment) {
	t.Helper()
	g := grpc.NewServer()
	authv3.RegisterAuthorizationServer(g, a)
	host, port := splitHostPort(t, requireGRPC(t, g))
	return mustCluster(t, envoy.ClusterOptions{Name: "authz", Host: host, Port: port, Protocol: envoy.HTTP2})
}

// inboundNode is the snapshot of a node whose "inbound" listener (0.0.0.0:15006 over
// downstream; nil for plaintext) runs ext_authz on the cluster authz and then forwards
// everything to the app at appAddr.
func inboundNode(t testing.TB, appAddr string, downstream *corev3.TransportSocket,
	authz *clusterv3.Cluster, authzCLA *endpointv3.ClusterLoadAssignment,
) map[resource.Type][]types.Resource {
	t.Helper()
	authzFilter := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter(authz.GetName()) })
	inbound := httpListener(t, "inbound", "0.0.0.0", 15006, downstream, authzFilter)
	appHost, appPort := splitHostPort(t, appAddr)
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: appHost, Port: appPort})
	routes := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		envoy.Forward("all", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "app", Timeout: 10 * time.Second}),
	}))
	return map[resource.Type][]types.Resource{
		resource.ListenerType: {inbound}, resource.RouteType: {routes},
		resource.ClusterType: {appCluster, authz}, resource.EndpointType: {appCLA, authzCLA},
	}
}

// outboundNode is the snapshot of a node whose plaintext "outbound" listener
// (127.0.0.1:3500) routes by routes to clusters.
func outboundNode(t testing.TB, routes []*routev3.Route, clusters ...*clusterv3.Cluster) map[resource.Type][]types.Resource {
	t.Helper()
	outbound := httpListener(t, "outbound", "127.0.0.1", 3500, nil)
	rc := envoy.RouteConfiguration("outbound", envoy.VirtualHost("outbound", []string{"*"}, routes))
	res := map[resource.Type][]types.Resource{resource.ListenerType: {outbound}, resource.RouteType: {rc}}
	for _, c := range clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], c)
	}
	return res
}

// sidecarCluster is the cluster name to inventory's sidecar (inventory-envoy:15006) over
// upstream mTLS that presents mesh and accepts only the SPIFFE ID peer.
func sidecarCluster(t testing.TB, name string, mesh envoy.MeshTLS, peer string) *clusterv3.Cluster {
	t.Helper()
	upstream := must(t, func() (*corev3.TransportSocket, error) { return envoy.UpstreamMTLS(mesh, peer) })
	c, _ := mustCluster(t, envoy.ClusterOptions{Name: name, Host: "inventory-envoy", Port: 15006,
		Protocol: envoy.HTTPAuto, TransportSocket: upstream})
	return c
}

// startUntilNACK starts an emulator on o (logging to t, closed when the test ends),
// waits up to within for its first NACK and returns it.
func startUntilNACK(t testing.TB, o Options, within time.Duration) (*Emulator, string) {
	t.Helper()
	o.Logf = t.Logf
	e, err := Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if err := e.Wait(ctx, func(e *Emulator) bool { return len(e.NACKs()) > 0 }); err != nil {
		t.Fatal(err)
	}
	return e, e.NACKs()[0]
}

// getBody GETs url with c, fails the test if that fails, and returns the response with
// its body (read to the end, errors ignored, and closed).
func getBody(t testing.TB, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

// extProcFilter is the ext_proc filter of the test rigs: cluster "proc", a 2s message
// timeout, then edit's changes if any.
func extProcFilter(t testing.TB, edit func(*extprocfilterv3.ExternalProcessor)) *hcmv3.HttpFilter {
	t.Helper()
	pc := envoy.ExtProc("proc")
	pc.MessageTimeout = durationpb.New(2 * time.Second)
	if edit != nil {
		edit(pc)
	}
	return must(t, func() (*hcmv3.HttpFilter, error) {
		a, err := envoy.Any(pc)
		return &hcmv3.HttpFilter{Name: envoy.FilterExtProc, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}, err
	})
}
