package bearer_test

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

func TestVerifyValid(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withConfig(func(is *policy.Issuer) { is.AppIDClaim = "azp" }))
	exp := f.clock.Now().Add(time.Hour)

	tests := []struct {
		name       string
		claims     map[string]any
		opts       []bearertest.MintOption
		advance    time.Duration // clock moves this far before Verify
		wantScopes []string
		wantAud    []string
		wantAppID  string
	}{
		{name: "RS256", claims: f.claims(), wantAud: []string{testAud}},
		{name: "ES256", claims: f.claims(), opts: []bearertest.MintOption{bearertest.WithAlg("ES256")}, wantAud: []string{testAud}},
		{name: "EdDSA", claims: f.claims(), opts: []bearertest.MintOption{bearertest.WithAlg("EdDSA")}, wantAud: []string{testAud}},
		{name: "PS256 with an RSA key without alg", claims: f.claims(), opts: []bearertest.MintOption{bearertest.WithAlg("PS256")}, wantAud: []string{testAud}},
		{name: "RS512", claims: f.claims(), opts: []bearertest.MintOption{bearertest.WithAlg("RS512")}, wantAud: []string{testAud}},
		{name: "no kid, exactly one RSA key", claims: f.claims(), opts: []bearertest.MintOption{bearertest.WithoutKID()}, wantAud: []string{testAud}},
		{
			name:    "aud as array",
			claims:  f.claimsWith(map[string]any{"aud": []string{"other", testAud}}),
			wantAud: []string{"other", testAud},
		},
		{
			name:    "exp passed but within leeway",
			claims:  f.claims(),
			advance: time.Hour + testLeeway - time.Second,
			wantAud: []string{testAud},
		},
		{
			name:    "nbf in the future but within leeway",
			claims:  f.claimsWith(map[string]any{"nbf": f.clock.Now().Add(testLeeway - time.Second).Unix()}),
			wantAud: []string{testAud},
		},
		{
			name:       "scp as array",
			claims:     f.claimsWith(map[string]any{"scp": []string{"tools.read", "tools.call"}}),
			wantAud:    []string{testAud},
			wantScopes: []string{"tools.read", "tools.call"},
		},
		{
			name:       "scp as string",
			claims:     f.claimsWith(map[string]any{"scp": "tools.read  tools.call"}),
			wantAud:    []string{testAud},
			wantScopes: []string{"tools.read", "tools.call"},
		},
		{
			name:       "scope string",
			claims:     f.claimsWith(map[string]any{"scope": "openid tools.read"}),
			wantAud:    []string{testAud},
			wantScopes: []string{"openid", "tools.read"},
		},
		{
			name:       "scope and scp merged and deduplicated",
			claims:     f.claimsWith(map[string]any{"scope": "a b a", "scp": []string{"b", "c"}}),
			wantAud:    []string{testAud},
			wantScopes: []string{"a", "b", "c"},
		},
		{
			name:      "app id claim",
			claims:    f.claimsWith(map[string]any{"azp": "billing"}),
			wantAud:   []string{testAud},
			wantAppID: "billing",
		},
		{
			name:    "app id claim not a string is ignored",
			claims:  f.claimsWith(map[string]any{"azp": 42}),
			wantAud: []string{testAud},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Not parallel: subtests share the fixture's clock.
			token := f.idp.Mint(t, tt.claims, tt.opts...)
			f.clock.Advance(tt.advance)
			defer f.clock.Advance(-tt.advance)

			p := requireVerified(t, f, token)
			if p.Issuer != f.cfg {
				t.Errorf("Issuer = %p, want the configured %p", p.Issuer, f.cfg)
			}
			if p.Subject != "alice" {
				t.Errorf("Subject = %q, want alice", p.Subject)
			}
			if !slices.Equal(p.Audience, tt.wantAud) {
				t.Errorf("Audience = %q, want %q", p.Audience, tt.wantAud)
			}
			if !slices.Equal(p.Scopes, tt.wantScopes) {
				t.Errorf("Scopes = %q, want %q", p.Scopes, tt.wantScopes)
			}
			if p.AppID != tt.wantAppID {
				t.Errorf("AppID = %q, want %q", p.AppID, tt.wantAppID)
			}
			if !p.ExpiresAt.Equal(exp) {
				t.Errorf("ExpiresAt = %v, want %v", p.ExpiresAt, exp)
			}
			if p.Claims["iss"] != f.idp.URL() || p.Claims["sub"] != "alice" {
				t.Errorf("Claims = %v, want iss and sub", p.Claims)
			}
		})
	}
}

