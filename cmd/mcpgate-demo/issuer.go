package main

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/spf13/cobra"
	"go.uber.org/zap"
)

// Paths the issuer serves, under the path of --issuer-url.
const (
	issuerKeysPath      = "/keys"
	issuerTokenPath     = "/token"
	issuerDiscoveryPath = "/.well-known/openid-configuration" // OIDC Discovery 1.0 §4
)

// demoAudience is the audience the demo policy's issuer accepts (testdata/demo/mesh.yaml).
const demoAudience = "https://inventory.example.com/mcp"

// maxTokenTTL bounds --ttl: these tokens are bearer secrets signed for anyone who asks.
const maxTokenTTL = time.Hour

type issuerFlags struct {
	addr      string
	issuerURL string
	audience  string
	ttl       time.Duration
}

func newIssuerCmd() *cobra.Command {
	f := &issuerFlags{}
	cmd := &cobra.Command{
		Use:   "issuer",
		Short: "Run a DEVELOPMENT-ONLY token issuer (signs a token for any client that asks)",
		Long: `Run a DEVELOPMENT-ONLY OAuth token issuer for the demo mesh. It generates an RSA key
at start (tokens do not survive a restart), publishes it as a JWKS, and answers

  POST <issuer-url>token   grant_type=client_credentials&client_id=my-agent&scope=...

with an RS256 JWT: iss = --issuer-url, sub = azp = client_id (the caller's App ID, the
demo policy's appIdClaim), aud = --audience, scope, iat, exp = iat + --ttl.

It authenticates no one: any client_id gets a token. Never run it outside a demo.
Also served: <issuer-url>keys (the JWKS) and <issuer-url>.well-known/openid-configuration.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			iss, err := newIssuer(f)
			if err != nil {
				return err
			}
			ln, err := net.Listen("tcp", f.addr)
			if err != nil {
				return err
			}
			log := newLogger()
			defer func() { _ = log.Sync() }()
			return runIssuer(cmd.Context(), ln, iss, log)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.addr, "addr", ":8080", "listen address")
	fl.StringVar(&f.issuerURL, "issuer-url", "", "the tokens' iss, exactly as the policy's issuers[].issuer says (required); the endpoints are served under its path")
	fl.StringVar(&f.audience, "audience", demoAudience, "the tokens' aud")
	fl.DurationVar(&f.ttl, "ttl", 5*time.Minute, "token lifetime (at most 1h)")
	return cmd
}

// issuer signs demo tokens with a key generated at start.
type issuer struct {
	url      string // --issuer-url, verbatim: it must equal the policy's issuer byte for byte
	base     *url.URL
	audience string
	ttl      time.Duration
	key      jwk.Key // private, with kid
	jwks     []byte
	now      func() time.Time
	log      *zap.Logger
}

func newIssuer(f *issuerFlags) (*issuer, error) {
	u, err := url.Parse(f.issuerURL)
	switch {
	case f.issuerURL == "":
		return nil, errors.New("--issuer-url is required (the policy's issuers[].issuer)")
	case err != nil || !u.IsAbs() || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") || u.RawQuery != "" || u.Fragment != "":
		return nil, fmt.Errorf("--issuer-url %q is not an absolute http(s) URL without query", f.issuerURL)
	case strings.TrimSpace(f.audience) == "":
		return nil, errors.New("--audience must not be empty")
	case f.ttl <= 0 || f.ttl > maxTokenTTL:
		return nil, fmt.Errorf("--ttl %s: must be positive and at most %s", f.ttl, maxTokenTTL)
	}
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("generate RSA key: %w", err)
	}
	key, err := jwk.Import(priv)
	if err != nil {
		return nil, err
	}
	pub, err := jwk.PublicKeyOf(key)
	if err != nil {
		return nil, err
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, err
	}
	kid := base64.RawURLEncoding.EncodeToString(tp) // RFC 7638 thumbprint: stable per key
	for _, kv := range []struct {
		k jwk.Key
		n string
		v any
	}{{key, jwk.KeyIDKey, kid}, {pub, jwk.KeyIDKey, kid}, {pub, jwk.AlgorithmKey, jwa.RS256()}, {pub, jwk.KeyUsageKey, jwk.ForSignature}} {
		if err := kv.k.Set(kv.n, kv.v); err != nil {
			return nil, err
		}
	}
	set := jwk.NewSet()
	if err := set.AddKey(pub); err != nil {
		return nil, err
	}
	jwks, err := json.Marshal(set)
	if err != nil {
		return nil, err
	}
	base := *u
	base.Path = strings.TrimSuffix(u.Path, "/")
	return &issuer{url: f.issuerURL, base: &base, audience: f.audience, ttl: f.ttl, key: key, jwks: jwks, now: time.Now, log: zap.NewNop()}, nil
}

// endpoint is the public URL of one of the issuer's paths.
func (i *issuer) endpoint(p string) string {
	u := *i.base
	u.Path += p
	return u.String()
}

func (i *issuer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+i.base.Path+issuerKeysPath, i.serveJWKS)
	mux.HandleFunc("GET "+i.base.Path+issuerDiscoveryPath, i.serveDiscovery)
	mux.HandleFunc("POST "+i.base.Path+issuerTokenPath, i.serveToken)
	return mux
}

func runIssuer(ctx context.Context, ln net.Listener, i *issuer, log *zap.Logger) error {
	i.log = log
	// Loud on purpose: this process hands out valid tokens to anyone who can reach it.
	log.Warn("DEVELOPMENT ONLY: this token issuer signs a token for ANY client_id that asks, without authentication; never run it outside a demo")
	log.Info("token issuer listening", zap.String("addr", ln.Addr().String()), zap.String("issuer", i.url),
		zap.String("token_endpoint", i.endpoint(issuerTokenPath)), zap.String("jwks_uri", i.endpoint(issuerKeysPath)),
		zap.String("audience", i.audience), zap.Duration("ttl", i.ttl))
	return serveHTTP(ctx, ln, i.handler())
}

func (i *issuer) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(i.jwks)
}

func (i *issuer) serveDiscovery(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{
		"issuer":                                i.url,
		"jwks_uri":                              i.endpoint(issuerKeysPath),
		"token_endpoint":                        i.endpoint(issuerTokenPath),
		"grant_types_supported":                 []string{"client_credentials"},
		"token_endpoint_auth_methods_supported": []string{"none"},
		"id_token_signing_alg_values_supported": []string{"RS256"},
		"response_types_supported":              []string{"token"},
		"subject_types_supported":               []string{"public"},
	})
}

// clientIDRE: client_id becomes azp, the caller's App ID, which mcpgate requires to be a
// DNS label (extauthz callerFromToken).
var clientIDRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

// scopeTokenRE is RFC 6749 §3.3 scope-token: %x21 / %x23-5B / %x5D-7E.
var scopeTokenRE = regexp.MustCompile(`^[\x21\x23-\x5B\x5D-\x7E]+$`)

// serveToken is a client-credentials token endpoint (RFC 6749 §4.4) without client
// authentication. Errors follow §5.2.
func (i *issuer) serveToken(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		tokenError(w, "invalid_request", "the body must be application/x-www-form-urlencoded")
		return
	}
	gt := r.PostForm.Get("grant_type")
	if gt != "" && gt != "client_credentials" {
		tokenError(w, "unsupported_grant_type", "only client_credentials is supported")
		return
	}
	clientID := r.PostForm.Get("client_id")
	if u, _, ok := r.BasicAuth(); ok && clientID == "" {
		clientID = u // RFC 6749 §2.3.1; the password is not checked
	}
	if !clientIDRE.MatchString(clientID) {
		tokenError(w, "invalid_client", "client_id must be an App ID (a DNS label, e.g. my-agent)")
		return
	}
	scopes := strings.Fields(r.PostForm.Get("scope"))
	for _, s := range scopes {
		if !scopeTokenRE.MatchString(s) {
			tokenError(w, "invalid_scope", "a scope is not an RFC 6749 scope-token")
			return
		}
	}
	now := i.now().Truncate(time.Second)
	b := jwt.NewBuilder().Issuer(i.url).Subject(clientID).Audience([]string{i.audience}).
		IssuedAt(now).Expiration(now.Add(i.ttl)).Claim("azp", clientID).JwtID(randomID())
	if len(scopes) > 0 {
		b = b.Claim("scope", strings.Join(scopes, " "))
	}
	tok, err := b.Build()
	if err != nil {
		http.Error(w, "build token", http.StatusInternalServerError)
		return
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(jwa.RS256(), i.key))
	if err != nil {
		http.Error(w, "sign token", http.StatusInternalServerError)
		return
	}
	// Never the token itself: it is a bearer secret.
	i.log.Info("token issued", zap.String("client_id", clientID), zap.Strings("scope", scopes), zap.Time("exp", now.Add(i.ttl)))
	w.Header().Set("Cache-Control", "no-store") // RFC 6749 §5.1
	w.Header().Set("Pragma", "no-cache")
	resp := map[string]any{
		"access_token": string(signed),
		"token_type":   "Bearer",
		"expires_in":   int(i.ttl.Seconds()),
	}
	if len(scopes) > 0 {
		resp["scope"] = strings.Join(scopes, " ")
	}
	writeJSON(w, http.StatusOK, resp)
}

func tokenError(w http.ResponseWriter, code, desc string) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusBadRequest, map[string]string{"error": code, "error_description": desc})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func randomID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}
