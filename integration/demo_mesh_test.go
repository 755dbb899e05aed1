//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/integration/otlptest"
)

var decisionInMessage = regexp.MustCompile(`\(decision ([0-9a-f]{12})[0-9a-f]*\)`)

// TestDemoMesh is the second half of `make demo`: an agent's MCP session through both
// sidecars, as a person would watch it. It asserts each outcome as it narrates it.
func TestDemoMesh(t *testing.T) {
	om := startOutboundMesh(t, time.Hour)
	m := om.mesh
	s := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
	var out strings.Builder
	fmt.Fprintf(&out, "my-agent's MCP client (official Go SDK) → my-agent's sidecar at /v1.0/invoke/inventory/method/mcp\n")
	fmt.Fprintf(&out, "  → inventory's sidecar (ext_authz + ext_proc: mcpgate) → inventory MCP server (official Go SDK)\n")
	fmt.Fprintf(&out, "  Both sidecars are programmed by mcpgate over xDS; session %s.\n\n", s.ID())

	step := 0
	line := func(what, verdict, detail string) {
		step++
		fmt.Fprintf(&out, "%2d. %-40s %-9s %s\n", step, what, verdict, detail)
	}
	authzID := func(tool string) string {
		calls := m.app.Calls()
		for i := len(calls) - 1; i >= 0; i-- {
			if calls[i].Tool == tool {
				if id := calls[i].Header.Get("x-mcpgate-decision-id"); len(id) >= 12 {
					return id[:12]
				}
			}
		}
		return "?"
	}
	denied := func(what string, err error, wantReason, tool string) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), wantReason) {
			t.Fatalf("%s: want a denial containing %q, got %v", what, wantReason, err)
		}
		id := "?"
		if m := decisionInMessage.FindStringSubmatch(err.Error()); m != nil {
			id = m[1]
		}
		if m.app.CallsTo(tool) != 0 && tool == "delete_product" {
			t.Fatalf("%s reached the server", what)
		}
		line(what, "DENIED", fmt.Sprintf("%s (decision %s); the server never saw it", wantReason, id))
	}

	names, err := s.ToolNames(callCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	if slices.Contains(names, "delete_product") || len(names) != 4 {
		t.Fatalf("tools/list = %v", names)
	}
	line("tools/list", "FILTERED", strings.Join(names, ", ")+" (the server offers delete_product too)")

	res, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"})
	if err != nil || res.IsError {
		t.Fatalf("get_inventory: %v %v", err, res)
	}
	line(`get_inventory {product_id: "SKU-42"}`, "ALLOWED", fmt.Sprintf("%q (rule readers + Rego; decision %s)", mcpapp.Text(res), authzID("get_inventory")))

	_, err = s.CallTool(callCtx(t), "delete_product", map[string]any{"product_id": "SKU-42"})
	denied(`delete_product {product_id: "SKU-42"}`, err, `denied by rule "no-deletes"`, "delete_product")

	_, err = s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "42; drop"})
	denied(`get_inventory {product_id: "42; drop"}`, err, "product_id must look like SKU-<digits>", "get_inventory")

	if _, err := s.CallTool(callCtx(t), "list_items", map[string]any{"limit": 500}); err != nil {
		t.Fatal(err)
	}
	calls := m.app.Calls()
	got := calls[len(calls)-1].Args["limit"]
	if fmt.Sprint(got) != "100" {
		t.Fatalf("server received limit %v, want 100", got)
	}
	line("list_items {limit: 500}", "REWRITTEN", fmt.Sprintf("the server received limit %v (Rego patch; decision %s)", got, authzID("list_items")))

	res, err = s.CallTool(callCtx(t), "get_customer", map[string]any{"id": "c1"})
	if err != nil || res.IsError {
		t.Fatalf("get_customer: %v %v", err, res)
	}
	b, _ := json.Marshal(res.StructuredContent)
	if strings.Contains(string(b), mcpapp.CustomerFor("c1").SSN) {
		t.Fatalf("ssn not redacted: %s", b)
	}
	line(`get_customer {id: "c1"}`, "REDACTED", fmt.Sprintf("client sees %s: ssn by responses.redact, email by Rego (token not tier gold)", b))

	call := s.CallToolWithProgress(callCtx(t), mcpapp.NewProgressToken(), "slow_report", map[string]any{"steps": 3})
	if call.Err != nil {
		t.Fatal(call.Err)
	}
	if err := call.ProgressBeforeResult(3); err != nil {
		t.Fatal(err)
	}
	var at []string
	for _, p := range call.Progress {
		at = append(at, fmt.Sprintf("%dms", p.At.Sub(call.StartedAt).Milliseconds()))
	}
	line("slow_report {steps: 3}", "STREAMED", fmt.Sprintf("progress at %s, result at %dms", strings.Join(at, ", "), call.ResultAt.Sub(call.StartedAt).Milliseconds()))

	resp, body := m.post(t, m.token(t, map[string]any{"azp": "stranger"}), initialize)
	if resp.StatusCode != 403 {
		t.Fatalf("stranger: %d", resp.StatusCode)
	}
	var denial struct {
		Reason string `json:"reason"`
	}
	_ = json.Unmarshal([]byte(body), &denial)
	line("initialize, token for App ID stranger", "HTTP 403", denial.Reason)

	resp, _ = m.post(t, "", initialize)
	if resp.StatusCode != 401 {
		t.Fatalf("no token: %d", resp.StatusCode)
	}
	line("initialize, no token", "HTTP 401", "WWW-Authenticate: "+resp.Header.Get("WWW-Authenticate"))

	// The remote MCP server github-mcp (an HTTPEndpoint; here a stand-in on loopback
	// that requires a token for its own audience). my-agent sends no credentials.
	fmt.Fprintf(&out, "\nmy-agent's MCP client → my-agent's sidecar at /v1.0/invoke/github-mcp/method/ → github-mcp (remote, official Go SDK,\n")
	fmt.Fprintf(&out, "  requires a token for %s). my-agent holds no secret and sends no Authorization header.\n\n", githubAudience)
	for range 2 {
		got := whoami(t, om.githubURL, nil)
		if !strings.Contains(got, "sub=mcpgate-github") || !strings.Contains(got, "aud="+githubAudience) {
			t.Fatalf("github-mcp saw %q", got)
		}
		line("github-mcp whoami", "ALLOWED", "the server saw "+got)
	}
	reqs := om.tokenRequests("mcpgate-github")
	if n := om.as.Count("client_credentials"); n != 1 || len(reqs) != 1 {
		t.Fatalf("%d tokens issued, %d token requests", n, len(reqs))
	}
	fmt.Fprintf(&out, "      token acquired by the sidecar's mcpgate: 1 client_credentials request (client_id %s, audience %s)\n", reqs[0].ClientID, reqs[0].Audience)
	fmt.Fprintf(&out, "      for %d requests github-mcp received, each with Authorization: Bearer <that token>\n", len(om.github.Authorizations()))

	// The same call traced: a mesh whose policy has spec.tracing (samplingRate 1) and a
	// real OTLP receiver (the OpenTelemetry Collector's otlpreceiver).
	col := otlptest.Start(t)
	tm := tracedMesh(t, col, "1")
	ts := tm.connect(t, tm.invokeURL, map[string]string{"Authorization": tm.token(t, nil)})
	if res, err := ts.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"}); err != nil || res.IsError {
		t.Fatalf("traced get_inventory: %v %v", err, res)
	}
	tt := waitTrace(t, col, 6, func(s otlptest.Span) bool {
		return s.Name == "mcpgate ext_proc" && s.Attrs["gen_ai.tool.name"] == "get_inventory"
	})
	if len(tt.roots) != 1 || tt.roots[0].Service != "my-agent-envoy" {
		t.Fatalf("the trace of get_inventory:\n%s", tt)
	}
	fmt.Fprintf(&out, "\nThe same get_inventory call with Mesh spec.tracing {samplingRate: \"1\", otlp: ...}: one trace (%s),\n", tt.roots[0].TraceID)
	fmt.Fprintf(&out, "  as the OTLP collector received it from both sidecars and mcpgate (service [kind] span  attributes):\n\n")
	for _, l := range strings.Split(strings.TrimRight(tt.String(), "\n"), "\n") {
		fmt.Fprintf(&out, "  %s\n", l)
	}

	fmt.Printf("=== TRANSCRIPT (an agent session through the sidecars)\n%s=== END\n", out.String())
}
