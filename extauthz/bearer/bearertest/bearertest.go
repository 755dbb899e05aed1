// Package bearertest provides a fake OIDC issuer for tests and benchmarks of code that
// verifies bearer tokens: an httptest server on 127.0.0.1 serving a JWKS and an OpenID
// discovery document, with RSA, EC and Ed25519 signing keys, and helpers to mint valid,
// expired, tampered and forged tokens.
//
// Signing uses only the standard library, independently of the verifier under test, so
// an encoding mistake in one cannot hide a matching mistake in the other.
package bearertest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"hash"
	"maps"
	"math/big"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Key IDs of the keys every Issuer starts with, all published.
const (
	KIDRSA     = "rsa-1" // RSA 2048, default for RS* and PS*
	KIDEC      = "ec-1"  // EC P-256, default for ES*
	KIDEd25519 = "ed-1"  // Ed25519, default for EdDSA
)

// Paths the issuer serves.
const (
	JWKSPath = "/jwks.json"
	// DiscoveryPath is the OpenID Provider Configuration (OIDC Discovery 1.0 §4).
	DiscoveryPath = "/.well-known/openid-configuration"
)

var b64 = base64.RawURLEncoding

// signingKey is one key of the issuer.
type signingKey struct {
	kid    string
	signer crypto.Signer // *rsa.PrivateKey, *ecdsa.PrivateKey or ed25519.PrivateKey
}

// Issuer is a fake OIDC issuer. Its methods are safe for concurrent use.
type Issuer struct {
	srv        *httptest.Server
	publishAlg bool

	mu        sync.Mutex
	keys      []*signingKey // in creation order
	published map[string]bool
	down      bool
	body      []byte // JWKS body override; nil serves the published keys
	nextRSA   int

	fetches     atomic.Int64
	discoveries atomic.Int64
}

// IssuerOption configures NewIssuer.
type IssuerOption func(*Issuer)

// WithJWKAlg makes the JWKS carry "alg" on every key (RS256 for RSA keys, ES256 for the
// EC key, EdDSA for Ed25519), as most production issuers do. Without it, verifiers must
// derive the allowed algorithms from the key type.
func WithJWKAlg() IssuerOption {
	return func(i *Issuer) { i.publishAlg = true }
}

// NewIssuer starts a fake issuer on 127.0.0.1 that is closed when the test ends.
func NewIssuer(t testing.TB, opts ...IssuerOption) *Issuer {
	t.Helper()
	i := &Issuer{published: map[string]bool{}, nextRSA: 2}
	for _, o := range opts {
		o(i)
	}
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatalf("bearertest: generate RSA key: %v", err)
	}
	ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatalf("bearertest: generate EC key: %v", err)
	}
	_, edk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatalf("bearertest: generate Ed25519 key: %v", err)
	}
	i.keys = []*signingKey{{KIDRSA, rk}, {KIDEC, ek}, {KIDEd25519, edk}}
	for _, k := range i.keys {
		i.published[k.kid] = true
	}

	mux := http.NewServeMux()
	mux.HandleFunc("GET "+JWKSPath, i.serveJWKS)
	mux.HandleFunc("GET "+DiscoveryPath, i.serveDiscovery)
	i.srv = httptest.NewServer(mux) // binds 127.0.0.1:0
	t.Cleanup(i.srv.Close)
	return i
}

func (i *Issuer) serveJWKS(w http.ResponseWriter, _ *http.Request) {
	i.fetches.Add(1)
	i.mu.Lock()
	down, body := i.down, i.body
	if body == nil {
		body = i.jwksLocked()
	}
	i.mu.Unlock()
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(body)
}

