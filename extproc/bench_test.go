package extproc

import (
	"context"
	"fmt"
	"net"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/extproc/grpcframe"
	"github.com/mcpgate/mcpgate/integration/redistest"
	"github.com/mcpgate/mcpgate/policy"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// passThrough answers every message with an empty reply: the floor of an ext_proc
// exchange (gRPC stream, loopback, protobuf).
type passThrough struct {
	extprocv3.UnimplementedExternalProcessorServer
}

func (passThrough) Process(srv extprocv3.ExternalProcessor_ProcessServer) error {
	for {
		req, err := srv.Recv()
		if err != nil {
			return nil
		}
		var resp *extprocv3.ProcessingResponse
		switch req.GetRequest().(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			resp = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}}
		case *extprocv3.ProcessingRequest_RequestBody:
			resp = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: &extprocv3.BodyResponse{}}}
		default:
			resp = &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}}
		}
		if err := srv.Send(resp); err != nil {
			return err
		}
	}
}

func startProcessor(tb testing.TB, srv extprocv3.ExternalProcessorServer) extprocv3.ExternalProcessorClient {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	gs := grpc.NewServer(extauthz.ServerOptions()...)
	extprocv3.RegisterExternalProcessorServer(gs, srv)
	go func() { _ = gs.Serve(lis) }()
	tb.Cleanup(gs.Stop)
	conn, err := grpc.NewClient("passthrough:///"+lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	return extprocv3.NewExternalProcessorClient(conn)
}

// exchangeOnce runs one tools/call through a processor as Envoy does: request headers,
// request body (buffered), response headers; one stream per request.
func exchangeOnce(b *testing.B, c extprocv3.ExternalProcessorClient, msgs []*extprocv3.ProcessingRequest) {
	stream, err := c.Process(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	for _, m := range msgs {
		if err := stream.Send(m); err != nil {
			b.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		if resp.GetImmediateResponse() != nil {
			b.Fatalf("denied: %s", resp.GetImmediateResponse().GetBody())
		}
	}
	if err := stream.CloseSend(); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkExchange is one full MCP tools/call exchange over loopback gRPC with the demo
// policy (rules, Rego with argument conditions), beside a pass-through processor in the
// same run; calls alternate, and so does which goes first, so both see the same machine
// noise (as BenchmarkCheckLoopback does).
func BenchmarkExchange(b *testing.B) {
	s := newDemoServer(b)
	// The demo's limits (get_inventory 10/s) would stop a benchmark; an unreachable limit
	// keeps the limiter's cost in the measured path.
	lim := &s.store.Current().App("inventory").MCP.Limits
	lim.PerCaller, lim.PerTool = &policy.RateLimit{N: 1 << 30, Per: time.Second}, nil
	gate, floor := startProcessor(b, s), startProcessor(b, passThrough{})
	body := call(1, "get_inventory", `{"product_id":"SKU-42"}`)
	ident, err := contract.FromMetadata(agentMD)
	if err != nil {
		b.Fatal(err)
	}
	session := s.bindSession("s1", identityOf(ident)) // as the client got it from initialize
	msgs := []*extprocv3.ProcessingRequest{
		{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json", "content-length", fmt.Sprint(len(body)),
				"mcp-protocol-version", "2025-06-18", "mcp-session-id", session, "accept", "application/json, text/event-stream")}}},
		{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}},
		{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
			Headers: headerMap(":status", "200", "content-type", "application/json")}}},
	}
	timed := func(c extprocv3.ExternalProcessorClient) time.Duration {
		t0 := time.Now()
		exchangeOnce(b, c, msgs)
		return time.Since(t0)
	}
	timed(gate)
	timed(floor)
	alternate(b, func() time.Duration { return timed(gate) }, func() time.Duration { return timed(floor) })
}

// alternate times gate and floor in turns, switching which goes first, so that both see
// the same machine noise, and reports their latencies and the p50 ratio.
func alternate(b *testing.B, gate, floor func() time.Duration) {
	var lg, lf []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			lg, lf = append(lg, gate()), append(lf, floor())
		} else {
			lf, lg = append(lf, floor()), append(lg, gate())
		}
		i++
	}
	g50, g99 := pct(lg)
	f50, f99 := pct(lf)
	b.ReportMetric(float64(g50.Microseconds()), "mcpgate-p50-µs")
	b.ReportMetric(float64(g99.Microseconds()), "mcpgate-p99-µs")
	b.ReportMetric(float64(f50.Microseconds()), "passthrough-p50-µs")
	b.ReportMetric(float64(f99.Microseconds()), "passthrough-p99-µs")
	b.ReportMetric(float64(g50)/float64(f50), "p50-ratio")
}

