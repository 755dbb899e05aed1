package bearer_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Key rotation: an unknown kid refetches the JWKS at most once per MinRefetch.
func TestKeyRotation(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	requireFetches(t, f, 1)

	kid := f.idp.RotateKey(t)
	rotated := f.idp.Mint(t, f.claims(), bearertest.WithKID(kid))

	// Right after the first fetch: unknown, and no refetch (rate limit).
	_, err := f.verify(rotated)
	requireErr(t, err, bearer.ErrUnknownKey, rotated)
	requireFetches(t, f, 1)

	// After MinRefetch: one refetch, but the issuer does not publish the key yet.
	f.clock.Advance(testMinRefetch)
	_, err = f.verify(rotated)
	requireErr(t, err, bearer.ErrUnknownKey, rotated)
	requireFetches(t, f, 2)

	// Published, but the last fetch was just now: still unknown, no refetch.
	f.idp.PublishKeys()
	_, err = f.verify(rotated)
	requireErr(t, err, bearer.ErrUnknownKey, rotated)
	requireFetches(t, f, 2)

	// After MinRefetch: exactly one refetch and the token verifies.
	f.clock.Advance(testMinRefetch)
	if p := requireVerified(t, f, rotated); p.Subject != "alice" {
		t.Errorf("Subject = %q", p.Subject)
	}
	requireFetches(t, f, 3)

	// A second unknown kid within MinRefetch does not refetch.
	unknown := f.idp.Mint(t, f.claims(), bearertest.WithKID("never-published"))
	for range 5 {
		_, err = f.verify(unknown)
		requireErr(t, err, bearer.ErrUnknownKey, unknown)
	}
	requireFetches(t, f, 3)

	// Old keys keep working alongside the new one.
	requireVerified(t, f, f.idp.Mint(t, f.claims(), bearertest.WithAlg("ES256")))
	requireFetches(t, f, 3)
}

// When the JWKS endpoint is down, cached keys keep verifying.
func TestJWKSDownKeepsCachedKeys(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	f.idp.SetDown(true)

	// Past the refresh interval a background refresh is attempted and fails; requests
	// keep being served from the cached set meanwhile and afterwards.
	f.clock.Advance(testRefresh + time.Second)
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	eventually(t, "the background refresh attempt", func() bool { return f.idp.Fetches() == 2 })
	requireVerified(t, f, f.idp.Mint(t, f.claims(), bearertest.WithAlg("ES256")))

	// The failed refresh is retried no more often than MinRefetch.
	f.clock.Advance(testMinRefetch - time.Second)
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	requireFetches(t, f, 2)
	f.clock.Advance(time.Second)
	// The first refresh may still be finishing (its 503 counted, its goroutine not yet
	// done), so keep sending fresh tokens until the second attempt shows up.
	n := 0
	eventually(t, "the second refresh attempt", func() bool {
		n++
		requireVerified(t, f, f.idp.Mint(t, f.claimsWith(map[string]any{"n": n})))
		return f.idp.Fetches() == 3
	})
	requireVerified(t, f, f.idp.Mint(t, f.claimsWith(map[string]any{"n": -1})))
	requireFetches(t, f, 3)
}

// A periodic refresh replaces the set in the background: a key the issuer drops stops
// verifying, a key it adds starts to, without any unknown-kid refetch.
func TestJWKSRefresh(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	requireVerified(t, f, f.idp.Mint(t, f.claims()))

	kid := f.idp.RotateKey(t)
	f.idp.PublishKeys()
	f.idp.Unpublish(bearertest.KIDRSA)

	f.clock.Advance(testRefresh - time.Second)
	requireVerified(t, f, f.idp.Mint(t, f.claims())) // not stale yet
	requireFetches(t, f, 1)

	f.clock.Advance(time.Second)
	// Stale: served from the old set while the refresh runs.
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	rotated := f.idp.Mint(t, f.claims(), bearertest.WithKID(kid))
	eventually(t, "the refreshed set", func() bool {
		_, err := f.verify(rotated)
		return err == nil
	})
	requireFetches(t, f, 2)

	// A token the cache has not seen, signed by the dropped key, no longer verifies.
	old := f.idp.Mint(t, f.claimsWith(map[string]any{"sub": "bob"}))
	_, err := f.verify(old)
	requireErr(t, err, bearer.ErrUnknownKey, old)
}