func TestVerifyDiscovery(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withConfig(func(is *policy.Issuer) { is.JWKSURI = "" }))
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	if got := f.idp.DiscoveryFetches(); got != 1 {
		t.Errorf("discovery fetches = %d, want 1", got)
	}
	requireFetches(t, f, 1)
}

func TestVerifyRejects(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	now := f.clock.Now()
	mint := func(claims map[string]any, opts ...bearertest.MintOption) func(t *testing.T) string {
		return func(t *testing.T) string { return f.idp.Mint(t, claims, opts...) }
	}
	raw := func(s string) func(*testing.T) string { return func(*testing.T) string { return s } }
	forge := func(header, claims map[string]any, sign func([]byte) []byte) func(*testing.T) string {
		return func(t *testing.T) string { return bearertest.Sign(t, header, claims, sign) }
	}
	b64 := base64.RawURLEncoding.EncodeToString
	valid := f.idp.Mint(t, f.claims())
	validParts := strings.Split(valid, ".")
	withIss := f.claims()
	withIss["iss"] = f.idp.URL()
	rsaHdr := map[string]any{"alg": "HS256", "kid": bearertest.KIDRSA, "typ": "JWT"}

	tests := []struct {
		name  string
		token func(*testing.T) string
		want  error
	}{
		// Shape.
		{"empty", raw(""), bearer.ErrMalformed},
		{"two parts", raw(validParts[0] + "." + validParts[1]), bearer.ErrMalformed},
		{"four parts", raw(valid + ".x"), bearer.ErrMalformed},
		{"five parts (JWE)", raw(validParts[0] + ".a.b.c." + validParts[2]), bearer.ErrMalformed},
		{"bad base64 header", raw("!!!." + validParts[1] + "." + validParts[2]), bearer.ErrMalformed},
		{"bad base64 payload", raw(validParts[0] + ".a*b." + validParts[2]), bearer.ErrMalformed},
		{"bad base64 signature", raw(validParts[0] + "." + validParts[1] + ".%%%"), bearer.ErrMalformed},
		{"padded base64", raw(validParts[0] + "=." + validParts[1] + "." + validParts[2]), bearer.ErrMalformed},
		{"empty signature", raw(validParts[0] + "." + validParts[1] + "."), bearer.ErrMalformed},
		{"header not JSON", raw(b64([]byte("hello")) + "." + validParts[1] + "." + validParts[2]), bearer.ErrMalformed},
		{"payload not an object", forge(map[string]any{"alg": "RS256"}, nil, func([]byte) []byte { return []byte("sig") }), bearer.ErrMalformed},
		{"20 KiB", mint(f.claimsWith(map[string]any{"pad": strings.Repeat("x", 20<<10)})), bearer.ErrMalformed},
		{"crit header", mint(f.claims(), bearertest.WithHeader("crit", []string{"exp"})), bearer.ErrMalformed},
		{"enc header", mint(f.claims(), bearertest.WithHeader("enc", "A256GCM")), bearer.ErrMalformed},
		{"no alg", mint(f.claims(), bearertest.WithHeader("alg", nil)), bearer.ErrMalformed},

		// Algorithms.
		{"alg none", func(t *testing.T) string { return bearertest.Unsecured(t, withIss) }, bearer.ErrAlgorithm},
		{"alg None", forge(map[string]any{"alg": "None"}, withIss, func([]byte) []byte { return []byte("x") }), bearer.ErrAlgorithm},
		{"HS256 keyed with the RSA public key PEM", forge(rsaHdr, withIss, bearertest.HMAC("HS256", f.idp.RSAPublicKeyPEM())), bearer.ErrAlgorithm},
		{"HS256 keyed with the RSA modulus (JWK n)", forge(rsaHdr, withIss, bearertest.HMAC("HS256", f.idp.RSAModulus())), bearer.ErrAlgorithm},
		{"HS512 keyed with the RSA public key PEM, no kid", forge(map[string]any{"alg": "HS512"}, withIss, bearertest.HMAC("HS512", f.idp.RSAPublicKeyPEM())), bearer.ErrAlgorithm},
		{"ES256 header on the RSA key", mint(f.claims(), bearertest.WithAlg("ES256"), bearertest.WithHeader("kid", bearertest.KIDRSA)), bearer.ErrAlgorithm},
		{"RS256 header on the EC key", mint(f.claims(), bearertest.WithHeader("kid", bearertest.KIDEC)), bearer.ErrAlgorithm},
		{"ES384 on a P-256 key", mint(f.claims(), bearertest.WithAlg("ES384")), bearer.ErrAlgorithm},
		{"EdDSA header on the RSA key", mint(f.claims(), bearertest.WithAlg("EdDSA"), bearertest.WithHeader("kid", bearertest.KIDRSA)), bearer.ErrAlgorithm},

		// Signature.
		{"tampered payload", func(t *testing.T) string {
			return bearertest.Tamper(t, f.idp.Mint(t, f.claims()), func(c map[string]any) { c["sub"] = "mallory" })
		}, bearer.ErrSignature},
		{"tampered ES256 payload", func(t *testing.T) string {
			return bearertest.Tamper(t, f.idp.Mint(t, f.claims(), bearertest.WithAlg("ES256")), func(c map[string]any) { c["aud"] = "x" })
		}, bearer.ErrSignature},
		{"signature of another token", raw(validParts[0] + "." + strings.Split(f.idp.Mint(t, f.claimsWith(map[string]any{"sub": "bob"})), ".")[1] + "." + validParts[2]), bearer.ErrSignature},
		{"signed by a key of another issuer", func(t *testing.T) string {
			other := bearertest.NewIssuer(t)
			return other.Mint(t, withIss)
		}, bearer.ErrSignature},

		// Keys.
		{"unknown kid", mint(f.claims(), bearertest.WithKID("nope")), bearer.ErrUnknownKey},

		// Claims.
		{"wrong iss", mint(f.claimsWith(map[string]any{"iss": "https://evil.example"})), bearer.ErrIssuer},
		{"iss with trailing slash", mint(f.claimsWith(map[string]any{"iss": f.idp.URL() + "/"})), bearer.ErrIssuer},
		{"no iss", forge(map[string]any{"alg": "RS256"}, map[string]any{"aud": testAud}, func([]byte) []byte { return []byte("sig") }), bearer.ErrIssuer},
		{"iss not a string", mint(f.claimsWith(map[string]any{"iss": 7})), bearer.ErrMalformed},
		{"wrong aud", mint(f.claimsWith(map[string]any{"aud": "other"})), bearer.ErrAudience},
		{"wrong aud array", mint(f.claimsWith(map[string]any{"aud": []string{"a", "b"}})), bearer.ErrAudience},
		{"no aud", mint(f.claimsWith(map[string]any{"aud": nil})), bearer.ErrAudience},
		{"aud not strings", mint(f.claimsWith(map[string]any{"aud": []any{testAud, 1}})), bearer.ErrMalformed},
		{"expired", mint(f.claimsWith(map[string]any{"exp": now.Add(-time.Minute).Unix()})), bearer.ErrExpired},
		{"expired exactly at exp+leeway", mint(f.claimsWith(map[string]any{"exp": now.Add(-testLeeway).Unix()})), bearer.ErrExpired},
		{"missing exp", mint(f.claimsWith(map[string]any{"exp": nil})), bearer.ErrMissingExp},
		{"exp not a number", mint(f.claimsWith(map[string]any{"exp": "tomorrow"})), bearer.ErrMalformed},
		{"nbf in the future", mint(f.claimsWith(map[string]any{"nbf": now.Add(time.Minute).Unix()})), bearer.ErrNotYetValid},
		{"iat in the future", mint(f.claimsWith(map[string]any{"iat": now.Add(time.Minute).Unix()})), bearer.ErrNotYetValid},
		{"sub not a string", mint(f.claimsWith(map[string]any{"sub": 12})), bearer.ErrMalformed},
		{"scope as array", mint(f.claimsWith(map[string]any{"scope": []string{"a"}})), bearer.ErrMalformed},
		{"scp as number", mint(f.claimsWith(map[string]any{"scp": 3})), bearer.ErrMalformed},
		{"scp array of numbers", mint(f.claimsWith(map[string]any{"scp": []int{1, 2}})), bearer.ErrMalformed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			token := tt.token(t)
			p, err := f.verify(token)
			if p != nil {
				t.Errorf("Verify returned a Principal with error %v", err)
			}
			requireErr(t, err, tt.want, token)
		})
	}
	// Failures are never cached: every one of them was a miss, none a hit.
	if hits, _ := f.v.Stats(); hits != 0 {
		t.Errorf("cache hits after only failures = %d, want 0", hits)
	}
}

