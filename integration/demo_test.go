//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// envoyCheck builds the CheckRequest the inventory sidecar's Envoy sends for a request to
// the MCP route: the peer's SPIFFE ID as source.principal, headers lower-cased with
// pseudo-headers, and the route's context extensions.
func envoyCheck(principal, method, path string, headers map[string]string) *authv3.CheckRequest {
	h := map[string]string{":method": method, ":path": path, ":authority": "inventory-envoy:15006", ":scheme": "https",
		"content-type": "application/json", "accept": "application/json, text/event-stream", "x-request-id": "demo"}
	for k, v := range headers {
		h[k] = v
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: principal},
		Destination: &authv3.AttributeContext_Peer{
			Principal: "spiffe://example.org/ns/default/inventory",
		},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "demo", Method: method, Path: path, Host: "inventory-envoy:15006", Scheme: "https", Protocol: "HTTP/1.1", Headers: h,
		}},
		ContextExtensions: map[string]string{"app_id": "inventory"},
	}}
}

// outcome summarizes a CheckResponse the way Envoy acts on it.
type outcome struct {
	status     int
	reason     string
	detail     string
	decisionID string
	www        string
	caller     string
}

func summarize(resp *authv3.CheckResponse) outcome {
	var o outcome
	headerMap := func(hs []*corev3.HeaderValueOption) map[string]string {
		m := map[string]string{}
		for _, h := range hs {
			m[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
		}
		return m
	}
	if ok := resp.GetOkResponse(); ok != nil {
		h := headerMap(ok.GetHeaders())
		o.status, o.reason, o.decisionID, o.caller = 200, "allowed", h["x-mcpgate-decision-id"], h["x-mcpgate-caller-app-id"]
		return o
	}
	d := resp.GetDeniedResponse()
	h := headerMap(d.GetHeaders())
	var body struct {
		Error      string `json:"error"`
		Reason     string `json:"reason"`
		DecisionID string `json:"decision_id"`
	}
	if err := json.Unmarshal([]byte(d.GetBody()), &body); err != nil {
		o.detail = "(denial body is not JSON: " + err.Error() + ")"
	}
	if body.DecisionID != h["x-mcpgate-decision-id"] {
		o.detail += " (decision id differs between body and header)"
	}
	o.status, o.reason, o.detail = int(d.GetStatus().GetCode()), resp.GetStatus().GetMessage(), body.Reason
	o.decisionID, o.www = h["x-mcpgate-decision-id"], h["www-authenticate"]
	return o
}

// TestDemo is `make demo`: the demo policy served by the real binary, a scripted series
// of checks as Envoy sends them, a live policy edit and a refused broken edit. It prints
// a transcript between === TRANSCRIPT and === END, and asserts every outcome.
func TestDemo(t *testing.T) {
	iss := bearertest.NewIssuer(t)
	dir := copyDemo(t, iss.URL(), iss.JWKSURL())
	g := startGate(t, dir)

	tok := func(overrides map[string]any) string {
		claims := map[string]any{
			"iss": iss.URL(), "sub": "alice@example.com", "aud": "https://inventory.example.com/mcp", "azp": "my-agent",
			"scope": "mcp:tools inventory:read", "exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix(),
		}
		for k, v := range overrides {
			claims[k] = v
		}
		return "Bearer " + iss.Mint(t, claims)
	}
	const (
		agent    = "spiffe://example.org/ns/default/my-agent"
		stranger = "spiffe://example.org/ns/default/stranger"
		foreign  = "spiffe://evil.example/ns/default/my-agent"
	)

	var out strings.Builder
	_, status := g.get(t, "/readyz")
	var ready struct{ Version string }
	_ = json.Unmarshal([]byte(status), &ready)
	fmt.Fprintf(&out, "mcpgate serving testdata/demo (policy version %s); each line is one ext_authz Check\n", ready.Version)
	fmt.Fprintf(&out, "as the inventory app's Envoy sidecar sends it for POST /mcp.\n\n")

	step := 0
	run := func(what string, req *authv3.CheckRequest, wantStatus int, wantReason string) outcome {
		t.Helper()
		step++
		o := summarize(g.check(t, req))
		verdict := "ALLOW"
		if o.status != 200 {
			verdict = "DENY "
		}
		fmt.Fprintf(&out, "%2d. %-58s %s %d  %-22s decision %s\n", step, what, verdict, o.status, o.reason, shortID(o.decisionID))
		if o.detail != "" {
			fmt.Fprintf(&out, "      why: %s\n", o.detail)
		}
		if o.www != "" {
			fmt.Fprintf(&out, "      WWW-Authenticate: %s\n", o.www)
		}
		if o.status != 200 && (o.detail == "" || strings.Contains(o.detail, "(denial body") || strings.Contains(o.detail, "(decision id differs")) {
			t.Errorf("step %d (%s): denial without a readable reason: %q", step, what, o.detail)
		}
		if o.status != wantStatus || o.reason != wantReason {
			t.Errorf("step %d (%s): got %d %s (%s), want %d %s", step, what, o.status, o.reason, o.detail, wantStatus, wantReason)
		}
		return o
	}

	ok := run("my-agent, corp token with mcp:tools", envoyCheck(agent, "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 200, "allowed")
	if ok.caller != "my-agent" {
		t.Errorf("caller header = %q", ok.caller)
	}
	run("my-agent, no token", envoyCheck(agent, "POST", "/mcp", nil), 401, "token_missing")
	run("my-agent, expired token", envoyCheck(agent, "POST", "/mcp", map[string]string{"authorization": tok(map[string]any{"exp": time.Now().Add(-time.Hour).Unix()})}), 401, "token_expired")
	run("my-agent, token for another audience", envoyCheck(agent, "POST", "/mcp", map[string]string{"authorization": tok(map[string]any{"aud": "api://billing"})}), 401, "token_wrong_audience")
	run("my-agent, token without the mcp:tools scope", envoyCheck(agent, "POST", "/mcp", map[string]string{"authorization": tok(map[string]any{"scope": "inventory:read"})}), 403, "insufficient_scope")
	run("my-agent, token in the query string", envoyCheck(agent, "POST", "/mcp?access_token=x", nil), 401, "token_in_query")
	run("stranger (not in accessControl), valid token", envoyCheck(stranger, "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 403, "access_denied")
	run("my-agent from another trust domain", envoyCheck(foreign, "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 403, "foreign_trust_domain")
	run("no client certificate (mtls: strict)", envoyCheck("", "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 403, "no_identity")

	// Per-tool decisions: ext_authz admits the caller, ext_proc decides on the body.
	fmt.Fprintf(&out, "\n-- MCP calls from my-agent: ext_authz admits the caller, then ext_proc decides on the JSON-RPC body\n")
	mcpStep := func(what, body, serverResponse string, want func(o mcpOutcome) string) mcpOutcome {
		t.Helper()
		step++
		o := g.mcpPost(t, agent, tok(nil), body, serverResponse)
		verdict := "FORWARDED"
		if o.forwarded == "" {
			verdict = "ANSWERED "
		}
		fmt.Fprintf(&out, "%2d. %-58s %s HTTP %d  decision %s\n", step, what, verdict, o.status, shortID(o.decisionID))
		fmt.Fprintf(&out, "      client gets: %s\n", clip(o.body, 150))
		if o.forwarded != "" && o.forwarded != body {
			fmt.Fprintf(&out, "      server got (rewritten): %s\n", clip(o.forwarded, 150))
		}
		if problem := want(o); problem != "" {
			t.Errorf("step %d (%s): %s; outcome %+v", step, what, problem, o)
		}
		return o
	}
	result := `{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"42 in stock"}]}}`
	mcpStep("tools/call get_inventory {product_id: SKU-42}", toolCall(1, "get_inventory", `{"product_id":"SKU-42"}`), result,
		func(o mcpOutcome) string {
			return expect(o.forwarded != "" && o.body == result, "want it forwarded and answered by the server")
		})
	mcpStep("tools/call get_inventory {product_id: \"42; drop\"} (Rego)", toolCall(2, "get_inventory", `{"product_id":"42; drop"}`), "",
		func(o mcpOutcome) string {
			return expect(o.forwarded == "" && strings.Contains(o.body, "product_id must look like SKU-<digits>") && strings.Contains(o.body, `"id":2`), "want a JSON-RPC error with Rego's reason")
		})
	mcpStep("tools/call delete_product (rule no-deletes)", toolCall(3, "delete_product", `{"product_id":"SKU-1"}`), "",
		func(o mcpOutcome) string {
			return expect(o.forwarded == "" && strings.Contains(o.body, `denied by rule \"no-deletes\"`) && strings.Contains(o.body, "-32001"), "want denial by rule")
		})
	mcpStep("tools/call list_items {limit: 500} (Rego patch)", toolCall(4, "list_items", `{"limit":500}`), `{"jsonrpc":"2.0","id":4,"result":{"content":[]}}`,
		func(o mcpOutcome) string {
			return expect(strings.Contains(o.forwarded, `"limit":100`), "want limit rewritten to 100")
		})
	listResp := `{"jsonrpc":"2.0","id":5,"result":{"tools":[{"name":"get_inventory","inputSchema":{"type":"object"}},{"name":"delete_product","inputSchema":{"type":"object"}},{"name":"list_items","inputSchema":{"type":"object"}},{"name":"get_customer","inputSchema":{"type":"object"}},{"name":"admin_reset","inputSchema":{"type":"object"}}]}}`
	mcpStep("tools/list (server offers 5 tools)", `{"jsonrpc":"2.0","id":5,"method":"tools/list"}`, listResp,
		func(o mcpOutcome) string {
			return expect(strings.Contains(o.body, "get_inventory") && strings.Contains(o.body, "list_items") && strings.Contains(o.body, "get_customer") &&
				!strings.Contains(o.body, "delete_product") && !strings.Contains(o.body, "admin_reset"), "want only the 3 callable tools")
		})
	custResp := `{"jsonrpc":"2.0","id":6,"result":{"structuredContent":{"name":"Ann","ssn":"123-45-6789"},"content":[{"type":"text","text":"{\"name\":\"Ann\",\"ssn\":\"123-45-6789\"}"}]}}`
	mcpStep("tools/call get_customer (ssn redacted)", toolCall(6, "get_customer", `{"id":"c1"}`), custResp,
		func(o mcpOutcome) string {
			return expect(!strings.Contains(o.body, "123-45-6789") && strings.Contains(o.body, "Ann"), "want ssn removed, name kept")
		})

	// A live edit: allow stranger. The watcher applies it without a restart.
	policyFile := filepath.Join(dir, "inventory.yaml")
	replaceInFile(t, policyFile, "        - appId: my-agent\n", "        - appId: stranger\n          defaultAction: allow\n        - appId: my-agent\n")
	requireEventually(t, 5*time.Second, "the edit to be applied", func() bool {
		return g.logs.count(msgIs("policy applied")) >= 1
	})
	_, status = g.get(t, "/readyz")
	_ = json.Unmarshal([]byte(status), &ready)
	fmt.Fprintf(&out, "\n-- edit inventory.yaml: add {appId: stranger, defaultAction: allow}; applied live, version %s\n", ready.Version)
	run("stranger again, valid token", envoyCheck(stranger, "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 200, "allowed")

	// A broken edit: refused, the last good policy keeps serving, /readyz says why.
	replaceInFile(t, policyFile, "    path: /mcp\n", "    path: /mcp\n    pathh: /typo\n")
	var readyz struct {
		Ready     bool   `json:"ready"`
		Version   string `json:"version"`
		LastError string `json:"last_error"`
	}
	requireEventually(t, 5*time.Second, "the broken edit to be refused", func() bool {
		code, body := g.get(t, "/readyz")
		_ = json.Unmarshal([]byte(body), &readyz)
		return code == http.StatusOK && readyz.LastError != ""
	})
	fmt.Fprintf(&out, "\n-- edit inventory.yaml with a typo (pathh:); refused, still serving version %s\n", readyz.Version)
	fmt.Fprintf(&out, "      /readyz last_error: %s\n", strings.ReplaceAll(readyz.LastError, dir+"/", ""))
	if !strings.Contains(readyz.LastError, `inventory.yaml:`) || !strings.Contains(readyz.LastError, `unknown field "pathh"`) {
		t.Errorf("readyz last_error = %q, want file:line and the unknown field", readyz.LastError)
	}
	if readyz.Version != ready.Version {
		t.Errorf("a refused edit changed the version: %s → %s", ready.Version, readyz.Version)
	}
	run("stranger, under the last good policy", envoyCheck(stranger, "POST", "/mcp", map[string]string{"authorization": tok(nil)}), 200, "allowed")

	_, metrics := g.get(t, "/metrics")
	for _, want := range []string{`mcpgate_policy_reloads_total{result="rejected"} 1`, `mcpgate_authz_decisions_total{`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	fmt.Fprintf(&out, "\n/metrics: %d decision series; decision log lines: %d\n",
		strings.Count(metrics, "\nmcpgate_authz_decisions_total{"), g.logs.count(func(m map[string]any) bool { return m["logger"] == "decision" }))
	g.stop(t)
	fmt.Printf("=== TRANSCRIPT (mcpgate as the inventory sidecar calls it, mtls: strict)\n%s=== END\n", out.String())
}

func expect(ok bool, problem string) string {
	if ok {
		return ""
	}
	return problem
}

func shortID(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
