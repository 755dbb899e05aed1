package bearer_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

// requireStats checks the verifier's cache counters.
func requireStats(t testing.TB, v *bearer.Verifier, wantHits, wantMisses uint64) {
	t.Helper()
	if hits, misses := v.Stats(); hits != wantHits || misses != wantMisses {
		t.Fatalf("Stats() = %d hits, %d misses; want %d, %d", hits, misses, wantHits, wantMisses)
	}
}

func TestCacheHit(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	token := f.idp.Mint(t, f.claimsWith(map[string]any{"scope": "a b"}))
	first := requireVerified(t, f, token)
	requireStats(t, f.v, 0, 1)
	requireFetches(t, f, 1)

	// The issuer being down proves a hit needs no keys at all.
	f.idp.SetDown(true)
	for range 10 {
		p := requireVerified(t, f, token)
		if p.Subject != first.Subject || p.Issuer != f.cfg || len(p.Scopes) != 2 {
			t.Fatalf("cached Principal = %+v, want %+v", p, first)
		}
	}
	requireStats(t, f.v, 10, 1)
	requireFetches(t, f, 1)
}

// A rebuilt but identical issuer config (policy reload) still hits, and the Principal
// names the live config.
func TestCacheHitAfterReloadWithSameConfig(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	token := f.idp.Mint(t, f.claims())
	requireVerified(t, f, token)

	reloaded := *f.cfg
	reloaded.Audiences = append([]string(nil), f.cfg.Audiences...)
	p, err := f.v.Verify(context.Background(), token, []*policy.Issuer{&reloaded})
	if err != nil {
		t.Fatal(err)
	}
	if p.Issuer != &reloaded {
		t.Errorf("Principal.Issuer is the old config, want the reloaded one")
	}
	requireStats(t, f.v, 1, 1)
}

// A cache entry is only reused by an issuer with the configuration that verified it.
func TestCacheRejectedWhenIssuerChanged(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		edit    func(*policy.Issuer)
		wantErr error // of the full re-verification
	}{
		{"audience removed", func(is *policy.Issuer) { is.Audiences = []string{"other"} }, bearer.ErrAudience},
		{"audience added", func(is *policy.Issuer) { is.Audiences = []string{testAud, "other"} }, nil},
		{"leeway changed", func(is *policy.Issuer) { is.Leeway = time.Second }, nil},
		{"app id claim changed", func(is *policy.Issuer) { is.AppIDClaim = "azp" }, nil},
		{"renamed", func(is *policy.Issuer) { is.Name = "corp2" }, nil},
		{"jwks uri changed", func(is *policy.Issuer) { is.JWKSURI += "?v=2" }, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			token := f.idp.Mint(t, f.claims())
			requireVerified(t, f, token)

			changed := *f.cfg
			tt.edit(&changed)
			p, err := f.v.Verify(context.Background(), token, []*policy.Issuer{&changed})
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Verify with changed config: err = %v, want %v", err, tt.wantErr)
			}
			if err == nil && p.Issuer != &changed {
				t.Errorf("Principal.Issuer = %+v, want the changed config", p.Issuer)
			}
			requireStats(t, f.v, 0, 2)
		})
	}
}

// An app that does not trust the issuer gets no hit from another app's verification.
func TestCacheRejectedForOtherApp(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	token := f.idp.Mint(t, f.claims())
	requireVerified(t, f, token)
	other := &policy.Issuer{Name: "partner", Issuer: "https://partner.example", Audiences: []string{testAud}}
	_, err := f.v.Verify(context.Background(), token, []*policy.Issuer{other})
	requireErr(t, err, bearer.ErrIssuer, token)
	requireStats(t, f.v, 0, 2)
}

func TestCacheExpiry(t *testing.T) {
	t.Parallel()
	const ttl = 5 * time.Minute
	f := newFixture(t, withOptions(func(o *bearer.Options) { o.MaxCacheTTL = ttl }))
	exp := f.clock.Now().Add(7 * time.Minute)
	token := f.idp.Mint(t, bearertest.Claims("alice", testAud, exp))

	requireVerified(t, f, token) // miss 1, cached until now+5m
	f.clock.Advance(ttl - time.Second)
	requireVerified(t, f, token) // hit 1
	requireStats(t, f.v, 1, 1)

	f.clock.Advance(time.Second) // MaxCacheTTL reached: full verification, re-cached
	requireVerified(t, f, token)
	requireStats(t, f.v, 1, 2)

	// Re-cached until exp+leeway (sooner than the new TTL end).
	f.clock.Advance(2*time.Minute + testLeeway - time.Second)
	requireVerified(t, f, token)
	requireStats(t, f.v, 2, 2)

	f.clock.Advance(time.Second) // exp+leeway reached: never a hit, and expired
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrExpired, token)
	requireStats(t, f.v, 2, 3)
}

func TestCacheDisabled(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withOptions(func(o *bearer.Options) { o.CacheSize = -1 }))
	token := f.idp.Mint(t, f.claims())
	for range 3 {
		requireVerified(t, f, token)
	}
	requireStats(t, f.v, 0, 3)
	requireFetches(t, f, 1)
}

// Concurrent first use fetches the JWKS once; concurrent hits and misses are race-free.
func TestConcurrentVerify(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withOptions(func(o *bearer.Options) { o.CacheSize = 16 }))
	type tc struct {
		token string
		want  error
	}
	var cases []tc
	for i := range 24 {
		alg := []string{"RS256", "ES256", "EdDSA"}[i%3]
		cases = append(cases, tc{token: f.idp.Mint(t, f.claimsWith(map[string]any{"sub": fmt.Sprint("user-", i)}), bearertest.WithAlg(alg))})
	}
	cases = append(cases,
		tc{f.idp.Mint(t, f.claimsWith(map[string]any{"aud": "x"})), bearer.ErrAudience},
		tc{bearertest.Tamper(t, cases[0].token, func(c map[string]any) { c["sub"] = "m" }), bearer.ErrSignature},
		tc{"not.a.jwt", bearer.ErrMalformed},
	)

	const workers = 16
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for round := range 20 {
				c := cases[(w+round)%len(cases)]
				_, err := f.verify(c.token)
				if !errors.Is(err, c.want) {
					errs <- fmt.Errorf("worker %d round %d: err = %v, want %v", w, round, err, c.want)
					return
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	requireFetches(t, f, 1)
	hits, misses := f.v.Stats()
	if hits == 0 || hits+misses != workers*20 {
		t.Errorf("Stats() = %d hits, %d misses; want some hits and %d in total", hits, misses, workers*20)
	}
}
