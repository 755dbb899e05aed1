package bearer_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

// t0 is the fake clock's start; any fixed instant works.
var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

const (
	testAud        = "mcp-gateway"
	testLeeway     = 30 * time.Second
	testMinRefetch = 30 * time.Second
	testRefresh    = 5 * time.Minute
)

// fakeClock is a manually advanced clock for Options.Now.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// fixture is one fake issuer, a Verifier on a fake clock and the issuer's config.
type fixture struct {
	idp   *bearertest.Issuer
	clock *fakeClock
	v     *bearer.Verifier
	cfg   *policy.Issuer
}

type fixtureOption func(*fixtureSetup)

type fixtureSetup struct {
	idpOpts []bearertest.IssuerOption
	opts    bearer.Options
	edit    func(*policy.Issuer)
}

func withIssuerOptions(o ...bearertest.IssuerOption) fixtureOption {
	return func(s *fixtureSetup) { s.idpOpts = append(s.idpOpts, o...) }
}

func withOptions(edit func(*bearer.Options)) fixtureOption {
	return func(s *fixtureSetup) { edit(&s.opts) }
}

func withConfig(edit func(*policy.Issuer)) fixtureOption {
	return func(s *fixtureSetup) { s.edit = edit }
}

func newFixture(t testing.TB, opts ...fixtureOption) *fixture {
	t.Helper()
	s := fixtureSetup{opts: bearer.Options{
		RefreshInterval: testRefresh,
		MinRefetch:      testMinRefetch,
	}}
	for _, o := range opts {
		o(&s)
	}
	f := &fixture{
		idp:   bearertest.NewIssuer(t, s.idpOpts...),
		clock: &fakeClock{now: t0},
	}
	s.opts.Now = f.clock.Now
	f.v = bearer.NewVerifier(s.opts)
	f.cfg = &policy.Issuer{
		Name:      "corp",
		Issuer:    f.idp.URL(),
		JWKSURI:   f.idp.JWKSURL(),
		Audiences: []string{testAud},
		Leeway:    testLeeway,
	}
	if s.edit != nil {
		s.edit(f.cfg)
	}
	return f
}

// claims are valid claims for the fixture, expiring an hour after the clock's now.
func (f *fixture) claims() map[string]any {
	return bearertest.Claims("alice", testAud, f.clock.Now().Add(time.Hour))
}

// claimsWith returns valid claims with edits applied (a nil value deletes the claim).
func (f *fixture) claimsWith(edits map[string]any) map[string]any {
	c := f.claims()
	for k, v := range edits {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	return c
}

func (f *fixture) verify(token string) (*bearer.Principal, error) {
	return f.v.Verify(context.Background(), token, []*policy.Issuer{f.cfg})
}

// requireVerified verifies token and fails the test on error.
func requireVerified(t testing.TB, f *fixture, token string) *bearer.Principal {
	t.Helper()
	p, err := f.verify(token)
	if err != nil {
		t.Fatalf("Verify: unexpected error: %v", err)
	}
	return p
}

// requireErr checks that err wraps want and that its message leaks no part of token.
func requireErr(t testing.TB, err, want error, token string) {
	t.Helper()
	if !errors.Is(err, want) {
		t.Fatalf("Verify error = %v, want %v", err, want)
	}
	requireNoLeak(t, err, token)
}

// requireNoLeak checks that err's message contains neither the token nor any of its
// segments (header, payload, signature).
func requireNoLeak(t testing.TB, err error, token string) {
	t.Helper()
	if err == nil || token == "" {
		return
	}
	msg := err.Error()
	for _, part := range append(strings.Split(token, "."), token) {
		if len(part) >= 8 && strings.Contains(msg, part) {
			t.Fatalf("error message leaks token material: %q", msg)
		}
	}
}

// requireFetches checks how many JWKS GETs the fake issuer has answered.
func requireFetches(t testing.TB, f *fixture, want int) {
	t.Helper()
	if got := f.idp.Fetches(); got != want {
		t.Fatalf("JWKS fetches = %d, want %d", got, want)
	}
}

// eventually polls cond until it holds or a deadline passes. Background JWKS refreshes
// finish on their own schedule; polling with a deadline keeps the test free of guesses.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
