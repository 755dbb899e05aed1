package extauthz

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/policy"
)

const testMesh = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  mtls: MTLS_MODE
  authz: {address: "mcpgate:9001"}
  sds: {certDir: /certs}
  issuers:
    - name: corp
      issuer: ISSUER_URL
      audiences: [api://mcp-server, https://open.example.com/mcp]
      appIdClaim: azp
`

const testApps = `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: inventory}
spec:
  address: inventory:8000
  sidecar: {address: inventory-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    path: /mcp
    resource: https://inventory.example.com/mcp
    authentication: {required: true, issuers: [corp], audiences: [api://mcp-server], scopes: [mcp:tools]}
    accessControl:
      defaultAction: deny
      policies:
        - {appId: my-agent, defaultAction: allow}
        - appId: auditor
          defaultAction: deny
          operations: [{name: /mcp, httpVerb: [GET], action: allow}]
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: open}
spec:
  address: open:8000
  sidecar: {address: open-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    resource: https://open.example.com/mcp
    authentication: {issuers: [corp]}
    accessControl: {defaultAction: allow}
    tools: {rego: open.rego}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: plain}
spec:
  address: plain:8000
`

type fixture struct {
	iss    *bearertest.Issuer
	server *Server
	snaps  map[policy.MTLSMode]*policy.Snapshot
}

// newFixture loads the test policy three times, once per mTLS mode, all trusting one fake
// issuer, and a Server whose store holds the strict one.
func newFixture(t testing.TB) *fixture {
	t.Helper()
	f := &fixture{iss: bearertest.NewIssuer(t), snaps: map[policy.MTLSMode]*policy.Snapshot{}}
	for _, mode := range []policy.MTLSMode{policy.MTLSStrict, policy.MTLSPermissive, policy.MTLSDisabled} {
		dir := t.TempDir()
		mesh := strings.NewReplacer("MTLS_MODE", string(mode), "ISSUER_URL", f.iss.URL()).Replace(testMesh)
		requireWrite(t, filepath.Join(dir, "mesh.yaml"), mesh)
		requireWrite(t, filepath.Join(dir, "apps.yaml"), testApps)
		requireWrite(t, filepath.Join(dir, "open.rego"), "package mcpgate\n\ndecision := {\"allow\": true}\n")
		snap, err := policy.LoadDir(context.Background(), dir)
		if err != nil {
			t.Fatalf("load %s policy: %v", mode, err)
		}
		f.snaps[mode] = snap
	}
	var err error
	f.server, err = NewServer(Options{
		Store:    policy.NewStore(f.snaps[policy.MTLSStrict]),
		Verifier: bearer.NewVerifier(bearer.Options{HTTPClient: f.iss.Client()}),
	})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func requireWrite(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// openResource is the open app's resource, and so its default audience: tokens for it
// carry it, as RFC 8707 clients ask.
const openResource = "https://open.example.com/mcp"

// token mints a token for the inventory app; overrides replace or (with nil) drop claims.
func (f *fixture) token(t testing.TB, overrides map[string]any, opts ...bearertest.MintOption) string {
	t.Helper()
	claims := map[string]any{
		"iss":   f.iss.URL(),
		"sub":   "alice@example.com",
		"aud":   "api://mcp-server",
		"azp":   "my-agent",
		"scope": "mcp:tools inventory:read",
		"exp":   time.Now().Add(time.Hour).Unix(),
		"iat":   time.Now().Unix(),
	}
	for k, v := range overrides {
		if v == nil {
			delete(claims, k)
		} else {
			claims[k] = v
		}
	}
	return f.iss.Mint(t, claims, opts...)
}

const (
	agentID   = "spiffe://example.org/ns/default/my-agent"
	auditorID = "spiffe://example.org/ns/default/auditor"
)

type req struct {
	target    string
	gateway   string
	principal string
	method    string
	path      string
	headers   map[string]string
	raw       [][2]string // header_map entries (encode_raw_headers)
}

func (r req) build() *authv3.CheckRequest {
	if r.method == "" {
		r.method = "POST"
	}
	if r.path == "" {
		r.path = "/mcp"
	}
	ext := map[string]string{}
	if r.target != "" {
		ext[contract.ContextAppID] = r.target
	}
	if r.gateway != "" {
		ext[contract.ContextGateway] = r.gateway
	}
	h := map[string]string{":method": r.method, ":path": r.path, "content-type": "application/json"}
	for k, v := range r.headers {
		h[k] = v
	}
	httpReq := &authv3.AttributeContext_HttpRequest{Id: "req-1", Method: r.method, Path: r.path, Headers: h}
	if r.raw != nil {
		httpReq.Headers = nil
		hm := &corev3.HeaderMap{}
		for _, kv := range r.raw {
			hm.Headers = append(hm.Headers, &corev3.HeaderValue{Key: kv[0], RawValue: []byte(kv[1])})
		}
		httpReq.HeaderMap = hm
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:            &authv3.AttributeContext_Peer{Principal: r.principal},
		Request:           &authv3.AttributeContext_Request{Http: httpReq},
		ContextExtensions: ext,
	}}
}

func bearerHeader(tok string) map[string]string {
	return map[string]string{"authorization": "Bearer " + tok}
}

func TestDecide(t *testing.T) {
	f := newFixture(t)
	valid := f.token(t, nil)

	tests := []struct {
		name   string
		mode   policy.MTLSMode // default strict
		req    func() req
		status int
		reason string
		caller string
		www    string // substring of WWW-Authenticate
	}{
		{name: "allowed", req: func() req { return req{target: "inventory", principal: agentID, headers: bearerHeader(valid)} },
			status: 200, reason: ReasonAllowed, caller: "my-agent"},
		{name: "no target in context extensions", req: func() req { return req{principal: agentID, headers: bearerHeader(valid)} },
			status: 403, reason: ReasonNoTarget},
		{name: "unknown target", req: func() req { return req{target: "nope", principal: agentID, headers: bearerHeader(valid)} },
			status: 403, reason: ReasonUnknownTarget},
		{name: "target without mcp policy", req: func() req { return req{target: "plain", principal: agentID, headers: bearerHeader(valid)} },
			status: 403, reason: ReasonNotMCP},
		{name: "strict: no client certificate", req: func() req { return req{target: "inventory", headers: bearerHeader(valid)} },
			status: 403, reason: ReasonNoIdentity},
		{name: "strict: foreign trust domain", req: func() req {
			return req{target: "inventory", principal: "spiffe://evil.org/ns/default/my-agent", headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonForeignDomain},
		{name: "strict: SPIFFE ID not in Dapr form", req: func() req {
			return req{target: "inventory", principal: "spiffe://example.org/workload/my-agent", headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonBadIdentity},
		{name: "strict: principal not a SPIFFE ID", req: func() req {
			return req{target: "inventory", principal: "CN=my-agent", headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonBadIdentity},
		{name: "caller not allowed, decided before authentication", req: func() req {
			return req{target: "inventory", principal: "spiffe://example.org/ns/default/stranger"}
		}, status: 403, reason: ReasonAccessDenied, caller: "stranger"},
		{name: "caller from another namespace", req: func() req {
			return req{target: "inventory", principal: "spiffe://example.org/ns/prod/my-agent", headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonAccessDenied},
		{name: "operation allows GET only", req: func() req {
			return req{target: "inventory", principal: auditorID, headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonAccessDenied},
		{name: "operation GET allowed", req: func() req {
			return req{target: "inventory", principal: auditorID, method: "GET", headers: bearerHeader(valid)}
		}, status: 200, reason: ReasonAllowed, caller: "auditor"},
		{name: "no token", req: func() req { return req{target: "inventory", principal: agentID} },
			status: 401, reason: ReasonTokenMissing, www: `Bearer resource_metadata="https://inventory.example.com/.well-known/oauth-protected-resource/mcp", scope="mcp:tools"`},
		{name: "expired", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"exp": time.Now().Add(-time.Hour).Unix()}))}
		}, status: 401, reason: "token_expired", www: `error="invalid_token"`},
		{name: "nbf in the future", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"nbf": time.Now().Add(time.Hour).Unix()}))}
		}, status: 401, reason: "token_not_yet_valid"},
		{name: "wrong iss", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"iss": "https://evil.example.com/"}))}
		}, status: 401, reason: "token_wrong_issuer"},
		{name: "wrong aud", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": "api://other"}))}
		}, status: 401, reason: "token_wrong_audience"},
		// Both apps trust the same issuer entry, which accepts both audiences: a token
		// is still only good at the app it names (MCP authorization, RFC 8707).
		{name: "token for another app of the same issuer", req: func() req {
			return req{target: "open", principal: agentID, headers: bearerHeader(valid)}
		}, status: 401, reason: "token_wrong_audience", www: `error="invalid_token"`},
		{name: "token for another app, through a gateway", req: func() req {
			return req{target: "open", gateway: "edge", headers: bearerHeader(valid)}
		}, status: 401, reason: "token_wrong_audience"},
		{name: "token naming the app's resource elsewhere", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": openResource}))}
		}, status: 401, reason: "token_wrong_audience"},
		{name: "default audience: the app's resource", req: func() req {
			return req{target: "open", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": openResource}))}
		}, status: 200, reason: ReasonAllowed, caller: "my-agent"},
		{name: "token naming both apps", req: func() req {
			return req{target: "open", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": []string{"api://mcp-server", openResource}}))}
		}, status: 200, reason: ReasonAllowed},
		{name: "alg none", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(unsigned(t, map[string]any{"iss": f.iss.URL(), "aud": "api://mcp-server", "scope": "mcp:tools", "exp": time.Now().Add(time.Hour).Unix()}))}
		}, status: 401, reason: "token_disallowed_algorithm"},
		{name: "HS256 signed with the RSA public key", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.hs256WithPublicKey(t, map[string]any{"iss": f.iss.URL(), "aud": "api://mcp-server", "scope": "mcp:tools", "exp": time.Now().Add(time.Hour).Unix()}))}
		}, status: 401, reason: "token_disallowed_algorithm"},
		{name: "tampered payload", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(tamper(t, f.token(t, nil)))}
		}, status: 401, reason: "token_bad_signature"},
		{name: "unknown kid", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, nil, bearertest.WithKID("never-published")))}
		}, status: 401, reason: "token_unknown_key"},
		{name: "missing scope", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"scope": "inventory:read"}))}
		}, status: 403, reason: ReasonInsufficientScop, www: `error="insufficient_scope", scope="mcp:tools"`},
		{name: "scp as an array", req: func() req {
			return req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"scope": nil, "scp": []string{"inventory:read", "mcp:tools"}}))}
		}, status: 200, reason: ReasonAllowed},
		{name: "token only in the query string", req: func() req {
			return req{target: "inventory", principal: agentID, path: "/mcp?access_token=" + valid}
		}, status: 401, reason: ReasonTokenInQuery},
		{name: "token in query and header", req: func() req {
			return req{target: "inventory", principal: agentID, path: "/mcp?x=1&access_token=" + valid, headers: bearerHeader(valid)}
		}, status: 401, reason: ReasonTokenInQuery},
		{name: "token in a query Go cannot parse", req: func() req {
			return req{target: "inventory", principal: agentID, path: "/mcp?a=%zz&access%5Ftoken=" + valid, headers: bearerHeader(valid)}
		}, status: 401, reason: ReasonTokenInQuery},
		{name: "basic auth", req: func() req {
			return req{target: "inventory", principal: agentID, headers: map[string]string{"authorization": "Basic YTpi"}}
		}, status: 401, reason: ReasonTokenMalformed},
		{name: "two authorization headers (raw header map)", req: func() req {
			return req{target: "inventory", principal: agentID, raw: [][2]string{{":method", "POST"}, {":path", "/mcp"}, {"authorization", "Bearer " + valid}, {"authorization", "Bearer " + valid}}}
		}, status: 401, reason: ReasonTokenMalformed},
		{name: "raw header map, one token", req: func() req {
			return req{target: "inventory", principal: agentID, raw: [][2]string{{":method", "POST"}, {":path", "/mcp"}, {"authorization", "Bearer " + valid}}}
		}, status: 200, reason: ReasonAllowed},
		{name: "optional auth, no token", req: func() req { return req{target: "open", principal: agentID} },
			status: 200, reason: ReasonAllowed, caller: "my-agent"},
		{name: "optional auth, bad token is still refused", req: func() req {
			return req{target: "open", principal: agentID, headers: bearerHeader(tamper(t, valid))}
		}, status: 401, reason: "token_bad_signature"},
		{name: "permissive: no certificate, caller from azp", mode: policy.MTLSPermissive, req: func() req {
			return req{target: "inventory", headers: bearerHeader(valid)}
		}, status: 200, reason: ReasonAllowed, caller: "my-agent"},
		{name: "permissive: no certificate, azp not allowed", mode: policy.MTLSPermissive, req: func() req {
			return req{target: "inventory", headers: bearerHeader(f.token(t, map[string]any{"azp": "stranger"}))}
		}, status: 403, reason: ReasonAccessDenied, caller: "stranger"},
		{name: "permissive: certificate from a foreign domain still refused", mode: policy.MTLSPermissive, req: func() req {
			return req{target: "inventory", principal: "spiffe://evil.org/ns/default/my-agent", headers: bearerHeader(valid)}
		}, status: 403, reason: ReasonForeignDomain},
		{name: "permissive: no certificate, no token", mode: policy.MTLSPermissive, req: func() req { return req{target: "inventory"} },
			status: 401, reason: ReasonTokenMissing},
		{name: "disabled: principal ignored, caller from azp", mode: policy.MTLSDisabled, req: func() req {
			return req{target: "inventory", principal: "spiffe://example.org/ns/default/stranger", headers: bearerHeader(valid)}
		}, status: 200, reason: ReasonAllowed, caller: "my-agent"},
		{name: "disabled: token without azp is anonymous", mode: policy.MTLSDisabled, req: func() req {
			return req{target: "inventory", headers: bearerHeader(f.token(t, map[string]any{"azp": nil}))}
		}, status: 403, reason: ReasonAccessDenied},
		{name: "gateway: JWT-only caller even when strict", req: func() req {
			return req{target: "inventory", gateway: "edge", headers: bearerHeader(valid)}
		}, status: 200, reason: ReasonAllowed, caller: "my-agent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mode := tt.mode
			if mode == "" {
				mode = policy.MTLSStrict
			}
			r := tt.req()
			d := f.server.decide(context.Background(), f.snaps[mode], r.build())
			if d.Status != tt.status || d.Reason != tt.reason {
				t.Fatalf("decision = %d %s (%s), want %d %s", d.Status, d.Reason, d.Detail, tt.status, tt.reason)
			}
			if tt.caller != "" && d.Caller.AppID != tt.caller {
				t.Errorf("caller = %q, want %q", d.Caller.AppID, tt.caller)
			}
			if !strings.Contains(d.WWWAuthenticate, tt.www) {
				t.Errorf("WWW-Authenticate = %q, want it to contain %q", d.WWWAuthenticate, tt.www)
			}
			if d.Status == 401 && !strings.Contains(d.WWWAuthenticate, `resource_metadata="`) {
				t.Errorf("401 without resource_metadata: %q", d.WWWAuthenticate)
			}
			requireNoSecrets(t, d.Response(), r)
		})
	}
}

