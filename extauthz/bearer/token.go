package bearer

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/lestrrat-go/jwx/v3/jws"

	"github.com/mcpgate/mcpgate/policy"
)

// MaxTokenSize is the largest token Verify accepts, in bytes. Real access tokens are a
// few KiB; the bound keeps decoding and hashing cheap for hostile input.
const MaxTokenSize = 16 << 10

// b64 decodes JWS segments: base64url without padding, strictly (RFC 7515 §2), so one
// token has exactly one encoding and trailing garbage bits are refused.
var b64 = base64.RawURLEncoding.Strict()

// header is the protected JOSE header, reduced to what the verifier acts on.
type header struct {
	Alg string
	Kid string
	// has records every member name, so that members we refuse (crit, b64, enc) are
	// refused whatever their value.
	has map[string]bool
}

// parseHeader decodes the header JSON with exact, case-sensitive member names (JWS
// names are case-sensitive, RFC 7515 §4; encoding/json's struct matching is not).
func parseHeader(b []byte) (header, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(b, &m); err != nil || m == nil {
		return header{}, malformed("header is not a JSON object")
	}
	h := header{has: make(map[string]bool, len(m))}
	for k := range m {
		h.has[k] = true
	}
	if raw, ok := m["alg"]; ok {
		if err := json.Unmarshal(raw, &h.Alg); err != nil {
			return header{}, malformed("header alg is not a string")
		}
	}
	if raw, ok := m["kid"]; ok {
		if err := json.Unmarshal(raw, &h.Kid); err != nil {
			return header{}, malformed("header kid is not a string")
		}
	}
	return h, nil
}

