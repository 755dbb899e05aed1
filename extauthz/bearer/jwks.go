package bearer

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"go.uber.org/zap"

	"github.com/mcpgate/mcpgate/policy"
)

// MaxJWKSSize bounds discovery and JWKS response bodies: a compromised or broken
// endpoint must not make mcpgate buffer without limit.
const MaxJWKSSize = 1 << 20

// fetchTimeout bounds a fetch even when Options.HTTPClient has no timeout. Fetches run
// detached from the request that triggered them (other requests may be waiting on the
// same fetch), so the request's context cannot bound them.
const fetchTimeout = 30 * time.Second

// minRSABits: RSA keys below 2048 bits are ignored (NIST SP 800-131A; RFC 7518 §3.3
// requires at least 2048 for RS*).
const minRSABits = 2048

// verifyKey is one usable public key of a JWKS, with the algorithms it may verify.
type verifyKey struct {
	kid string
	pub any // *rsa.PublicKey, *ecdsa.PublicKey or ed25519.PublicKey
	// algs is the allow-list, from the key (its "alg", else its type and curve), never
	// from the token.
	algs map[string]jwa.SignatureAlgorithm
}

// keySet is one fetched JWKS, reduced to the keys we may verify with. Immutable.
type keySet struct {
	keys  []*verifyKey
	byKID map[string][]*verifyKey
}

// fetchCall is one fetch in flight; everyone who needs it waits on done.
type fetchCall struct {
	done chan struct{}
	err  error
}

// keySource is the cached JWKS of one URL (or of one issuer, when discovered).
type keySource struct {
	issuer  string // for discovery and log lines
	jwksURI string // configured URI; "" means OIDC discovery from issuer

	// mu guards the fields below. It is held only to read or swap them, never across I/O.
	mu        sync.Mutex
	keys      *keySet
	fetchedAt time.Time // start of the last successful fetch
	attemptAt time.Time // start of the last fetch, successful or not
	inflight  *fetchCall
}

// source returns the shared key source of is. Issuers with the same JWKS URI share one,
// so a policy reload (which rebuilds Issuers) keeps the fetched keys.
func (v *Verifier) source(is *policy.Issuer) *keySource {
	id := "jwks " + is.JWKSURI
	if is.JWKSURI == "" {
		id = "oidc " + is.Issuer
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	s := v.sources[id]
	if s == nil {
		s = &keySource{issuer: is.Issuer, jwksURI: is.JWKSURI}
		v.sources[id] = s
	}
	return s
}

// keyFor returns the key of is that verifies a token with this kid and alg, fetching or
// refetching the JWKS as the rules allow.
func (v *Verifier) keyFor(ctx context.Context, is *policy.Issuer, kid, alg string) (*verifyKey, error) {
	s := v.source(is)
	ks, err := v.keys(ctx, s, is)
	if err != nil {
		return nil, err
	}
	k, refetch, err := ks.lookup(kid, alg)
	if !refetch {
		return k, wrapKeyErr(err, is)
	}
	// The issuer may have rotated keys since our last fetch.
	if ks2, fetched := v.refetch(ctx, s); fetched && ks2 != nil {
		k, _, err = ks2.lookup(kid, alg)
	}
	return k, wrapKeyErr(err, is)
}

func wrapKeyErr(err error, is *policy.Issuer) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("%w (issuer %q)", err, is.Name)
}

// lookup chooses the key for kid and alg. refetch says whether a newer JWKS could help.
func (ks *keySet) lookup(kid, alg string) (k *verifyKey, refetch bool, err error) {
	if kid != "" {
		cands := ks.byKID[kid]
		if len(cands) == 0 {
			return nil, true, fmt.Errorf("%w: kid %q", ErrUnknownKey, clip(kid))
		}
		for _, c := range cands {
			if _, ok := c.algs[alg]; ok {
				return c, false, nil
			}
		}
		return nil, false, fmt.Errorf("%w: %s is not allowed for kid %q", ErrAlgorithm, alg, clip(kid))
	}
	// No kid: usable only when exactly one key fits, so a verifier never tries keys in
	// turn (which would multiply signature work and blur which key signed).
	var found *verifyKey
	n := 0
	for _, c := range ks.keys {
		if _, ok := c.algs[alg]; ok {
			found = c
			n++
		}
	}
	switch n {
	case 1:
		return found, false, nil
	case 0:
		return nil, true, fmt.Errorf("%w: token has no kid and no key allows %s", ErrUnknownKey, alg)
	default:
		return nil, false, fmt.Errorf("%w: token has no kid and %d keys allow %s", ErrUnknownKey, n, alg)
	}
}

