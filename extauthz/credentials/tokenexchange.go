package credentials

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"

	"github.com/mcpgate/mcpgate/policy"
)

// Token exchange (RFC 8693): the caller's verified inbound token (the subject token) is
// exchanged for one minted for the upstream (its audience, resource and scopes), so that
// the upstream gets a token of its own and the caller's token is never passed through.
// golang.org/x/oauth2 has no token exchange client; the grant is one form POST.

// Grant type and token type URIs of RFC 8693.
const (
	GrantTokenExchange = "urn:ietf:params:oauth:grant-type:token-exchange"
	TokenTypeAccess    = "urn:ietf:params:oauth:token-type:access_token"
	TokenTypeJWT       = "urn:ietf:params:oauth:token-type:jwt"
)

// ExchangeConfig is one endpoint's token exchange grant. mcpgate authenticates to the
// token endpoint as a client with the secret from SecretFile (re-read at every exchange).
type ExchangeConfig struct {
	Endpoint     string
	TokenURL     string
	ClientID     string
	SecretFile   string
	SecretInBody bool // client_secret_post; default client_secret_basic
	Audience     string
	Resource     string
	Scopes       []string
	HTTPClient   *http.Client
	Now          func() time.Time
	// MaxEntries bounds the cache of exchanged tokens (default 10000).
	MaxEntries int
}

// TokenExchange exchanges subject tokens, caching each result per subject token (by its
// SHA-256, never the token itself) until shortly before it expires. Concurrent requests
// for one subject token share one exchange.
type TokenExchange struct {
	cfg   ExchangeConfig
	group singleflight.Group

	mu    sync.Mutex
	cache map[[32]byte]exchanged
	calls int
}

type exchanged struct {
	token  string
	expiry time.Time
}

// NewTokenExchange returns the exchanger of cfg.
func NewTokenExchange(cfg ExchangeConfig) *TokenExchange {
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 10 * time.Second,
			// A token endpoint has no reason to redirect, and following one would post
			// the form (client secret, the user's subject token) to wherever it points.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxEntries <= 0 {
		cfg.MaxEntries = 10000
	}
	return &TokenExchange{cfg: cfg, cache: map[[32]byte]exchanged{}}
}

// Exchanges is how many times the token endpoint was asked.
func (x *TokenExchange) Exchanges() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.calls
}

// Token returns the upstream token for subjectToken (an access token mcpgate verified).
func (x *TokenExchange) Token(ctx context.Context, subjectToken string) (string, error) {
	key := sha256.Sum256([]byte(subjectToken))
	x.mu.Lock()
	if e, ok := x.cache[key]; ok && x.cfg.Now().Before(e.expiry) {
		x.mu.Unlock()
		return e.token, nil
	}
	x.mu.Unlock()
	ch := x.group.DoChan(string(key[:]), func() (any, error) { return x.exchange(subjectToken, key) })
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
		return "", &Error{Endpoint: x.cfg.Endpoint, Err: ctx.Err()}
	}
}

func (x *TokenExchange) exchange(subjectToken string, key [32]byte) (string, error) {
	fail := func(code string, err error) (string, error) {
		return "", &Error{Endpoint: x.cfg.Endpoint, Code: code, Err: err}
	}
	x.mu.Lock()
	x.calls++
	x.mu.Unlock()
	secret, err := os.ReadFile(x.cfg.SecretFile)
	if err != nil {
		return fail("", fmt.Errorf("client secret file: %w", err))
	}
	clientSecret := strings.TrimRight(string(secret), "\r\n")
	form := url.Values{
		"grant_type":           {GrantTokenExchange},
		"subject_token":        {subjectToken},
		"subject_token_type":   {TokenTypeAccess},
		"requested_token_type": {TokenTypeAccess},
	}
	if x.cfg.Audience != "" {
		form.Set("audience", x.cfg.Audience)
	}
	if x.cfg.Resource != "" {
		form.Set("resource", x.cfg.Resource)
	}
	if len(x.cfg.Scopes) > 0 {
		form.Set("scope", strings.Join(x.cfg.Scopes, " "))
	}
	if x.cfg.SecretInBody {
		form.Set("client_id", x.cfg.ClientID)
		form.Set("client_secret", clientSecret)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, x.cfg.TokenURL, strings.NewReader(form.Encode()))
	if err != nil {
		return fail("", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if !x.cfg.SecretInBody {
		req.SetBasicAuth(url.QueryEscape(x.cfg.ClientID), url.QueryEscape(clientSecret)) // RFC 6749 §2.3.1
	}
	resp, err := x.cfg.HTTPClient.Do(req)
	if err != nil {
		return fail("", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fail("", err)
	}
	var out struct {
		AccessToken     string `json:"access_token"`
		TokenType       string `json:"token_type"`
		IssuedTokenType string `json:"issued_token_type"`
		ExpiresIn       int64  `json:"expires_in"`
		Error           string `json:"error"`
	}
	if json.Unmarshal(body, &out) != nil && resp.StatusCode == http.StatusOK {
		return fail("", fmt.Errorf("token endpoint answered with no JSON token"))
	}
	if resp.StatusCode != http.StatusOK {
		// The body may echo what was sent: only its error code is kept.
		return fail(out.Error, fmt.Errorf("token endpoint answered HTTP %d", resp.StatusCode))
	}
	if out.AccessToken == "" || !strings.EqualFold(out.TokenType, "bearer") && !strings.EqualFold(out.TokenType, "N_A") {
		return fail("", fmt.Errorf("token endpoint issued no bearer token"))
	}
	if out.AccessToken == subjectToken {
		// An exchange that hands the caller's token back would be passthrough.
		return fail("", fmt.Errorf("token endpoint returned the subject token itself"))
	}
	life := time.Duration(out.ExpiresIn) * time.Second
	if life <= 0 {
		life = 5 * time.Minute
	}
	exp := x.cfg.Now().Add(life - min(max(life/10, 5*time.Second), 5*time.Minute))
	x.mu.Lock()
	if len(x.cache) >= x.cfg.MaxEntries {
		x.evict()
	}
	x.cache[key] = exchanged{token: out.AccessToken, expiry: exp}
	x.mu.Unlock()
	return out.AccessToken, nil
}

// evict drops expired entries, and everything if that frees too little: the cache only
// saves exchanges. x.mu is held.
func (x *TokenExchange) evict() {
	now := x.cfg.Now()
	for k, e := range x.cache {
		if !now.Before(e.expiry) {
			delete(x.cache, k)
		}
	}
	if len(x.cache) >= x.cfg.MaxEntries {
		clear(x.cache)
	}
}

// ExchangeConfigOf is the grant an HTTPEndpoint's auth.tokenExchange describes, or false
// when it has none.
func ExchangeConfigOf(ep *policy.HTTPEndpoint) (ExchangeConfig, bool) {
	if ep == nil || ep.Auth == nil || ep.Auth.TokenExchange == nil {
		return ExchangeConfig{}, false
	}
	tx := ep.Auth.TokenExchange
	return ExchangeConfig{
		Endpoint: ep.Name, TokenURL: tx.TokenURL, ClientID: tx.ClientID, SecretFile: tx.ClientSecretFile,
		SecretInBody: tx.AuthMethod == "client_secret_post", Audience: tx.Audience, Resource: tx.Resource, Scopes: tx.Scopes,
	}, true
}
