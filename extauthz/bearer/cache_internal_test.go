package bearer

import (
	"context"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

func TestTokenCacheCapacity(t *testing.T) {
	t.Parallel()
	for _, size := range []int{1, 2, 3, 7, 31, 32, 33, 100, DefaultCacheSize} {
		c := newTokenCache(size)
		total := 0
		for i := range c.shards {
			if c.shards[i].cap < 1 {
				t.Errorf("size %d: shard %d has capacity %d", size, i, c.shards[i].cap)
			}
			total += c.shards[i].cap
		}
		if total > size || total < size-len(c.shards) {
			t.Errorf("size %d: total capacity %d", size, total)
		}
	}
}

// The cache never grows past CacheSize, and failures never enter it.
func TestTokenCacheBounded(t *testing.T) {
	t.Parallel()
	const size = 8
	idp := bearertest.NewIssuer(t)
	now := time.Now()
	v := NewVerifier(Options{CacheSize: size, Now: func() time.Time { return now }})
	cfg := []*policy.Issuer{{Name: "corp", Issuer: idp.URL(), JWKSURI: idp.JWKSURL(), Audiences: []string{"a"}}}

	for i := range 5 * size {
		claims := bearertest.Claims("user", "a", now.Add(time.Hour))
		claims["n"] = i
		if _, err := v.Verify(context.Background(), idp.Mint(t, claims, bearertest.WithAlg("ES256")), cfg); err != nil {
			t.Fatalf("token %d: %v", i, err)
		}
		if n := v.cache.len(); n > size {
			t.Fatalf("after %d tokens the cache holds %d entries, bound is %d", i+1, n, size)
		}
	}

	v2 := NewVerifier(Options{CacheSize: size, Now: func() time.Time { return now }})
	for i := range 3 * size {
		claims := bearertest.Claims("user", "wrong-audience", now.Add(time.Hour))
		claims["n"] = i
		if _, err := v2.Verify(context.Background(), idp.Mint(t, claims, bearertest.WithAlg("ES256")), cfg); err == nil {
			t.Fatal("want an audience error")
		}
	}
	if n := v2.cache.len(); n != 0 {
		t.Errorf("failed verifications left %d cache entries, want 0", n)
	}
}