// keys returns the cached key set of s, fetching it on first use. A stale set is
// returned as is while a background refresh replaces it, so request latency never
// includes a periodic refresh.
func (v *Verifier) keys(ctx context.Context, s *keySource, is *policy.Issuer) (*keySet, error) {
	now := v.now()
	s.mu.Lock()
	ks := s.keys
	var call *fetchCall
	switch {
	case ks != nil:
		if now.Sub(s.fetchedAt) >= v.refreshInterval && s.inflight == nil && now.Sub(s.attemptAt) >= v.minRefetch {
			v.startFetchLocked(s, now)
		}
	case s.inflight != nil:
		call = s.inflight
	case s.attemptAt.IsZero() || now.Sub(s.attemptAt) >= v.minRefetch:
		call = v.startFetchLocked(s, now)
	}
	s.mu.Unlock()
	if ks != nil {
		return ks, nil
	}
	if call == nil {
		// The last attempt failed less than MinRefetch ago: fail fast rather than
		// hammering an issuer that is down.
		return nil, fmt.Errorf("%w: issuer %q (retrying after %s)", ErrJWKSUnavailable, is.Name, v.minRefetch)
	}
	if err := wait(ctx, call); err != nil {
		return nil, fmt.Errorf("%w: issuer %q", ErrJWKSUnavailable, is.Name)
	}
	s.mu.Lock()
	ks = s.keys
	s.mu.Unlock()
	if ks == nil {
		return nil, fmt.Errorf("%w: issuer %q", ErrJWKSUnavailable, is.Name)
	}
	return ks, nil
}

// refetch fetches s again for an unknown kid unless the last fetch started less than
// MinRefetch ago (joining a fetch already in flight). fetched reports whether a fetch
// completed successfully; ks is the set to look in.
func (v *Verifier) refetch(ctx context.Context, s *keySource) (ks *keySet, fetched bool) {
	now := v.now()
	s.mu.Lock()
	call := s.inflight
	if call == nil && now.Sub(s.attemptAt) >= v.minRefetch {
		call = v.startFetchLocked(s, now)
	}
	s.mu.Unlock()
	if call == nil {
		return nil, false
	}
	if err := wait(ctx, call); err != nil {
		return nil, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.keys, true
}

func wait(ctx context.Context, c *fetchCall) error {
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// startFetchLocked starts fetching s in the background. s.mu must be held.
func (v *Verifier) startFetchLocked(s *keySource, now time.Time) *fetchCall {
	c := &fetchCall{done: make(chan struct{})}
	s.inflight = c
	s.attemptAt = now
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
		defer cancel()
		ks, err := v.fetchKeySet(ctx, s)
		s.mu.Lock()
		s.inflight = nil
		if err == nil {
			s.keys = ks
			s.fetchedAt = now
		}
		// On failure the previous set (if any) stays: an issuer outage must not reject
		// tokens whose keys are still known.
		cached := s.keys != nil
		s.mu.Unlock()
		if err != nil {
			v.log.Warn("bearer: fetching JWKS failed",
				zap.String("issuer", s.issuer), zap.Bool("serving_cached_keys", cached), zap.Error(err))
		}
		c.err = err
		close(c.done)
	}()
	return c
}

// fetchKeySet resolves the JWKS URI (via discovery if needed) and fetches the set.
func (v *Verifier) fetchKeySet(ctx context.Context, s *keySource) (*keySet, error) {
	uri := s.jwksURI
	if uri == "" {
		var err error
		if uri, err = v.discover(ctx, s.issuer); err != nil {
			return nil, err
		}
	}
	body, err := v.get(ctx, uri)
	if err != nil {
		return nil, err
	}
	ks, skipped, err := parseKeySet(body)
	if err != nil {
		return nil, fmt.Errorf("parse JWKS from %s: %w", redact(uri), err)
	}
	if skipped > 0 {
		v.log.Debug("bearer: JWKS keys skipped as unusable for verification",
			zap.String("issuer", s.issuer), zap.Int("skipped", skipped), zap.Int("kept", len(ks.keys)))
	}
	return ks, nil
}

// discover reads jwks_uri from the issuer's OpenID Provider Configuration (OIDC
// Discovery 1.0 §4).
func (v *Verifier) discover(ctx context.Context, issuer string) (string, error) {
	u := strings.TrimSuffix(issuer, "/") + "/.well-known/openid-configuration"
	body, err := v.get(ctx, u)
	if err != nil {
		return "", err
	}
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return "", fmt.Errorf("parse discovery document %s: %w", redact(u), err)
	}
	// OIDC Discovery §4.3: the document's issuer must be identical to the one used to
	// find it, which stops one issuer's document pointing at another's keys.
	if doc.Issuer != issuer {
		return "", fmt.Errorf("discovery document %s names issuer %q, want %q", redact(u), doc.Issuer, issuer)
	}
	ju, err := url.Parse(doc.JWKSURI)
	if err != nil || ju.Host == "" || !secureURL(ju) {
		// Keys fetched in plaintext could be anyone's: the policy's rule for jwksUri
		// (https, http only for loopback hosts) holds for a discovered one too.
		return "", fmt.Errorf("discovery document %s has no usable jwks_uri (https is required, http only for loopback hosts)", redact(u))
	}
	return doc.JWKSURI, nil
}