// A JWK that declares its alg allows only that alg, whatever its key type would allow.
func TestVerifyJWKAlgPinsAlgorithm(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withIssuerOptions(bearertest.WithJWKAlg()))
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	token := f.idp.Mint(t, f.claims(), bearertest.WithAlg("PS256"))
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrAlgorithm, token)
}

// Keys that must never verify are dropped from the JWKS: encryption keys, symmetric
// keys, keys whose alg contradicts their type.
func TestVerifyIgnoresUnsuitableKeys(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		edit func(jwk map[string]any)
	}{
		{"use enc", func(k map[string]any) { k["use"] = "enc" }},
		{"RSA key labelled HS256", func(k map[string]any) { k["alg"] = "HS256" }},
		{"RSA key labelled ES256", func(k map[string]any) { k["alg"] = "ES256" }},
		{"symmetric key", func(k map[string]any) {
			for _, f := range []string{"n", "e"} {
				delete(k, f)
			}
			k["kty"] = "oct"
			k["k"] = base64.RawURLEncoding.EncodeToString([]byte("secret"))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			k := f.idp.JWK(t, bearertest.KIDRSA)
			tt.edit(k)
			f.idp.SetJWKSBody(mustJSON(t, map[string]any{"keys": []any{k}}))
			token := f.idp.Mint(t, f.claims())
			_, err := f.verify(token)
			requireErr(t, err, bearer.ErrUnknownKey, token)
		})
	}
}

