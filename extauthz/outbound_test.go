package extauthz

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/integration/idp"
	"github.com/mcpgate/mcpgate/policy"
)

// outboundFixture is mcpgate's ext_authz server with a policy of two Apps and three
// HTTPEndpoints whose credentials it supplies, against a real OAuth 2.0 server.
type outboundFixture struct {
	as     *idp.Server
	server *Server
	dir    string
}

const outboundPolicy = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  mtls: strict
  authz: {address: "mcpgate:9001"}
  sds: {certDir: /certs}
  issuers:
    - {name: users, issuer: AS_ISSUER, jwksUri: AS_JWKS, audiences: [api://my-agent]}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: my-agent}
spec:
  sidecar: {address: my-agent-envoy, inboundPort: 15006, outboundPort: 3500}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: other}
spec:
  sidecar: {address: other-envoy, inboundPort: 15006, outboundPort: 3500}
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: github-mcp}
spec:
  baseUrl: https://github.example.com/mcp/
  callers: [my-agent]
  auth:
    clientCredentials:
      tokenUrl: AS_TOKEN
      clientId: mcpgate
      clientSecretFile: SECRETS/mcpgate
      audience: https://github.example.com/mcp/
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: wrong-secret}
spec:
  baseUrl: https://github.example.com/mcp/
  callers: ["*"]
  auth:
    clientCredentials:
      tokenUrl: AS_TOKEN
      clientId: mcpgate
      clientSecretFile: SECRETS/wrong
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: obo}
spec:
  baseUrl: https://obo.example.com/mcp/
  callers: [my-agent]
  auth:
    tokenExchange:
      tokenUrl: AS_TOKEN
      clientId: exchanger
      clientSecretFile: SECRETS/exchanger
      audience: https://obo.example.com/mcp/
      scopes: [files:read]
      subjectIssuers: [users]
