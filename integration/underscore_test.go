//go:build integration

package integration

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/envoy/contract"
)

// Issue 18, finding 8: a caller must not forge an identity header under a spelling the
// MCP server folds into the real one (x_mcpgate_caller_app_id, as CGI-style servers
// read it). Every listener mcpgate generates refuses header names with underscores
// (headers_with_underscores_action: REJECT_REQUEST), so such a request never reaches the
// server, through the agent's sidecar or straight at the server's.
func TestUnderscoreIdentityHeaders(t *testing.T) {
	m := startMesh(t)
	before := len(m.app.Requests())
	for _, target := range []struct{ name, url string }{
		{"agent sidecar", m.invokeURL},
		{"inventory sidecar", "http://" + m.inventory.Listener("inbound") + "/mcp"},
	} {
		for _, name := range []string{"x_mcpgate_caller_app_id", "dapr_caller_app_id", "x-mcpgate_subject"} {
			req := mcpPost(t, target.url, m.token(t, nil), initialize)
			req.Header[name] = []string{"admin"} // this exact spelling on the wire
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("%s with %s: got %d %q, want 400", target.name, name, resp.StatusCode, b)
			}
		}
	}
	if got := m.app.Requests()[before:]; len(got) != 0 {
		t.Fatalf("%d requests with a forged identity header reached the server, the first with %v", len(got), got[0].Header)
	}

	// The same request without it goes through, and the server sees only the identity
	// mcpgate verified.
	resp, body := m.post(t, m.token(t, nil), initialize)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("clean initialize: %d %q", resp.StatusCode, body)
	}
	h := m.app.LastHeader()
	if got := h.Get(contract.HeaderCallerAppID); got != "my-agent" {
		t.Errorf("the server got %s %q, want my-agent", contract.HeaderCallerAppID, got)
	}
	for k := range h {
		if strings.Contains(k, "_") {
			t.Errorf("the server got %s: %q", k, h[k])
		}
	}
}
