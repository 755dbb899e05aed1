package envoyemu

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/grpcapp"
	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/extproc/grpcframe"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// The gRPC MCP service's method prefix (proto/mcpgate/mcp/v1/mcp.proto).
const mcpService = "/mcpgate.mcp.v1.McpService/"

// grpcProcessingMode is the per-route processing mode of gRPC MCP routes: request body
// STREAMED, response headers only, no trailers.
func grpcProcessingMode() *extprocfilterv3.ProcessingMode {
	return &extprocfilterv3.ProcessingMode{
		RequestHeaderMode: extprocfilterv3.ProcessingMode_SEND, RequestBodyMode: extprocfilterv3.ProcessingMode_STREAMED,
		ResponseHeaderMode: extprocfilterv3.ProcessingMode_SEND, ResponseBodyMode: extprocfilterv3.ProcessingMode_NONE,
		RequestTrailerMode: extprocfilterv3.ProcessingMode_SKIP, ResponseTrailerMode: extprocfilterv3.ProcessingMode_SKIP,
	}
}

// grpcRoute is the inbound route of a gRPC MCP app as xDS builds it: the service's
// methods with a gRPC content-type, to cluster, no response timeout, ext_proc's mode
// replaced per route (and perFilter's other configs).
func grpcRoute(t testing.TB, cluster string, idle time.Duration, perFilter map[string]*anypb.Any) *routev3.Route {
	t.Helper()
	m := envoy.Prefix(mcpService)
	m.Headers = append(m.Headers, &routev3.HeaderMatcher{Name: "content-type",
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "application/grpc"}, IgnoreCase: true}}})
	proc := must(t, func() (*anypb.Any, error) {
		return envoy.Any(&extprocfilterv3.ExtProcPerRoute{Override: &extprocfilterv3.ExtProcPerRoute_Overrides{
			Overrides: &extprocfilterv3.ExtProcOverrides{ProcessingMode: grpcProcessingMode()}}})
	})
	pf := map[string]*anypb.Any{envoy.FilterExtProc: proc}
	for k, v := range perFilter {
		pf[k] = v
	}
	return envoy.Forward("grpc", m, envoy.ForwardOptions{Cluster: cluster, Timeout: 0, IdleTimeout: idle, PerFilter: pf})
}

// grpcRig is an emulator whose "inbound" listener runs a scripted ext_proc and routes
// the gRPC MCP service to the grpc-go reference App over HTTP/2, and a grpc-go client of
// it.
type grpcRig struct {
	emu    *Emulator
	addr   string
	proc   *scripted
	app    *grpcapp.Server
	client mcpv1.McpServiceClient
}

type grpcRigOptions struct {
	extProc  func(*extprocfilterv3.ExternalProcessor)
	procAddr string        // the ext_proc cluster's address instead of the scripted processor's
	idle     time.Duration // the route's idle_timeout (default 30s)
	upstream string        // the app cluster's address instead of the reference App's
}

func requireGRPCRig(t *testing.T, o grpcRigOptions) *grpcRig {
	t.Helper()
	rg := &grpcRig{proc: &scripted{}}
	app, err := grpcapp.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(app.Close)
	rg.app = app
	procAddr := o.procAddr
	if procAddr == "" {
		g := grpc.NewServer()
		extprocv3.RegisterExternalProcessorServer(g, rg.proc)
		procAddr = requireGRPC(t, g)
	}
	procFilter := extProcFilter(t, o.extProc)
	lis := httpListener(t, "inbound", "0.0.0.0", 15006, nil, procFilter)
	appAddr := app.Addr()
	if o.upstream != "" {
		appAddr = o.upstream
	}
	appHost, appPort := splitHostPort(t, appAddr)
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: appHost, Port: appPort, Protocol: envoy.HTTP2})
	procHost, procPort := splitHostPort(t, procAddr)
	procCluster, procCLA := mustCluster(t, envoy.ClusterOptions{Name: "proc", Host: procHost, Port: procPort, Protocol: envoy.HTTP2})
	if o.idle == 0 {
		o.idle = 30 * time.Second
	}
	rc := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{grpcRoute(t, "app", o.idle, nil)}))
	xdsAddr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {appCluster, procCluster}, resource.EndpointType: {appCLA, procCLA},
	})
	rg.emu = requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "test"})
	rg.addr = rg.emu.Listener("inbound")
	rg.client = grpcClient(t, rg.addr)
	return rg
}

func grpcClient(t testing.TB, addr string) mcpv1.McpServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return mcpv1.NewMcpServiceClient(conn)
}

