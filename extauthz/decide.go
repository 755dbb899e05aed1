// Package extauthz is mcpgate's Envoy ext_authz server: it decides who is calling (SPIFFE
// mTLS identity → caller App ID, JWT bearer → subject) and whether they may reach the
// target app at all (DESIGN.md decision layers 1–3). What they may do inside MCP is
// decided later by ext_proc, which reads the dynamic metadata this server returns.
package extauthz

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/policy"
)

// Reasons are short, stable and low-cardinality: they are metric labels. Token failures
// add the verifier's reason ("token_expired", "token_bad_signature", ...).
const (
	ReasonAllowed          = "allowed"
	ReasonMalformed        = "malformed_request"
	ReasonNoTarget         = "no_target"
	ReasonUnknownTarget    = "unknown_target"
	ReasonNotMCP           = "target_not_mcp"
	ReasonNotReady         = "no_policy"
	ReasonNoIdentity       = "no_identity"
	ReasonBadIdentity      = "bad_spiffe_id"
	ReasonForeignDomain    = "foreign_trust_domain"
	ReasonAccessDenied     = "access_denied"
	ReasonTokenMissing     = "token_missing"
	ReasonTokenInQuery     = "token_in_query"
	ReasonTokenMalformed   = "token_malformed_header"
	ReasonInsufficientScop = "insufficient_scope"
)

// Decision is the outcome of one Check: everything the response, the decision log and
// the metrics need. It never holds the caller's token; an outbound decision holds the
// upstream token it supplies, for the response only.
type Decision struct {
	ID      string
	Allowed bool
	// Status is the HTTP status Envoy answers a denied request with.
	Status int
	// Error is the OAuth-style error code of the denial body ("invalid_token",
	// "insufficient_scope", "access_denied", "invalid_request").
	Error string
	// Reason is the metric label; Detail is the human explanation.
	Reason string
	Detail string

	Target    string
	Gateway   string
	Caller    policy.Caller
	SpiffeID  string
	Principal *bearer.Principal
	// WWWAuthenticate is set on 401 and insufficient-scope 403 answers.
	WWWAuthenticate string
	// Strip lists incoming headers that only mcpgate may set, in every spelling
	// contract.IsInternalHeader matches ("x_mcpgate_caller_app_id" too).
	Strip []string
	// Method and Path are the request's, the path without its query (queries can hold
	// secrets and are never logged).
	Method    string
	Path      string
	RequestID string
	MCPPath   string
	// wantClaims: the target has a Rego policy, which may read the token's claims, or a
	// rate limit counted by a claim (perTenant's tid, say).
	wantClaims bool
	// upstreamToken is the token an outbound decision supplies (never logged);
	// oauthError the token endpoint's error code when it refused; endpointDenial marks
	// a refused outbound call, whose body names the endpoint.
	upstreamToken  string
	oauthError     string
	endpointDenial bool
	// pv and rv hold the response values of Principal and of the route, from the
	// server's caches; nil when the Decision was not made by decide.
	pv *principalValues
	rv *routeValues
}

// request is what decide reads from a CheckRequest, normalized.
type request struct {
	target    string
	gateway   string
	endpoint  string // outbound routes with credentials: the HTTPEndpoint
	sourceApp string // and the App calling it
	principal string
	method    string
	path      string
	query     string
	requestID string
	auth      []string // authorization header values, one per header line
	strip     []string
}

