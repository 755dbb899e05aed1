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

	pc := envoy.ExtProc("proc")
	pc.MessageTimeout = durationpb.New(2 * time.Second)
	if o.extProc != nil {
		o.extProc(pc)
	}
	procFilter := must(t, func() (*hcmv3.HttpFilter, error) {
		a, err := envoy.Any(pc)
		return &hcmv3.HttpFilter{Name: envoy.FilterExtProc, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}, err
	})
	router := must(t, envoy.RouterFilter)
	chain := must(t, func() (*listenerv3.FilterChain, error) {
		return envoy.HTTPFilterChain("main", envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "main", RouteConfig: "main",
			Filters: []*hcmv3.HttpFilter{procFilter, router}}), nil)
	})
	lis := envoy.Listener(envoy.ListenerOptions{Name: "main", Address: "0.0.0.0", Port: 10000, Chains: []*listenerv3.FilterChain{chain}})
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
