// Package grpcapp is the demo's inventory App served as gRPC MCP
// (mcpgate.mcp.v1.McpService, proto/mcpgate/mcp/v1/mcp.proto) on grpc-go: the same tools
// as package mcpapp (get_inventory, list_items, delete_product, get_customer,
// slow_report) and the same inventory. The integration tests run it behind the emulated
// sidecars with [Start], which records every tool it executes, so a test can tell that a
// denied message never reached it.
package grpcapp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	mcpv1 "github.com/mcpgate/mcpgate/proto/mcpgate/mcp/v1"
)

// Call is one tool call the App executed.
type Call struct {
	Tool      string
	Arguments map[string]any
	// Metadata is the gRPC metadata of the RPC that carried it (identity headers set by
	// mcpgate included).
	Metadata metadata.MD
	// RPC is the full method, e.g. /mcpgate.mcp.v1.McpService/CallTool.
	RPC string
}

// Server is the App.
type Server struct {
	mcpv1.UnimplementedMcpServiceServer

	ln   net.Listener
	grpc *grpc.Server

	mu        sync.Mutex
	calls     []Call
	inventory map[string]int
}

// New returns the App with the demo inventory, not yet serving.
func New() *Server {
	return &Server{inventory: maps.Clone(mcpapp.DefaultInventory)}
}

// Start serves the App on 127.0.0.1:0 over plaintext HTTP/2 (h2c, as behind a sidecar).
// The caller must Close it.
func Start() (*Server, error) {
	s := New()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("grpcapp: listen: %w", err)
	}
	s.ln = ln
	s.grpc = grpc.NewServer()
	mcpv1.RegisterMcpServiceServer(s.grpc, s)
	go func() { _ = s.grpc.Serve(ln) }()
	return s, nil
}

// Addr is the listener's host:port.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Close stops the server at once (streams are cut).
func (s *Server) Close() { s.grpc.Stop() }

// Calls returns the tool calls the App executed, in order.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.calls)
}

func (s *Server) record(ctx context.Context, name string, args map[string]any) {
	md, _ := metadata.FromIncomingContext(ctx)
	rpc, _ := grpc.Method(ctx)
	s.mu.Lock()
	s.calls = append(s.calls, Call{Tool: name, Arguments: args, Metadata: md.Copy(), RPC: rpc})
	s.mu.Unlock()
}

// tools is what ListTools answers, in order.
var tools = []*mcpv1.Tool{
	{Name: mcpapp.ToolGetInventory, Description: "Stock level of a product.", InputSchema: schema("product_id")},
	{Name: mcpapp.ToolListItems, Description: "Lists catalogue items, one page at a time.", InputSchema: schema()},
	{Name: mcpapp.ToolDeleteProduct, Description: "Deletes a product.", InputSchema: schema("product_id")},
	{Name: mcpapp.ToolGetCustomer, Description: "Customer record.", InputSchema: schema("id")},
	{Name: mcpapp.ToolSlowReport, Description: "Builds a report slowly, reporting progress.", InputSchema: schema()},
}

// schema is an object JSON Schema requiring the named string properties.
func schema(required ...string) *structpb.Struct {
	props := map[string]any{}
	req := make([]any, len(required))
	for i, r := range required {
		props[r] = map[string]any{"type": "string"}
		req[i] = r
	}
	s, _ := structpb.NewStruct(map[string]any{"type": "object", "properties": props, "required": req})
	return s
}

// Initialize implements McpService.
func (s *Server) Initialize(_ context.Context, req *mcpv1.InitializeRequest) (*mcpv1.InitializeResponse, error) {
	return &mcpv1.InitializeResponse{
		ProtocolVersion: req.GetProtocolVersion(),
		ServerInfo:      &mcpv1.Implementation{Name: "inventory", Version: "v1.0.0"},
	}, nil
}

// ListTools implements McpService.
func (s *Server) ListTools(context.Context, *mcpv1.ListToolsRequest) (*mcpv1.ListToolsResponse, error) {
	return &mcpv1.ListToolsResponse{Tools: tools}, nil
}

// CallTool implements McpService.
func (s *Server) CallTool(ctx context.Context, req *mcpv1.CallToolRequest) (*mcpv1.CallToolResponse, error) {
	return s.call(ctx, req, nil)
}

