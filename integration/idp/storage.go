package idp

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// storage is the in-memory op.Storage of the authorization server: its clients, its one
// RSA signing key, and nothing of the interactive flows (no users log in here).
type storage struct {
	key *rsa.PrivateKey
	kid string

	mu      sync.Mutex
	clients map[string]*Client
}

var errUnsupported = errors.New("not supported by this authorization server")

// ctxKey carries what zitadel's token handler does not hand to storage: the audience and
// resource of a client credentials request, and how the client authenticated.
type ctxKey struct{}

type requestInfo struct {
	audience, resource string
	basic              bool
}

func info(ctx context.Context) requestInfo {
	ri, _ := ctx.Value(ctxKey{}).(requestInfo)
	return ri
}

func (s *storage) client(id string) (*Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.clients[id]
	if c == nil {
		return nil, fmt.Errorf("unknown client %q", id)
	}
	cp := *c
	return &cp, nil
}

// authenticate checks the secret and that the client used its registered method.
func (s *storage) authenticate(ctx context.Context, id, secret string) (*Client, error) {
	c, err := s.client(id)
	if err != nil {
		return nil, err
	}
	if secret == "" || secret != c.Secret {
		return nil, errors.New("wrong client secret")
	}
	if basic := info(ctx).basic; basic != (c.authMethod() == oidc.AuthMethodBasic) {
		return nil, fmt.Errorf("client %s must authenticate with %s", id, c.authMethod())
	}
	return c, nil
}

// ClientCredentialsStorage

func (s *storage) ClientCredentials(ctx context.Context, clientID, clientSecret string) (op.Client, error) {
	c, err := s.authenticate(ctx, clientID, clientSecret)
	if err != nil {
		return nil, err
	}
	return opClient{c}, nil
}

func (s *storage) ClientCredentialsTokenRequest(ctx context.Context, clientID string, scopes []string) (op.TokenRequest, error) {
	c, err := s.client(clientID)
	if err != nil {
		return nil, err
	}
	for _, sc := range scopes {
		if !slices.Contains(c.Scopes, sc) {
			return nil, oidc.ErrInvalidScope().WithDescription("scope %q is not allowed for this client", sc)
		}
	}
	aud := c.Audiences[:1]
	ri := info(ctx)
	for _, want := range []string{ri.audience, ri.resource} {
		if want == "" {
			continue
		}
		if !slices.Contains(c.Audiences, want) {
			return nil, oidc.ErrInvalidTarget().WithDescription("%q is not an audience of this client", want)
		}
		aud = []string{want}
	}
	return tokenRequest{subject: clientID, audience: aud, scopes: scopes, clientID: clientID}, nil
}

type tokenRequest struct {
	subject, clientID string
	audience, scopes  []string
}

func (r tokenRequest) GetSubject() string    { return r.subject }
func (r tokenRequest) GetAudience() []string { return r.audience }
func (r tokenRequest) GetScopes() []string   { return r.scopes }

// TokenExchangeStorage

func (s *storage) ValidateTokenExchangeRequest(ctx context.Context, req op.TokenExchangeRequest) error {
	c, err := s.client(req.GetClientID())
	if err != nil {
		return err
	}
	if !c.TokenExchange {
		return oidc.ErrUnauthorizedClient().WithDescription("client may not exchange tokens")
	}
	if len(req.GetAudience()) == 0 {
		return oidc.ErrInvalidTarget().WithDescription("audience is required")
	}
	for _, a := range req.GetAudience() {
		if !slices.Contains(c.Audiences, a) {
			return oidc.ErrInvalidTarget().WithDescription("%q is not an audience of this client", a)
		}
	}
	for _, sc := range req.GetScopes() {
		if !slices.Contains(c.Scopes, sc) {
			return oidc.ErrInvalidScope().WithDescription("scope %q is not allowed for this client", sc)
		}
	}
	if req.GetRequestedTokenType() == "" {
		req.SetRequestedTokenType(oidc.AccessTokenType)
	}
	if req.GetRequestedTokenType() != oidc.AccessTokenType {
		return oidc.ErrInvalidRequest().WithDescription("only access tokens are issued")
	}
	return nil
}

func (s *storage) CreateTokenExchangeRequest(context.Context, op.TokenExchangeRequest) error {
	return nil
}

func (s *storage) GetPrivateClaimsFromTokenExchangeRequest(_ context.Context, req op.TokenExchangeRequest) (map[string]any, error) {
	claims := map[string]any{"act": map[string]any{"sub": req.GetClientID()}} // RFC 8693 §4.1
	if sc := req.GetScopes(); len(sc) > 0 {
		claims["scope"] = strings.Join(sc, " ")
	}
	return claims, nil
}

func (s *storage) SetUserinfoFromTokenExchangeRequest(context.Context, *oidc.UserInfo, op.TokenExchangeRequest) error {
	return nil
}

// AuthStorage: tokens and keys; the interactive flows are not supported.

func (s *storage) CreateAccessToken(_ context.Context, req op.TokenRequest) (string, time.Time, error) {
	clientID := ""
	switch r := req.(type) {
	case tokenRequest:
		clientID = r.clientID
	case op.TokenExchangeRequest:
		clientID = r.GetClientID()
	}
	c, err := s.client(clientID)
	if err != nil {
		return "", time.Time{}, err
	}
	return randomID(), time.Now().Add(c.lifetime()), nil
}

