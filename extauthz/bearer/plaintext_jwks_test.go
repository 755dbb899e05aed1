package bearer_test

// The policy requires https for an issuer's jwksUri (http only on loopback), and the
// verifier holds a discovered jwks_uri and every redirect hop to the same rule: keys
// fetched in plaintext could be served by whoever is on that path, who would then mint
// tokens mcpgate accepts.

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

func TestPlaintextJWKS(t *testing.T) {
	const issuerURL = "https://example.com" // httptest's TLS certificate is valid for example.com
	const plaintextJWKS = "http://keys.example.net/jwks.json"

	// The network attacker: answers the plaintext fetch with keys it holds.
	attacker := bearertest.NewIssuer(t)
	attackerAddr := attacker.URL()[len("http://"):]

	for _, tc := range []struct {
		name    string
		jwksURI string // policy jwksUri ("" = discovery)
	}{
		{"discovery names an http jwks_uri", ""},
		{"https jwksUri redirects to http", issuerURL + "/keys"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := http.NewServeMux()
			mux.HandleFunc("GET /.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				_, _ = w.Write([]byte(`{"issuer":"` + issuerURL + `","jwks_uri":"` + plaintextJWKS + `"}`))
			})
			mux.HandleFunc("GET /keys", func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, plaintextJWKS, http.StatusFound)
			})
			idp := httptest.NewTLSServer(mux)
			defer idp.Close()

			// Resolve the two names to the two test servers, as DNS would.
			client := idp.Client()
			tr := client.Transport.(*http.Transport).Clone()
			tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				switch addr {
				case "example.com:443":
					addr = idp.Listener.Addr().String()
				case "keys.example.net:80":
					addr = attackerAddr
				}
				return (&net.Dialer{}).DialContext(ctx, network, addr)
			}
			client.Transport = tr

			is := &policy.Issuer{Name: "corp", Issuer: issuerURL, JWKSURI: tc.jwksURI,
				Audiences: []string{"api://mcp-server"}, Leeway: 30 * time.Second}
			v := bearer.NewVerifier(bearer.Options{HTTPClient: client})

			forged := attacker.Mint(t, map[string]any{
				"iss": issuerURL, "sub": "admin", "aud": "api://mcp-server",
				"scope": "mcp:tools", "exp": time.Now().Add(time.Hour).Unix(),
			})
			p, err := v.Verify(context.Background(), forged, []*policy.Issuer{is})
			if err == nil {
				t.Fatalf("a token signed with keys fetched over plaintext HTTP (%s) was accepted: sub=%q scopes=%v",
					plaintextJWKS, p.Subject, p.Scopes)
			}
		})
	}
}
