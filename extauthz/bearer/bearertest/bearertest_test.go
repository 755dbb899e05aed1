package bearertest_test

import (
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// getJWKS fetches the issuer's JWKS and returns the status and, on 200, the set.
func getJWKS(t *testing.T, i *bearertest.Issuer) (int, jwk.Set) {
	t.Helper()
	resp, err := i.Client().Get(i.JWKSURL())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, nil
	}
	set, err := jwk.Parse(body)
	if err != nil {
		t.Fatalf("parse JWKS: %v", err)
	}
	return resp.StatusCode, set
}

// Minted tokens verify with an independent implementation (jwx) against the served JWKS.
func TestMintVerifiesWithJWX(t *testing.T) {
	t.Parallel()
	i := bearertest.NewIssuer(t)
	_, set := getJWKS(t, i)
	claims := bearertest.Claims("alice", "aud", time.Now().Add(time.Hour))
	for _, alg := range []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA"} {
		t.Run(alg, func(t *testing.T) {
			token := i.Mint(t, claims, bearertest.WithAlg(alg))
			if _, err := jws.Verify([]byte(token), jws.WithKeySet(set, jws.WithInferAlgorithmFromKey(true))); err != nil {
				t.Fatalf("jws.Verify: %v", err)
			}
			tampered := bearertest.Tamper(t, token, func(c map[string]any) { c["sub"] = "mallory" })
			if _, err := jws.Verify([]byte(tampered), jws.WithKeySet(set, jws.WithInferAlgorithmFromKey(true))); err == nil {
				t.Fatal("tampered token verified")
			}
		})
	}
}

func TestRotateDownAndFetches(t *testing.T) {
	t.Parallel()
	i := bearertest.NewIssuer(t)
	kid := i.RotateKey(t)
	if _, set := getJWKS(t, i); set.Len() != 3 {
		t.Fatalf("before PublishKeys: %d keys, want 3", set.Len())
	}
	i.PublishKeys()
	_, set := getJWKS(t, i)
	if _, ok := set.LookupKeyID(kid); !ok {
		t.Fatalf("rotated key %q not served after PublishKeys", kid)
	}
	i.SetDown(true)
	if status, _ := getJWKS(t, i); status != http.StatusServiceUnavailable {
		t.Fatalf("status while down = %d, want 503", status)
	}
	if i.Fetches() != 3 {
		t.Fatalf("Fetches() = %d, want 3", i.Fetches())
	}
}
