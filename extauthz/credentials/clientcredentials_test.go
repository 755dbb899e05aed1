package credentials

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/policy"
)

// tokenEndpoint is an RFC 6749 token endpoint for client_credentials that issues
// numbered tokens to one client, whose secret the test may change.
type tokenEndpoint struct {
	*httptest.Server
	secret    atomic.Value // string
	calls     atomic.Int32
	down      atomic.Bool
	expiresIn int
	mu        sync.Mutex
	lastForm  map[string]string
	lastBasic bool
}

func newTokenEndpoint(t *testing.T, secret string, expiresIn int) *tokenEndpoint {
	t.Helper()
	e := &tokenEndpoint{expiresIn: expiresIn}
	e.secret.Store(secret)
	e.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := e.calls.Add(1)
		if e.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		if err := r.ParseForm(); err != nil || r.PostForm.Get("grant_type") != "client_credentials" {
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"error":"unsupported_grant_type"}`))
			return
		}
		id, sec, basic := r.BasicAuth()
		if !basic {
			id, sec = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
		}
		e.mu.Lock()
		e.lastForm, e.lastBasic = map[string]string{}, basic
		for k := range r.PostForm {
			e.lastForm[k] = r.PostForm.Get(k)
		}
		e.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if id != "agent" || sec != e.secret.Load().(string) {
			w.WriteHeader(401)
			_, _ = w.Write([]byte(`{"error":"invalid_client","error_description":"secret ` + sec + ` is wrong"}`))
			return
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": "tok-" + string(rune('0'+n)), "token_type": "Bearer", "expires_in": e.expiresIn})
	}))
	t.Cleanup(e.Close)
	return e
}

func secretFile(t *testing.T, secret string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(p, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// clock is a test clock ahead of real time by an offset (x/oauth2 computes Expiry from
// the real clock).
type clock struct{ off atomic.Int64 }

func (c *clock) now() time.Time          { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *clock) advance(d time.Duration) { c.off.Add(int64(d)) }

func source(t *testing.T, e *tokenEndpoint, file string, clk *clock) *ClientCredentials {
	t.Helper()
	return NewClientCredentials(Config{Endpoint: "github-mcp", TokenURL: e.URL, ClientID: "agent", SecretFile: file,
		Scopes: []string{"repo:read"}, Now: clk.now})
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second) // a kept source's retries back off to seconds
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond) // polling interval
	}
}

func TestTokenAcquiredOnceForManyCalls(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 3600)
	c := source(t, e, secretFile(t, "s1"), &clock{})
	var wg sync.WaitGroup
	for range 50 {
		wg.Go(func() {
			if tok, err := c.Token(context.Background()); err != nil || tok != "tok-1" {
				t.Errorf("token %q, err %v", tok, err)
			}
		})
	}
	wg.Wait()
	if n := e.calls.Load(); n != 1 {
		t.Fatalf("the token endpoint was asked %d times for 50 concurrent calls, want once", n)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.lastBasic || e.lastForm["scope"] != "repo:read" {
		t.Errorf("client_secret_basic with scope: basic %v, form %v", e.lastBasic, e.lastForm)
	}
}

func TestTokenRefreshedBeforeExpiry(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 100)
	clk := &clock{}
	c := source(t, e, secretFile(t, "s1"), clk)
	if tok, _ := c.Token(context.Background()); tok != "tok-1" {
		t.Fatalf("first token %q", tok)
	}
	clk.advance(95 * time.Second) // inside the refresh window (a tenth of 100s)
	if tok, err := c.Token(context.Background()); err != nil || tok != "tok-1" {
		t.Fatalf("in the refresh window the cached token is served: %q %v", tok, err)
	}
	eventually(t, "the background refresh", func() bool { return e.calls.Load() == 2 && c.Fetches() == 2 })
	eventually(t, "the new token", func() bool { tok, _ := c.Token(context.Background()); return tok == "tok-2" })
}

func TestSecretFileRotation(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 60)
	clk := &clock{}
	file := secretFile(t, "s1")
	c := source(t, e, file, clk)
	if _, err := c.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.secret.Store("s2")
	if err := os.WriteFile(file, []byte("s2"), 0o600); err != nil {
		t.Fatal(err)
	}
	clk.advance(2 * time.Minute) // expired: the next fetch reads the new secret
	if tok, err := c.Token(context.Background()); err != nil || tok != "tok-2" {
		t.Fatalf("after rotation: %q %v", tok, err)
	}
}

func TestTokenEndpointDown(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 100)
	clk := &clock{}
	c := source(t, e, secretFile(t, "s1"), clk)
	if _, err := c.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.down.Store(true)
	clk.advance(95 * time.Second)
	// A cached valid token keeps working while the endpoint is down.
	for range 3 {
		if tok, err := c.Token(context.Background()); err != nil || tok != "tok-1" {
			t.Fatalf("with the endpoint down and a valid token: %q %v", tok, err)
		}
	}
	eventually(t, "the failed refresh", func() bool { return e.calls.Load() >= 2 })
	clk.advance(10 * time.Second) // expired
	_, err := c.Token(context.Background())
	var ce *Error
	if !errors.As(err, &ce) || ce.Endpoint != "github-mcp" || !strings.Contains(err.Error(), "503") {
		t.Fatalf("expired with the endpoint down: %v", err)
	}
	// Without any cached token, the same.
	fresh := source(t, e, secretFile(t, "s1"), &clock{})
	if _, err := fresh.Token(context.Background()); !errors.As(err, &ce) {
		t.Fatalf("no token, endpoint down: %v", err)
	}
}

func TestWrongSecretNamesInvalidClient(t *testing.T) {
	e := newTokenEndpoint(t, "right", 60)
	c := source(t, e, secretFile(t, "wrong-secret-value"), &clock{})
	_, err := c.Token(context.Background())
	var ce *Error
	if !errors.As(err, &ce) || ce.Code != "invalid_client" {
		t.Fatalf("err %v, want invalid_client", err)
	}
	if strings.Contains(err.Error(), "wrong-secret-value") || strings.Contains(err.Error(), "right") {
		t.Fatalf("the error exposes a secret: %v", err)
	}
}

func TestSecretInBodyAudienceResource(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 60)
	c := NewClientCredentials(Config{Endpoint: "x", TokenURL: e.URL, ClientID: "agent", SecretFile: secretFile(t, "s1"),
		SecretInBody: true, Audience: "api://github-mcp", Resource: "https://github-mcp.example.com/mcp"})
	if _, err := c.Token(context.Background()); err != nil {
		t.Fatal(err)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.lastBasic || e.lastForm["client_secret"] != "s1" || e.lastForm["audience"] != "api://github-mcp" || e.lastForm["resource"] != "https://github-mcp.example.com/mcp" {
		t.Fatalf("basic %v, form %v", e.lastBasic, e.lastForm)
	}
}

func TestContextEndsTheWaitNotTheFetch(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 60)
	c := source(t, e, secretFile(t, "s1"), &clock{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.Token(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	eventually(t, "the fetch to complete anyway", func() bool { tok, _ := c.Token(context.Background()); return tok == "tok-1" })
}

func TestConfigOfPolicy(t *testing.T) {
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	for _, ep := range snap.Endpoints {
		cfg, ok := ConfigOf(ep)
		if ep.Auth == nil {
			if ok {
				t.Errorf("%s: a grant without auth", ep.Name)
			}
			continue
		}
		if !ok || cfg.Endpoint != ep.Name || cfg.TokenURL == "" || cfg.ClientID == "" || cfg.SecretFile == "" {
			t.Errorf("%s: %+v", ep.Name, cfg)
		}
	}
	if _, ok := ConfigOf(nil); ok {
		t.Error("a grant for no endpoint")
	}
}

// TestKeptTokenRenewedWithoutCalls is the source of a token sidecars inject themselves:
// no call reaches mcpgate, so it renews on its own before expiry, stops publishing a
// token that expired while the token endpoint was down, recovers when it is back, and
// Close ends the renewals.
func TestKeptTokenRenewedWithoutCalls(t *testing.T) {
	e := newTokenEndpoint(t, "s1", 2)
	c := NewClientCredentials(Config{Endpoint: "github-mcp", TokenURL: e.URL, ClientID: "agent", SecretFile: secretFile(t, "s1"),
		RefreshBefore: time.Second})
	var mu sync.Mutex
	var seen []string
	c.Keep(func() {
		tok, _ := c.Current()
		mu.Lock()
		seen = append(seen, tok)
		mu.Unlock()
	})
	last := func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(seen) == 0 {
			return "(none)"
		}
		return seen[len(seen)-1]
	}
	eventually(t, "the first token, unasked", func() bool { return last() == "tok-1" })
	eventually(t, "a renewal before expiry, without a call", func() bool { return last() == "tok-2" })
	if tok, ok := c.Current(); !ok || tok != "tok-2" {
		t.Fatalf("Current %q %v", tok, ok)
	}
	e.down.Store(true)
	eventually(t, "the expired token withdrawn while the endpoint is down", func() bool { return last() == "" })
	if _, ok := c.Current(); ok {
		t.Fatal("an expired token is still current")
	}
	e.down.Store(false)
	eventually(t, "a token again once the endpoint is back", func() bool { return strings.HasPrefix(last(), "tok-") })
	c.Close()
	eventually(t, "no fetch in flight", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return c.fetching == nil })
	n := c.Fetches()
	c.mu.Lock()
	pending := c.timer.Stop()             // true: Close left the renewal timer running
	c.lastErr = errors.New("renewal due") // so that a kept source's wake would fetch
	c.mu.Unlock()
	if pending {
		t.Error("Close left a renewal scheduled")
	}
	c.wake() // a timer that fired just before Close
	if m := c.Fetches(); m != n {
		t.Errorf("%d fetches after Close", m-n)
	}
}
