package credentials

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// exchangeEndpoint is an RFC 8693 token endpoint: it exchanges any subject token for a
// numbered token of the requested audience, for client "gateway" with secret "s1".
func exchangeEndpoint(t *testing.T, expiresIn int) (*httptest.Server, *atomic.Int32, *sync.Map) {
	t.Helper()
	var calls atomic.Int32
	var seen sync.Map // subject token → audience asked
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		id, sec, ok := r.BasicAuth()
		if err := r.ParseForm(); err != nil || !ok || id != "gateway" || sec != "s1" {
			w.WriteHeader(401)
			_, _ = w.Write([]byte(`{"error":"invalid_client","error_description":"bad secret ` + sec + `"}`))
			return
		}
		f := r.PostForm
		if f.Get("grant_type") != GrantTokenExchange || f.Get("subject_token_type") != TokenTypeAccess {
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"error":"unsupported_grant_type"}`))
			return
		}
		sub := f.Get("subject_token")
		if sub == "revoked" {
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"error":"invalid_grant"}`))
			return
		}
		seen.Store(sub, f.Get("audience"))
		tok := "up-" + strconv.Itoa(int(n))
		if sub == "echo" {
			tok = sub
		}
		_ = json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer",
			"issued_token_type": TokenTypeAccess, "expires_in": expiresIn})
	}))
	t.Cleanup(srv.Close)
	return srv, &calls, &seen
}

func exchanger(t *testing.T, url string, clk *clock) *TokenExchange {
	t.Helper()
	return NewTokenExchange(ExchangeConfig{Endpoint: "billing-api", TokenURL: url, ClientID: "gateway", SecretFile: secretFile(t, "s1"),
		Audience: "api://billing", Now: clk.now})
}

func TestTokenExchangePerSubjectCached(t *testing.T) {
	srv, calls, seen := exchangeEndpoint(t, 300)
	clk := &clock{}
	x := exchanger(t, srv.URL, clk)
	a1, err := x.Token(context.Background(), "alice-token")
	if err != nil || !strings.HasPrefix(a1, "up-") {
		t.Fatalf("alice: %q %v", a1, err)
	}
	if aud, _ := seen.Load("alice-token"); aud != "api://billing" {
		t.Fatalf("audience asked %v", aud)
	}
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			if tok, err := x.Token(context.Background(), "alice-token"); err != nil || tok != a1 {
				t.Errorf("cached: %q %v", tok, err)
			}
		})
	}
	wg.Wait()
	b1, err := x.Token(context.Background(), "bob-token")
	if err != nil || b1 == a1 {
		t.Fatalf("bob: %q %v (alice's %q)", b1, err, a1)
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("%d exchanges for two subjects, want 2", n)
	}
	clk.advance(300 * time.Second) // expired: exchanged again
	if a2, err := x.Token(context.Background(), "alice-token"); err != nil || a2 == a1 {
		t.Fatalf("after expiry: %q %v", a2, err)
	}
}

func TestTokenExchangeConcurrentSubjectsShareOneExchange(t *testing.T) {
	srv, calls, _ := exchangeEndpoint(t, 300)
	x := exchanger(t, srv.URL, &clock{})
	var wg sync.WaitGroup
	for range 30 {
		wg.Go(func() { _, _ = x.Token(context.Background(), "carol-token") })
	}
	wg.Wait()
	if n := calls.Load(); n != 1 {
		t.Fatalf("%d exchanges for one subject asked 30 times at once, want 1", n)
	}
}

func TestTokenExchangeFailsClosed(t *testing.T) {
	srv, _, _ := exchangeEndpoint(t, 300)
	x := exchanger(t, srv.URL, &clock{})
	var ce *Error
	if _, err := x.Token(context.Background(), "revoked"); !errors.As(err, &ce) || ce.Code != "invalid_grant" || ce.Endpoint != "billing-api" {
		t.Fatalf("revoked subject: %v", err)
	}
	if _, err := x.Token(context.Background(), "echo"); err == nil || !strings.Contains(err.Error(), "subject token itself") {
		t.Fatalf("an exchange returning the subject token: %v", err)
	}
	bad := NewTokenExchange(ExchangeConfig{Endpoint: "billing-api", TokenURL: srv.URL, ClientID: "gateway", SecretFile: secretFile(t, "wrong-secret-xyz")})
	_, err := bad.Token(context.Background(), "alice-token")
	if !errors.As(err, &ce) || ce.Code != "invalid_client" || strings.Contains(err.Error(), "wrong-secret-xyz") || strings.Contains(err.Error(), "alice-token") {
		t.Fatalf("wrong secret: %v", err)
	}
}

func TestTokenExchangeCacheBounded(t *testing.T) {
	srv, _, _ := exchangeEndpoint(t, 300)
	x := NewTokenExchange(ExchangeConfig{Endpoint: "e", TokenURL: srv.URL, ClientID: "gateway", SecretFile: secretFile(t, "s1"), MaxEntries: 5})
	for i := range 12 {
		if _, err := x.Token(context.Background(), "subject-"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if len(x.cache) > 5 {
		t.Fatalf("%d cached tokens, want at most 5", len(x.cache))
	}
	for k := range x.cache {
		if strings.Contains(string(k[:]), "subject-") {
			t.Fatal("a subject token is a cache key in the clear")
		}
	}
}