// parseRequest normalizes a CheckRequest. A structurally broken request is an error that
// becomes a denial, never a panic (generated getters are nil-safe).
func parseRequest(req *authv3.CheckRequest) (*request, error) {
	attrs := req.GetAttributes()
	httpReq := attrs.GetRequest().GetHttp()
	if httpReq == nil {
		return nil, fmt.Errorf("CheckRequest has no attributes.request.http")
	}
	r := &request{
		target:    attrs.GetContextExtensions()[contract.ContextAppID],
		gateway:   attrs.GetContextExtensions()[contract.ContextGateway],
		endpoint:  attrs.GetContextExtensions()[contract.ContextEndpoint],
		sourceApp: attrs.GetContextExtensions()[contract.ContextSourceAppID],
		principal: attrs.GetSource().GetPrincipal(),
		method:    httpReq.GetMethod(),
		requestID: httpReq.GetId(),
	}
	r.path, r.query, _ = strings.Cut(httpReq.GetPath(), "?")
	visit := func(key, value string) {
		key = strings.ToLower(key)
		switch {
		case key == "authorization":
			r.auth = append(r.auth, value)
		case contract.IsInternalHeader(key):
			r.strip = append(r.strip, key)
		case key == ":path" && r.path == "":
			r.path, r.query, _ = strings.Cut(value, "?")
		case key == ":method" && r.method == "":
			r.method = value
		}
	}
	// With encode_raw_headers Envoy sends header_map (one entry per header line, value
	// in raw_value); otherwise the headers map with repeated headers joined by ",".
	if hm := httpReq.GetHeaderMap(); hm != nil && len(hm.GetHeaders()) > 0 {
		for _, h := range hm.GetHeaders() {
			visit(h.GetKey(), contract.HeaderValue(h))
		}
	} else {
		for k, v := range httpReq.GetHeaders() {
			visit(k, v)
		}
	}
	if r.method == "" {
		return nil, fmt.Errorf("CheckRequest has no HTTP method")
	}
	if r.path == "" || r.path[0] != '/' {
		return nil, fmt.Errorf("CheckRequest has no absolute request path")
	}
	return r, nil
}

// tokenInQuery reports whether the query carries an OAuth access token. RFC 6750 §2.3
// allows it, but the MCP authorization spec forbids it: query strings end up in logs.
func tokenInQuery(query string) bool {
	if query == "" {
		return false
	}
	vals, err := url.ParseQuery(query)
	if err != nil {
		// An unparsable query could hide a token from us but not from the app, whose parser
		// may split on ';' too and decode what it can of a name: do the same, leniently.
		for _, pair := range strings.FieldsFunc(query, func(c rune) bool { return c == '&' || c == ';' }) {
			name, _, _ := strings.Cut(pair, "=")
			if strings.EqualFold(unescapeLenient(name), "access_token") {
				return true
			}
		}
		return false
	}
	for name := range vals {
		// Without case, as the fallback: an app may read its parameters so.
		if strings.EqualFold(name, "access_token") {
			return true
		}
	}
	return false
}

// unescapeLenient decodes a query component as url.QueryUnescape does ('+' is a space),
// but keeps an invalid %-sequence as it is instead of failing.
func unescapeLenient(s string) string {
	if !strings.ContainsAny(s, "%+") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '+':
			b.WriteByte(' ')
		case c == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]):
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case c <= '9':
		return c - '0'
	case c <= 'F':
		return c - 'A' + 10
	}
	return c - 'a' + 10
}

// bearerToken extracts the token from Authorization: Bearer. ok is false when the header
// is present but unusable (another scheme, several headers, junk).
func bearerToken(values []string) (token string, present, ok bool) {
	if len(values) == 0 {
		return "", false, true
	}
	if len(values) > 1 {
		return "", true, false
	}
	scheme, tok, found := strings.Cut(strings.TrimSpace(values[0]), " ")
	tok = strings.TrimSpace(tok)
	if !found || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", true, false
	}
	// A JWT never contains "," or white space; either means joined duplicate headers.
	// (IndexByte is vectorized: three passes over a token beat one byte loop.)
	if strings.IndexByte(tok, ',') >= 0 || strings.IndexByte(tok, ' ') >= 0 || strings.IndexByte(tok, '\t') >= 0 {
		return "", true, false
	}
	return tok, true, true
}