func TestJWKSUnavailable(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		break_ func(*bearertest.Issuer)
		fix    func(*bearertest.Issuer)
	}{
		{"503", func(i *bearertest.Issuer) { i.SetDown(true) }, func(i *bearertest.Issuer) { i.SetDown(false) }},
		{"not JSON", func(i *bearertest.Issuer) { i.SetJWKSBody([]byte("<html>")) }, func(i *bearertest.Issuer) { i.SetJWKSBody(nil) }},
		{"over 1 MiB", func(i *bearertest.Issuer) {
			i.SetJWKSBody([]byte(`{"keys":[],"pad":"` + strings.Repeat("x", 1<<20) + `"}`))
		}, func(i *bearertest.Issuer) { i.SetJWKSBody(nil) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			tt.break_(f.idp)
			token := f.idp.Mint(t, f.claims())

			_, err := f.verify(token)
			requireErr(t, err, bearer.ErrJWKSUnavailable, token)
			requireFetches(t, f, 1)

			// Failed first fetches are not retried within MinRefetch, even once fixed.
			tt.fix(f.idp)
			_, err = f.verify(token)
			requireErr(t, err, bearer.ErrJWKSUnavailable, token)
			requireFetches(t, f, 1)

			f.clock.Advance(testMinRefetch)
			requireVerified(t, f, token)
			requireFetches(t, f, 2)
		})
	}
}

func TestDiscoveryUnavailable(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withConfig(func(is *policy.Issuer) { is.JWKSURI = "" }))
	f.idp.SetDown(true)
	token := f.idp.Mint(t, f.claims())
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrJWKSUnavailable, token)
	requireFetches(t, f, 0)
}

// A discovery document for another issuer must not lend its keys.
func TestDiscoveryIssuerMismatch(t *testing.T) {
	t.Parallel()
	idp := bearertest.NewIssuer(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]string{"issuer": idp.URL(), "jwks_uri": idp.JWKSURL()})
	}))
	t.Cleanup(srv.Close)
	v := bearer.NewVerifier(bearer.Options{})
	cfg := &policy.Issuer{Name: "x", Issuer: srv.URL, Audiences: []string{testAud}}
	token := idp.Mint(t, map[string]any{"iss": srv.URL, "aud": testAud, "exp": time.Now().Add(time.Hour).Unix()})
	_, err := v.Verify(context.Background(), token, []*policy.Issuer{cfg})
	requireErr(t, err, bearer.ErrJWKSUnavailable, token)
}

// A caller whose context ends while the first fetch is slow gets an error at once; the
// fetch itself is not cancelled, so the next caller gets the keys.
func TestFirstFetchContextCancelled(t *testing.T) {
	t.Parallel()
	idp := bearertest.NewIssuer(t)
	release := make(chan struct{})
	var once sync.Once
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		resp, err := idp.Client().Get(idp.JWKSURL())
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(mustRead(t, resp))
	}))
	t.Cleanup(srv.Close)
	t.Cleanup(func() { once.Do(func() { close(release) }) })

	v := bearer.NewVerifier(bearer.Options{})
	cfg := &policy.Issuer{Name: "slow", Issuer: idp.URL(), JWKSURI: srv.URL, Audiences: []string{testAud}}
	token := idp.Mint(t, bearertest.Claims("alice", testAud, time.Now().Add(time.Hour)))

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := v.Verify(ctx, token, []*policy.Issuer{cfg})
	requireErr(t, err, bearer.ErrJWKSUnavailable, token)

	once.Do(func() { close(release) })
	if _, err := v.Verify(context.Background(), token, []*policy.Issuer{cfg}); err != nil {
		t.Fatalf("Verify after the slow fetch finished: %v", err)
	}
	if idp.Fetches() != 1 {
		t.Errorf("fetches = %d, want 1", idp.Fetches())
	}
}

func mustRead(t testing.TB, resp *http.Response) []byte {
	t.Helper()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Error(err)
	}
	return b
}

// Fetch failures are logged with their cause (for operators) while Verify's error stays
// generic (it may reach the caller); neither contains the token.
func TestJWKSFailureLogged(t *testing.T) {
	t.Parallel()
	core, logs := observer.New(zap.DebugLevel)
	f := newFixture(t, withOptions(func(o *bearer.Options) { o.Logger = zap.New(core) }))
	f.idp.SetDown(true)
	token := f.idp.Mint(t, f.claims())
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrJWKSUnavailable, token)
	if strings.Contains(err.Error(), f.idp.JWKSURL()) {
		t.Errorf("Verify error names the JWKS URL: %v", err)
	}

	entries := logs.FilterMessageSnippet("JWKS").All()
	if len(entries) != 1 {
		t.Fatalf("got %d JWKS log entries, want 1: %v", len(entries), logs.All())
	}
	line := fmt.Sprint(entries[0].Message, entries[0].ContextMap())
	if !strings.Contains(line, "503") {
		t.Errorf("log entry lacks the cause: %s", line)
	}
	requireNoLeak(t, errors.New(line), token)
}
