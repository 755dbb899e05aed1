//go:build integration

package integration

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// Mcp-Param-* headers (MCP 2026-07-28) through the mesh with the Go SDK on both sides: the
// server annotates get_inventory's product_id (Product) and list_items' limit (Limit), the
// client mirrors them after listing, and the SDK server refuses any request whose headers
// disagree with its body. mcpgate learns the annotations from the list it passes, keeps
// the validated headers, rewrites Mcp-Param-Limit when the demo's Rego patch caps limit
// (otherwise the server would refuse the patched call), and answers a request whose
// header lies about its body with 400 and -32020 before the server sees it.
func TestParamHeadersThroughTheMesh(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, Stateless: true, ParamHeaders: true})
	startMeshWith(t, m, "disabled", nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := mcpapp.ConnectWith(ctx, mcpapp.ConnectOptions{Endpoint: m.invokeURL, Headers: map[string]string{"Authorization": m.token(t, nil)}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v := s.ProtocolVersion(); v < "2026-07-28" {
		t.Fatalf("the session speaks %s, want 2026-07-28 or later", v)
	}
	if _, err := s.Session.ListTools(ctx, nil); err != nil {
		t.Fatal(err)
	}

	res, err := s.Session.CallTool(ctx, &mcp.CallToolParams{Name: mcpapp.ToolGetInventory, Arguments: map[string]any{"product_id": "SKU-42"}})
	if err != nil || res.IsError {
		t.Fatalf("get_inventory: %v %s", err, mcpapp.Text(res))
	}
	res, err = s.Session.CallTool(ctx, &mcp.CallToolParams{Name: mcpapp.ToolListItems, Arguments: map[string]any{"limit": 500}})
	if err != nil || res.IsError {
		t.Fatalf("list_items with a patched limit: %v %s", err, mcpapp.Text(res))
	}
	calls := m.app.Calls()
	if len(calls) != 2 {
		t.Fatalf("the server executed %d calls, want 2", len(calls))
	}
	if h := calls[0].Header.Get("Mcp-Param-Product"); h != "SKU-42" {
		t.Errorf("get_inventory reached the server with Mcp-Param-Product %q, want SKU-42", h)
	}
	if h, limit := calls[1].Header.Get("Mcp-Param-Limit"), calls[1].Args["limit"]; h != "100" || limit != float64(100) {
		t.Errorf("list_items reached the server with limit %v and Mcp-Param-Limit %q, want 100 and 100", limit, h)
	}

	// A client whose header says another product than its body.
	req := mcpPost(t, m.invokeURL, m.token(t, nil), `{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"get_inventory","arguments":{"product_id":"SKU-42"}}}`)
	for k, v := range map[string]string{"Mcp-Protocol-Version": s.ProtocolVersion(), "Mcp-Method": "tools/call", "Mcp-Name": "get_inventory", "Mcp-Param-Product": "SKU-2"} {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(body), "-32020") || !strings.Contains(string(body), "Mcp-Param-Product does not match") ||
		resp.Header.Get("X-Mcpgate-Decision-Id") == "" {
		t.Errorf("a lying Mcp-Param-Product: HTTP %d %s (decision id %q), want mcpgate's 400 with -32020", resp.StatusCode, body, resp.Header.Get("X-Mcpgate-Decision-Id"))
	}
	if n := len(m.app.Calls()); n != 2 {
		t.Errorf("the server executed %d calls, want 2: the lying request must not reach it", n)
	}
}

// The legacy era with the official TypeScript SDK client (1.32.2, the newest on npm here,
// speaks 2025-11-25): mirror headers a client adds — here ones that lie about the body,
// naming a tool the agent may not call — are never decided on and never a -32020, and
// none of them reaches the server.
func TestLegacyMirrorHeadersWithTypeScriptClient(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true, ParamHeaders: true})
	startMeshWith(t, m, "disabled", nil, nil)
	steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil),
		"Mcp-Method": "tools/call", "Mcp-Name": "delete_product", "Mcp-Param-Product": "SKU-7"},
		`[{"op":"list"},{"op":"call","name":"get_inventory","arguments":{"product_id":"SKU-42"}}]`)
	if len(steps) != 3 || !steps[1].OK || !steps[2].OK || steps[2].Result.StructuredContent["quantity"] != float64(42) {
		t.Fatalf("steps = %+v", steps)
	}
	calls := m.app.Calls()
	if len(calls) != 1 {
		t.Fatalf("the server executed %d calls, want 1", len(calls))
	}
	if v := calls[0].Header.Get("Mcp-Protocol-Version"); v == "" || v >= "2026-07-28" {
		t.Fatalf("the TypeScript client spoke %q, want a revision before 2026-07-28", v)
	}
	for _, h := range []string{"Mcp-Method", "Mcp-Name", "Mcp-Param-Product"} {
		if v := calls[0].Header.Get(h); v != "" {
			t.Errorf("%s: %q reached the server on a legacy request", h, v)
		}
	}
}