// requireNoSecrets checks that no part of a token appears in what goes back to Envoy.
func requireNoSecrets(t *testing.T, resp *authv3.CheckResponse, r req) {
	t.Helper()
	var toks []string
	for _, v := range r.headers {
		toks = append(toks, strings.TrimPrefix(v, "Bearer "))
	}
	for _, kv := range r.raw {
		toks = append(toks, strings.TrimPrefix(kv[1], "Bearer "))
	}
	if _, q, ok := strings.Cut(r.path, "access_token="); ok {
		toks = append(toks, q)
	}
	out := onWire(t, resp).String()
	for _, tok := range toks {
		for _, part := range strings.Split(tok, ".") {
			if len(part) > 16 && strings.Contains(out, part) {
				t.Fatalf("response leaks part of the token: %s", out)
			}
		}
	}
}

// tamper changes the payload and keeps the original signature.
func tamper(t *testing.T, tok string) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWS: %q", tok)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var payload map[string]any
	if err := json.Unmarshal(raw, &payload); err != nil {
		t.Fatal(err)
	}
	payload["sub"] = "mallory@example.com"
	raw, _ = json.Marshal(payload)
	parts[1] = base64.RawURLEncoding.EncodeToString(raw)
	return strings.Join(parts, ".")
}

// unsigned forges an "alg: none" token.
func unsigned(t *testing.T, claims map[string]any) string {
	return bearertest.Sign(t, map[string]any{"alg": "none", "typ": "JWT", "kid": bearertest.KIDRSA}, claims, func([]byte) []byte { return nil })
}

