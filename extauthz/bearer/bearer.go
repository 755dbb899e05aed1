// Package bearer verifies OAuth bearer JWTs for mcpgate's Envoy ext_authz server.
//
// It runs on the hot path (once per HTTP request), so a token that verified once is
// remembered by its SHA-256 and reused without signature work until it expires, its
// cache entry ages out, or the issuer's configuration changes. JWKS documents are fetched
// lazily, shared between concurrent requests, refreshed in the background and kept when
// the issuer is down.
//
// Security choices, each following RFC 8725 (JWT Best Current Practices):
//   - the signature algorithm is chosen by the key, never by the token alone (§3.1), so
//     HMAC and "none" are never accepted and "HS256 keyed with the RSA public key" fails;
//   - the unverified "iss" is only used to pick the configured issuer (§3.8), and then
//     "iss", "aud" (§3.9) and the time claims are checked after the signature;
//   - errors never contain the token, the signature or key material, because they end up
//     in decision logs and in the response to the caller.
package bearer

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/mcpgate/mcpgate/policy"
)

// Sentinel errors. Verify wraps exactly one of them, so callers can branch with
// errors.Is and Reason can turn them into metric labels.
var (
	// ErrMalformed: not a compact JWS of acceptable size, or a claim has the wrong type.
	ErrMalformed = errors.New("malformed token")
	// ErrAlgorithm: the header alg is not allowed for the selected key (or never, like
	// "none" and HMAC).
	ErrAlgorithm = errors.New("disallowed signature algorithm")
	// ErrSignature: the signature does not verify with the selected key.
	ErrSignature = errors.New("bad signature")
	// ErrUnknownKey: no key of the issuer's JWKS matches the token's kid (or, without a
	// kid, not exactly one key fits).
	ErrUnknownKey = errors.New("unknown signing key")
	// ErrJWKSUnavailable: the issuer's keys were never fetched successfully.
	ErrJWKSUnavailable = errors.New("issuer keys unavailable")
	// ErrIssuer: the token's iss is not one of the issuers the target app trusts.
	ErrIssuer = errors.New("untrusted issuer")
	// ErrAudience: the token's aud does not name any configured audience.
	ErrAudience = errors.New("wrong audience")
	// ErrExpired: now is at or past exp plus leeway.
	ErrExpired = errors.New("token expired")
	// ErrNotYetValid: nbf or iat lies in the future beyond the leeway.
	ErrNotYetValid = errors.New("token not yet valid")
	// ErrMissingExp: the token has no exp; tokens that never expire are refused.
	ErrMissingExp = errors.New("token has no exp")
)

// reasons maps each sentinel to its metric label. Order matters only in that every error
// wraps exactly one sentinel.
var reasons = []struct {
	err    error
	reason string
}{
	{ErrMalformed, "malformed"},
	{ErrAlgorithm, "disallowed_algorithm"},
	{ErrSignature, "bad_signature"},
	{ErrUnknownKey, "unknown_key"},
	{ErrJWKSUnavailable, "jwks_unavailable"},
	{ErrIssuer, "wrong_issuer"},
	{ErrAudience, "wrong_audience"},
	{ErrExpired, "expired"},
	{ErrNotYetValid, "not_yet_valid"},
	{ErrMissingExp, "missing_exp"},
}

// Reason maps an error from Verify to a short, stable snake_case label for metrics and
// logs. It returns "" for nil and "error" for an error that wraps no sentinel.
func Reason(err error) string {
	if err == nil {
		return ""
	}
	for _, r := range reasons {
		if errors.Is(err, r.err) {
			return r.reason
		}
	}
	return "error"
}

// issuerConfig is a value copy of an Issuer's fields: the fingerprint a cache entry is
// bound to. Policy reload rebuilds Issuers, so pointer identity says nothing; comparing
// fields directly is exact and cheaper than hashing them on every request.
type issuerConfig struct {
	name, issuer, jwksURI, appIDClaim string
	audiences                         []string
	leeway                            time.Duration
}

func configOf(is *policy.Issuer) issuerConfig {
	return issuerConfig{
		name:       is.Name,
		issuer:     is.Issuer,
		jwksURI:    is.JWKSURI,
		appIDClaim: is.AppIDClaim,
		audiences:  slices.Clone(is.Audiences),
		leeway:     is.Leeway,
	}
}

// matches reports whether is still has exactly the configuration c was taken from.
func (c *issuerConfig) matches(is *policy.Issuer) bool {
	return c.issuer == is.Issuer && c.name == is.Name && c.jwksURI == is.JWKSURI &&
		c.appIDClaim == is.AppIDClaim && c.leeway == is.Leeway && slices.Equal(c.audiences, is.Audiences)
}

