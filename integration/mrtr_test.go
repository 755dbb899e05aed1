//go:build integration

package integration

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// seenRetry is what the MRTR tool's handler received on one call.
type seenRetry struct {
	ProductID    string
	RequestState string
	Responses    []string
}

// Multi round-trip requests (MCP 2026-07-28, SEP-2322) through the mesh, the Go SDK on
// both sides (a stateless server, so the session speaks 2026-07-28): the input_required
// result reaches the agent with its inputRequests and requestState untouched, the retry
// reaches the server with inputResponses and requestState untouched and is decided
// again from scratch: a retry that changes an allowed argument into a denied one is
// denied, and the server never sees it.
func TestMultiRoundTripThroughTheMesh(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, Stateless: true})
	var mu sync.Mutex
	var seen []seenRetry
	m.app.MCPServer().AddTool(&mcp.Tool{Name: mcpapp.ToolGetInventory, Description: "Stock level of a product, after a confirmation.",
		InputSchema: map[string]any{"type": "object", "properties": map[string]any{"product_id": map[string]any{"type": "string"}}}},
		func(_ context.Context, req *mcp.CallToolRequest) (*mcp.CallToolResult, error) {
			var args struct {
				ProductID string `json:"product_id"`
			}
			_ = json.Unmarshal(req.Params.Arguments, &args)
			s := seenRetry{ProductID: args.ProductID, RequestState: req.Params.RequestState}
			for k := range req.Params.InputResponses {
				s.Responses = append(s.Responses, k)
			}
			mu.Lock()
			seen = append(seen, s)
			mu.Unlock()
			if _, ok := req.Params.InputResponses["confirm"]; !ok {
				return &mcp.CallToolResult{
					InputRequests: mcp.InputRequestMap{"confirm": &mcp.ElicitParams{Message: "Look up " + args.ProductID + "?",
						RequestedSchema: map[string]any{"type": "object", "properties": map[string]any{"ok": map[string]any{"type": "boolean"}}}}},
					RequestState: "state:" + args.ProductID,
				}, nil
			}
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: args.ProductID + ": 42 in stock"}}}, nil
		})
	startMeshWith(t, m, "disabled", nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := mcpapp.ConnectWith(ctx, mcpapp.ConnectOptions{Endpoint: m.invokeURL, ManualMultiRoundTrip: true,
		Headers: map[string]string{"Authorization": m.token(t, nil)}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v := s.ProtocolVersion(); v < "2026-07-28" {
		t.Fatalf("the session speaks %s, want 2026-07-28 or later", v)
	}

	first, err := s.Session.CallTool(ctx, &mcp.CallToolParams{Name: mcpapp.ToolGetInventory, Arguments: map[string]any{"product_id": "SKU-42"}})
	if err != nil {
		t.Fatal(err)
	}
	if !first.NeedsInput() || first.RequestState != "state:SKU-42" || first.InputRequests["confirm"] == nil {
		t.Fatalf("the input_required result through mcpgate: needsInput %v state %q requests %v", first.NeedsInput(), first.RequestState, first.InputRequests)
	}
	if ep, ok := first.InputRequests["confirm"].(*mcp.ElicitParams); !ok || ep.Message != "Look up SKU-42?" {
		t.Errorf("the input request: %#v", first.InputRequests["confirm"])
	}
	confirm := mcp.InputResponseMap{"confirm": &mcp.ElicitResult{Action: "accept", Content: map[string]any{"ok": true}}}

	// The retry with the same, allowed arguments.
	done, err := s.Session.CallTool(ctx, &mcp.CallToolParams{Name: mcpapp.ToolGetInventory, Arguments: map[string]any{"product_id": "SKU-42"},
		InputResponses: confirm, RequestState: first.RequestState})
	if err != nil || done.NeedsInput() || len(done.Content) != 1 || done.Content[0].(*mcp.TextContent).Text != "SKU-42: 42 in stock" {
		t.Fatalf("the retry: %v %+v", err, done)
	}

	// A retry whose argument the policy denies (Rego: product_id must look like
	// SKU-<digits>) is denied, whatever the first round trip allowed.
	_, err = s.Session.CallTool(ctx, &mcp.CallToolParams{Name: mcpapp.ToolGetInventory, Arguments: map[string]any{"product_id": "42; drop"},
		InputResponses: confirm, RequestState: first.RequestState})
	if err == nil || !strings.Contains(err.Error(), "product_id must look like SKU-<digits>") {
		t.Fatalf("a retry with a denied argument: %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 {
		t.Fatalf("the server handled %d calls, want 2 (the denied retry must not reach it): %+v", len(seen), seen)
	}
	if r := seen[1]; r.RequestState != "state:SKU-42" || strings.Join(r.Responses, ",") != "confirm" {
		t.Errorf("the retry reached the server as %+v, want requestState and inputResponses untouched", r)
	}
}
