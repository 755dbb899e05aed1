//go:build integration

package integration

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// A server that marks its tool list public (cacheScope "public", ttlMs 60000, as the Go
// SDK's SetCacheable lets it): the list mcpgate filtered for this caller reaches the
// agent marked "private", its TTL kept, and its HTTP response says private, no-store.
func TestFilteredListIsPrivate(t *testing.T) {
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true,
		Cacheable: func(_ context.Context, _ mcp.Request, c *mcp.Cacheable) { c.CacheScope, c.TTLMs = "public", 60000 }})
	startMeshWith(t, m, "disabled", nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	direct, err := mcpapp.Connect(ctx, m.app.Endpoint(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	res, err := direct.Session.ListTools(ctx, nil)
	if err != nil || res.CacheScope != "public" || len(res.Tools) != 5 {
		t.Fatalf("the server itself: %v scope %q, %d tools, protocol %s", err, res.GetCacheScope(), len(res.Tools), direct.ProtocolVersion())
	}

	s := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
	res, err = s.Session.ListTools(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.CacheScope != "private" || res.TTLMs != 60000 || len(res.Tools) != 4 {
		t.Errorf("through mcpgate: cacheScope %q ttlMs %d, %d tools; want private, 60000, 4 (delete_product filtered)", res.CacheScope, res.TTLMs, len(res.Tools))
	}
	calls := m.app.RequestsFor("tools/list")
	if len(calls) < 2 {
		t.Fatalf("the server saw %d tools/list", len(calls))
	}

	// On the wire, the HTTP response of the filtered list.
	req := mcpPost(t, m.invokeURL, m.token(t, nil), `{"jsonrpc":"2.0","id":7,"method":"tools/list"}`)
	req.Header.Set("Mcp-Protocol-Version", s.ProtocolVersion())
	req.Header.Set("Mcp-Method", "tools/list")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if cc := resp.Header.Get("Cache-Control"); resp.StatusCode != 200 || !strings.Contains(cc, "private") || !strings.Contains(cc, "no-store") {
		t.Errorf("HTTP %d Cache-Control %q, want private, no-store", resp.StatusCode, cc)
	}
}