// Principal is what a verified token says. Principals may be shared between requests
// through the token cache: treat every field, including the slices and Claims, as
// read-only.
type Principal struct {
	// Issuer is the configured issuer that verified the token.
	Issuer *policy.Issuer
	// Subject is "sub" ("" if absent).
	Subject string
	// Audience is "aud", normalised to a list.
	Audience []string
	// Scopes is the union of "scope" (space-separated string) and "scp" (space-separated
	// string or array of strings), deduplicated, in order of first appearance.
	Scopes []string
	// AppID is the value of Issuer.AppIDClaim if set and present as a string, else "".
	AppID string
	// ExpiresAt is "exp".
	ExpiresAt time.Time
	// Claims holds all payload claims as decoded by encoding/json (numbers are float64),
	// for policy input.
	Claims map[string]any
	// RawClaims is the verified payload JSON exactly as the issuer signed it. ext_authz
	// forwards it to ext_proc as one string: far cheaper to marshal than a nested
	// protobuf Struct on every request, and decoded only when a Rego policy needs it.
	RawClaims []byte
}

// Options configure a Verifier. The zero value gives production defaults.
type Options struct {
	// HTTPClient fetches discovery documents and JWKS. Default: a client with a 5s timeout.
	HTTPClient *http.Client
	// Now is the clock. Default time.Now; tests inject a fake clock.
	Now func() time.Time
	// RefreshInterval is how old a JWKS may get before it is refreshed (default 5m). The
	// refresh runs in the background; a failed refresh keeps serving the cached keys.
	RefreshInterval time.Duration
	// MinRefetch rate-limits fetches per JWKS source (default 30s): an unknown kid, a
	// failed first fetch or a failed refresh cause at most one fetch per MinRefetch, so a
	// flood of tokens with random kids cannot be turned against the issuer.
	MinRefetch time.Duration
	// CacheSize bounds the verified-token cache (default 10000; negative disables it).
	CacheSize int
	// MaxCacheTTL is how long a cached verification is reused at most (default 5m); it is
	// never reused past the token's exp plus leeway.
	MaxCacheTTL time.Duration
	// Logger receives JWKS fetch failures with their cause (default: no-op). Verify's
	// errors only say that keys were unavailable, because they may reach the caller.
	Logger *zap.Logger
}

// Defaults for Options.
const (
	DefaultHTTPTimeout     = 5 * time.Second
	DefaultRefreshInterval = 5 * time.Minute
	DefaultMinRefetch      = 30 * time.Second
	DefaultCacheSize       = 10000
	DefaultMaxCacheTTL     = 5 * time.Minute
)

// Verifier verifies bearer tokens against configured issuers. It is safe for concurrent
// use; create one per process so that JWKS and verified tokens are shared.
type Verifier struct {
	client          *http.Client
	now             func() time.Time
	refreshInterval time.Duration
	minRefetch      time.Duration
	maxCacheTTL     time.Duration
	log             *zap.Logger

	cache *tokenCache // nil when disabled

	mu      sync.Mutex
	sources map[string]*keySource

	hits, misses atomic.Uint64
}

// NewVerifier returns a Verifier with opts, zero fields replaced by their defaults.
func NewVerifier(opts Options) *Verifier {
	v := &Verifier{
		client:          opts.HTTPClient,
		now:             opts.Now,
		refreshInterval: opts.RefreshInterval,
		minRefetch:      opts.MinRefetch,
		maxCacheTTL:     opts.MaxCacheTTL,
		log:             opts.Logger,
		sources:         map[string]*keySource{},
	}
	if v.client == nil {
		v.client = &http.Client{Timeout: DefaultHTTPTimeout}
	}
	if v.now == nil {
		v.now = time.Now
	}
	if v.refreshInterval <= 0 {
		v.refreshInterval = DefaultRefreshInterval
	}
	if v.minRefetch <= 0 {
		v.minRefetch = DefaultMinRefetch
	}
	if v.maxCacheTTL <= 0 {
		v.maxCacheTTL = DefaultMaxCacheTTL
	}
	if v.log == nil {
		v.log = zap.NewNop()
	}
	size := opts.CacheSize
	if size == 0 {
		size = DefaultCacheSize
	}
	if size > 0 {
		v.cache = newTokenCache(size)
	}
	return v
}

// Stats reports verified-token cache hits (no parsing or signature work was done) and
// misses (the token went through full verification, successful or not).
func (v *Verifier) Stats() (hits, misses uint64) {
	return v.hits.Load(), v.misses.Load()
}

// Verify checks token against issuers (the target app's trusted issuers) and returns
// what it says. Every error wraps exactly one of the package's sentinel errors.
func (v *Verifier) Verify(ctx context.Context, token string, issuers []*policy.Issuer) (*Principal, error) {
	// Check the size before hashing: an oversized header must not cost a SHA-256.
	if len(token) > MaxTokenSize {
		return nil, malformed("token longer than %d bytes", MaxTokenSize)
	}
	now := v.now()
	var key cacheKey
	if v.cache != nil {
		key = hashToken(token)
		if p := v.cache.get(key, issuers, now); p != nil {
			v.hits.Add(1)
			return p, nil
		}
	}
	v.misses.Add(1)

	p, validUntil, err := v.verify(ctx, token, issuers, now)
	if err != nil {
		// Failures are never cached: they are cheap to produce, so caching them would
		// let anyone flush the good entries out of the cache.
		return nil, err
	}
	if v.cache != nil {
		v.cache.put(key, p, validUntil, now.Add(v.maxCacheTTL), now)
	}
	return p, nil
}