// CallToolStream implements McpService: slow_report's progress, then the result.
func (s *Server) CallToolStream(req *mcpv1.CallToolStreamRequest, stream grpc.ServerStreamingServer[mcpv1.CallToolStreamResponse]) error {
	res, err := s.call(stream.Context(), req.GetCall(), func(p *mcpv1.Progress) error {
		return stream.Send(&mcpv1.CallToolStreamResponse{Event: &mcpv1.CallToolStreamResponse_Progress{Progress: p}})
	})
	if err != nil {
		return err
	}
	return stream.Send(&mcpv1.CallToolStreamResponse{Event: &mcpv1.CallToolStreamResponse_Result{Result: res}})
}

// Session implements McpService: each client message is one request, answered in order.
func (s *Server) Session(stream grpc.BidiStreamingServer[mcpv1.SessionRequest, mcpv1.SessionResponse]) error {
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		id := req.GetRequestId()
		out := &mcpv1.SessionResponse{RequestId: id}
		switch r := req.GetRequest().(type) {
		case *mcpv1.SessionRequest_CallTool:
			res, err := s.call(stream.Context(), r.CallTool, func(p *mcpv1.Progress) error {
				return stream.Send(&mcpv1.SessionResponse{RequestId: id, Response: &mcpv1.SessionResponse_Progress{Progress: p}})
			})
			if err != nil {
				st, _ := status.FromError(err)
				out.Response = &mcpv1.SessionResponse_Error{Error: &mcpv1.Error{Code: int32(st.Code()), Message: st.Message()}}
			} else {
				out.Response = &mcpv1.SessionResponse_CallTool{CallTool: res}
			}
		case *mcpv1.SessionRequest_ListTools:
			out.Response = &mcpv1.SessionResponse_ListTools{ListTools: &mcpv1.ListToolsResponse{Tools: tools}}
		default:
			out.Response = &mcpv1.SessionResponse_Error{Error: &mcpv1.Error{Code: int32(codes.Unimplemented), Message: fmt.Sprintf("%T is not served", r)}}
		}
		if err := stream.Send(out); err != nil {
			return err
		}
	}
}

// call runs one tool; progress, if set, receives slow_report's notifications.
func (s *Server) call(ctx context.Context, req *mcpv1.CallToolRequest, progress func(*mcpv1.Progress) error) (*mcpv1.CallToolResponse, error) {
	args := req.GetArguments().AsMap()
	s.record(ctx, req.GetName(), args)
	str := func(k string) string { v, _ := args[k].(string); return v }
	switch req.GetName() {
	case mcpapp.ToolGetInventory:
		s.mu.Lock()
		q, ok := s.inventory[str("product_id")]
		s.mu.Unlock()
		if !ok {
			return result(fmt.Sprintf("product %q not found", str("product_id")), nil, true), nil
		}
		return result(fmt.Sprintf("%s: %d in stock", str("product_id"), q), map[string]any{"product_id": str("product_id"), "quantity": q}, false), nil
	case mcpapp.ToolDeleteProduct:
		s.mu.Lock()
		_, ok := s.inventory[str("product_id")]
		delete(s.inventory, str("product_id"))
		s.mu.Unlock()
		return result("deleted", map[string]any{"product_id": str("product_id"), "deleted": ok}, false), nil
	case mcpapp.ToolGetCustomer:
		c := mcpapp.CustomerFor(str("id"))
		return result(c.Name, map[string]any{"name": c.Name, "email": c.Email, "ssn": c.SSN}, false), nil
	case mcpapp.ToolListItems:
		s.mu.Lock()
		items := slices.Sorted(maps.Keys(s.inventory))
		s.mu.Unlock()
		list := make([]any, len(items))
		for i, it := range items {
			list[i] = it
		}
		return result(fmt.Sprintf("%d items", len(items)), map[string]any{"items": list}, false), nil
	case mcpapp.ToolSlowReport:
		steps, _ := args["steps"].(float64)
		for i := range int(steps) {
			if progress == nil {
				break
			}
			if err := progress(&mcpv1.Progress{Progress: float64(i + 1), Total: steps}); err != nil {
				return nil, err
			}
		}
		return result("report ready", map[string]any{"steps": steps}, false), nil
	}
	return nil, status.Errorf(codes.NotFound, "unknown tool %q", req.GetName())
}

func result(text string, structured map[string]any, isError bool) *mcpv1.CallToolResponse {
	r := &mcpv1.CallToolResponse{Content: []*mcpv1.Content{{Type: "text", Text: text}}, IsError: isError}
	if structured != nil {
		r.StructuredContent, _ = structpb.NewStruct(structured)
	}
	return r
}
