package credentials

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

// TestPrivateKeyJWT: the client authenticates with a signed assertion (RFC 7523 §2.2),
// never a secret; the token endpoint checks it against the registered public key,
// issuer, subject, audience and expiry, and refuses a replayed jti.
func TestPrivateKeyJWT(t *testing.T) {
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	pub, err := jwk.Import(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	var tokenURL string
	var issued atomic.Int32
	seen := map[string]bool{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		refuse := func(code string) {
			w.WriteHeader(401)
			_, _ = w.Write([]byte(`{"error":"` + code + `"}`))
		}
		if err := r.ParseForm(); err != nil || r.PostForm.Get("client_secret") != "" || r.Header.Get("Authorization") != "" {
			refuse("invalid_request")
			return
		}
		if r.PostForm.Get("client_assertion_type") != clientAssertionType || r.PostForm.Get("client_id") != "agent" {
			refuse("invalid_client")
			return
		}
		tok, err := jwt.Parse([]byte(r.PostForm.Get("client_assertion")), jwt.WithKey(jwa.ES256(), pub),
			jwt.WithIssuer("agent"), jwt.WithSubject("agent"), jwt.WithAudience(tokenURL), jwt.WithValidate(true),
			jwt.WithAcceptableSkew(time.Minute)) // the client runs on the test clock, ahead of real time
		if err != nil {
			refuse("invalid_client")
			return
		}
		jti, _ := tok.JwtID()
		exp, _ := tok.Expiration()
		if jti == "" || seen[jti] || time.Until(exp) > 2*time.Minute {
			refuse("invalid_client")
			return
		}
		seen[jti] = true
		n := issued.Add(1)
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": "jwt-tok-" + string(rune('0'+n)), "token_type": "Bearer", "expires_in": 1})
	}))
	t.Cleanup(srv.Close)
	tokenURL = srv.URL + "/token"

	clk := &clock{}
	c := NewClientCredentials(Config{Endpoint: "jwt-mcp", TokenURL: tokenURL, ClientID: "agent", PrivateKeyFile: keyFile, KeyID: "k1", Now: clk.now})
	tok, err := c.Token(context.Background())
	if err != nil || tok != "jwt-tok-1" {
		t.Fatalf("token = %q, %v", tok, err)
	}
	// Expired: a second fetch signs a new assertion (a new jti).
	clk.advance(2 * time.Second)
	if tok, err = c.Token(context.Background()); err != nil || tok != "jwt-tok-2" {
		t.Fatalf("second token = %q, %v", tok, err)
	}
	// A key file that is no key: the error names the file, never its content.
	if err := os.WriteFile(keyFile, []byte("garbage-key-material"), 0o600); err != nil {
		t.Fatal(err)
	}
	clk.advance(2 * time.Second)
	_, err = c.Token(context.Background())
	if err == nil || !strings.Contains(err.Error(), "not a PEM private key") || strings.Contains(err.Error(), "garbage-key-material") {
		t.Fatalf("bad key file: %v", err)
	}
}
