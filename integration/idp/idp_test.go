package idp

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/modelcontextprotocol/go-sdk/mcp"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func TestClientCredentialsAndErrors(t *testing.T) {
	s := Start(t,
		Client{ID: "basic", Secret: "b", Audiences: []string{"https://a.example"}, Scopes: []string{"x"}, TokenLifetime: time.Minute},
		Client{ID: "post", Secret: "p", AuthMethod: "client_secret_post", Audiences: []string{"https://a.example", "https://b.example"}})
	keys, err := jwk.Fetch(ctx(t), s.JWKSURL())
	if err != nil {
		t.Fatal(err)
	}
	cc := clientcredentials.Config{ClientID: "basic", ClientSecret: "b", TokenURL: s.TokenURL(), Scopes: []string{"x"}, AuthStyle: oauth2.AuthStyleInHeader}
	tok, err := cc.Token(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	jt, err := jwt.Parse([]byte(tok.AccessToken), jwt.WithKeySet(keys), jwt.WithIssuer(s.Issuer()), jwt.WithAudience("https://a.example"), jwt.WithValidate(true))
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	var scope string
	if sub, _ := jt.Subject(); sub != "basic" || jt.Get("scope", &scope) != nil || scope != "x" {
		t.Errorf("sub = %q, scope = %q", sub, scope)
	}
	if exp, _ := jt.Expiration(); time.Until(exp) > time.Minute+5*time.Second || time.Until(exp) < 50*time.Second {
		t.Errorf("exp in %v, want the client's 1m lifetime", time.Until(exp))
	}
	post := clientcredentials.Config{ClientID: "post", ClientSecret: "p", TokenURL: s.TokenURL(), AuthStyle: oauth2.AuthStyleInParams,
		EndpointParams: map[string][]string{"audience": {"https://b.example"}}}
	tok, err = post.Token(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwt.Parse([]byte(tok.AccessToken), jwt.WithKeySet(keys), jwt.WithAudience("https://b.example"), jwt.WithValidate(true)); err != nil {
		t.Errorf("requested audience not granted: %v", err)
	}
	if r := s.Requests(); r[len(r)-1].Audience != "https://b.example" || r[len(r)-1].ClientID != "post" {
		t.Errorf("recorded %+v", r[len(r)-1])
	}
	for name, c := range map[string]clientcredentials.Config{
		"wrong secret":     {ClientID: "basic", ClientSecret: "nope", TokenURL: s.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader},
		"wrong method":     {ClientID: "post", ClientSecret: "p", TokenURL: s.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader},
		"foreign audience": {ClientID: "basic", ClientSecret: "b", TokenURL: s.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader, EndpointParams: map[string][]string{"resource": {"https://b.example"}}},
	} {
		_, err := c.Token(ctx(t))
		var re *oauth2.RetrieveError
		want := "invalid_client"
		if name == "foreign audience" {
			want = "invalid_target"
		}
		if !errors.As(err, &re) || re.ErrorCode != want {
			t.Errorf("%s: %v, want %s", name, err, want)
		}
	}
	if n := s.Count(GrantClientCredentials); n != 2 {
		t.Errorf("Count = %d, want 2", n)
	}
	s.SetSecret("basic", "b2")
	if _, err := cc.Token(ctx(t)); err == nil {
		t.Error("old secret still accepted")
	}
	cc.ClientSecret = "b2"
	if _, err := cc.Token(ctx(t)); err != nil {
		t.Errorf("new secret: %v", err)
	}
	s.Stop()
	if _, err := cc.Token(ctx(t)); err == nil { // EOF on a kept-alive connection, then connection refused
		t.Errorf("stopped: %v", err)
	}
	s.Restart(t)
	if _, err := cc.Token(ctx(t)); err != nil {
		t.Errorf("restarted: %v", err)
	}
}

func TestTokenExchangeAndProtectedMCP(t *testing.T) {
	s := Start(t,
		Client{ID: "x", Secret: "xs", TokenExchange: true, Audiences: []string{"https://files.example"}, Scopes: []string{"read"}},
		Client{ID: "plain", Secret: "ps", Audiences: []string{"https://files.example"}})
	user := s.UserToken(t, "alice", []string{"api://agent"}, []string{"read"}, time.Hour)
	exchange := func(id, secret, subject string) (string, error) {
		cc := clientcredentials.Config{ClientID: id, ClientSecret: secret, TokenURL: s.TokenURL(), AuthStyle: oauth2.AuthStyleInHeader,
			Scopes: []string{"read"}, EndpointParams: map[string][]string{
				"grant_type": {GrantTokenExchange}, "subject_token": {subject},
				"subject_token_type": {"urn:ietf:params:oauth:token-type:access_token"}, "audience": {"https://files.example"}}}
		tok, err := cc.Token(ctx(t))
		if err != nil {
			return "", err
		}
		return tok.AccessToken, nil
	}
	up, err := exchange("x", "xs", user)
	if err != nil {
		t.Fatal(err)
	}
	p := StartProtectedMCP(t, s, "https://files.example")
	call := func(token string) (string, error) {
		hc := &http.Client{Transport: bearer{token}}
		cs, err := mcp.NewClient(&mcp.Implementation{Name: "t", Version: "1"}, nil).Connect(ctx(t), &mcp.StreamableClientTransport{Endpoint: p.URL(), HTTPClient: hc}, nil)
		if err != nil {
			return "", err
		}
		defer cs.Close()
		res, err := cs.CallTool(ctx(t), &mcp.CallToolParams{Name: "whoami"})
		if err != nil {
			return "", err
		}
		return res.Content[0].(*mcp.TextContent).Text, nil
	}
	got, err := call(up)
	if err != nil || !strings.Contains(got, "sub=alice") || !strings.Contains(got, "aud=https://files.example") || !strings.Contains(got, "scope=read") {
		t.Fatalf("whoami with the exchanged token: %q %v", got, err)
	}
	if _, err := call(user); err == nil {
		t.Error("the user's own token (another audience) was accepted")
	}
	if a := p.Authorizations(); len(a) == 0 || a[0] != "Bearer "+up {
		t.Errorf("Authorizations = %v", a)
	}
	if _, err := exchange("x", "xs", "not-a-token"); err == nil {
		t.Error("a bad subject token was exchanged")
	}
	if _, err := exchange("plain", "ps", user); err == nil {
		t.Error("a client without TokenExchange exchanged")
	}
	if n := s.Count(GrantTokenExchange); n != 1 {
		t.Errorf("Count = %d", n)
	}
}

type bearer struct{ tok string }

func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+b.tok)
	return http.DefaultTransport.RoundTrip(r)
}