func rpcCtx(t testing.TB) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func callTool(t testing.TB, tool string, args map[string]any) *mcpv1.CallToolRequest {
	t.Helper()
	s, err := structpb.NewStruct(args)
	if err != nil {
		t.Fatal(err)
	}
	return &mcpv1.CallToolRequest{Name: tool, Arguments: s}
}

// frame is one gRPC length-prefixed message.
func frame(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return grpcframe.Append(nil, b)
}

func ran(app *grpcapp.Server, tool string) int {
	n := 0
	for _, c := range app.Calls() {
		if c.Tool == tool {
			n++
		}
	}
	return n
}

func requireStatus(t testing.TB, err error, want codes.Code, msgPart string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != want || !strings.Contains(st.Message(), msgPart) {
		t.Fatalf("status %v %q, want %v with %q", st.Code(), st.Message(), want, msgPart)
	}
}

// denyBodiesWith answers request body chunks that contain word with an immediate
// response carrying grpc_status PERMISSION_DENIED, as mcpgate's ext_proc refuses a
// message.
func denyBodiesWith(word, body string) func(*extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
	return func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if b := r.GetRequestBody(); b != nil && bytes.Contains(b.GetBody(), []byte(word)) {
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ImmediateResponse{ImmediateResponse: &extprocv3.ImmediateResponse{
				Status: &typev3.HttpStatus{Code: typev3.StatusCode_OK}, Body: []byte(body),
				GrpcStatus: &extprocv3.GrpcStatus{Status: uint32(codes.PermissionDenied)},
			}}}
		}
		return nil
	}
}

// The route's ExtProcPerRoute processing mode replaces the filter's (BUFFERED request
// body): the request body goes to the processor STREAMED, chunk by chunk, the last
// message with end_of_stream; the response's trailers (grpc-status) reach the client.
func TestGRPCUnaryStreamedPerRouteMode(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	req := callTool(t, "get_inventory", map[string]any{"product_id": "SKU-42"})
	res, err := rg.client.CallTool(rpcCtx(t), req)
	if err != nil || res.GetStructuredContent().AsMap()["quantity"] != float64(42) {
		t.Fatalf("CallTool: %v %v", res, err)
	}
	// grpc-go ends a unary request with END_STREAM on its DATA frame; Go's server hands
	// the end of stream over after the data, so it comes as an empty last chunk.
	rg.requireMessages(t, "request_headers eos=false", describeBody("request_body", frame(t, req), false),
		`request_body "" eos=true`, "response_headers eos=false", "<eof>")
}

// A denied first message: Envoy's local reply to a gRPC request is trailers-only,
// HTTP 200 with grpc-status from ImmediateResponse.grpc_status and the body as
// grpc-message, percent-encoded; nothing reaches the server's handler.
func TestGRPCImmediateResponseTrailersOnly(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	rg.proc.script = denyBodiesWith("delete_product", "tool delete_product denied: 100% sure ✓")
	_, err := rg.client.CallTool(rpcCtx(t), callTool(t, "delete_product", map[string]any{"product_id": "SKU-1"}))
	requireStatus(t, err, codes.PermissionDenied, "tool delete_product denied: 100% sure ✓")
	if n := ran(rg.app, "delete_product"); n != 0 {
		t.Fatalf("the server ran delete_product %d times", n)
	}

	// On the wire: one HEADERS frame, no body.
	body := frame(t, callTool(t, "delete_product", map[string]any{"product_id": "SKU-1"}))
	resp, data := rawGRPC(t, rg.addr, "CallTool", body)
	if resp.StatusCode != 200 || resp.Header.Get("content-type") != "application/grpc" || len(data) != 0 ||
		resp.Header.Get("grpc-status") != "7" || resp.Header.Get("grpc-message") != "tool delete_product denied: 100%25 sure %E2%9C%93" {
		t.Fatalf("got %d %v body %q trailers %v", resp.StatusCode, resp.Header, data, resp.Trailer)
	}
}

// Bidi: the first message goes upstream at once and its answer flows back while the
// client keeps the stream open; a denied message after that comes too late for a local
// reply (response headers went downstream), so Envoy resets the stream and the client
// sees INTERNAL (RST_STREAM); the server never gets the denied message.
func TestGRPCSessionDenialMidStreamResets(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	rg.proc.script = denyBodiesWith("delete_product", "denied")
	st, err := rg.client.Session(rpcCtx(t))
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
	if err != nil || first.GetRequestId() != "a" || first.GetCallTool() == nil {
		t.Fatalf("the allowed message: %v %v", first, err)
	}
	send("b", "delete_product")
	_, err = st.Recv()
	requireStatus(t, err, codes.Internal, "RST_STREAM")
	if ran(rg.app, "get_inventory") != 1 || ran(rg.app, "delete_product") != 0 {
		t.Fatalf("the server ran %+v", rg.app.Calls())
	}
}

