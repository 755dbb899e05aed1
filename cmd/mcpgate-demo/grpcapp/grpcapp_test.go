package grpcapp

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// dial starts the App and returns a grpc-go client of it.
func dial(t *testing.T) (*Server, mcpv1.McpServiceClient) {
	t.Helper()
	s, err := Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	conn, err := grpc.NewClient("passthrough:///"+s.Addr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return s, mcpv1.NewMcpServiceClient(conn)
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func args(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestUnary(t *testing.T) {
	s, c := dial(t)
	lt, err := c.ListTools(ctx(t), &mcpv1.ListToolsRequest{})
	if err != nil || len(lt.GetTools()) != 5 || lt.GetTools()[0].GetName() != "get_inventory" {
		t.Fatalf("ListTools: %v %v", lt, err)
	}
	md := metadata.Pairs("x-mcpgate-caller-app-id", "my-agent")
	res, err := c.CallTool(metadata.NewOutgoingContext(ctx(t), md), &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: args(t, map[string]any{"product_id": "SKU-42"})})
	if err != nil || res.GetIsError() || res.GetStructuredContent().AsMap()["quantity"] != float64(42) {
		t.Fatalf("CallTool: %v %v", res, err)
	}
	calls := s.Calls()
	if len(calls) != 1 || calls[0].Tool != "get_inventory" || calls[0].RPC != "/mcpgate.mcp.v1.McpService/CallTool" ||
		calls[0].Metadata.Get("x-mcpgate-caller-app-id")[0] != "my-agent" {
		t.Fatalf("recorded %+v", calls)
	}
	cust, err := c.CallTool(ctx(t), &mcpv1.CallToolRequest{Name: "get_customer", Arguments: args(t, map[string]any{"id": "c1"})})
	if err != nil || cust.GetStructuredContent().AsMap()["ssn"] == nil {
		t.Fatalf("get_customer: %v %v", cust, err)
	}
}

func TestCallToolStreamProgressThenResult(t *testing.T) {
	_, c := dial(t)
	st, err := c.CallToolStream(ctx(t), &mcpv1.CallToolStreamRequest{Call: &mcpv1.CallToolRequest{Name: "slow_report", Arguments: args(t, map[string]any{"steps": 3})}})
	if err != nil {
		t.Fatal(err)
	}
	var progress int
	var result *mcpv1.CallToolResponse
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if result != nil {
			t.Fatal("a message after the result")
		}
		if m.GetProgress() != nil {
			progress++
		}
		result = m.GetResult()
	}
	if progress != 3 || result == nil {
		t.Fatalf("%d progress messages, result %v", progress, result)
	}
}

func TestSessionAnswersEachRequest(t *testing.T) {
	s, c := dial(t)
	st, err := c.Session(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	reqs := []*mcpv1.SessionRequest{
		{RequestId: "a", Request: &mcpv1.SessionRequest_CallTool{CallTool: &mcpv1.CallToolRequest{Name: "get_inventory", Arguments: args(t, map[string]any{"product_id": "SKU-7"})}}},
		{RequestId: "b", Request: &mcpv1.SessionRequest_ListTools{ListTools: &mcpv1.ListToolsRequest{}}},
		{RequestId: "c", Request: &mcpv1.SessionRequest_CallTool{CallTool: &mcpv1.CallToolRequest{Name: "nope"}}},
	}
	for _, r := range reqs {
		if err := st.Send(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.CloseSend(); err != nil {
		t.Fatal(err)
	}
	got := map[string]*mcpv1.SessionResponse{}
	for {
		m, err := st.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[m.GetRequestId()] = m
	}
	if got["a"].GetCallTool().GetStructuredContent().AsMap()["quantity"] != float64(7) || len(got["b"].GetListTools().GetTools()) != 5 || got["c"].GetError().GetCode() == 0 {
		t.Fatalf("answers %v", got)
	}
	if n := len(s.Calls()); n != 2 {
		t.Fatalf("%d calls recorded, want 2", n)
	}
}
