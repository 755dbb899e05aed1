package bearer_test

import (
	"context"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

// benchSetup returns a verifier whose JWKS is already fetched, and a valid token.
func benchSetup(b *testing.B, opts bearer.Options, mintOpts ...bearertest.MintOption) (*bearer.Verifier, string, []*policy.Issuer) {
	b.Helper()
	idp := bearertest.NewIssuer(b)
	v := bearer.NewVerifier(opts)
	issuers := []*policy.Issuer{{Name: "corp", Issuer: idp.URL(), JWKSURI: idp.JWKSURL(), Audiences: []string{testAud}, Leeway: testLeeway}}
	claims := bearertest.Claims("alice", testAud, time.Now().Add(time.Hour))
	claims["scope"] = "tools.read tools.call"
	token := idp.Mint(b, claims, mintOpts...)
	if _, err := v.Verify(context.Background(), token, issuers); err != nil {
		b.Fatal(err)
	}
	return v, token, issuers
}

func BenchmarkVerifyCached(b *testing.B) {
	v, token, issuers := benchSetup(b, bearer.Options{})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, token, issuers); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyCachedParallel(b *testing.B) {
	v, token, issuers := benchSetup(b, bearer.Options{})
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := v.Verify(ctx, token, issuers); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

func BenchmarkVerifyUncachedRS256(b *testing.B) {
	v, token, issuers := benchSetup(b, bearer.Options{CacheSize: -1})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, token, issuers); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkVerifyUncachedES256(b *testing.B) {
	v, token, issuers := benchSetup(b, bearer.Options{CacheSize: -1}, bearertest.WithAlg("ES256"))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.Verify(ctx, token, issuers); err != nil {
			b.Fatal(err)
		}
	}
}