func (i *Issuer) serveDiscovery(w http.ResponseWriter, _ *http.Request) {
	i.discoveries.Add(1)
	i.mu.Lock()
	down := i.down
	i.mu.Unlock()
	if down {
		http.Error(w, "down", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{
		"issuer":   i.URL(),
		"jwks_uri": i.JWKSURL(),
	})
}

func (i *Issuer) jwksLocked() []byte {
	keys := []map[string]any{}
	for _, k := range i.keys {
		if i.published[k.kid] {
			keys = append(keys, i.jwk(k))
		}
	}
	b, _ := json.Marshal(map[string]any{"keys": keys})
	return b
}

// jwk is the public JWK of k (RFC 7517 §4, RFC 7518 §6).
func (i *Issuer) jwk(k *signingKey) map[string]any {
	m := map[string]any{"kid": k.kid, "use": "sig"}
	var alg string
	switch p := k.signer.Public().(type) {
	case *rsa.PublicKey:
		m["kty"] = "RSA"
		m["n"] = b64.EncodeToString(p.N.Bytes())
		m["e"] = b64.EncodeToString(big.NewInt(int64(p.E)).Bytes())
		alg = "RS256"
	case *ecdsa.PublicKey:
		pt, err := p.Bytes() // 0x04 || X || Y
		if err != nil {
			panic(fmt.Sprintf("bearertest: encode EC key: %v", err))
		}
		n := (len(pt) - 1) / 2
		m["kty"] = "EC"
		m["crv"] = p.Curve.Params().Name
		m["x"] = b64.EncodeToString(pt[1 : 1+n])
		m["y"] = b64.EncodeToString(pt[1+n:])
		alg = "ES256"
	case ed25519.PublicKey:
		m["kty"] = "OKP"
		m["crv"] = "Ed25519"
		m["x"] = b64.EncodeToString(p)
		alg = "EdDSA"
	}
	if i.publishAlg {
		m["alg"] = alg
	}
	return m
}

// URL is the issuer identifier, "http://127.0.0.1:port" (use it as iss).
func (i *Issuer) URL() string { return i.srv.URL }

// JWKSURL is where the JWKS is served.
func (i *Issuer) JWKSURL() string { return i.srv.URL + JWKSPath }

// Client is an HTTP client for the issuer's server.
func (i *Issuer) Client() *http.Client { return i.srv.Client() }

// Fetches reports how many JWKS GETs the issuer answered, including 503s while down.
func (i *Issuer) Fetches() int { return int(i.fetches.Load()) }

// DiscoveryFetches reports how many discovery documents the issuer answered.
func (i *Issuer) DiscoveryFetches() int { return int(i.discoveries.Load()) }

// SetDown makes the JWKS and discovery endpoints answer 503 while down is true.
func (i *Issuer) SetDown(down bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.down = down
}

// SetJWKSBody makes the JWKS endpoint serve body verbatim (any bytes, e.g. a JWKS with
// an "enc" key or a 2 MiB blob); nil goes back to serving the published keys.
func (i *Issuer) SetJWKSBody(body []byte) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.body = body
}

// JWK returns the public JWK of kid as the JWKS serves it, for building custom sets
// with SetJWKSBody. It fails the test if there is no such key.
func (i *Issuer) JWK(t testing.TB, kid string) map[string]any {
	t.Helper()
	i.mu.Lock()
	defer i.mu.Unlock()
	k := i.keyLocked(kid)
	if k == nil {
		t.Fatalf("bearertest: no key %q", kid)
	}
	return i.jwk(k)
}

// RotateKey creates a new RSA signing key and returns its kid. The JWKS serves it only
// after PublishKeys, so tokens signed with it are "unknown kid" until then.
func (i *Issuer) RotateKey(t testing.TB) (kid string) {
	t.Helper()
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatalf("bearertest: generate RSA key: %v", err)
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	kid = fmt.Sprintf("rsa-%d", i.nextRSA)
	i.nextRSA++
	i.keys = append(i.keys, &signingKey{kid, rk})
	return kid
}

// PublishKeys makes the JWKS serve every key, including rotated ones.
func (i *Issuer) PublishKeys() {
	i.mu.Lock()
	defer i.mu.Unlock()
	for _, k := range i.keys {
		i.published[k.kid] = true
	}
}

// Unpublish removes kid from the JWKS; tokens it signs can still be minted.
func (i *Issuer) Unpublish(kid string) {
	i.mu.Lock()
	defer i.mu.Unlock()
	delete(i.published, kid)
}

// RSAPublicKey returns the public key of KIDRSA.
func (i *Issuer) RSAPublicKey() *rsa.PublicKey {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.keyLocked(KIDRSA).signer.Public().(*rsa.PublicKey)
}

