//go:build integration

package integration

import (
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// browserOrigin is the web app of TestCORS's policy.
const browserOrigin = "https://app.example.com"

// TestCORS drives inventory (which requires a bearer token) as a browser-based MCP
// client does, through the emulated sidecars, with spec.mcp.cors naming one origin
// (issue 19): the preflight, sent without credentials, is answered by Envoy's CORS
// filter from policy and reaches neither ext_authz nor the server; a preflight from
// another origin is refused as before; the real requests carry the Access-Control-*
// headers and are decided exactly as without an Origin.
func TestCORS(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "    path: /mcp\n",
			"    path: /mcp\n    cors:\n      allowOrigins: ["+browserOrigin+"]\n      allowCredentials: true\n")
	})
	client := &http.Client{Timeout: 20 * time.Second}
	send := func(t *testing.T, req *http.Request) (*http.Response, string) {
		t.Helper()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}
	preflight := func(t *testing.T, origin string) *http.Response {
		t.Helper()
		req, err := http.NewRequest(http.MethodOptions, m.invokeURL, nil)
		if err != nil {
			t.Fatal(err)
		}
		// Exactly what a browser sends before a credentialed Streamable HTTP POST.
		req.Header.Set("Origin", origin)
		req.Header.Set("Access-Control-Request-Method", "POST")
		req.Header.Set("Access-Control-Request-Headers", "content-type, accept, mcp-protocol-version, mcp-session-id, authorization, last-event-id")
		resp, _ := send(t, req)
		return resp
	}
	// Checks of OPTIONS requests in mcpgate's decision log: ext_authz saw a preflight.
	optionsChecks := func() int {
		return m.gate.logs.count(func(l map[string]any) bool { return l["logger"] == "decision" && l["method"] == http.MethodOptions })
	}
	optionsAtServer := func() int {
		n := 0
		for _, r := range m.app.Requests() {
			if r.Method == http.MethodOptions {
				n++
			}
		}
		return n
	}

	t.Run("preflight from an allowed origin", func(t *testing.T) {
		resp := preflight(t, browserOrigin)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("preflight: HTTP %d, want 200 from Envoy's CORS filter", resp.StatusCode)
		}
		for k, want := range map[string]string{
			"Access-Control-Allow-Origin":      browserOrigin,
			"Access-Control-Allow-Methods":     "GET,POST,DELETE,OPTIONS",
			"Access-Control-Allow-Headers":     "content-type,accept,authorization,mcp-protocol-version,mcp-session-id,last-event-id,mcp-method,mcp-name",
			"Access-Control-Max-Age":           "600",
			"Access-Control-Allow-Credentials": "true",
		} {
			if got := resp.Header.Get(k); got != want {
				t.Errorf("%s = %q, want %q", k, got, want)
			}
		}
		if n := optionsChecks(); n != 0 {
			t.Errorf("ext_authz decided %d OPTIONS requests: the preflight must not reach it", n)
		}
		if n := optionsAtServer(); n != 0 {
			t.Errorf("the MCP server received %d OPTIONS requests", n)
		}
	})

	t.Run("preflight from another origin", func(t *testing.T) {
		resp := preflight(t, "https://evil.example.com")
		if resp.StatusCode == http.StatusOK {
			t.Errorf("preflight from another origin: HTTP 200, want it refused")
		}
		for _, k := range []string{"Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Headers", "Access-Control-Allow-Credentials"} {
			if v := resp.Header.Get(k); v != "" {
				t.Errorf("%s = %q, want none", k, v)
			}
		}
		// It went on down the chain, where ext_authz refused it for want of a token.
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("HTTP %d, want ext_authz's 401", resp.StatusCode)
		}
		requireEventually(t, 5*time.Second, "ext_authz's decision on the OPTIONS request", func() bool { return optionsChecks() == 1 })
		if n := optionsAtServer(); n != 0 {
			t.Errorf("the MCP server received %d OPTIONS requests", n)
		}
	})

	t.Run("TypeScript SDK client with an Origin", func(t *testing.T) {
		before := m.app.CallsTo("get_inventory")
		steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil), "Origin": browserOrigin},
			`[{"op":"list"},{"op":"call","name":"get_inventory","arguments":{"product_id":"SKU-42"}},{"op":"call","name":"delete_product","arguments":{"product_id":"SKU-42"}}]`)
		if len(steps) != 4 || !steps[0].OK {
			t.Fatalf("steps = %+v", steps)
		}
		if !slices.Contains(steps[1].Tools, "get_inventory") || slices.Contains(steps[1].Tools, "delete_product") {
			t.Errorf("listed %v", steps[1].Tools)
		}
		if !steps[2].OK || m.app.CallsTo("get_inventory") != before+1 {
			t.Errorf("get_inventory = %+v", steps[2])
		}
		// A denied tool stays denied with an Origin.
		if steps[3].OK || steps[3].Error == nil || !strings.Contains(steps[3].Error.Message, "no-deletes") || m.app.CallsTo("delete_product") != 0 {
			t.Errorf("delete_product = %+v", steps[3])
		}
		var withOrigin int
		for _, r := range m.app.Requests() {
			if r.Header.Get("Origin") == browserOrigin {
				withOrigin++
			}
		}
		if withOrigin == 0 {
			t.Errorf("no request reached the server with Origin %s: the test did not exercise a cross-origin call", browserOrigin)
		}
	})

	t.Run("POST with an Origin", func(t *testing.T) {
		req := mcpPost(t, m.invokeURL, m.token(t, nil), initialize)
		req.Header.Set("Origin", browserOrigin)
		resp, body := send(t, req)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Mcp-Session-Id") == "" {
			t.Fatalf("initialize: HTTP %d, Mcp-Session-Id %q: %s", resp.StatusCode, resp.Header.Get("Mcp-Session-Id"), body)
		}
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != browserOrigin {
			t.Errorf("Access-Control-Allow-Origin = %q, want %q", got, browserOrigin)
		}
		if got := resp.Header.Get("Access-Control-Allow-Credentials"); got != "true" {
			t.Errorf("Access-Control-Allow-Credentials = %q", got)
		}
		if got := resp.Header.Get("Access-Control-Expose-Headers"); !slices.Contains(strings.Split(got, ","), "mcp-session-id") {
			t.Errorf("Access-Control-Expose-Headers = %q, want mcp-session-id among them", got)
		}
	})

	t.Run("the preflight grants nothing", func(t *testing.T) {
		if resp := preflight(t, browserOrigin); resp.StatusCode != http.StatusOK {
			t.Fatalf("preflight: HTTP %d", resp.StatusCode)
		}
		req := mcpPost(t, m.invokeURL, "", initialize)
		req.Header.Set("Origin", browserOrigin)
		resp, _ := send(t, req)
		if resp.StatusCode != http.StatusUnauthorized || !strings.Contains(resp.Header.Get("Www-Authenticate"), "resource_metadata=") {
			t.Fatalf("POST without a token after a preflight: HTTP %d, WWW-Authenticate %q, want 401 with the challenge",
				resp.StatusCode, resp.Header.Get("Www-Authenticate"))
		}
		// The 401 is ext_authz's local reply, encoded through the CORS filter: a browser
		// client may read it and its challenge.
		if got := resp.Header.Get("Access-Control-Allow-Origin"); got != browserOrigin {
			t.Errorf("401: Access-Control-Allow-Origin = %q, want %q", got, browserOrigin)
		}
		if got := resp.Header.Get("Access-Control-Expose-Headers"); !slices.Contains(strings.Split(got, ","), "www-authenticate") {
			t.Errorf("401: Access-Control-Expose-Headers = %q, want www-authenticate among them", got)
		}
		if n := optionsAtServer(); n != 0 {
			t.Errorf("the MCP server received %d OPTIONS requests", n)
		}
	})

	t.Run("the metadata document is readable cross-origin", func(t *testing.T) {
		// Where the 401's challenge points a browser client to discover the authorization
		// server; Envoy answers it itself, so the CORS filter does not, and the route says
		// it: any origin, no credentials.
		resp, _ := send(t, mcpPost(t, m.invokeURL, "", initialize))
		raw := strings.SplitN(strings.SplitN(resp.Header.Get("Www-Authenticate"), `resource_metadata="`, 2)[1], `"`, 2)[0]
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		docURL := "http://" + m.agent.Listener("outbound") + "/v1.0/invoke/inventory/method" + u.Path
		req, _ := http.NewRequest(http.MethodOptions, docURL, nil)
		req.Header.Set("Origin", browserOrigin)
		req.Header.Set("Access-Control-Request-Method", "GET")
		req.Header.Set("Access-Control-Request-Headers", "mcp-protocol-version")
		pre, _ := send(t, req)
		if pre.StatusCode != http.StatusOK || pre.Header.Get("Access-Control-Allow-Origin") != "*" ||
			!slices.Contains(strings.Split(pre.Header.Get("Access-Control-Allow-Headers"), ","), "mcp-protocol-version") {
			t.Fatalf("preflight of the metadata document: HTTP %d %v", pre.StatusCode, pre.Header)
		}
		req, _ = http.NewRequest(http.MethodGet, docURL, nil)
		req.Header.Set("Origin", browserOrigin)
		req.Header.Set("MCP-Protocol-Version", "2025-11-25")
		doc, body := send(t, req)
		if doc.StatusCode != http.StatusOK || !strings.Contains(body, `"authorization_servers"`) || doc.Header.Get("Access-Control-Allow-Origin") != "*" ||
			doc.Header.Get("Access-Control-Allow-Credentials") != "" {
			t.Fatalf("metadata document: HTTP %d %v %s", doc.StatusCode, doc.Header, body)
		}
	})
}