func pct(d []time.Duration) (p50, p99 time.Duration) {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return d[len(d)/2], d[len(d)*99/100]
}

// BenchmarkRegoDecision is layers 4 and 5 alone for an allowed get_inventory call.
func BenchmarkRegoDecision(b *testing.B) {
	s := newDemoServer(b)
	m := s.store.Current().App("inventory").MCP
	r := &Request{
		Caller: policy.Caller{AppID: "my-agent", Namespace: "default"}, Subject: "alice", Scopes: []string{"mcp:tools", "inventory:read"},
		ClaimsJSON: `{"sub":"alice","tier":"gold"}`, Target: "inventory", Method: "tools/call", Tool: "get_inventory",
		Arguments: map[string]any{"product_id": "SKU-42"}, HTTPMethod: "POST", Path: "/mcp",
	}
	r.base = newRegoBase(r, newRegoCaches()) // as the stream does once per request
	ctx := context.Background()
	lat := make([]time.Duration, 0, 1<<16)
	b.ReportAllocs()
	for b.Loop() {
		t0 := time.Now()
		if d := Decide(ctx, m, r); !d.Allow {
			b.Fatal(d.Reason)
		}
		lat = append(lat, time.Since(t0))
	}
	p50, p99 := pct(lat)
	b.ReportMetric(float64(p50.Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(p99.Nanoseconds())/1e3, "p99-µs")
}

// toolsListResponse is a tools/list result of n tools with realistic input schemas.
func toolsListResponse(n int) string {
	var sb strings.Builder
	sb.WriteString(`{"jsonrpc":"2.0","id":2,"result":{"tools":[`)
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		name := []string{"get_inventory", "list_items", "delete_product", "get_customer", "admin_tool"}[i%5]
		fmt.Fprintf(&sb, `{"name":"%s_%d","description":"Tool number %d does something useful with the inventory.","inputSchema":{"type":"object","properties":{"product_id":{"type":"string","description":"SKU"},"limit":{"type":"integer","minimum":1,"maximum":1000}},"required":["product_id"]}}`, name, i, i)
	}
	sb.WriteString(`],"nextCursor":"abc"}}`)
	return sb.String()
}

// BenchmarkFilterToolsList500 filters a 500-tool tools/list response with the demo policy:
// every tool decided by rules and Rego as if called.
func BenchmarkFilterToolsList500(b *testing.B) {
	s := newDemoServer(b)
	resp := []byte(toolsListResponse(500))
	st := &stream{s: s, snap: s.store.Current()}
	st.app = st.snap.App("inventory")
	st.ident = contract.Identity{Target: "inventory", CallerAppID: "my-agent", CallerNamespace: "default", Scopes: []string{"mcp:tools", "inventory:read"}}
	st.req = Request{Caller: policy.Caller{AppID: "my-agent", Namespace: "default"}, Scopes: st.ident.Scopes, Target: "inventory", Method: "tools/list"}
	st.req.base = newRegoBase(&st.req, s.rego)
	body, err := mcpParse([]byte(`{"jsonrpc":"2.0","id":2,"method":"tools/list"}`), 1<<20, false)
	if err != nil {
		b.Fatal(err)
	}
	st.planResponse(context.Background(), body, []requestDecision{{msgIndex: 0, d: Decision{Allow: true}}})
	// cold: every entry decided (first tools/list of a caller after a policy change);
	// warm: the same caller lists again (list-time decisions cached).
	for _, warm := range []bool{false, true} {
		name := map[bool]string{false: "cold", true: "warm"}[warm]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(resp)))
			lat := make([]time.Duration, 0, 1024)
			for b.Loop() {
				if !warm {
					s.listCache.m = nil
				}
				t0 := time.Now()
				out, err := st.rewriteJSON(resp)
				if err != nil || len(out) >= len(resp) {
					b.Fatalf("not filtered: %v", err)
				}
				lat = append(lat, time.Since(t0))
			}
			p50, p99 := pct(lat)
			b.ReportMetric(float64(p50.Microseconds())/1e3, "p50-ms")
			b.ReportMetric(float64(p99.Microseconds())/1e3, "p99-ms")
		})
	}
}