// RSAPublicKeyPEM returns KIDRSA's public key as a PKIX "PUBLIC KEY" PEM block: the
// bytes an algorithm-confusion attacker uses as an HS256 secret.
func (i *Issuer) RSAPublicKeyPEM() []byte {
	der, err := x509.MarshalPKIXPublicKey(i.RSAPublicKey())
	if err != nil {
		panic(fmt.Sprintf("bearertest: marshal RSA key: %v", err))
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// RSAModulus returns the big-endian modulus of KIDRSA, the bytes of the JWK's "n".
func (i *Issuer) RSAModulus() []byte {
	return i.RSAPublicKey().N.Bytes()
}

func (i *Issuer) keyLocked(kid string) *signingKey {
	for _, k := range i.keys {
		if k.kid == kid {
			return k
		}
	}
	return nil
}

// mintConfig collects MintOptions.
type mintConfig struct {
	alg       string
	kid       string
	kidSet    bool
	noKID     bool
	headers   map[string]any
	removeHdr []string
}

// MintOption changes how Mint builds a token.
type MintOption func(*mintConfig)

// WithKID signs with the issuer's key kid (e.g. one from RotateKey) and puts kid in the
// header. If the issuer has no such key, the token is signed with the default key for
// the algorithm but still claims kid — an "unknown kid" token.
func WithKID(kid string) MintOption {
	return func(c *mintConfig) { c.kid, c.kidSet = kid, true }
}

// WithAlg signs with alg: RS256/384/512 and PS256/384/512 use KIDRSA, ES256 uses KIDEC,
// EdDSA uses KIDEd25519 (unless WithKID picks another key).
func WithAlg(alg string) MintOption {
	return func(c *mintConfig) { c.alg = alg }
}

// WithoutKID leaves kid out of the header.
func WithoutKID() MintOption {
	return func(c *mintConfig) { c.noKID = true }
}

// WithHeader sets header field k to v after alg and kid are filled in, so it can also
// override them (the signature is made over the final header). A nil v removes k.
func WithHeader(k string, v any) MintOption {
	return func(c *mintConfig) {
		if v == nil {
			c.removeHdr = append(c.removeHdr, k)
			return
		}
		if c.headers == nil {
			c.headers = map[string]any{}
		}
		c.headers[k] = v
	}
}

// defaultKID is the key used for alg when WithKID does not choose one.
func defaultKID(alg string) string {
	switch {
	case strings.HasPrefix(alg, "ES"):
		return KIDEC
	case alg == "EdDSA":
		return KIDEd25519
	default:
		return KIDRSA
	}
}

// Mint returns a compact JWS over claims, signed with RS256 and KIDRSA unless options
// say otherwise. iss is set to URL() if claims has none; nothing else is added, so
// claims decides exp, aud and the rest (see Claims). claims is not modified.
func (i *Issuer) Mint(t testing.TB, claims map[string]any, opts ...MintOption) string {
	t.Helper()
	c := mintConfig{alg: "RS256"}
	for _, o := range opts {
		o(&c)
	}
	kid := c.kid
	if !c.kidSet {
		kid = defaultKID(c.alg)
	}
	i.mu.Lock()
	k := i.keyLocked(kid)
	if k == nil {
		k = i.keyLocked(defaultKID(c.alg))
	}
	i.mu.Unlock()

	hdr := map[string]any{"alg": c.alg, "typ": "JWT"}
	if !c.noKID {
		hdr["kid"] = kid
	}
	maps.Copy(hdr, c.headers)
	for _, r := range c.removeHdr {
		delete(hdr, r)
	}

	cl := maps.Clone(claims)
	if cl == nil {
		cl = map[string]any{}
	}
	if _, ok := cl["iss"]; !ok {
		cl["iss"] = i.URL()
	}
	return Sign(t, hdr, cl, func(input []byte) []byte {
		sig, err := signWith(k.signer, c.alg, input)
		if err != nil {
			t.Fatalf("bearertest: sign %s with %s: %v", c.alg, k.kid, err)
		}
		return sig
	})
}

// Claims returns the usual claims of a valid access token: sub, aud, iat (exp-1h) and
// exp. Mint adds iss.
func Claims(sub, aud string, exp time.Time) map[string]any {
	return map[string]any{
		"sub": sub,
		"aud": aud,
		"iat": exp.Add(-time.Hour).Unix(),
		"exp": exp.Unix(),
	}
}

// Sign assembles a compact JWS from header and claims, signing the JWS signing input
// (base64url(header) "." base64url(claims)) with sign. Use it to forge tokens, e.g.
// with HMAC("HS256", issuer.RSAPublicKeyPEM()).
func Sign(t testing.TB, header, claims map[string]any, sign func(signingInput []byte) []byte) string {
	t.Helper()
	h, err := json.Marshal(header)
	if err != nil {
		t.Fatalf("bearertest: marshal header: %v", err)
	}
	p, err := json.Marshal(claims)
	if err != nil {
		t.Fatalf("bearertest: marshal claims: %v", err)
	}
	input := b64.EncodeToString(h) + "." + b64.EncodeToString(p)
	return input + "." + b64.EncodeToString(sign([]byte(input)))
}

// HMAC returns a signer for Sign computing HS256, HS384 or HS512 keyed with secret.
func HMAC(alg string, secret []byte) func([]byte) []byte {
	var h func() hash.Hash
	switch alg {
	case "HS256":
		h = sha256.New
	case "HS384":
		h = sha512.New384
	case "HS512":
		h = sha512.New
	default:
		panic("bearertest: HMAC: unsupported alg " + alg)
	}
	return func(input []byte) []byte {
		m := hmac.New(h, secret)
		m.Write(input)
		return m.Sum(nil)
	}
}

// Unsecured returns an unsecured JWT (RFC 7519 §6: "alg":"none", empty signature).
func Unsecured(t testing.TB, claims map[string]any) string {
	t.Helper()
	return Sign(t, map[string]any{"alg": "none", "typ": "JWT"}, claims, func([]byte) []byte { return nil })
}

// Tamper decodes token's payload, lets edit change the claims, and re-encodes it with
// the original header and signature — a token whose signature no longer matches.
func Tamper(t testing.TB, token string, edit func(claims map[string]any)) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("bearertest: Tamper: want 3 parts, got %d", len(parts))
	}
	raw, err := b64.DecodeString(parts[1])
	if err != nil {
		t.Fatalf("bearertest: Tamper: decode payload: %v", err)
	}
	var claims map[string]any
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatalf("bearertest: Tamper: parse payload: %v", err)
	}
	edit(claims)
	p, err := json.Marshal(claims)
	if err != nil {
		t.Fatalf("bearertest: Tamper: marshal payload: %v", err)
	}
	return parts[0] + "." + b64.EncodeToString(p) + "." + parts[2]
}

