//go:build integration

package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/grpcapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/extproc/grpcframe"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// grpcMesh is the mesh with inventory served as gRPC MCP by the grpc-go reference App:
// clients call the agent's sidecar with dapr-app-id: inventory, as through Dapr.
type grpcMesh struct {
	*mesh
	app    *grpcapp.Server
	client mcpv1.McpServiceClient
}

func startGRPCMesh(t *testing.T, edit func(m *mesh)) *grpcMesh {
	t.Helper()
	app, err := grpcapp.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(app.Close)
	m := &mesh{iss: bearertest.NewIssuer(t), appAddr: app.Addr()}
	startMeshWith(t, m, "disabled", nil, func() {
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "  mcp:\n    path: /mcp\n", "  mcp:\n    transport: grpc\n")
		if edit != nil {
			edit(m)
		}
	})
	conn, err := grpc.NewClient("passthrough:///"+m.agent.Listener("outbound"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return &grpcMesh{mesh: m, app: app, client: mcpv1.NewMcpServiceClient(conn)}
}

// rpcCtx carries what a Dapr-style gRPC client sends: the App and the bearer token.
func (g *grpcMesh) rpcCtx(t *testing.T, token string) context.Context {
	t.Helper()
	md := metadata.Pairs("dapr-app-id", "inventory")
	if token != "" {
		md.Set("authorization", token)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return metadata.NewOutgoingContext(ctx, md)
}

func grpcArgs(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func requireCode(t *testing.T, err error, want codes.Code, msgPart string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != want || !strings.Contains(st.Message(), msgPart) {
		t.Fatalf("status %v %q, want %v with %q", st.Code(), st.Message(), want, msgPart)
	}
}

func (g *grpcMesh) ran(tool string) int {
	n := 0
	for _, c := range g.app.Calls() {
		if c.Tool == tool {
			n++
		}
	}
	return n
}

func TestGRPCEndToEnd(t *testing.T) {
	g := startGRPCMesh(t, nil)
	tok := g.token(t, nil)

	t.Run("allowed unary call names the caller", func(t *testing.T) {
		res, err := g.client.CallTool(g.rpcCtx(t, tok), &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})})
		if err != nil || res.GetStructuredContent().AsMap()["quantity"] != float64(42) {
			t.Fatalf("CallTool: %v %v", res, err)
		}
		calls := g.app.Calls()
		if last := calls[len(calls)-1]; last.Metadata.Get("x-mcpgate-caller-app-id")[0] != "my-agent" {
			t.Fatalf("the server saw caller %v", last.Metadata.Get("x-mcpgate-caller-app-id"))
		}
	})
	t.Run("denied tool never reaches the server", func(t *testing.T) {
		_, err := g.client.CallTool(g.rpcCtx(t, tok), &mcpv1.CallToolRequest{Name: "delete_product", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})})
		requireCode(t, err, codes.PermissionDenied, "no-deletes")
		if n := g.ran("delete_product"); n != 0 {
			t.Fatalf("the server ran delete_product %d times", n)
		}
	})
	t.Run("ListTools filtered", func(t *testing.T) {
		lt, err := g.client.ListTools(g.rpcCtx(t, tok), &mcpv1.ListToolsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, tl := range lt.GetTools() {
			names = append(names, tl.GetName())
		}
		if strings.Contains(strings.Join(names, ","), "delete_product") || len(names) == 0 {
			t.Fatalf("the client sees %v", names)
		}
	})
	t.Run("unauthenticated ListTools refused", func(t *testing.T) {
		_, err := g.client.ListTools(g.rpcCtx(t, ""), &mcpv1.ListToolsRequest{})
		if st, _ := status.FromError(err); st.Code() != codes.Unauthenticated {
			t.Fatalf("status %v, want Unauthenticated", st)
		}
	})
	t.Run("redacted result", func(t *testing.T) {
		res, err := g.client.CallTool(g.rpcCtx(t, tok), &mcpv1.CallToolRequest{Name: "get_customer", Arguments: grpcArgs(t, map[string]any{"id": "c1"})})
		if err != nil {
			t.Fatal(err)
		}
		if whole, _ := proto.Marshal(res); bytes.Contains(whole, []byte("078-05-1120")) {
			t.Fatalf("the ssn reached the client: %v", res)
		}
	})
	t.Run("stream: an allowed call, then a denied one", func(t *testing.T) {
		before := g.ran("get_inventory")
		st, err := g.client.Session(g.rpcCtx(t, tok))
		if err != nil {
			t.Fatal(err)
		}
		send := func(id, tool string) {
			if err := st.Send(&mcpv1.SessionRequest{RequestId: id, Request: &mcpv1.SessionRequest_CallTool{CallTool: &mcpv1.CallToolRequest{Name: tool, Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})}}}); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
		}
		send("a", "get_inventory")
		first, err := st.Recv()
		if err != nil || first.GetCallTool() == nil {
			t.Fatalf("the allowed call: %v %v", first, err)
		}
		send("b", "delete_product")
		_, err = st.Recv()
		if err == nil {
			t.Fatal("the stream went on after a denied message")
		}
		if g.ran("get_inventory") != before+1 || g.ran("delete_product") != 0 {
			t.Fatalf("the server ran %v", g.app.Calls())
		}
	})
	t.Run("malformed frame ends the RPC before the server", func(t *testing.T) {
		before := len(g.app.Calls())
		good, _ := proto.Marshal(&mcpv1.CallToolRequest{Name: "get_inventory", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})})
		bad := grpcframe.Append(nil, good)
		bad[0] = 0x80 // reserved flag bit
		code := rawGRPC(t, g.agent.Listener("outbound"), tok, "CallTool", bad)
		if code != codes.InvalidArgument {
			t.Fatalf("grpc-status %v, want InvalidArgument", code)
		}
		if n := len(g.app.Calls()) - before; n != 0 {
			t.Fatalf("the server ran %d calls", n)
		}
	})
	t.Run("grpc-js client", func(t *testing.T) {
		lines := runGRPCJS(t, g.agent.Listener("outbound"), strings.TrimPrefix(tok, "Bearer "),
			`[{"rpc":"ListTools"},{"rpc":"CallTool","tool":"get_inventory","args":{"product_id":"SKU-7"}},{"rpc":"CallTool","tool":"delete_product","args":{"product_id":"SKU-7"}}]`)
		if len(lines) != 3 {
			t.Fatalf("%d lines: %v", len(lines), lines)
		}
		if !lines[0].OK || strings.Contains(string(lines[0].Result), "delete_product") {
			t.Errorf("ListTools: %+v", lines[0])
		}
		if !lines[1].OK || !strings.Contains(string(lines[1].Result), `"quantity":7`) {
			t.Errorf("CallTool get_inventory: %+v", lines[1])
		}
		if lines[2].OK || codes.Code(lines[2].Code) != codes.PermissionDenied || !strings.Contains(lines[2].Details, "no-deletes") {
			t.Errorf("CallTool delete_product: %+v", lines[2])
		}
	})
}