// BenchmarkGRPCStreamMessage is the per-message cost on an open gRPC Session stream: each
// iteration sends one request body chunk holding one tools/call message and waits for the
// reply, on mcpgate (framing, decoding, limits, rules, Rego) and on a pass-through
// processor in the same run, alternating.
func BenchmarkGRPCStreamMessage(b *testing.B) {
	s := newDemoServer(b)
	lim := &s.store.Current().App("inventory").MCP.Limits
	lim.PerCaller, lim.PerTool = &policy.RateLimit{N: 1 << 30, Per: time.Second}, nil
	open := func(c extprocv3.ExternalProcessorClient) extprocv3.ExternalProcessor_ProcessClient {
		stream, err := c.Process(context.Background())
		if err != nil {
			b.Fatal(err)
		}
		if err := stream.Send(&extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
			Headers: headerMap(":method", "POST", ":path", GRPCService+"Session", "content-type", "application/grpc", "te", "trailers")}}}); err != nil {
			b.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = stream.CloseSend() })
		return stream
	}
	gate, floor := open(startProcessor(b, s)), open(startProcessor(b, passThrough{}))
	args, _ := structpb.NewStruct(map[string]any{"product_id": "SKU-42"})
	n := 0
	message := func() *extprocv3.ProcessingRequest {
		n++
		data, _ := proto.Marshal(&mcpv1.SessionRequest{RequestId: strconv.Itoa(n), Request: &mcpv1.SessionRequest_CallTool{
			CallTool: &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: args}}})
		return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: grpcframe.Append(nil, data)}}}
	}
	timed := func(stream extprocv3.ExternalProcessor_ProcessClient) time.Duration {
		m := message()
		t0 := time.Now()
		if err := stream.Send(m); err != nil {
			b.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		if resp.GetImmediateResponse() != nil {
			b.Fatalf("refused: %s", resp.GetImmediateResponse().GetBody())
		}
		return time.Since(t0)
	}
	alternate(b, func() time.Duration { return timed(gate) }, func() time.Duration { return timed(floor) })
}

// BenchmarkGRPCStreamThroughput pushes b.N tools/call messages down one open Session, one
// chunk each, sent without waiting for replies (gRPC's flow control bounds what is in
// flight), and reports the sustained rate of decided messages.
func BenchmarkGRPCStreamThroughput(b *testing.B) {
	s := newDemoServer(b)
	lim := &s.store.Current().App("inventory").MCP.Limits
	lim.PerCaller, lim.PerTool = &policy.RateLimit{N: 1 << 30, Per: time.Second}, nil
	c := startProcessor(b, s)
	stream, err := c.Process(context.Background())
	if err != nil {
		b.Fatal(err)
	}
	if err := stream.Send(&extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
		Headers: headerMap(":method", "POST", ":path", GRPCService+"Session", "content-type", "application/grpc", "te", "trailers")}}}); err != nil {
		b.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		b.Fatal(err)
	}
	args, _ := structpb.NewStruct(map[string]any{"product_id": "SKU-42"})
	chunk := func(i int) *extprocv3.ProcessingRequest {
		data, _ := proto.Marshal(&mcpv1.SessionRequest{RequestId: strconv.Itoa(i), Request: &mcpv1.SessionRequest_CallTool{
			CallTool: &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: args}}})
		return &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: grpcframe.Append(nil, data)}}}
	}
	msgs := make([]*extprocv3.ProcessingRequest, b.N)
	for i := range msgs {
		msgs[i] = chunk(i)
	}
	errc := make(chan error, 1)
	b.ResetTimer()
	start := time.Now()
	go func() {
		for i := range msgs {
			if err := stream.Send(msgs[i]); err != nil {
				errc <- err
				return
			}
		}
		errc <- nil
	}()
	for range b.N {
		resp, err := stream.Recv()
		if err != nil {
			b.Fatal(err)
		}
		if resp.GetImmediateResponse() != nil {
			b.Fatalf("refused: %s", resp.GetImmediateResponse().GetBody())
		}
	}
	elapsed := time.Since(start)
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	_ = stream.CloseSend()
}