// parsedToken is a compact JWS split and decoded, not yet verified.
type parsedToken struct {
	raw     string
	header  header
	claims  map[string]any
	payload []byte // the decoded payload JSON, kept for Principal.RawClaims
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// clip shortens attacker-controlled strings (kid, iss) before they go into an error,
// so errors stay small and log lines bounded.
func clip(s string) string {
	const max = 64
	if len(s) <= max {
		return s
	}
	return s[:max] + "…"
}

// parseToken splits and decodes a compact JWS. Decoding errors are not wrapped: their
// text can quote input bytes, and errors must never echo the token.
func parseToken(token string) (*parsedToken, error) {
	if token == "" {
		return nil, malformed("empty token")
	}
	h, rest, ok := strings.Cut(token, ".")
	p, s, ok2 := strings.Cut(rest, ".")
	switch {
	case !ok || !ok2:
		return nil, malformed("not a compact JWS (want 3 dot-separated parts)")
	case strings.Contains(s, "."):
		// 5 parts is a JWE; we only accept signed tokens.
		return nil, malformed("not a compact JWS (want 3 dot-separated parts)")
	case h == "" || p == "":
		return nil, malformed("empty header or payload")
	}

	hb, err := b64.DecodeString(h)
	if err != nil {
		return nil, malformed("header is not base64url")
	}
	t := &parsedToken{raw: token}
	if t.header, err = parseHeader(hb); err != nil {
		return nil, err
	}
	if err := checkHeader(&t.header); err != nil {
		return nil, err
	}
	// The signature is checked for shape after the header so that an unsecured token
	// ("alg":"none" with an empty signature) is reported as the algorithm problem it is.
	if s == "" {
		return nil, malformed("empty signature")
	}
	if _, err := b64.DecodeString(s); err != nil {
		return nil, malformed("signature is not base64url")
	}

	pb, err := b64.DecodeString(p)
	if err != nil {
		return nil, malformed("payload is not base64url")
	}
	if err := json.Unmarshal(pb, &t.claims); err != nil || t.claims == nil {
		return nil, malformed("payload is not a JSON object")
	}
	t.payload = pb
	return t, nil
}

// checkHeader refuses what the verifier does not implement rather than ignoring it.
func checkHeader(h *header) error {
	switch {
	case h.Alg == "":
		return malformed("header has no alg")
	case h.has["enc"]:
		return malformed("encrypted tokens (JWE) are not accepted")
	case !signatureAlgs[h.Alg]:
		// Covers "none" (RFC 8725 §3.1: never accept unsecured JWTs) and HS* (a public
		// key must never be usable as an HMAC secret).
		return fmt.Errorf("%w: %q", ErrAlgorithm, clip(h.Alg))
	case h.has["crit"]:
		// RFC 7515 §4.1.11: a recipient must reject a JWS whose critical extensions it
		// does not understand, and we understand none.
		return malformed("header has crit extensions")
	case h.has["b64"]:
		// RFC 7797 unencoded payloads are not JWTs.
		return malformed("header has b64")
	}
	// jku, x5u and jwk are ignored on purpose: keys come from the configured issuer
	// only, never from locations or keys the token names (RFC 8725 §3.10).
	return nil
}

// signatureAlgs are the only algorithms any key may allow.
var signatureAlgs = map[string]bool{
	"RS256": true, "RS384": true, "RS512": true,
	"PS256": true, "PS384": true, "PS512": true,
	"ES256": true, "ES384": true, "ES512": true,
	"EdDSA": true,
}

// verify does full verification of a token that missed the cache. validUntil is when
// the token stops being acceptable (exp plus leeway).
func (v *Verifier) verify(ctx context.Context, token string, issuers []*policy.Issuer, now time.Time) (p *Principal, validUntil time.Time, err error) {
	t, err := parseToken(token)
	if err != nil {
		return nil, time.Time{}, err
	}
	iss, err := stringClaim(t.claims, "iss")
	if err != nil {
		return nil, time.Time{}, err
	}
	// The unverified iss only chooses which configured issuer's keys to try; everything
	// is verified against that issuer afterwards (RFC 8725 §3.8).
	var firstErr error
	for _, is := range issuers {
		if is == nil || is.Issuer != iss || iss == "" {
			continue
		}
		// Several entries may share an iss (e.g. different audiences); the first that
		// accepts the token wins.
		p, validUntil, err := v.verifyWith(ctx, t, is, now)
		if err == nil {
			return p, validUntil, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	if firstErr != nil {
		return nil, time.Time{}, firstErr
	}
	if iss == "" {
		return nil, time.Time{}, fmt.Errorf("%w: token has no iss", ErrIssuer)
	}
	return nil, time.Time{}, fmt.Errorf("%w: %q is not trusted here", ErrIssuer, clip(iss))
}

func (v *Verifier) verifyWith(ctx context.Context, t *parsedToken, is *policy.Issuer, now time.Time) (*Principal, time.Time, error) {
	key, err := v.keyFor(ctx, is, t.header.Kid, t.header.Alg)
	if err != nil {
		return nil, time.Time{}, err
	}
	// VerifyCompactFast checks that the header alg equals the one we chose from the key
	// and refuses crit/b64; the signing input is the token's own bytes.
	if _, err := jws.VerifyCompactFast(key.pub, []byte(t.raw), key.algs[t.header.Alg]); err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: issuer %q, kid %q, alg %s", ErrSignature, is.Name, clip(key.kid), t.header.Alg)
	}
	p, validUntil, err := checkClaims(t.claims, is, now)
	if p != nil {
		p.RawClaims = t.payload
	}
	return p, validUntil, err
}

// checkClaims validates the registered claims of a token whose signature verified and
// builds its Principal.
func checkClaims(c map[string]any, is *policy.Issuer, now time.Time) (*Principal, time.Time, error) {
	fail := func(err error) (*Principal, time.Time, error) { return nil, time.Time{}, err }

	// iss was matched before the signature check; checked again here so that this
	// function is correct on its own.
	if iss, _ := c["iss"].(string); iss != is.Issuer {
		return fail(fmt.Errorf("%w: iss does not match issuer %q", ErrIssuer, is.Name))
	}

	aud, err := stringOrStrings(c, "aud")
	if err != nil {
		return fail(err)
	}
	if !intersects(aud, is.Audiences) {
		return fail(fmt.Errorf("%w: aud names none of issuer %q's audiences", ErrAudience, is.Name))
	}

	exp, ok, err := timeClaim(c, "exp")
	switch {
	case err != nil:
		return fail(err)
	case !ok:
		return fail(fmt.Errorf("%w: issuer %q", ErrMissingExp, is.Name))
	}
	validUntil := exp.Add(is.Leeway)
	if !now.Before(validUntil) {
		return fail(fmt.Errorf("%w: exp %s (leeway %s)", ErrExpired, exp.UTC().Format(time.RFC3339), is.Leeway))
	}
	if nbf, ok, err := timeClaim(c, "nbf"); err != nil {
		return fail(err)
	} else if ok && now.Before(nbf.Add(-is.Leeway)) {
		return fail(fmt.Errorf("%w: nbf %s (leeway %s)", ErrNotYetValid, nbf.UTC().Format(time.RFC3339), is.Leeway))
	}
	if iat, ok, err := timeClaim(c, "iat"); err != nil {
		return fail(err)
	} else if ok && iat.After(now.Add(is.Leeway)) {
		return fail(fmt.Errorf("%w: iat %s is in the future (leeway %s)", ErrNotYetValid, iat.UTC().Format(time.RFC3339), is.Leeway))
	}

	sub, err := stringClaim(c, "sub")
	if err != nil {
		return fail(err)
	}
	scopes, err := scopesOf(c)
	if err != nil {
		return fail(err)
	}
	var appID string
	if is.AppIDClaim != "" {
		// Present but not a string leaves AppID empty rather than failing: the App ID is
		// an optional hint, and policy sees the raw claim anyway.
		appID, _ = c[is.AppIDClaim].(string)
	}
	return &Principal{
		Issuer:    is,
		Subject:   sub,
		Audience:  aud,
		Scopes:    scopes,
		AppID:     appID,
		ExpiresAt: exp,
		Claims:    c,
	}, validUntil, nil
}

// stringClaim returns claim name if it is a string, "" if absent, ErrMalformed otherwise.
func stringClaim(c map[string]any, name string) (string, error) {
	v, ok := c[name]
	if !ok {
		return "", nil
	}
	s, ok := v.(string)
	if !ok {
		return "", malformed("claim %s is not a string", name)
	}
	return s, nil
}

// stringOrStrings reads a claim that is a string or an array of strings (RFC 7519
// §4.1.3 for aud).
func stringOrStrings(c map[string]any, name string) ([]string, error) {
	switch v := c[name].(type) {
	case nil:
		if _, present := c[name]; present {
			return nil, malformed("claim %s is null", name)
		}
		return nil, nil
	case string:
		return []string{v}, nil
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			s, ok := e.(string)
			if !ok {
				return nil, malformed("claim %s is not an array of strings", name)
			}
			out = append(out, s)
		}
		return out, nil
	default:
		return nil, malformed("claim %s is not a string or an array of strings", name)
	}
}

func intersects(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}

// maxNumericDate is 9999-12-31T23:59:59Z. Larger values are clamped so a huge exp
// cannot overflow time arithmetic into the past.
const maxNumericDate = 253402300799

// timeClaim reads a NumericDate (RFC 7519 §2: seconds, possibly fractional).
func timeClaim(c map[string]any, name string) (time.Time, bool, error) {
	v, ok := c[name]
	if !ok {
		return time.Time{}, false, nil
	}
	f, isNum := v.(float64)
	if !isNum || math.IsNaN(f) || math.IsInf(f, 0) {
		return time.Time{}, false, malformed("claim %s is not a number", name)
	}
	f = min(max(f, -maxNumericDate), maxNumericDate)
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true, nil
}

// scopesOf merges "scope" (RFC 8693 §4.2: space-separated string) and "scp" (used by
// Azure AD and Okta: string or array of strings).
func scopesOf(c map[string]any) ([]string, error) {
	var out []string
	seen := map[string]bool{}
	add := func(s string) {
		if s != "" && !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	if v, ok := c["scope"]; ok {
		s, isStr := v.(string)
		if !isStr {
			return nil, malformed("claim scope is not a string")
		}
		for _, f := range strings.Fields(s) {
			add(f)
		}
	}
	if v, ok := c["scp"]; ok {
		switch v := v.(type) {
		case string:
			for _, f := range strings.Fields(v) {
				add(f)
			}
		case []any:
			for _, e := range v {
				s, isStr := e.(string)
				if !isStr {
					return nil, malformed("claim scp is not an array of strings")
				}
				add(s)
			}
		default:
			return nil, malformed("claim scp is not a string or an array of strings")
		}
	}
	return out, nil
}