// A per-subject limit counts the messages of one stream, not the stream.
func TestGRPCPerMessageLimit(t *testing.T) {
	g := startGRPCMesh(t, func(m *mesh) {
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "perCaller: 100/m", "perCaller: 100000/m\n      perSubject: 50/m")
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "get_inventory: 10/s", "get_inventory: 100000/s")
	})
	st, err := g.client.Session(g.rpcCtx(t, g.token(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		for i := range 1000 {
			if st.Send(&mcpv1.SessionRequest{RequestId: strconv.Itoa(i),
				Request: &mcpv1.SessionRequest_CallTool{CallTool: &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})}}}) != nil {
				return
			}
		}
		_ = st.CloseSend()
	}()
	answered := 0
	var last error
	for answered <= 1000 {
		if _, last = st.Recv(); last != nil {
			break
		}
		answered++
	}
	if answered > 50 || last == nil || errors.Is(last, io.EOF) {
		t.Fatalf("%d messages answered, then %v: want at most 50 and the stream ended by the limit", answered, last)
	}
	if n := g.ran("get_inventory"); n > 50 {
		t.Fatalf("the server ran %d calls, want at most 50", n)
	}
}

// A token that expires while its stream is open stops working at its first message
// after expiry.
func TestGRPCTokenExpiresMidStream(t *testing.T) {
	g := startGRPCMesh(t, nil)
	exp := time.Now().Add(3 * time.Second)
	tok := g.token(t, map[string]any{"exp": exp.Unix()})
	st, err := g.client.Session(g.rpcCtx(t, tok))
	if err != nil {
		t.Fatal(err)
	}
	call := func(id string) error {
		return st.Send(&mcpv1.SessionRequest{RequestId: id, Request: &mcpv1.SessionRequest_CallTool{CallTool: &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})}}})
	}
	if err := call("before"); err != nil {
		t.Fatal(err)
	}
	if m, err := st.Recv(); err != nil || m.GetCallTool() == nil {
		t.Fatalf("before expiry: %v %v", m, err)
	}
	// Waiting for the token's exp to pass (not for readiness): bounded by exp itself.
	for time.Now().Unix() <= exp.Unix() {
		time.Sleep(100 * time.Millisecond)
	}
	before := g.ran("get_inventory")
	_ = call("after")
	_, err = st.Recv()
	if st, _ := status.FromError(err); err == nil || (st.Code() != codes.Unauthenticated && st.Code() != codes.Internal) {
		t.Fatalf("after expiry: %v", err)
	}
	if g.ran("get_inventory") != before {
		t.Fatal("a message after expiry reached the server")
	}
}