// Without a kid the key must be unambiguous; a second RSA key makes it ambiguous.
func TestVerifyNoKIDAmbiguous(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	f.idp.RotateKey(t)
	f.idp.PublishKeys()
	token := f.idp.Mint(t, f.claims(), bearertest.WithoutKID())
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrUnknownKey, token)
	// The kid-bearing token still verifies.
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
}

// Several configured entries may share an iss; the one whose audiences fit wins.
func TestVerifySameIssuerTwice(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	other := *f.cfg
	other.Name = "corp-other"
	other.Audiences = []string{"other"}
	p, err := f.v.Verify(context.Background(), f.idp.Mint(t, f.claimsWith(map[string]any{"aud": "other"})), []*policy.Issuer{f.cfg, &other})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if p.Issuer != &other {
		t.Errorf("Issuer = %q, want corp-other", p.Issuer.Name)
	}
}

func TestVerifyIssuerNotConfiguredForApp(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	token := f.idp.Mint(t, f.claims())
	for _, issuers := range [][]*policy.Issuer{nil, {}, {nil}, {{Name: "x", Issuer: "https://other", Audiences: []string{testAud}}}} {
		_, err := f.v.Verify(context.Background(), token, issuers)
		requireErr(t, err, bearer.ErrIssuer, token)
	}
	requireFetches(t, f, 0) // choosing the issuer needs no keys
}

func TestVerifyEmptyAudiencesRejects(t *testing.T) {
	t.Parallel()
	f := newFixture(t, withConfig(func(is *policy.Issuer) { is.Audiences = nil }))
	token := f.idp.Mint(t, f.claims())
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrAudience, token)
}

func TestReason(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  error
		want string
	}{
		{nil, ""},
		{errors.New("other"), "error"},
		{bearer.ErrMalformed, "malformed"},
		{bearer.ErrAlgorithm, "disallowed_algorithm"},
		{bearer.ErrSignature, "bad_signature"},
		{bearer.ErrUnknownKey, "unknown_key"},
		{bearer.ErrJWKSUnavailable, "jwks_unavailable"},
		{bearer.ErrIssuer, "wrong_issuer"},
		{bearer.ErrAudience, "wrong_audience"},
		{bearer.ErrExpired, "expired"},
		{bearer.ErrNotYetValid, "not_yet_valid"},
		{bearer.ErrMissingExp, "missing_exp"},
		{fmt.Errorf("outer: %w", fmt.Errorf("%w: exp 2026", bearer.ErrExpired)), "expired"},
	}
	for _, tt := range tests {
		if got := bearer.Reason(tt.err); got != tt.want {
			t.Errorf("Reason(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

// One key the verifier cannot use must not take the rest of the set down with it.
func TestVerifyJWKSWithForeignKeys(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	good := f.idp.JWK(t, bearertest.KIDRSA)
	enc := f.idp.JWK(t, bearertest.KIDEC)
	enc["kid"], enc["use"] = "enc-1", "enc"
	set := map[string]any{"keys": []any{
		map[string]any{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
		enc,
		map[string]any{"kty": "EC", "kid": "secp256k1", "crv": "secp256k1", "x": "AA", "y": "AA"},
		good,
	}}
	f.idp.SetJWKSBody(mustJSON(t, set))
	requireVerified(t, f, f.idp.Mint(t, f.claims()))
	token := f.idp.Mint(t, f.claims(), bearertest.WithKID("hmac"), bearertest.WithAlg("RS256"))
	_, err := f.verify(token)
	requireErr(t, err, bearer.ErrUnknownKey, token)
}
