// Package idp runs, for tests, a real OAuth 2.0 authorization server on loopback: the
// token endpoint of zitadel/oidc's OpenID Provider (github.com/zitadel/oidc/v3/pkg/op)
// over an in-memory storage of clients. It issues JWT access tokens for the client
// credentials grant (RFC 6749 §4.4) and the token exchange grant (RFC 8693), signed with
// a key it generates at start and published at its JWKS URL. zitadel parses the
// requests, authenticates the clients and answers errors (invalid_client, ...); this
// package only says who the clients are and what they may have.
//
// ProtectedMCP is a remote MCP server on the official Go SDK that requires its tokens.
package idp

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// Client is a client registered with the authorization server.
type Client struct {
	ID, Secret string
	// AuthMethod is client_secret_basic (default) or client_secret_post; a client using
	// the other is refused with invalid_client.
	AuthMethod string
	// Audiences the client may get tokens for; the first is the aud of a client
	// credentials token when the request names none (audience= or resource=).
	Audiences []string
	// Scopes the client may get.
	Scopes []string
	// TokenLifetime of the tokens issued to it (default 1h).
	TokenLifetime time.Duration
	// TokenExchange lets the client use the RFC 8693 grant.
	TokenExchange bool
}

func (c *Client) authMethod() oidc.AuthMethod {
	if c.AuthMethod == "client_secret_post" {
		return oidc.AuthMethodPost
	}
	return oidc.AuthMethodBasic
}

func (c *Client) lifetime() time.Duration {
	if c.TokenLifetime > 0 {
		return c.TokenLifetime
	}
	return time.Hour
}

// Request is one token request as received, without secrets or tokens.
type Request struct {
	GrantType, ClientID, Audience, Resource, Scope string
	// SubjectTokenSHA256 is the hex SHA-256 of subject_token, "" without one.
	SubjectTokenSHA256 string
	// Status is the HTTP status the server answered.
	Status int
}

// Grant types, as Count takes them.
const (
	GrantClientCredentials = "client_credentials"
	GrantTokenExchange     = "urn:ietf:params:oauth:grant-type:token-exchange"
)

// Server is the authorization server.
type Server struct {
	issuer string
	addr   string
	st     *storage
	h      http.Handler

	mu   sync.Mutex
	srv  *http.Server
	reqs []Request
}

// Start runs an authorization server for clients on 127.0.0.1 until the test ends. Its
// issuer is http://127.0.0.1:<port> (no trailing slash, as zitadel serves it).
func Start(t testing.TB, clients ...Client) *Server {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	st := &storage{key: key, kid: randomID()[:8], clients: map[string]*Client{}}
	for i := range clients {
		c := clients[i]
		st.clients[c.ID] = &c
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &Server{addr: lis.Addr().String(), st: st}
	s.issuer = "http://" + s.addr
	done := &atomic.Bool{}
	t.Cleanup(func() { done.Store(true) })
	var cryptoKey [32]byte
	_, _ = rand.Read(cryptoKey[:])
	provider, err := op.NewProvider(&op.Config{CryptoKey: cryptoKey, AuthMethodPost: true}, st, op.StaticIssuer(s.issuer), op.WithAllowInsecure(),
		op.WithLogger(slog.New(slog.NewTextHandler(testWriter{t, done}, nil))))
	if err != nil {
		t.Fatal(err)
	}
	s.h = s.record(provider)
	s.serve(lis)
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) serve(lis net.Listener) {
	srv := &http.Server{Handler: s.h, ReadHeaderTimeout: 5 * time.Second}
	s.mu.Lock()
	s.srv = srv
	s.mu.Unlock()
	go func() { _ = srv.Serve(lis) }()
}

// record notes every token request and hands zitadel's storage what its token handler
// does not: the requested audience and resource, and whether the client authenticated
// with HTTP Basic.
func (s *Server) record(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/oauth/token" {
			next.ServeHTTP(w, r)
			return
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		form, _ := url.ParseQuery(string(body))
		id, _, basic := r.BasicAuth()
		if !basic {
			id = form.Get("client_id")
		} else {
			id, _ = url.QueryUnescape(id)
		}
		req := Request{GrantType: form.Get("grant_type"), ClientID: id, Audience: form.Get("audience"),
			Resource: form.Get("resource"), Scope: form.Get("scope")}
		if st := form.Get("subject_token"); st != "" {
			sum := sha256.Sum256([]byte(st))
			req.SubjectTokenSHA256 = hex.EncodeToString(sum[:])
		}
		ctx := context.WithValue(r.Context(), ctxKey{}, requestInfo{audience: req.Audience, resource: req.Resource, basic: basic})
		rw := &statusWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(rw, r.WithContext(ctx))
		req.Status = rw.status
		s.mu.Lock()
		s.reqs = append(s.reqs, req)
		s.mu.Unlock()
	})
}

// testWriter sends zitadel's log lines to the test log until the test ends (t.Log
// panics after that).
type testWriter struct {
	t    testing.TB
	done *atomic.Bool
}

func (w testWriter) Write(p []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	w.status = code
	w.ResponseWriter.WriteHeader(code)
}

// Issuer is the iss of the tokens.
func (s *Server) Issuer() string { return s.issuer }

// TokenURL is the token endpoint.
func (s *Server) TokenURL() string { return s.issuer + "/oauth/token" }

// JWKSURL is where the signing key is published.
func (s *Server) JWKSURL() string { return s.issuer + "/keys" }

// SetSecret rotates a client's secret: the old one is refused from now on.
func (s *Server) SetSecret(clientID, secret string) {
	s.st.mu.Lock()
	defer s.st.mu.Unlock()
	if c := s.st.clients[clientID]; c != nil {
		c.Secret = secret
	}
}

// Stop closes the server: token requests fail to connect.
func (s *Server) Stop() {
	s.mu.Lock()
	srv := s.srv
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// Restart listens again on the same address after Stop.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		lis, err := net.Listen("tcp", s.addr)
		if err == nil {
			s.serve(lis)
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("restart the authorization server on %s: %v", s.addr, err)
		}
		time.Sleep(10 * time.Millisecond) // the port is released asynchronously
	}
}

// Requests are every token request so far, in order.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.reqs)
}

// Count is how many tokens were issued for grantType.
func (s *Server) Count(grantType string) int {
	n := 0
	for _, r := range s.Requests() {
		if r.GrantType == grantType && r.Status == http.StatusOK {
			n++
		}
	}
	return n
}

// UserToken is an access token (JWT) as this server issues to a signed-in user, which
// its token exchange accepts as subject_token.
func (s *Server) UserToken(t testing.TB, sub string, aud, scopes []string, ttl time.Duration) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: s.st.key},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", s.st.kid))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims := map[string]any{
		"iss": s.issuer, "sub": sub, "aud": aud, "iat": now.Unix(), "nbf": now.Unix(),
		"exp": now.Add(ttl).Unix(), "jti": randomID(), "client_id": "user-app",
	}
	if len(scopes) > 0 {
		claims["scope"] = strings.Join(scopes, " ")
	}
	tok, err := jwt.Signed(signer).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}