// Bidi, denied before the server answered anything: the local reply still replaces the
// response (trailers-only), and the upstream request is reset.
func TestGRPCSessionDenialBeforeAnswer(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	rg.proc.script = denyBodiesWith("delete_product", "no deletes")
	st, err := rg.client.Session(rpcCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&mcpv1.SessionRequest{RequestId: "a", Request: &mcpv1.SessionRequest_CallTool{CallTool: callTool(t, "delete_product", map[string]any{"product_id": "SKU-1"})}}); err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	requireStatus(t, err, codes.PermissionDenied, "no deletes")
	if n := len(rg.app.Calls()); n != 0 {
		t.Fatalf("the server ran %d calls", n)
	}
}

// A mode_override replaces both sides' processing modes (body modes always explicit):
// one on the response headers that leaves request_body_mode NONE lets the rest of a
// bidi stream through unprocessed (ext_proc.cc onReceiveMessage, onData). This is why
// mcpgate's overrides keep the request body STREAMED.
func TestGRPCModeOverrideOnResponseReplacesRequestMode(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	deny := denyBodiesWith("delete_product", "denied")
	rg.proc.script = func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		if r.GetResponseHeaders() != nil {
			resp := continueFor(r)
			resp.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_NONE}
			return resp
		}
		return deny(r)
	}
	st, err := rg.client.Session(rpcCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []struct{ id, tool string }{{"a", "get_inventory"}, {"b", "delete_product"}} {
		if err := st.Send(&mcpv1.SessionRequest{RequestId: m.id, Request: &mcpv1.SessionRequest_CallTool{CallTool: callTool(t, m.tool, map[string]any{"product_id": "SKU-42"})}}); err != nil {
			t.Fatal(err)
		}
		if res, err := st.Recv(); err != nil || res.GetRequestId() != m.id {
			t.Fatalf("message %s: %v %v", m.id, res, err)
		}
	}
	_ = st.CloseSend()
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("end of stream: %v", err)
	}
	if ran(rg.app, "delete_product") != 1 {
		t.Fatalf("the server ran %+v", rg.app.Calls())
	}
	for _, m := range rg.waitMessages(t) {
		if strings.Contains(m, "delete_product") {
			t.Fatalf("the processor saw the second message: %q", m)
		}
	}
}

// mode_override STREAMED on the response headers of a gRPC response: each response chunk
// goes to the processor (here replaced by a filtered message); the body ends with
// trailers, so no empty end_of_stream chunk is sent, and the trailers reach the client.
func TestGRPCResponseStreamedOverrideWithTrailers(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{})
	filtered := frame(t, &mcpv1.ListToolsResponse{Tools: []*mcpv1.Tool{{Name: "get_inventory"}}})
	rg.proc.script = func(r *extprocv3.ProcessingRequest) *extprocv3.ProcessingResponse {
		switch {
		case r.GetResponseHeaders() != nil:
			resp := continueFor(r)
			resp.ModeOverride = &extprocfilterv3.ProcessingMode{ResponseBodyMode: extprocfilterv3.ProcessingMode_STREAMED}
			return resp
		case r.GetResponseBody() != nil && len(r.GetResponseBody().GetBody()) > 0:
			return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: &extprocv3.BodyResponse{
				Response: &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_Body{Body: filtered}}}}}}
		}
		return nil
	}
	lt, err := rg.client.ListTools(rpcCtx(t), &mcpv1.ListToolsRequest{})
	if err != nil || len(lt.GetTools()) != 1 || lt.GetTools()[0].GetName() != "get_inventory" {
		t.Fatalf("ListTools: %v %v", lt, err)
	}
	msgs := rg.waitMessages(t)
	last := msgs[len(msgs)-2]
	if !strings.HasPrefix(last, "response_body ") || !strings.HasSuffix(last, "eos=false") {
		t.Fatalf("ext_proc messages %q: want the last response body chunk without end_of_stream", msgs)
	}

	// The trailers themselves, on the wire.
	resp, data := rawGRPC(t, rg.addr, "ListTools", frame(t, &mcpv1.ListToolsRequest{}))
	if resp.StatusCode != 200 || !bytes.Equal(data, filtered) || resp.Trailer.Get("grpc-status") != "0" {
		t.Fatalf("got %d %v body %x trailers %v", resp.StatusCode, resp.Header, data, resp.Trailer)
	}
}

