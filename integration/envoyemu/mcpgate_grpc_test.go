package envoyemu

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/grpcapp"
	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/extproc"
	"github.com/mcpgate/mcpgate/policy"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// grpcGate is mcpgate's ext_authz and ext_proc in process (demo policy, mtls disabled,
// a local issuer) behind the emulated inventory sidecar, whose inbound listener runs
// ext_authz, ext_proc and the router as mcpgate's envoy builders make them and routes the
// gRPC MCP service to the grpc-go reference App. The route is built here as xds builds
// gRPC MCP routes (ext_authz naming the app, ext_proc STREAMED per route, no timeout).
type grpcGate struct {
	iss     *bearertest.Issuer
	app     *grpcapp.Server
	inbound string
	client  mcpv1.McpServiceClient
}

// requireGRPCGate starts it; with mcpgateDown the mcpgate cluster points at a dead
// address.
func requireGRPCGate(t *testing.T, mcpgateDown bool) *grpcGate {
	t.Helper()
	g := &grpcGate{iss: bearertest.NewIssuer(t)}
	store := policy.NewStore(requireLoad(t, copyDemo(t, g.iss.URL(), g.iss.JWKSURL())))
	authz, err := extauthz.NewServer(extauthz.Options{Store: store, Verifier: bearer.NewVerifier(bearer.Options{HTTPClient: g.iss.Client()})})
	if err != nil {
		t.Fatal(err)
	}
	proc, err := extproc.NewServer(extproc.Options{Store: store})
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	authv3.RegisterAuthorizationServer(gs, authz)
	extprocv3.RegisterExternalProcessorServer(gs, proc)
	mcpgateAddr := requireGRPC(t, gs)
	t.Cleanup(authz.Close)
	if mcpgateDown {
		mcpgateAddr = deadAddr(t)
	}
	if g.app, err = grpcapp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.app.Close)

	authzFilter := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("mcpgate") })
	procFilter := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtProcFilter("mcpgate") })
	lis := httpListener(t, "inbound", "0.0.0.0", 15006, nil, authzFilter, procFilter)
	ctxExt := must(t, func() (*anypb.Any, error) {
		return envoy.ExtAuthzContext(map[string]string{contract.ContextAppID: "inventory"})
	})
	rc := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		grpcRoute(t, "app", 30*time.Second, map[string]*anypb.Any{envoy.FilterExtAuthz: ctxExt}),
	}))
	appHost, appPort := splitHostPort(t, g.app.Addr())
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: appHost, Port: appPort, Protocol: envoy.HTTP2})
	gateHost, gatePort := splitHostPort(t, mcpgateAddr)
	gateCluster, gateCLA := mustCluster(t, envoy.ClusterOptions{Name: "mcpgate", Host: gateHost, Port: gatePort, Protocol: envoy.HTTP2})
	xdsAddr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {appCluster, gateCluster}, resource.EndpointType: {appCLA, gateCLA},
	})
	emu := requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "test"})
	g.inbound = emu.Listener("inbound")
	g.client = grpcClient(t, g.inbound)
	return g
}

// ctx carries the caller's bearer token (my-agent, inventory:read) as gRPC metadata.
func (g *grpcGate) ctx(t *testing.T) context.Context {
	t.Helper()
	return metadata.AppendToOutgoingContext(rpcCtx(t), "authorization", g.token(t))
}

func (g *grpcGate) token(t *testing.T) string {
	t.Helper()
	return "Bearer " + g.iss.Mint(t, map[string]any{
		"sub": "alice@example.com", "aud": "https://inventory.example.com/mcp", "azp": "my-agent",
		"scope": "mcp:tools inventory:read",
		"iat":   time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	})
}

// An allowed unary call reaches the server with the caller named by mcpgate; its
// trailers (grpc-status 0) reach the client.
func TestMCPGateGRPCUnaryAllowed(t *testing.T) {
	g := requireGRPCGate(t, false)
	res, err := g.client.CallTool(g.ctx(t), callTool(t, "get_inventory", map[string]any{"product_id": "SKU-42"}))
	if err != nil || res.GetStructuredContent().AsMap()["quantity"] != float64(42) {
		t.Fatalf("CallTool: %v %v", res, err)
	}
	calls := g.app.Calls()
	if len(calls) != 1 || calls[0].RPC != mcpService+"CallTool" || strings.Join(calls[0].Metadata.Get(contract.HeaderCallerAppID), ",") != "my-agent" {
		t.Fatalf("the server recorded %+v", calls)
	}
	resp, data := rawGRPC(t, g.inbound, "CallTool", frame(t, callTool(t, "get_inventory", map[string]any{"product_id": "SKU-7"})),
		"authorization", g.token(t))
	if resp.StatusCode != 200 || len(data) == 0 || resp.Trailer.Get("grpc-status") != "0" {
		t.Fatalf("got %d %v body %d bytes, trailers %v", resp.StatusCode, resp.Header, len(data), resp.Trailer)
	}
}

