// Package credentials acquires the tokens mcpgate injects on an agent's outbound calls to
// remote MCP servers (HTTPEndpoint.spec.auth), so that the agent holds no secret and its
// own inbound token is never passed through (the MCP authorization spec forbids it).
//
// ClientCredentials is the OAuth 2.0 client credentials grant (RFC 6749 §4.4) on
// golang.org/x/oauth2's clientcredentials: one token per endpoint, cached until shortly
// before it expires, refreshed in the background by one fetch at a time, with the client
// secret re-read from its file at every fetch so a rotated secret applies without a
// restart. Errors name the endpoint and the OAuth error code, never a secret or a token.
package credentials

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"

	"github.com/mcpgate/mcpgate/policy"
)

// Config is one endpoint's client credentials grant.
type Config struct {
	// Endpoint names the HTTPEndpoint, for errors and logs.
	Endpoint     string
	TokenURL     string
	ClientID     string
	SecretFile   string
	Scopes       []string
	Audience     string // sent as "audience" when set
	Resource     string // RFC 8707 "resource" when set
	SecretInBody bool   // client_secret_post; default client_secret_basic
	// PrivateKeyFile, when set, is private_key_jwt client authentication (RFC 7523 §2.2,
	// OpenID Connect Core §9): a PEM RSA or EC key, re-read at every fetch, signing a
	// fresh client assertion; SecretFile is then unused. KeyID is the assertion's kid.
	PrivateKeyFile string
	KeyID          string
	// HTTPClient fetches tokens (default: a client with a 10s timeout).
	HTTPClient *http.Client
	// RefreshBefore is how long before expiry a token is renewed (default: a tenth of
	// its lifetime, between 5s and 5m).
	RefreshBefore time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Error is a failure to obtain a token: the endpoint, and the OAuth error code when the
// token endpoint gave one (invalid_client, invalid_scope, ...).
type Error struct {
	Endpoint string
	Code     string // OAuth error code, "" when the endpoint did not answer with one
	Err      error
}

func (e *Error) Error() string {
	if e.Code != "" {
		return fmt.Sprintf("token for endpoint %q: %s", e.Endpoint, e.Code)
	}
	return fmt.Sprintf("token for endpoint %q: %v", e.Endpoint, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ClientCredentials is the token source of one endpoint. Safe for concurrent use.
type ClientCredentials struct {
	cfg Config

	mu       sync.Mutex
	tok      *oauth2.Token
	fetching chan struct{} // non-nil while one fetch runs; closed when it ends
	lastErr  error
	failedAt time.Time // when lastErr happened
	fetches  int

	// Kept (Keep): renewed before expiry without waiting for a call, onChange called when
	// the token that Current returns changes.
	keep      bool
	closed    bool
	onChange  func()
	published string        // what Current returned when onChange last ran
	backoff   time.Duration // between background retries after failures
	timer     *time.Timer
}

// retryAfterFailure is how long a failed fetch is the answer for callers without a valid
// token, so that an outage or a wrong secret costs the token endpoint one request per
// interval, not one per call.
const retryAfterFailure = time.Second

// maxBackoff bounds the wait between the background retries of a kept source whose token
// endpoint keeps failing (they start at retryAfterFailure and double).
const maxBackoff = time.Minute

// NewClientCredentials returns the source of cfg. Nothing is fetched until Token.
func NewClientCredentials(cfg Config) *ClientCredentials {
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 10 * time.Second,
			// A token endpoint has no reason to redirect, and following one would post
			// the form (client secret, the user's subject token) to wherever it points.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &ClientCredentials{cfg: cfg}
}

// Token returns a valid access token. A cached one is returned at once; within its
// refresh window one background fetch renews it. Without a valid token the caller waits
// for the fetch (one at a time for all callers). While the token endpoint fails, a
// cached token keeps working until it expires.
func (c *ClientCredentials) Token(ctx context.Context) (string, error) {
	c.mu.Lock()
	now := c.cfg.Now()
	if t := c.tok; t != nil && now.Before(t.Expiry) {
		if now.After(t.Expiry.Add(-c.refreshBefore(t))) && c.fetching == nil {
			c.startFetch()
		}
		c.mu.Unlock()
		return t.AccessToken, nil
	}
	if c.fetching == nil {
		if c.lastErr != nil && now.Sub(c.failedAt) < retryAfterFailure {
			err := c.lastErr
			c.mu.Unlock()
			return "", err
		}
		c.startFetch()
	}
	wait := c.fetching
	c.mu.Unlock()

	select {
	case <-wait:
	case <-ctx.Done():
		return "", &Error{Endpoint: c.cfg.Endpoint, Err: ctx.Err()}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.tok; t != nil && c.cfg.Now().Before(t.Expiry) {
		return t.AccessToken, nil
	}
	if c.lastErr == nil {
		return "", &Error{Endpoint: c.cfg.Endpoint, Err: errors.New("the token endpoint issued a token that had already expired")}
	}
	return "", c.lastErr
}

// Fetches is how many times the token endpoint was asked.
func (c *ClientCredentials) Fetches() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.fetches
}

// refreshBefore is the renewal window of t.
func (c *ClientCredentials) refreshBefore(t *oauth2.Token) time.Duration {
	if c.cfg.RefreshBefore > 0 {
		return c.cfg.RefreshBefore
	}
	life := t.Expiry.Sub(c.cfg.Now()) // what is left; at fetch time, the lifetime
	if issued, ok := t.Extra("mcpgate_lifetime").(time.Duration); ok {
		life = issued
	}
	return min(max(life/10, 5*time.Second), 5*time.Minute)
}

// Current is the cached token while it is valid, without fetching ("", false otherwise).
func (c *ClientCredentials) Current() (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.currentLocked()
}

func (c *ClientCredentials) currentLocked() (string, bool) {
	if t := c.tok; t != nil && c.cfg.Now().Before(t.Expiry) {
		return t.AccessToken, true
	}
	return "", false
}

// Keep makes c hold a token without waiting for calls: it fetches one now if it has
// none, renews it when its renewal window opens, retries failures in the background
// (from a second, doubling up to a minute, until the cached token expires), and calls
// onChange (outside its lock) whenever what Current returns changes: a token obtained
// or renewed, or expired without a renewal. This is how sidecars get the token to
// inject themselves (SDS): no call reaches mcpgate to trigger a renewal. Later calls
// keep the first onChange. Close ends it.
func (c *ClientCredentials) Keep(onChange func()) {
	c.mu.Lock()
	if c.keep || c.closed {
		c.mu.Unlock()
		return
	}
	c.keep, c.onChange = true, onChange
	c.published, _ = c.currentLocked()
	if _, ok := c.currentLocked(); !ok && c.fetching == nil {
		c.startFetch()
	}
	c.rearmLocked()
	c.mu.Unlock()
}

// Close stops the background renewals of a kept source (its endpoint left the policy or
// its auth changed). Token still works, fetching on demand.
func (c *ClientCredentials) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed, c.keep = true, false
	if c.timer != nil {
		c.timer.Stop()
	}
}

// rearmLocked sets when a kept source looks next: the start of the renewal window (not
// sooner than a second after a renewal, so a token shorter-lived than its window is not
// fetched in a loop), after a backoff when the last fetch failed, and in any case at the
// expiry of the cached token, which must then stop being published. c.mu is held.
func (c *ClientCredentials) rearmLocked() {
	if !c.keep {
		return
	}
	now := c.cfg.Now()
	t := c.tok
	valid := t != nil && now.Before(t.Expiry)
	next := time.Duration(-1)
	switch {
	case c.fetching != nil: // the fetch rearms when it ends
	case c.lastErr == nil && valid:
		next = max(t.Expiry.Add(-c.refreshBefore(t)).Sub(now), retryAfterFailure)
	default:
		next = max(c.backoff, retryAfterFailure)
	}
	if valid && (next < 0 || t.Expiry.Sub(now) < next) {
		next = t.Expiry.Sub(now)
	}
	if c.timer != nil {
		c.timer.Stop()
	}
	if next >= 0 {
		c.timer = time.AfterFunc(next, c.wake)
	}
}

// wake is a kept source's timer: renew when due, publish an expiry.
func (c *ClientCredentials) wake() {
	c.mu.Lock()
	if !c.keep {
		c.mu.Unlock()
		return
	}
	t := c.tok
	due := t == nil || c.lastErr != nil || !c.cfg.Now().Before(t.Expiry.Add(-c.refreshBefore(t)))
	if due && c.fetching == nil {
		c.startFetch()
	}
	c.rearmLocked()
	notify := c.publishLocked()
	c.mu.Unlock()
	notify()
}

// publishLocked returns onChange when what Current returns differs from what was last
// published, else a no-op. c.mu is held; the caller runs the result unlocked.
func (c *ClientCredentials) publishLocked() func() {
	cur, _ := c.currentLocked()
	if !c.keep || cur == c.published || c.onChange == nil {
		return func() {}
	}
	c.published = cur
	return c.onChange
}

// startFetch starts the one fetch. c.mu is held.
func (c *ClientCredentials) startFetch() {
	done := make(chan struct{})
	c.fetching = done
	c.fetches++
	go func() {
		t, err := c.fetch()
		c.mu.Lock()
		if err == nil {
			c.tok, c.lastErr, c.backoff = t, nil, 0
		} else {
			c.lastErr, c.failedAt = err, c.cfg.Now()
			c.backoff = min(max(2*c.backoff, retryAfterFailure), maxBackoff)
		}
		c.fetching = nil
		c.rearmLocked()
		notify := c.publishLocked()
		c.mu.Unlock()
		close(done)
		notify()
	}()
}

// fetch asks the token endpoint, with the secret as its file holds it now.
func (c *ClientCredentials) fetch() (*oauth2.Token, error) {
	fail := func(err error) (*oauth2.Token, error) {
		e := &Error{Endpoint: c.cfg.Endpoint, Err: err}
		var re *oauth2.RetrieveError
		if errors.As(err, &re) {
			e.Code = re.ErrorCode
			if e.Code == "" {
				e.Err = fmt.Errorf("token endpoint answered HTTP %d", re.Response.StatusCode) // the body may echo secrets
			}
		}
		return nil, e
	}
	params := map[string][]string{}
	var secret []byte
	style := oauth2.AuthStyleInHeader
	if c.cfg.PrivateKeyFile != "" {
		assertion, err := c.clientAssertion()
		if err != nil {
			return fail(err)
		}
		// x/oauth2 sends client_id in the form and no client_secret when it is empty.
		style = oauth2.AuthStyleInParams
		params["client_assertion_type"] = []string{clientAssertionType}
		params["client_assertion"] = []string{assertion}
	} else {
		var err error
		if secret, err = os.ReadFile(c.cfg.SecretFile); err != nil {
			return fail(fmt.Errorf("client secret file: %w", err))
		}
		if c.cfg.SecretInBody {
			style = oauth2.AuthStyleInParams
		}
	}
	if c.cfg.Audience != "" {
		params["audience"] = []string{c.cfg.Audience}
	}
	if c.cfg.Resource != "" {
		params["resource"] = []string{c.cfg.Resource}
	}
	cc := clientcredentials.Config{
		ClientID: c.cfg.ClientID, ClientSecret: strings.TrimRight(string(secret), "\r\n"),
		TokenURL: c.cfg.TokenURL, Scopes: c.cfg.Scopes, EndpointParams: params, AuthStyle: style,
	}
	ctx, cancel := context.WithTimeout(context.WithValue(context.Background(), oauth2.HTTPClient, c.cfg.HTTPClient), 15*time.Second)
	defer cancel()
	t, err := cc.Token(ctx)
	if err != nil {
		return fail(err)
	}
	if t.AccessToken == "" || !strings.EqualFold(t.Type(), "bearer") {
		return fail(fmt.Errorf("token endpoint issued no bearer token"))
	}
	// Expiry on our clock: from expires_in when given, else short-lived rather than
	// forever.
	expiresIn := t.ExpiresIn
	if expiresIn == 0 {
		switch v := t.Extra("expires_in").(type) {
		case float64:
			expiresIn = int64(v)
		case string: // some servers send it quoted
			_, _ = fmt.Sscan(v, &expiresIn)
		}
	}
	switch {
	case expiresIn > 0:
		t.Expiry = c.cfg.Now().Add(time.Duration(expiresIn) * time.Second)
	case t.Expiry.IsZero():
		t.Expiry = c.cfg.Now().Add(5 * time.Minute)
	}
	return t.WithExtra(map[string]any{"mcpgate_lifetime": t.Expiry.Sub(c.cfg.Now())}), nil
}

// clientAssertionType is RFC 7523 §2.2's client_assertion_type.
const clientAssertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// clientAssertion signs the JWT of private_key_jwt: iss and sub the client id, aud the
// token endpoint, a unique jti, one minute of validity (RFC 7523 §3).
func (c *ClientCredentials) clientAssertion() (string, error) {
	pemBytes, err := os.ReadFile(c.cfg.PrivateKeyFile)
	if err != nil {
		return "", fmt.Errorf("private key file: %w", err)
	}
	key, err := jwk.ParseKey(pemBytes, jwk.WithPEM(true))
	if err != nil {
		return "", fmt.Errorf("private key file %s: not a PEM private key", c.cfg.PrivateKeyFile) // never quote the key
	}
	alg := jwa.RS256()
	if _, ok := key.(jwk.ECDSAPrivateKey); ok {
		alg = jwa.ES256()
	}
	if c.cfg.KeyID != "" {
		if err := key.Set(jwk.KeyIDKey, c.cfg.KeyID); err != nil {
			return "", err
		}
	}
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", err
	}
	now := c.cfg.Now()
	tok, err := jwt.NewBuilder().Issuer(c.cfg.ClientID).Subject(c.cfg.ClientID).Audience([]string{c.cfg.TokenURL}).
		JwtID(hex.EncodeToString(jti[:])).IssuedAt(now).Expiration(now.Add(time.Minute)).Build()
	if err != nil {
		return "", err
	}
	signed, err := jwt.Sign(tok, jwt.WithKey(alg, key))
	if err != nil {
		return "", fmt.Errorf("sign the client assertion: %w", err)
	}
	return string(signed), nil
}

// ConfigOf is the grant an HTTPEndpoint's auth.clientCredentials describes, or false when
// it has none.
func ConfigOf(ep *policy.HTTPEndpoint) (Config, bool) {
	if ep == nil || ep.Auth == nil || ep.Auth.ClientCredentials == nil {
		return Config{}, false
	}
	cc := ep.Auth.ClientCredentials
	return Config{
		Endpoint: ep.Name, TokenURL: cc.TokenURL, ClientID: cc.ClientID, SecretFile: cc.ClientSecretFile,
		Scopes: cc.Scopes, Audience: cc.Audience, Resource: cc.Resource, SecretInBody: cc.AuthMethod == "client_secret_post",
		PrivateKeyFile: cc.PrivateKeyFile, KeyID: cc.KeyID,
	}, true
}