// hs256WithPublicKey forges the algorithm-confusion attack: HS256 keyed with the RSA
// public key (PEM), which a naive verifier would accept with the issuer's "key".
func (f *fixture) hs256WithPublicKey(t *testing.T, claims map[string]any) string {
	return bearertest.Sign(t, map[string]any{"alg": "HS256", "typ": "JWT", "kid": bearertest.KIDRSA}, claims, bearertest.HMAC("HS256", f.iss.RSAPublicKeyPEM()))
}

func TestCheckAllowedResponse(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, nil)
	r := req{target: "inventory", principal: agentID, headers: map[string]string{
		"authorization":           "Bearer " + tok,
		"x-mcpgate-caller-app-id": "admin",
		"dapr-caller-app-id":      "admin",
		"x-mcpgate-role":          "root",
		// The same identity under spellings a server may fold into the ones above
		// (issue 18, finding 8): never overwritten, so always removed.
		"x_mcpgate_caller_app_id": "admin",
		"dapr_caller_app_id":      "admin",
		"X-MCPGATE_SUBJECT":       "root@example.com",
		"x_mcpgate_decision_id":   "00000000000000000000000000000000",
		// Dapr's other identity headers, which Dapr-era apps (Dapr SDKs) trust.
		"dapr-caller-namespace": "kube-system",
		"dapr-callee-app-id":    "admin-console",
		"Dapr_Caller_Namespace": "kube-system",
	}}
	resp, err := f.server.Check(context.Background(), r.build())
	if err != nil {
		t.Fatal(err)
	}
	resp = onWire(t, resp)
	if resp.GetStatus().GetCode() != int32(codes.OK) {
		t.Fatalf("status %v", resp.GetStatus())
	}
	ok := resp.GetOkResponse()
	set := map[string]string{}
	for _, h := range ok.GetHeaders() {
		if h.GetAppendAction() != corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD {
			t.Errorf("header %s appended instead of overwritten", h.GetHeader().GetKey())
		}
		set[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	if set[contract.HeaderCallerAppID] != "my-agent" || set[contract.HeaderDaprCallerAppID] != "my-agent" || set[contract.HeaderSubject] != "alice@example.com" || len(set[contract.HeaderDecisionID]) != 32 ||
		set[contract.HeaderDaprCallerNamespace] != "default" || set[contract.HeaderDaprCalleeAppID] != "inventory" {
		t.Errorf("headers set = %v", set)
	}
	got := slices.Sorted(slices.Values(ok.GetHeadersToRemove()))
	removed := []string{"dapr_caller_app_id", "dapr_caller_namespace", "x-mcpgate-role", "x-mcpgate_subject", "x_mcpgate_caller_app_id", "x_mcpgate_decision_id"}
	if !slices.Equal(got, removed) {
		t.Errorf("headers to remove = %v, want %v (the spoofed headers mcpgate does not overwrite)", got, removed)
	}
	md := resp.GetDynamicMetadata().AsMap()
	want := map[string]any{
		contract.MetaTarget: "inventory", contract.MetaCallerAppID: "my-agent", contract.MetaCallerNamespace: "default",
		contract.MetaSpiffeID: agentID, contract.MetaSubject: "alice@example.com", contract.MetaIssuer: "corp",
	}
	for k, v := range want {
		if md[k] != v {
			t.Errorf("metadata[%s] = %v, want %v", k, md[k], v)
		}
	}
	if sc, _ := md[contract.MetaScopes].([]any); len(sc) != 2 || sc[0] != "mcp:tools" {
		t.Errorf("metadata scopes = %v", md[contract.MetaScopes])
	}
	if exp, _ := md[contract.MetaTokenExpiry].(float64); exp < float64(time.Now().Unix()) {
		t.Errorf("metadata token_exp = %v", md[contract.MetaTokenExpiry])
	}
	if _, ok := md[contract.MetaClaimsJSON]; ok {
		t.Errorf("claims sent to an app without Rego: %v", md[contract.MetaClaimsJSON])
	}
	// An app with a Rego policy gets the verified claims, as signed.
	resp, err = f.server.Check(context.Background(), req{target: "open", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": openResource}))}.build())
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := onWire(t, resp).GetDynamicMetadata().AsMap()[contract.MetaClaimsJSON].(string)
	var claims map[string]any
	if err := json.Unmarshal([]byte(raw), &claims); err != nil || claims["azp"] != "my-agent" || claims["sub"] != "alice@example.com" {
		t.Errorf("metadata claims_json = %q (%v)", raw, err)
	}
	if md[contract.MetaDecisionID] != set[contract.HeaderDecisionID] {
		t.Errorf("decision id differs between header and metadata")
	}
}

func TestCheckDeniedResponse(t *testing.T) {
	f := newFixture(t)
	resp, err := f.server.Check(context.Background(), req{target: "inventory", principal: agentID}.build())
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetStatus().GetCode() != int32(codes.Unauthenticated) {
		t.Errorf("grpc status %v", resp.GetStatus())
	}
	denied := resp.GetDeniedResponse()
	if denied.GetStatus().GetCode() != 401 {
		t.Fatalf("http status %v", denied.GetStatus())
	}
	headers := map[string]string{}
	for _, h := range denied.GetHeaders() {
		headers[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	if headers["content-type"] != "application/json" || !strings.HasPrefix(headers["www-authenticate"], "Bearer resource_metadata=") {
		t.Errorf("headers = %v", headers)
	}
	var body denialBody
	if err := json.Unmarshal([]byte(denied.GetBody()), &body); err != nil {
		t.Fatalf("body %q: %v", denied.GetBody(), err)
	}
	if body.Error != "invalid_token" || body.Reason == "" || body.DecisionID != headers[contract.HeaderDecisionID] {
		t.Errorf("body = %+v", body)
	}
}

func TestCheckMalformedRequests(t *testing.T) {
	f := newFixture(t)
	for name, r := range map[string]*authv3.CheckRequest{
		"nil":            nil,
		"empty":          {},
		"no http":        {Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{}}},
		"no method":      {Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Path: "/mcp"}}}},
		"relative path":  {Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "mcp"}}}},
		"no path at all": {Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET"}}}},
		"nil header map": {Attributes: &authv3.AttributeContext{Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/", HeaderMap: &corev3.HeaderMap{}}}}},
	} {
		t.Run(name, func(t *testing.T) {
			resp, err := f.server.Check(context.Background(), r)
			if err != nil {
				t.Fatalf("malformed request must be a denial, not an error: %v", err)
			}
			if resp.GetDeniedResponse() == nil || resp.GetStatus().GetCode() == int32(codes.OK) {
				t.Fatalf("not denied: %v", resp)
			}
		})
	}
}

func TestCheckNoPolicy(t *testing.T) {
	s, err := NewServer(Options{Store: policy.NewStore(nil)})
	if err != nil {
		t.Fatal(err)
	}
	resp, _ := s.Check(context.Background(), req{target: "inventory", principal: agentID}.build())
	if resp.GetDeniedResponse().GetStatus().GetCode() != 503 {
		t.Fatalf("want 503 before any policy is loaded, got %v", resp)
	}
}

// TestDecideJWKSDownKeysCached: once keys are cached, a fresh token (not in the token
// cache) still verifies while the JWKS endpoint is down.
func TestDecideJWKSDownKeysCached(t *testing.T) {
	f := newFixture(t)
	snap := f.snaps[policy.MTLSStrict]
	if d := f.server.decide(context.Background(), snap, req{target: "inventory", principal: agentID, headers: bearerHeader(f.token(t, nil))}.build()); !d.Allowed {
		t.Fatalf("warm-up denied: %s", d.Detail)
	}
	f.iss.SetDown(true)
	fresh := f.token(t, map[string]any{"sub": "bob@example.com"})
	if d := f.server.decide(context.Background(), snap, req{target: "inventory", principal: agentID, headers: bearerHeader(fresh)}.build()); !d.Allowed {
		t.Fatalf("denied with cached keys while JWKS is down: %s", d.Detail)
	}
}

// TestDecideUnknownKidThenPublished: a token signed by a key the JWKS does not serve yet
// is refused; once the JWKS serves it, the same token verifies.
func TestDecideUnknownKidThenPublished(t *testing.T) {
	f := newFixture(t)
	clock := time.Now()
	f.server.verifier = bearer.NewVerifier(bearer.Options{HTTPClient: f.iss.Client(), MinRefetch: time.Minute, Now: func() time.Time { return clock }})
	snap := f.snaps[policy.MTLSStrict]
	kid := f.iss.RotateKey(t)
	tok := f.token(t, nil, bearertest.WithKID(kid))
	r := req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}.build()
	if d := f.server.decide(context.Background(), snap, r); d.Reason != "token_unknown_key" {
		t.Fatalf("before publishing: %s %s", d.Reason, d.Detail)
	}
	f.iss.PublishKeys()
	clock = clock.Add(2 * time.Minute) // past the refetch rate limit
	if d := f.server.decide(context.Background(), snap, r); !d.Allowed {
		t.Fatalf("after publishing: %s %s", d.Reason, d.Detail)
	}
}