`

func newOutboundFixture(t testing.TB) *outboundFixture {
	t.Helper()
	f := &outboundFixture{dir: t.TempDir()}
	f.as = idp.Start(t,
		idp.Client{ID: "mcpgate", Secret: "s3cret", Audiences: []string{"https://github.example.com/mcp/"}},
		idp.Client{ID: "exchanger", Secret: "x-s3cret", TokenExchange: true, // zitadel authenticates exchanges with HTTP Basic only
			Audiences: []string{"https://obo.example.com/mcp/"}, Scopes: []string{"files:read"}},
	)
	secrets := filepath.Join(f.dir, "secrets")
	requireWrite(t, filepath.Join(f.dir, "policy.yaml"), strings.NewReplacer(
		"AS_ISSUER", f.as.Issuer(), "AS_JWKS", f.as.JWKSURL(), "AS_TOKEN", f.as.TokenURL(), "SECRETS", secrets,
	).Replace(outboundPolicy))
	if err := os.Mkdir(secrets, 0o700); err != nil {
		t.Fatal(err)
	}
	requireWrite(t, filepath.Join(secrets, "mcpgate"), "s3cret\n")
	requireWrite(t, filepath.Join(secrets, "wrong"), "not-the-secret\n")
	requireWrite(t, filepath.Join(secrets, "exchanger"), "x-s3cret\n")
	snap, err := policy.LoadDir(context.Background(), f.dir)
	if err != nil {
		t.Fatal(err)
	}
	if f.server, err = NewServer(Options{Store: policy.NewStore(snap), Verifier: bearer.NewVerifier(bearer.Options{})}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(f.server.Close)
	return f
}

// outboundCheck is the CheckRequest of an agent's sidecar for a call to endpoint: no
// peer principal (the agent is on loopback), the route's context extensions.
func outboundCheck(endpoint, source string, headers map[string]string) *authv3.CheckRequest {
	h := map[string]string{":method": "POST", ":path": "/v1.0/invoke/" + endpoint + "/method/", ":authority": "127.0.0.1:3500"}
	for k, v := range headers {
		h[k] = v
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "req-1", Method: "POST", Path: h[":path"], Headers: h,
		}},
		ContextExtensions: map[string]string{contract.ContextEndpoint: endpoint, contract.ContextSourceAppID: source},
	}}
}

type outboundResult struct {
	code        codes.Code
	status      int
	auth        string // the Authorization header set on the upstream request
	removed     []string
	decisionID  string
	body        endpointDenialBody
	bodyText    string
	www         string
	respHeaders map[string]string
}

func (f *outboundFixture) check(t *testing.T, ctx context.Context, req *authv3.CheckRequest) outboundResult {
	t.Helper()
	resp, err := f.server.Check(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	r := outboundResult{code: codes.Code(resp.GetStatus().GetCode()), respHeaders: map[string]string{}}
	if ok := resp.GetOkResponse(); ok != nil {
		r.status = 200
		for _, h := range ok.GetHeaders() {
			if h.GetHeader().GetKey() == "authorization" {
				r.auth = h.GetHeader().GetValue()
			} else {
				t.Errorf("the upstream request gets header %s: only authorization is set", h.GetHeader().GetKey())
			}
		}
		r.removed = ok.GetHeadersToRemove()
		for _, h := range ok.GetResponseHeadersToAdd() {
			r.respHeaders[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
		}
		r.decisionID = r.respHeaders[contract.HeaderDecisionID]
		if resp.GetDynamicMetadata() != nil {
			t.Error("an outbound answer carries dynamic metadata")
		}
		return r
	}
	d := resp.GetDeniedResponse()
	r.status, r.bodyText = int(d.GetStatus().GetCode()), d.GetBody()
	if err := json.Unmarshal([]byte(d.GetBody()), &r.body); err != nil {
		t.Fatalf("denial body is not JSON: %q", d.GetBody())
	}
	for _, h := range d.GetHeaders() {
		r.respHeaders[h.GetHeader().GetKey()] = h.GetHeader().GetValue()
	}
	r.www, r.decisionID = r.respHeaders["www-authenticate"], r.respHeaders[contract.HeaderDecisionID]
	return r
}

func TestOutboundClientCredentials(t *testing.T) {
	f := newOutboundFixture(t)
	ctx := context.Background()
	const agentToken = "Bearer agent-held-token"
	first := f.check(t, ctx, outboundCheck("github-mcp", "my-agent", map[string]string{
		"authorization": agentToken, "x-mcpgate-subject": "spoofed",
	}))
	if first.status != 200 || !strings.HasPrefix(first.auth, "Bearer ") || first.auth == agentToken {
		t.Fatalf("first call: %+v", first)
	}
	if len(first.removed) != 1 || first.removed[0] != "x-mcpgate-subject" {
		t.Errorf("headers removed = %v, want the spoofed internal header", first.removed)
	}
	if first.decisionID == "" {
		t.Error("no decision id on the response to the agent")
	}
	// The token is the authorization server's, for the endpoint's audience.
	claims := jwtClaims(t, strings.TrimPrefix(first.auth, "Bearer "))
	if claims["aud"] != "https://github.example.com/mcp/" && !containsAny(claims["aud"], "https://github.example.com/mcp/") {
		t.Errorf("token aud = %v", claims["aud"])
	}
	for range 20 {
		again := f.check(t, ctx, outboundCheck("github-mcp", "my-agent", nil))
		if again.auth != first.auth {
			t.Fatal("a later call got another token: the cached one was not reused")
		}
	}
	if n := f.as.Count("client_credentials"); n != 1 {
		t.Errorf("token endpoint issued %d tokens for 21 calls, want 1", n)
	}
	reqs := f.as.Requests()
	if len(reqs) == 0 || reqs[0].Audience != "https://github.example.com/mcp/" {
		t.Errorf("token requests = %+v, want audience sent", reqs)
	}
}

func TestOutboundRefusals(t *testing.T) {
	f := newOutboundFixture(t)
	ctx := context.Background()
	for _, c := range []struct {
		name       string
		ctx        context.Context
		req        *authv3.CheckRequest
		status     int
		reason     string
		detail     string
		oauthError string
	}{
		{"not among spec.callers", ctx, outboundCheck("github-mcp", "other", nil), 403, ReasonNotEndpointCaller, "App other may not call HTTPEndpoint github-mcp", ""},
		{"unknown endpoint", ctx, outboundCheck("nope", "my-agent", nil), 403, ReasonUnknownEndpoint, `no HTTPEndpoint "nope"`, ""},
		{"unknown source", ctx, outboundCheck("github-mcp", "", nil), 403, ReasonUnknownSource, "names no App", ""},
		{"wrong client secret", ctx, outboundCheck("wrong-secret", "other", nil), 503, ReasonTokenUnavailable, `endpoint "wrong-secret": invalid_client`, "invalid_client"},
		{"Envoy connected as another App", withPeer(t, "spiffe://example.org/ns/default/other"), outboundCheck("github-mcp", "my-agent", nil), 403, ReasonSourceMismatch, "connected as spiffe://example.org/ns/default/other", ""},
		{"token exchange without a token", ctx, outboundCheck("obo", "my-agent", nil), 401, ReasonTokenMissing, "send the signed-in user's token", ""},
		{"token exchange with a bad token", ctx, outboundCheck("obo", "my-agent", map[string]string{"authorization": "Bearer not.a.jwt"}), 401, "token_malformed", "not valid", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := f.check(t, c.ctx, c.req)
			if r.status != c.status || !strings.Contains(r.body.Reason, c.detail) || r.body.OAuthError != c.oauthError {
				t.Fatalf("got %d %+v, want %d with %q (oauth_error %q)", r.status, r.body, c.status, c.detail, c.oauthError)
			}
			if r.code == codes.OK || r.decisionID == "" || r.body.DecisionID != r.decisionID {
				t.Errorf("status %v, decision id %q / %q", r.code, r.decisionID, r.body.DecisionID)
			}
			if r.status == 401 && !strings.HasPrefix(r.www, "Bearer") {
				t.Errorf("401 without a Bearer challenge: %q", r.www)
			}
			if strings.Contains(r.bodyText, "s3cret") || strings.Contains(r.bodyText, "not-the-secret") {
				t.Errorf("denial body holds a secret: %s", r.bodyText)
			}
		})
	}
	if n := f.as.Count("client_credentials"); n != 0 {
		t.Errorf("%d tokens issued for refused calls", n)
	}
}

func TestOutboundSameSpiffeIDAdmitted(t *testing.T) {
	f := newOutboundFixture(t)
	r := f.check(t, withPeer(t, "spiffe://example.org/ns/default/my-agent"), outboundCheck("github-mcp", "my-agent", nil))
	if r.status != 200 || r.auth == "" {
		t.Fatalf("the App's own Envoy was refused: %+v", r)
	}
}

func TestOutboundTokenExchange(t *testing.T) {
	f := newOutboundFixture(t)
	ctx := context.Background()
	user := f.as.UserToken(t, "alice", []string{"api://my-agent"}, []string{"files:read"}, time.Hour)
	first := f.check(t, ctx, outboundCheck("obo", "my-agent", map[string]string{"authorization": "Bearer " + user}))
	if first.status != 200 {
		t.Fatalf("exchange: %+v", first)
	}
	upstream := strings.TrimPrefix(first.auth, "Bearer ")
	if upstream == user || strings.Contains(first.auth, user) {
		t.Fatal("the user's token would be passed through")
	}
	claims := jwtClaims(t, upstream)
	if claims["sub"] != "alice" || !containsAny(claims["aud"], "https://obo.example.com/mcp/") {
		t.Errorf("exchanged token claims = %v", claims)
	}
	for range 10 {
		if r := f.check(t, ctx, outboundCheck("obo", "my-agent", map[string]string{"authorization": "Bearer " + user})); r.auth != first.auth {
			t.Fatal("the exchanged token was not reused for the same subject token")
		}
	}
	bob := f.as.UserToken(t, "bob", []string{"api://my-agent"}, []string{"files:read"}, time.Hour)
	if r := f.check(t, ctx, outboundCheck("obo", "my-agent", map[string]string{"authorization": "Bearer " + bob})); r.status != 200 || jwtClaims(t, strings.TrimPrefix(r.auth, "Bearer "))["sub"] != "bob" {
		t.Fatalf("bob: %+v", r)
	}
	if n := f.as.Count(oauthtestGrantExchange); n != 2 {
		t.Errorf("%d exchanges for two users, want 2", n)
	}
	// A token of another audience is not exchanged: mcpgate verifies it first.
	other := f.as.UserToken(t, "alice", []string{"api://billing"}, nil, time.Hour)
	if r := f.check(t, ctx, outboundCheck("obo", "my-agent", map[string]string{"authorization": "Bearer " + other})); r.status != 401 {
		t.Fatalf("token for another audience: %+v", r)
	}
}

const oauthtestGrantExchange = "urn:ietf:params:oauth:grant-type:token-exchange"

func withPeer(t *testing.T, spiffeID string) context.Context {
	t.Helper()
	u, err := url.Parse(spiffeID)
	if err != nil {
		t.Fatal(err)
	}
	cert := &x509.Certificate{URIs: []*url.URL{u}}
	return peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{
		State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}},
	}})
}

func jwtClaims(t *testing.T, tok string) map[string]any {
	t.Helper()
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %d parts", len(parts))
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

func containsAny(v any, want string) bool {
	switch a := v.(type) {
	case string:
		return a == want
	case []any:
		for _, x := range a {
			if x == want {
				return true
			}
		}
	}
	return false
}

// BenchmarkOutboundCheckLoopback is an outbound Check with a cached client credentials
// token over gRPC on loopback, beside a no-op Authorization server in the same run
// (alternating): what mcpgate adds to an agent's call to an HTTPEndpoint with auth is the
// round trip (the no-op's p50) plus its own work (the difference).
func BenchmarkOutboundCheckLoopback(b *testing.B) {
	f := newOutboundFixture(b)
	noop, gate := startGRPC(b, noopServer{}), startGRPC(b, f.server)
	check := outboundCheck("github-mcp", "my-agent", map[string]string{"authorization": "Bearer agent-held"})
	ctx := context.Background()
	if resp, err := gate.Check(ctx, check); err != nil || resp.GetOkResponse() == nil {
		b.Fatalf("warm-up: %v %v", resp, err)
	}
	timed := func(c authv3.AuthorizationClient) time.Duration {
		t0 := time.Now()
		if _, err := c.Check(ctx, check); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	var ln, lg []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			ln, lg = append(ln, timed(noop)), append(lg, timed(gate))
		} else {
			lg, ln = append(lg, timed(gate)), append(ln, timed(noop))
		}
		i++
	}
	pn50, _ := percentiles(ln)
	pg50, _ := percentiles(lg)
	b.ReportMetric(us(pn50), "noop-p50-µs")
	b.ReportMetric(us(pg50), "mcpgate-p50-µs")
	b.ReportMetric(us(pg50-pn50), "mcpgate-work-p50-µs")
	if n := f.as.Count(idp.GrantClientCredentials); n != 1 {
		b.Errorf("%d tokens issued, want 1", n)
	}
}