// secureURL reports whether keys may be fetched from u: https, or http to a loopback host
// (local development and tests), the rule the policy applies to issuers and jwksUri.
func secureURL(u *url.URL) bool {
	switch u.Scheme {
	case "https":
		return true
	case "http":
		h := u.Hostname()
		ip := net.ParseIP(h)
		return h == "localhost" || ip != nil && ip.IsLoopback()
	}
	return false
}

// errTooLarge is returned for bodies over MaxJWKSSize.
var errTooLarge = errors.New("response body too large")

// get fetches u and returns its body if the status is 200 and it fits MaxJWKSSize.
func (v *Verifier) get(ctx context.Context, u string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", redact(u), err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := v.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", redact(u), err)
	}
	defer resp.Body.Close()
	if resp.Request != nil && !secureURL(resp.Request.URL) {
		// A redirect to plaintext: what came back could be anyone's keys.
		return nil, fmt.Errorf("GET %s: redirected to %s: https is required (http only for loopback hosts)", redact(u), redact(resp.Request.URL.String()))
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", redact(u), resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxJWKSSize+1))
	if err != nil {
		return nil, fmt.Errorf("GET %s: read body: %w", redact(u), err)
	}
	if len(body) > MaxJWKSSize {
		return nil, fmt.Errorf("GET %s: %w (limit %d bytes)", redact(u), errTooLarge, MaxJWKSSize)
	}
	return body, nil
}

// redact drops userinfo from a URL before it is logged.
func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparsable URL)"
	}
	return p.Redacted()
}

// parseKeySet keeps the keys of a JWKS (RFC 7517 §5) we may verify with and works out
// their algorithms once, so that verification does no JWK work. Keys are parsed one by
// one: a key type jwx does not know (a post-quantum key, say) or one broken key must not
// make the issuer's other keys unusable.
func parseKeySet(body []byte) (ks *keySet, skipped int, err error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(body, &doc); err != nil {
		return nil, 0, fmt.Errorf("not a JWKS: %w", err)
	}
	if doc.Keys == nil {
		return nil, 0, errors.New(`not a JWKS: no "keys" array`)
	}
	ks = &keySet{byKID: map[string][]*verifyKey{}}
	for _, raw := range doc.Keys {
		k, err := jwk.ParseKey(raw)
		if err != nil {
			skipped++
			continue
		}
		vk := toVerifyKey(k)
		if vk == nil {
			skipped++
			continue
		}
		ks.keys = append(ks.keys, vk)
		if vk.kid != "" {
			ks.byKID[vk.kid] = append(ks.byKID[vk.kid], vk)
		}
	}
	return ks, skipped, nil
}

// toVerifyKey returns nil for keys that must not verify signatures: encryption keys,
// symmetric keys, weak RSA keys, keys whose alg does not fit their type.
func toVerifyKey(k jwk.Key) *verifyKey {
	if use, ok := k.KeyUsage(); ok && use != "sig" {
		return nil
	}
	var pub any
	raw, err := jwk.PublicRawKeyOf(k)
	if err != nil {
		return nil
	}
	var byType []string
	switch p := raw.(type) {
	case *rsa.PublicKey:
		if p.N.BitLen() < minRSABits {
			return nil
		}
		pub = p
		byType = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
	case *ecdsa.PublicKey:
		pub = p
		// RFC 7518 §3.4: each ES* algorithm fixes the curve.
		switch p.Curve {
		case elliptic.P256():
			byType = []string{"ES256"}
		case elliptic.P384():
			byType = []string{"ES384"}
		case elliptic.P521():
			byType = []string{"ES512"}
		default:
			return nil
		}
	case ed25519.PublicKey:
		pub = p
		byType = []string{"EdDSA"}
	default:
		// Symmetric ("oct") keys land here: an HMAC secret published in a JWKS would be
		// known to everyone.
		return nil
	}
	allowed := byType
	if a, ok := k.Algorithm(); ok && a.String() != "" {
		// A key that declares its alg allows only that one, and only if it fits the key
		// type (an RSA key labelled HS256 is dropped, not trusted).
		allowed = nil
		for _, b := range byType {
			if b == a.String() {
				allowed = []string{b}
			}
		}
		if allowed == nil {
			return nil
		}
	}
	vk := &verifyKey{pub: pub, algs: make(map[string]jwa.SignatureAlgorithm, len(allowed))}
	vk.kid, _ = k.KeyID()
	for _, a := range allowed {
		sa, ok := jwa.LookupSignatureAlgorithm(a)
		if !ok {
			continue
		}
		vk.algs[a] = sa
	}
	if len(vk.algs) == 0 {
		return nil
	}
	return vk
}