func (s *storage) CreateAccessAndRefreshTokens(context.Context, op.TokenRequest, string) (string, string, time.Time, error) {
	return "", "", time.Time{}, errUnsupported
}

func (s *storage) TokenRequestByRefreshToken(context.Context, string) (op.RefreshTokenRequest, error) {
	return nil, op.ErrInvalidRefreshToken
}

func (s *storage) CreateAuthRequest(context.Context, *oidc.AuthRequest, string) (op.AuthRequest, error) {
	return nil, errUnsupported
}
func (s *storage) AuthRequestByID(context.Context, string) (op.AuthRequest, error) {
	return nil, errUnsupported
}
func (s *storage) AuthRequestByCode(context.Context, string) (op.AuthRequest, error) {
	return nil, errUnsupported
}
func (s *storage) SaveAuthCode(context.Context, string, string) error     { return errUnsupported }
func (s *storage) DeleteAuthRequest(context.Context, string) error        { return errUnsupported }
func (s *storage) TerminateSession(context.Context, string, string) error { return errUnsupported }
func (s *storage) RevokeToken(context.Context, string, string, string) *oidc.Error {
	return oidc.ErrServerError().WithDescription("revocation is not supported")
}
func (s *storage) GetRefreshTokenInfo(context.Context, string, string) (string, string, error) {
	return "", "", op.ErrInvalidRefreshToken
}

func (s *storage) SigningKey(context.Context) (op.SigningKey, error) { return signingKey{s}, nil }
func (s *storage) SignatureAlgorithms(context.Context) ([]jose.SignatureAlgorithm, error) {
	return []jose.SignatureAlgorithm{jose.RS256}, nil
}
func (s *storage) KeySet(context.Context) ([]op.Key, error) { return []op.Key{publicKey{s}}, nil }

// OPStorage

func (s *storage) GetClientByClientID(_ context.Context, clientID string) (op.Client, error) {
	c, err := s.client(clientID)
	if err != nil {
		return nil, err
	}
	return opClient{c}, nil
}

func (s *storage) AuthorizeClientIDSecret(ctx context.Context, clientID, clientSecret string) error {
	_, err := s.authenticate(ctx, clientID, clientSecret)
	return err
}

func (s *storage) SetUserinfoFromScopes(context.Context, *oidc.UserInfo, string, string, []string) error {
	return nil
}
func (s *storage) SetUserinfoFromToken(context.Context, *oidc.UserInfo, string, string, string) error {
	return errUnsupported
}
func (s *storage) SetIntrospectionFromToken(context.Context, *oidc.IntrospectionResponse, string, string, string) error {
	return errUnsupported
}

// GetPrivateClaimsFromScopes puts the granted scopes in the token as "scope" (RFC 9068
// §2.2.3), which zitadel leaves to storage.
func (s *storage) GetPrivateClaimsFromScopes(_ context.Context, _, _ string, scopes []string) (map[string]any, error) {
	if len(scopes) == 0 {
		return nil, nil
	}
	return map[string]any{"scope": strings.Join(scopes, " ")}, nil
}
func (s *storage) GetKeyByIDAndClientID(context.Context, string, string) (*jose.JSONWebKey, error) {
	return nil, errUnsupported
}
func (s *storage) ValidateJWTProfileScopes(context.Context, string, []string) ([]string, error) {
	return nil, errUnsupported
}
func (s *storage) Health(context.Context) error { return nil }

type signingKey struct{ s *storage }

func (k signingKey) SignatureAlgorithm() jose.SignatureAlgorithm { return jose.RS256 }
func (k signingKey) Key() any                                    { return k.s.key }
func (k signingKey) ID() string                                  { return k.s.kid }

type publicKey struct{ s *storage }

func (k publicKey) ID() string                         { return k.s.kid }
func (k publicKey) Algorithm() jose.SignatureAlgorithm { return jose.RS256 }
func (k publicKey) Use() string                        { return "sig" }
func (k publicKey) Key() any                           { return &k.s.key.PublicKey }

// opClient is a Client as zitadel's op sees it.
type opClient struct{ c *Client }

func (o opClient) GetID() string                       { return o.c.ID }
func (o opClient) RedirectURIs() []string              { return nil }
func (o opClient) PostLogoutRedirectURIs() []string    { return nil }
func (o opClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeWeb }
func (o opClient) AuthMethod() oidc.AuthMethod         { return o.c.authMethod() }
func (o opClient) ResponseTypes() []oidc.ResponseType  { return nil }
func (o opClient) GrantTypes() []oidc.GrantType {
	g := []oidc.GrantType{oidc.GrantTypeClientCredentials}
	if o.c.TokenExchange {
		g = append(g, oidc.GrantTypeTokenExchange)
	}
	return g
}
func (o opClient) LoginURL(string) string               { return "" }
func (o opClient) AccessTokenType() op.AccessTokenType  { return op.AccessTokenTypeJWT }
func (o opClient) IDTokenLifetime() time.Duration       { return time.Hour }
func (o opClient) DevMode() bool                        { return false }
func (o opClient) IsScopeAllowed(scope string) bool     { return slices.Contains(o.c.Scopes, scope) }
func (o opClient) IDTokenUserinfoClaimsAssertion() bool { return false }
func (o opClient) ClockSkew() time.Duration             { return 0 }
func (o opClient) RestrictAdditionalIdTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}
func (o opClient) RestrictAdditionalAccessTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}

func randomID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
