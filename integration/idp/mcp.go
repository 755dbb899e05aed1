package idp

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/modelcontextprotocol/go-sdk/auth"
	"github.com/modelcontextprotocol/go-sdk/mcp"
)

// ProtectedMCP is a remote MCP server on the official Go SDK behind the SDK's own bearer
// middleware (auth.RequireBearerToken): it serves only requests whose token the
// authorization server signed for its audience. Its one tool, whoami, says whose token
// it got.
type ProtectedMCP struct {
	url, addr string

	mu      sync.Mutex
	headers []http.Header
}

// StartProtectedMCP serves Streamable HTTP at /mcp/ on 127.0.0.1 until the test ends.
func StartProtectedMCP(t testing.TB, s *Server, audience string) *ProtectedMCP {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys, err := jwk.Fetch(ctx, s.JWKSURL())
	if err != nil {
		t.Fatalf("fetch the authorization server's keys: %v", err)
	}
	verify := func(_ context.Context, token string, _ *http.Request) (*auth.TokenInfo, error) {
		tok, err := jwt.Parse([]byte(token), jwt.WithKeySet(keys), jwt.WithIssuer(s.Issuer()), jwt.WithAudience(audience), jwt.WithValidate(true))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", auth.ErrInvalidToken, err)
		}
		sub, _ := tok.Subject()
		exp, _ := tok.Expiration()
		aud, _ := tok.Audience()
		var scope string
		_ = tok.Get("scope", &scope)
		return &auth.TokenInfo{UserID: sub, Expiration: exp, Scopes: strings.Fields(scope),
			Extra: map[string]any{"aud": strings.Join(aud, " "), "scope": scope}}, nil
	}
	server := mcp.NewServer(&mcp.Implementation{Name: "remote-mcp", Version: "v1.0.0"}, nil)
	mcp.AddTool(server, &mcp.Tool{Name: "whoami", Description: "Whose token the server received"},
		func(_ context.Context, req *mcp.CallToolRequest, _ struct{}) (*mcp.CallToolResult, any, error) {
			ti := req.Extra.TokenInfo
			if ti == nil {
				return nil, nil, fmt.Errorf("no token info")
			}
			text := fmt.Sprintf("sub=%s aud=%v scope=%v", ti.UserID, ti.Extra["aud"], ti.Extra["scope"])
			return &mcp.CallToolResult{Content: []mcp.Content{&mcp.TextContent{Text: text}}}, nil, nil
		})
	handler := mcp.NewStreamableHTTPHandler(func(*http.Request) *mcp.Server { return server }, nil)
	p := &ProtectedMCP{}
	mux := http.NewServeMux()
	mux.Handle("/mcp/", auth.RequireBearerToken(verify, &auth.RequireBearerTokenOptions{})(handler))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = lis.Addr().String()
	p.url = "http://" + p.addr + "/mcp/"
	srv := &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.mu.Lock()
		p.headers = append(p.headers, r.Header.Clone())
		p.mu.Unlock()
		mux.ServeHTTP(w, r)
	})}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { _ = srv.Close() })
	return p
}

// URL is the server's MCP endpoint.
func (p *ProtectedMCP) URL() string { return p.url }

// Addr is its host:port.
func (p *ProtectedMCP) Addr() string { return p.addr }

// Headers are every request's headers, in order.
func (p *ProtectedMCP) Headers() []http.Header {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.headers)
}

// Authorizations are the Authorization header of every request received, in order (""
// for none).
func (p *ProtectedMCP) Authorizations() []string {
	var out []string
	for _, h := range p.Headers() {
		out = append(out, h.Get("Authorization"))
	}
	return out
}
