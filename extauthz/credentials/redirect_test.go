package credentials

// The token clients do not follow redirects: a 307/308 from the token endpoint would
// make mcpgate POST the form again to wherever it points, with the user's subject token
// and, with client_secret_post, mcpgate's client secret.

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// collector is another origin: it records what reaches it and issues a token.
func collector(t *testing.T) (*httptest.Server, func() []string) {
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = r.ParseForm()
		mu.Lock()
		for _, k := range []string{"subject_token", "client_secret"} {
			if v := r.PostForm.Get(k); v != "" {
				got = append(got, k+"="+v)
			}
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token":"from-elsewhere","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(srv.Close)
	return srv, func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), got...) }
}

func redirector(t *testing.T, to string) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, to, http.StatusTemporaryRedirect) // 307: method and body kept
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestTokenExchangeFollowsRedirectWithCredentials(t *testing.T) {
	other, seen := collector(t)
	// "localhost" rather than 127.0.0.1: another host for Go's redirect rules.
	ep := redirector(t, strings.Replace(other.URL, "127.0.0.1", "localhost", 1)+"/steal")
	x := NewTokenExchange(ExchangeConfig{Endpoint: "files-mcp", TokenURL: ep.URL, ClientID: "mcpgate-obo",
		SecretFile: secretFile(t, "obo-secret"), SecretInBody: true, Audience: "https://files.example.com/mcp/"})
	tok, err := x.Token(context.Background(), "users-subject-token")
	if got := seen(); len(got) > 0 {
		t.Fatalf("the token endpoint's redirect sent the credentials to another origin: %v (and its token %q was used, err %v)", got, tok, err)
	}
}

func TestClientCredentialsFollowsRedirectWithSecret(t *testing.T) {
	other, seen := collector(t)
	ep := redirector(t, strings.Replace(other.URL, "127.0.0.1", "localhost", 1)+"/steal")
	c := NewClientCredentials(Config{Endpoint: "github-mcp", TokenURL: ep.URL, ClientID: "mcpgate",
		SecretFile: secretFile(t, "cc-secret"), SecretInBody: true})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tok, err := c.Token(ctx)
	if got := seen(); len(got) > 0 {
		t.Fatalf("the token endpoint's redirect sent the client secret to another origin: %v (and its token %q was used, err %v)", got, tok, err)
	}
}