// BenchmarkRedisLimitedExchange is what a shared rate limit adds to a call: one full
// tools/call exchange with three limits in Redis on loopback (perCaller, perSubject and
// a perTool limit, decided in one round trip), beside the same exchange with no limit,
// in the same run and alternating, as BenchmarkExchange does. The limits are out of
// reach so every call is admitted (and spends from three buckets).
//
// on-body is a 2025-06-18 call: with a perTool limit its buckets are known only from
// its body, and Redis's round trip adds to the call. on-headers is a 2026-07-28 call,
// whose Mcp-Method and Mcp-Name headers name the tool: the decision is taken on the
// headers and Redis answers while the body is on its way (earlyLimit).
//
// redis-own-core leaves redis-server a CPU of its own (GOMAXPROCS one below the CPUs),
// as where Redis runs on another machine or container; shared-cores lets mcpgate, the
// benchmark's client and Redis contend for every CPU, which on a 2-CPU machine is most
// of the difference between the two.
func BenchmarkRedisLimitedExchange(b *testing.B) {
	srv := redistest.Start(b)
	for _, decided := range []struct {
		name    string
		headers []string
	}{
		{"on-body", []string{"mcp-protocol-version", "2025-06-18"}},
		{"on-headers", []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "get_inventory"}},
	} {
		b.Run(decided.name+"/redis-own-core", func(b *testing.B) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(max(1, runtime.NumCPU()-1)))
			benchLimited(b, srv, decided.headers)
		})
		b.Run(decided.name+"/shared-cores", func(b *testing.B) { benchLimited(b, srv, decided.headers) })
	}
}

func benchLimited(b *testing.B, srv *redistest.Server, headers []string) {
	unlimited, limited := newDemoServer(b), newDemoServer(b)
	b.Cleanup(unlimited.Close)
	b.Cleanup(limited.Close)
	lim := &unlimited.store.Current().App("inventory").MCP.Limits
	lim.PerCaller, lim.PerTool = nil, nil
	g, err := policy.CompileGlob("get_*")
	if err != nil {
		b.Fatal(err)
	}
	snap := limited.store.Current()
	snap.Mesh.RateLimits = &policy.RateLimitStore{Address: srv.Addr(), FailureMode: policy.FailDeny, Timeout: time.Second}
	lim = &snap.App("inventory").MCP.Limits
	huge := policy.RateLimit{N: 1 << 30, Per: time.Second}
	lim.PerCaller, lim.PerSubject, lim.SubjectClaim = &huge, &huge, "sub"
	lim.PerTool = []policy.ToolRate{{Tool: g, Rate: huge, Per: policy.PerSubject, Claim: "sub"}}

	body := call(1, "get_inventory", `{"product_id":"SKU-42"}`)
	msgs := func(s *Server) []*extprocv3.ProcessingRequest {
		ident, err := contract.FromMetadata(agentMD)
		if err != nil {
			b.Fatal(err)
		}
		session := s.bindSession("s1", identityOf(ident))
		return []*extprocv3.ProcessingRequest{
			{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{RequestHeaders: &extprocv3.HttpHeaders{
				Headers: headerMap(append([]string{":method", "POST", ":path", "/mcp", "content-type", "application/json", "content-length", fmt.Sprint(len(body)),
					"mcp-session-id", session, "accept", "application/json, text/event-stream"}, headers...)...)}}},
			{Request: &extprocv3.ProcessingRequest_RequestBody{RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}},
			{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{
				Headers: headerMap(":status", "200", "content-type", "application/json")}}},
		}
	}
	lc, uc := startProcessor(b, limited), startProcessor(b, unlimited)
	lm, um := msgs(limited), msgs(unlimited)
	timed := func(c extprocv3.ExternalProcessorClient, m []*extprocv3.ProcessingRequest) time.Duration {
		t0 := time.Now()
		exchangeOnce(b, c, m)
		return time.Since(t0)
	}
	timed(lc, lm) // dial Redis, load the script
	timed(uc, um)
	var ll, lu []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			ll, lu = append(ll, timed(lc, lm)), append(lu, timed(uc, um))
		} else {
			lu, ll = append(lu, timed(uc, um)), append(ll, timed(lc, lm))
		}
		i++
	}
	l50, l99 := pct(ll)
	u50, u99 := pct(lu)
	b.ReportMetric(float64(l50.Microseconds()), "limited-p50-µs")
	b.ReportMetric(float64(l99.Microseconds()), "limited-p99-µs")
	b.ReportMetric(float64(u50.Microseconds()), "unlimited-p50-µs")
	b.ReportMetric(float64(u99.Microseconds()), "unlimited-p99-µs")
	b.ReportMetric(float64((l50 - u50).Microseconds()), "added-p50-µs")
}