// decide is the decision function: layers 1–3 of DESIGN.md in order. It reads only the
// snapshot, the request and the verifier (whose caches make repeated tokens cheap).
func (s *Server) decide(ctx context.Context, snap *policy.Snapshot, req *authv3.CheckRequest) *Decision {
	d := &Decision{ID: contract.NewDecisionID(), Status: http.StatusForbidden, Error: "access_denied"}
	if snap == nil {
		return d.deny(http.StatusServiceUnavailable, ReasonNotReady, "mcpgate has no policy loaded yet")
	}
	r, err := parseRequest(req)
	if err != nil {
		d.Error = "invalid_request"
		return d.deny(http.StatusForbidden, ReasonMalformed, err.Error())
	}
	d.Method, d.Path, d.RequestID, d.Strip, d.Gateway = r.method, r.path, r.requestID, r.strip, r.gateway

	if r.endpoint != "" {
		d := s.outbound(ctx, snap, r, d)
		d.endpointDenial = d.endpointDenial || !d.Allowed
		return d
	}
	// The target comes from the route's context extensions, set by our own xDS.
	if r.target == "" {
		return d.deny(http.StatusForbidden, ReasonNoTarget, "the route names no target app (context_extensions.app_id)")
	}
	app := snap.App(r.target)
	if app == nil {
		return d.deny(http.StatusForbidden, ReasonUnknownTarget, fmt.Sprintf("no App %q in the policy", r.target))
	}
	d.Target = app.ID
	if app.MCP == nil {
		return d.deny(http.StatusForbidden, ReasonNotMCP, fmt.Sprintf("App %q has no mcp policy", app.ID))
	}
	m := app.MCP
	d.MCPPath = m.Path
	d.wantClaims = m.Tools.Rego != nil || m.Limits.ReadsClaims()

	if tokenInQuery(r.query) {
		return d.challenge(m, "invalid_request", ReasonTokenInQuery, "access tokens in the query string are not accepted; send Authorization: Bearer")
	}
	token, tokenPresent, tokenOK := bearerToken(r.auth)

	// Layer 1: identity. With mTLS the peer certificate's SPIFFE ID names the caller; at a
	// gateway, or when mTLS is off or optional and no certificate was shown, the caller's
	// App ID can only come from a verified token (appIdClaim).
	mesh := snap.Mesh
	fromToken := r.gateway != "" || mesh.MTLS == policy.MTLSDisabled || (mesh.MTLS == policy.MTLSPermissive && r.principal == "")
	if !fromToken {
		if r.principal == "" {
			return d.deny(http.StatusForbidden, ReasonNoIdentity, "no client certificate identity (mtls: strict)")
		}
		caller, reason, err := callerFromSpiffe(r.principal, mesh.TrustDomain)
		if err != nil {
			return d.deny(http.StatusForbidden, reason, err.Error())
		}
		if app := snap.App(caller.AppID); app != nil && app.Namespace != caller.Namespace {
			// Tool rules, Rego's caller.app_id and the identity headers the app reads key
			// on the App ID alone: a workload of another namespace that picked this name
			// (Dapr's Sentry issues ns/<pod namespace>/<app-id annotation>) must not pass
			// for the App of the policy.
			return d.deny(http.StatusForbidden, ReasonBadIdentity, fmt.Sprintf("peer SPIFFE ID %s names App %s, which is in namespace %q", r.principal, caller.AppID, app.Namespace))
		}
		d.Caller, d.SpiffeID = caller, r.principal
		// Layer 2 before 3 for certified callers: a caller that may not call the app at
		// all learns nothing about its authentication requirements.
		if dd := d.access(m, r); dd != nil {
			return dd
		}
	}

	// Layer 3: authentication.
	if tokenPresent && !tokenOK {
		return d.challenge(m, "invalid_request", ReasonTokenMalformed, "the Authorization header is not a single Bearer token")
	}
	if tokenPresent && len(m.Authentication.Issuers) > 0 {
		p, err := s.verifier.Verify(ctx, token, m.Authentication.Issuers)
		if err != nil {
			return d.challenge(m, "invalid_token", "token_"+bearer.Reason(err), "invalid bearer token: "+err.Error())
		}
		if !slices.ContainsFunc(p.Audience, func(a string) bool { return slices.Contains(m.Authentication.Audiences, a) }) {
			// The issuer accepted the token, but it was minted for another service of
			// the mesh (MCP authorization: servers accept only tokens issued for them).
			return d.challenge(m, "invalid_token", "token_"+bearer.Reason(bearer.ErrAudience), fmt.Sprintf("invalid bearer token: %v: aud names none of app %s's audiences", bearer.ErrAudience, r.target))
		}
		d.Principal = p
		d.pv = s.principals.get(p)
	}
	if d.Principal == nil && m.Authentication.Required {
		return d.challenge(m, "", ReasonTokenMissing, "a bearer token is required")
	}
	if fromToken {
		d.Caller = callerFromToken(d.Principal, mesh.TrustDomain)
		if dd := d.access(m, r); dd != nil {
			return dd
		}
	}
	if missing := missingScopes(m.Authentication.Scopes, d.Principal); len(missing) > 0 {
		d.WWWAuthenticate = wwwAuthenticate(m, "insufficient_scope", m.Authentication.Scopes)
		d.Error = "insufficient_scope"
		return d.deny(http.StatusForbidden, ReasonInsufficientScop, "the token lacks scopes: "+strings.Join(missing, " "))
	}
	d.Allowed, d.Status, d.Error, d.Reason = true, http.StatusOK, "", ReasonAllowed
	d.Detail = "allowed"
	d.rv = s.routes.get(d.routeKey())
	return d
}