// mcpgate down: the RPC fails closed and never reaches the server.
func TestGRPCMcpgateDown(t *testing.T) {
	g := startGRPCMesh(t, nil)
	tok := g.token(t, nil)
	g.gate.stop(t)
	before := len(g.app.Calls())
	_, err := g.client.CallTool(g.rpcCtx(t, tok), &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: grpcArgs(t, map[string]any{"product_id": "SKU-42"})})
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable {
		t.Fatalf("status %v, want Unavailable", st)
	}
	if len(g.app.Calls()) != before {
		t.Fatal("the call reached the server with mcpgate down")
	}
}

// rawGRPC sends one gRPC request with a hand-made body over h2c and returns its status.
func rawGRPC(t *testing.T, addr, token, method string, body []byte) codes.Code {
	t.Helper()
	// h2c with prior knowledge, as gRPC clients speak to a plaintext sidecar.
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	req, err := http.NewRequest("POST", "http://"+addr+"/mcpgate.mcp.v1.McpService/"+method, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("TE", "trailers")
	req.Header.Set("dapr-app-id", "inventory")
	req.Header.Set("Authorization", token)
	resp, err := (&http.Client{Transport: tr, Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	_, _ = io.ReadAll(resp.Body)
	s := resp.Trailer.Get("grpc-status")
	if s == "" {
		s = resp.Header.Get("grpc-status")
	}
	c, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("no grpc-status (HTTP %d, headers %v, trailers %v)", resp.StatusCode, resp.Header, resp.Trailer)
	}
	return codes.Code(c)
}

// jsLine is one line of tsclient/grpcclient.mjs output.
type jsLine struct {
	RPC     string          `json:"rpc"`
	OK      bool            `json:"ok"`
	Code    int             `json:"code"`
	Details string          `json:"details"`
	Result  json.RawMessage `json:"result"`
}

func runGRPCJS(t *testing.T, addr, token, steps string) []jsLine {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "tsclient/grpcclient.mjs", "--addr", addr, "--app", "inventory", "--token", token, "--steps", steps)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("grpc-js client: %v\nstderr: %s\nstdout: %s", err, stderr.String(), out)
	}
	var lines []jsLine
	for _, l := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		var jl jsLine
		if err := json.Unmarshal(l, &jl); err != nil {
			t.Fatalf("line %q: %v", l, err)
		}
		lines = append(lines, jl)
	}
	return lines
}