// A denied tool: PERMISSION_DENIED with mcpgate's reason (the rule's name), as a
// trailers-only reply; the server never runs it.
func TestMCPGateGRPCDeniedTool(t *testing.T) {
	g := requireGRPCGate(t, false)
	_, err := g.client.CallTool(g.ctx(t), callTool(t, "delete_product", map[string]any{"product_id": "SKU-42"}))
	requireStatus(t, err, codes.PermissionDenied, "no-deletes")
	if n := ran(g.app, "delete_product"); n != 0 {
		t.Fatalf("the server ran delete_product %d times", n)
	}
}

// No token: ext_authz's 401 becomes UNAUTHENTICATED (httpToGrpcStatus), with its
// WWW-Authenticate challenge on the trailers-only reply.
func TestMCPGateGRPCNoToken(t *testing.T) {
	g := requireGRPCGate(t, false)
	_, err := g.client.ListTools(rpcCtx(t), &mcpv1.ListToolsRequest{})
	requireStatus(t, err, codes.Unauthenticated, "")
	resp, _ := rawGRPC(t, g.inbound, "ListTools", frame(t, &mcpv1.ListToolsRequest{}))
	if resp.Header.Get("grpc-status") != strconv.Itoa(int(codes.Unauthenticated)) || !strings.Contains(resp.Header.Get("www-authenticate"), "resource_metadata=") {
		t.Fatalf("got %v", resp.Header)
	}
}

// ListTools through mcpgate: the response is filtered (mode_override STREAMED on the
// response headers) to the tools the caller may call.
func TestMCPGateGRPCListToolsFiltered(t *testing.T) {
	g := requireGRPCGate(t, false)
	lt, err := g.client.ListTools(g.ctx(t), &mcpv1.ListToolsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tl := range lt.GetTools() {
		names = append(names, tl.GetName())
	}
	if got := strings.Join(names, ","); strings.Contains(got, "delete_product") || !strings.Contains(got, "get_inventory") {
		t.Fatalf("the client sees %v", names)
	}
}

// A redacted result: get_customer's ssn never reaches the client.
func TestMCPGateGRPCRedactedResult(t *testing.T) {
	g := requireGRPCGate(t, false)
	res, err := g.client.CallTool(g.ctx(t), callTool(t, "get_customer", map[string]any{"id": "c1"}))
	if err != nil {
		t.Fatal(err)
	}
	if whole, _ := proto.Marshal(res); bytes.Contains(whole, []byte("ssn")) {
		t.Fatalf("the ssn reached the client: %v", res)
	}
}

// A Session whose first message is denied: PERMISSION_DENIED before anything was
// answered, and the server runs nothing.
func TestMCPGateGRPCSessionDeniedFirst(t *testing.T) {
	g := requireGRPCGate(t, false)
	st, err := g.client.Session(g.ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&mcpv1.SessionRequest{RequestId: "a", Request: &mcpv1.SessionRequest_CallTool{CallTool: callTool(t, "delete_product", map[string]any{"product_id": "SKU-1"})}}); err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	requireStatus(t, err, codes.PermissionDenied, "no-deletes")
	if n := len(g.app.Calls()); n != 0 {
		t.Fatalf("the server ran %d calls", n)
	}
}

// A Session with an allowed message, answered while the stream stays open, then a
// denied one: the server runs only the first; the denial comes after response headers
// went downstream, so the stream is reset (the client sees INTERNAL).
func TestMCPGateGRPCSessionAllowedThenDenied(t *testing.T) {
	g := requireGRPCGate(t, false)
	st, err := g.client.Session(g.ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	send := func(id, tool string) {
		t.Helper()
		err := st.Send(&mcpv1.SessionRequest{RequestId: id, Request: &mcpv1.SessionRequest_CallTool{CallTool: callTool(t, tool, map[string]any{"product_id": "SKU-42"})}})
		if err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
	}
	send("a", "get_inventory")
	first, err := st.Recv()
	if err != nil || first.GetCallTool() == nil {
		t.Fatalf("the allowed message: %v %v", first, err)
	}
	send("b", "delete_product")
	_, err = st.Recv()
	requireStatus(t, err, codes.Internal, "RST_STREAM")
	if ran(g.app, "get_inventory") != 1 || ran(g.app, "delete_product") != 0 {
		t.Fatalf("the server ran %+v", g.app.Calls())
	}
}

// mcpgate down: ext_authz fails closed with mcpgate's status_on_error 503, which a gRPC
// client sees as UNAVAILABLE; the server is never called.
func TestMCPGateGRPCDownUnavailable(t *testing.T) {
	g := requireGRPCGate(t, true)
	_, err := g.client.CallTool(g.ctx(t), callTool(t, "get_inventory", map[string]any{"product_id": "SKU-42"}))
	requireStatus(t, err, codes.Unavailable, "")
	if n := len(g.app.Calls()); n != 0 {
		t.Fatalf("the server ran %d calls", n)
	}
}