// signWith computes a JWS signature (RFC 7518 §3) with the standard library.
func signWith(key crypto.Signer, alg string, input []byte) ([]byte, error) {
	hashFor := map[string]crypto.Hash{"256": crypto.SHA256, "384": crypto.SHA384, "512": crypto.SHA512}
	if alg == "EdDSA" {
		k, ok := key.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("EdDSA needs an Ed25519 key, have %T", key)
		}
		return ed25519.Sign(k, input), nil
	}
	if len(alg) != 5 {
		return nil, fmt.Errorf("unsupported alg %q", alg)
	}
	h, ok := hashFor[alg[2:]]
	if !ok {
		return nil, fmt.Errorf("unsupported alg %q", alg)
	}
	d := h.New()
	d.Write(input)
	digest := d.Sum(nil)
	switch alg[:2] {
	case "RS":
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s needs an RSA key, have %T", alg, key)
		}
		return rsa.SignPKCS1v15(rand.Reader, k, h, digest)
	case "PS":
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s needs an RSA key, have %T", alg, key)
		}
		return rsa.SignPSS(rand.Reader, k, h, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	case "ES":
		k, ok := key.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s needs an EC key, have %T", alg, key)
		}
		r, s, err := ecdsa.Sign(rand.Reader, k, digest)
		if err != nil {
			return nil, err
		}
		// JWS uses fixed-size R || S, not ASN.1 (RFC 7518 §3.4).
		n := (k.Curve.Params().BitSize + 7) / 8
		out := make([]byte, 2*n)
		r.FillBytes(out[:n])
		s.FillBytes(out[n:])
		return out, nil
	}
	return nil, fmt.Errorf("unsupported alg %q", alg)
}