// A query url.ParseQuery refuses (an invalid escape, a ';') is read as an app's lenient
// parser would: pairs split on '&' and ';', names decoded where they can be.
func TestTokenInQuery(t *testing.T) {
	for q, want := range map[string]bool{
		"access_token=eyJ":                true,
		"x=1&access_token=eyJ":            true,
		"x=1":                             false,
		"ACCESS_TOKEN=eyJ":                true,
		"x=1&Access_Token=eyJ":            true,
		"a=%zz&access_token=eyJ":          true,
		"a=%zz&access%5Ftoken=eyJ":        true,
		"x;access%5ftoken=eyJ":            true,
		"x;ACCESS_TOKEN=eyJ":              true,
		"%zz&%61ccess_token":              true,
		"a=%zz;access_token;b":            true,
		"a=%zz&access%5token=eyJ":         false,
		"a=%zz&x=access_token":            false,
		"a=%zz&access_tokens=eyJ":         false,
		"%zz%":                            false,
		"a=%zz&access%5Ftoken%=eyJ":       false,
		"a=%zz&access+token=eyJ":          false,
		"a=%zz&access%5F%74oken%3D=1;b=2": false,
	} {
		if got := tokenInQuery(q); got != want {
			t.Errorf("tokenInQuery(%q) = %v, want %v", q, got, want)
		}
	}
}