// HTTP/2 trailers both ways on a STREAMED route: request trailers reach the upstream
// (request_trailer_mode SKIP: never to the processor, and the body they end gets no
// empty end_of_stream chunk), response trailers reach the client.
func TestHTTP2TrailersPass(t *testing.T) {
	type seen struct {
		body    string
		trailer string
	}
	got := make(chan seen, 1)
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- seen{string(b), r.Trailer.Get("x-req-trailer")}
		w.Header().Set("content-type", "application/grpc")
		w.Header().Set("trailer", "x-resp-trailer")
		_, _ = io.WriteString(w, "response")
		w.Header().Set("x-resp-trailer", "bye")
		w.Header().Set(http.TrailerPrefix+"grpc-status", "0")
	}), Protocols: new(http.Protocols)}
	up.Protocols.SetUnencryptedHTTP2(true)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = up.Serve(lis) }()
	t.Cleanup(func() { _ = up.Close() })
	rg := requireGRPCRig(t, grpcRigOptions{upstream: lis.Addr().String()})

	req, err := http.NewRequestWithContext(rpcCtx(t), "POST", "http://"+rg.addr+mcpService+"CallTool", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("content-type", "application/grpc")
	req.Trailer = http.Header{"X-Req-Trailer": nil}
	req.Body = &trailingBody{r: strings.NewReader("request"), atEOF: func() { req.Trailer.Set("X-Req-Trailer", "hi") }}
	req.ContentLength = -1
	resp, err := h2cClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if s := <-got; s.body != "request" || s.trailer != "hi" {
		t.Fatalf("the upstream saw %+v", s)
	}
	if string(body) != "response" || resp.Trailer.Get("x-resp-trailer") != "bye" || resp.Trailer.Get("grpc-status") != "0" {
		t.Fatalf("the client got %q, trailers %v", body, resp.Trailer)
	}
	rg.requireMessages(t, "request_headers eos=false", `request_body "request" eos=false`, "response_headers eos=false", "<eof>")
}

type trailingBody struct {
	r     io.Reader
	atEOF func()
}

func (b *trailingBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if errors.Is(err, io.EOF) {
		b.atEOF()
	}
	return n, err
}

func (b *trailingBody) Close() error { return nil }

// ext_proc unreachable: the filter fails closed with status_on_error as a gRPC status
// (503 → UNAVAILABLE; the default 500 → UNKNOWN, Grpc::Utility::httpToGrpcStatus), and
// the server is never called.
func TestGRPCExtProcDownFailsClosed(t *testing.T) {
	dead := deadAddr(t)
	for _, c := range []struct {
		name    string
		onError *typev3.HttpStatus
		want    codes.Code
	}{
		{"mcpgate's 503", &typev3.HttpStatus{Code: typev3.StatusCode_ServiceUnavailable}, codes.Unavailable},
		{"default 500", nil, codes.Unknown},
	} {
		t.Run(c.name, func(t *testing.T) {
			rg := requireGRPCRig(t, grpcRigOptions{procAddr: dead, extProc: func(p *extprocfilterv3.ExternalProcessor) { p.StatusOnError = c.onError }})
			_, err := rg.client.CallTool(rpcCtx(t), callTool(t, "get_inventory", map[string]any{"product_id": "SKU-42"}))
			if st, _ := status.FromError(err); st.Code() != c.want {
				t.Fatalf("status %v, want %v", st, c.want)
			}
			if n := len(rg.app.Calls()); n != 0 {
				t.Fatalf("the server ran %d calls", n)
			}
		})
	}
}