// access applies layer 2 and returns a denial, or nil when the caller may proceed.
func (d *Decision) access(m *policy.MCP, r *request) *Decision {
	action, why := m.AccessControl.Decide(d.Caller, r.method, r.path)
	if action != policy.Allow {
		return d.deny(http.StatusForbidden, ReasonAccessDenied, why)
	}
	return nil
}

func (d *Decision) deny(status int, reason, detail string) *Decision {
	d.Allowed, d.Status, d.Reason, d.Detail = false, status, reason, detail
	return d
}

// challenge is a 401 with the RFC 9728 resource_metadata pointer so that an MCP client
// can discover where to get a token (MCP authorization spec, RFC 6750 §3).
func (d *Decision) challenge(m *policy.MCP, oauthErr, reason, detail string) *Decision {
	d.WWWAuthenticate = wwwAuthenticate(m, oauthErr, m.Authentication.Scopes)
	d.Error = oauthErr
	if d.Error == "" {
		d.Error = "invalid_token"
	}
	return d.deny(http.StatusUnauthorized, reason, detail)
}

// wwwAuthenticate builds the Bearer challenge. Every value is from the validated policy
// (scopes are RFC 6749 scope tokens, so no quote or backslash can break the header).
func wwwAuthenticate(m *policy.MCP, oauthErr string, scopes []string) string {
	var b strings.Builder
	b.WriteString("Bearer")
	sep := " "
	add := func(k, v string) {
		b.WriteString(sep)
		b.WriteString(k)
		b.WriteString(`="`)
		b.WriteString(v)
		b.WriteString(`"`)
		sep = ", "
	}
	if m.MetadataURL != "" {
		add("resource_metadata", m.MetadataURL)
	}
	if oauthErr != "" {
		add("error", oauthErr)
	}
	if len(scopes) > 0 {
		add("scope", strings.Join(scopes, " "))
	}
	return b.String()
}

// callerFromSpiffe reads spiffe://<td>/ns/<ns>/<app-id>, Dapr's SPIFFE ID format.
func callerFromSpiffe(principal, trustDomain string) (policy.Caller, string, error) {
	id, err := spiffeid.FromString(principal)
	if err != nil {
		return policy.Caller{}, ReasonBadIdentity, fmt.Errorf("peer identity is not a SPIFFE ID")
	}
	if id.TrustDomain().Name() != trustDomain {
		return policy.Caller{}, ReasonForeignDomain, fmt.Errorf("peer SPIFFE ID is from trust domain %q, not %q", id.TrustDomain().Name(), trustDomain)
	}
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 3 || segs[0] != "ns" || !policy.IsDNSLabel(segs[1]) || !policy.IsDNSLabel(segs[2]) {
		return policy.Caller{}, ReasonBadIdentity, fmt.Errorf("peer SPIFFE ID %s is not of the form spiffe://%s/ns/<namespace>/<app-id>", principal, trustDomain)
	}
	return policy.Caller{AppID: segs[2], Namespace: segs[1], TrustDomain: trustDomain}, "", nil
}

// callerFromToken names a JWT-only caller by its issuer's appIdClaim. Without one (or with
// a value that is not an App ID) the caller is anonymous and only defaultAction applies.
func callerFromToken(p *bearer.Principal, trustDomain string) policy.Caller {
	if p == nil || p.AppID == "" || !policy.IsDNSLabel(p.AppID) {
		return policy.Caller{}
	}
	return policy.Caller{AppID: p.AppID, Namespace: policy.DefaultNamespace, TrustDomain: trustDomain}
}

func missingScopes(need []string, p *bearer.Principal) []string {
	if len(need) == 0 {
		return nil
	}
	var have []string
	if p != nil {
		have = p.Scopes
	}
	var missing []string
	for _, n := range need {
		found := false
		for _, h := range have {
			if h == n {
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, n)
		}
	}
	return missing
}