// The route's idle_timeout bounds silence on a long-lived stream: before any response
// the stream ends with Envoy's 408 "stream timeout" local reply (UNKNOWN to a gRPC
// client: httpToGrpcStatus has no mapping for 408); once the response started, with a
// reset (INTERNAL).
func TestGRPCRouteIdleTimeout(t *testing.T) {
	rg := requireGRPCRig(t, grpcRigOptions{idle: 150 * time.Millisecond})
	st, err := rg.client.Session(rpcCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.Recv()
	requireStatus(t, err, codes.Unknown, "stream timeout")

	st, err = rg.client.Session(rpcCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&mcpv1.SessionRequest{RequestId: "a", Request: &mcpv1.SessionRequest_CallTool{CallTool: callTool(t, "get_inventory", map[string]any{"product_id": "SKU-42"})}}); err != nil {
		t.Fatal(err)
	}
	if res, err := st.Recv(); err != nil || res.GetCallTool() == nil {
		t.Fatalf("first answer: %v %v", res, err)
	}
	_, err = st.Recv()
	requireStatus(t, err, codes.Internal, "RST_STREAM")
}

// A route-level ExtProcPerRoute without a processing mode keeps the virtual host's
// (ext_proc.cc mergeProcessingMode), and failure_mode_allow overrides merge likewise.
func TestExtProcPerRouteMerge(t *testing.T) {
	vh := &extprocfilterv3.ExtProcPerRoute{Override: &extprocfilterv3.ExtProcPerRoute_Overrides{
		Overrides: &extprocfilterv3.ExtProcOverrides{ProcessingMode: grpcProcessingMode()}}}
	route := &extprocfilterv3.ExtProcPerRoute{Override: &extprocfilterv3.ExtProcPerRoute_Overrides{
		Overrides: &extprocfilterv3.ExtProcOverrides{FailureModeAllow: wrapperspb.Bool(true)}}}
	f := &filterCfg{name: filterExtProc, proc: envoy.ExtProc("proc")}
	e := &routeEntry{vh: &vhostCfg{perFilter: map[string]proto.Message{filterExtProc: vh}}, own: map[string]proto.Message{filterExtProc: route}}
	s := &stream{route: e}
	p := s.newProc(f)
	if !proto.Equal(p.mode, grpcProcessingMode()) || !p.failOpen {
		t.Fatalf("merged mode %v failure_mode_allow %v", p.mode, p.failOpen)
	}
	// Without per-route config the filter's mode stands.
	p = (&stream{}).newProc(f)
	if p.mode.GetRequestBodyMode() != extprocfilterv3.ProcessingMode_BUFFERED || p.failOpen {
		t.Fatalf("filter mode %v", p.mode)
	}
}

// Overrides the emulator does not implement are NACKed rather than ignored.
func TestExtProcPerRouteUnsupportedOverrideNACKed(t *testing.T) {
	a := must(t, func() (*anypb.Any, error) {
		return anypb.New(&extprocfilterv3.ExtProcPerRoute{Override: &extprocfilterv3.ExtProcPerRoute_Overrides{
			Overrides: &extprocfilterv3.ExtProcOverrides{GrpcService: &corev3.GrpcService{}}}})
	})
	if _, err := parsePerFilter(map[string]*anypb.Any{filterExtProc: a}); err == nil {
		t.Fatal("a grpc_service override was accepted")
	}
}

// The deprecated Cluster.http2_protocol_options still makes an HTTP/2 cluster.
func TestLegacyHTTP2ProtocolOptions(t *testing.T) {
	c, _ := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: "127.0.0.1", Port: 1})
	c.TypedExtensionProtocolOptions = nil
	//lint:ignore SA1019 testing the deprecated field on purpose
	c.Http2ProtocolOptions = &corev3.Http2ProtocolOptions{}
	cc, err := parseCluster(c)
	if err != nil || !cc.h2 {
		t.Fatalf("h2 %v, err %v", cc != nil && cc.h2, err)
	}
	c2, _ := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: "127.0.0.1", Port: 1, Protocol: envoy.HTTP2})
	if cc, err := parseCluster(c2); err != nil || !cc.h2 {
		t.Fatalf("typed options: %v", err)
	}
}

// describeBody is how the scripted processor logs a body message.
func describeBody(kind string, body []byte, eos bool) string {
	r := &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: body, EndOfStream: eos}}}
	if kind == "response_body" {
		r = &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: body, EndOfStream: eos}}}
	}
	return describe(r)
}

func (rg *grpcRig) waitMessages(t *testing.T) []string {
	t.Helper()
	requireEventually(t, 5*time.Second, "the ext_proc stream to end", func() bool {
		m := rg.proc.messages()
		return len(m) > 0 && m[len(m)-1] == "<eof>"
	})
	return rg.proc.messages()
}

func (rg *grpcRig) requireMessages(t *testing.T, want ...string) {
	t.Helper()
	got := rg.waitMessages(t)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("ext_proc messages:\n  %s\nwant:\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
}

// rawGRPC posts one gRPC request body to method over h2c and returns the response with
// its body read to the end (so its trailers are in).
func rawGRPC(t *testing.T, addr, method string, body []byte, hdr ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(rpcCtx(t), "POST", "http://"+addr+mcpService+method, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("content-type", "application/grpc")
	req.Header.Set("te", "trailers")
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := h2cClient(t).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, data
}

// deadAddr is a loopback address nothing listens on.
func deadAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}
