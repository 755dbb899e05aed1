package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/policy"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// listen binds 127.0.0.1:0. The listener accepts (queues) connections from here on, so a
// server started on it needs no readiness wait.
func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// background runs a server until the test ends and checks that it stopped cleanly.
func background(t *testing.T, run func(ctx context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server stopped with %v", err)
			}
		case <-time.After(2 * shutdownTimeout):
			t.Error("server did not stop")
		}
	})
}

// startIssuer runs `issuer` on loopback; the issuer URL is http://ADDR+path.
func startIssuer(t *testing.T, path string, log *zap.Logger) (*issuer, string) {
	t.Helper()
	ln := listen(t)
	base := "http://" + ln.Addr().String() + path
	iss, err := newIssuer(&issuerFlags{issuerURL: base, audience: demoAudience, ttl: 5 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	background(t, func(ctx context.Context) error { return runIssuer(ctx, ln, iss, log) })
	return iss, base
}

func startInventory(t *testing.T) string {
	t.Helper()
	ln := listen(t)
	background(t, func(ctx context.Context) error { return runInventory(ctx, ln, &inventoryFlags{}, zap.NewNop()) })
	return "http://" + ln.Addr().String() + mcpapp.Path
}

// composeIssuer is the corp issuer of the compose policy, pointed at iss: the token must
// verify with exactly the audiences and appIdClaim mcpgate uses in the compose demo.
func composeIssuer(t *testing.T, issuerURL, jwksURL string) *policy.Issuer {
	t.Helper()
	snap, err := policy.LoadDir(context.Background(), "../../deploy/compose/policy")
	if err != nil {
		t.Fatal(err)
	}
	is := *snap.Mesh.Issuers["corp"]
	is.Issuer, is.JWKSURI = issuerURL, jwksURL
	return &is
}

func TestIssuerTokenVerifiesWithTheComposePolicy(t *testing.T) {
	ctx := testCtx(t)
	core, logs := observer.New(zap.InfoLevel)
	_, base := startIssuer(t, "/", zap.New(core))

	tok, err := fetchToken(ctx, base+"token", "my-agent", "mcp:tools inventory:read")
	if err != nil {
		t.Fatal(err)
	}
	if tok.ExpiresIn != 300 || tok.Scope != "mcp:tools inventory:read" {
		t.Errorf("token response: expires_in %d scope %q", tok.ExpiresIn, tok.Scope)
	}
	for name, jwks := range map[string]string{"jwksUri": base + "keys", "OIDC discovery": ""} {
		v := bearer.NewVerifier(bearer.Options{})
		p, err := v.Verify(ctx, tok.AccessToken, []*policy.Issuer{composeIssuer(t, base, jwks)})
		if err != nil {
			t.Fatalf("%s: mcpgate's verifier rejects the token: %v", name, err)
		}
		if p.AppID != "my-agent" || p.Subject != "my-agent" || !slices.Equal(p.Scopes, []string{"mcp:tools", "inventory:read"}) ||
			!slices.Equal(p.Audience, []string{demoAudience}) {
			t.Errorf("%s: principal %+v", name, p)
		}
		if d := time.Until(p.ExpiresAt); d < 4*time.Minute || d > 5*time.Minute+time.Second {
			t.Errorf("expires in %s, want 5m", d)
		}
	}

	// The log says it is for demos and who got a token, never the token.
	all := logs.All()
	if len(all) == 0 || all[0].Level != zap.WarnLevel || !strings.Contains(all[0].Message, "DEVELOPMENT ONLY") {
		t.Errorf("first log entry %+v, want the DEVELOPMENT ONLY warning", all)
	}
	issued := logs.FilterMessage("token issued").All()
	if len(issued) != 1 || issued[0].ContextMap()["client_id"] != "my-agent" {
		t.Errorf("token issued logs: %+v", issued)
	}
	sig := tok.AccessToken[strings.LastIndex(tok.AccessToken, ".")+1:]
	for _, e := range all {
		b, _ := json.Marshal(e.ContextMap())
		if strings.Contains(e.Message+string(b), sig) {
			t.Errorf("the token was logged: %s %s", e.Message, b)
		}
	}
}

func TestIssuerEndpoints(t *testing.T) {
	ctx := testCtx(t)
	_, base := startIssuer(t, "/realms/demo/", zap.NewNop())

	resp, err := http.Get(base + ".well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	var disc map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&disc)
	resp.Body.Close()
	if disc["issuer"] != base || disc["jwks_uri"] != base+"keys" || disc["token_endpoint"] != base+"token" {
		t.Errorf("discovery %v", disc)
	}

	for _, tt := range []struct {
		name, method, form string
		status             int
		oauthErr           string
	}{
		{"wrong grant", "POST", "grant_type=password&client_id=my-agent", 400, "unsupported_grant_type"},
		{"no client", "POST", "grant_type=client_credentials", 400, "invalid_client"},
		{"client not an App ID", "POST", "client_id=My_Agent", 400, "invalid_client"},
		{"bad scope", "POST", `client_id=my-agent&scope=a"b`, 400, "invalid_scope"},
		{"GET", "GET", "", 405, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequestWithContext(ctx, tt.method, base+"token", strings.NewReader(tt.form))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body struct {
				Error       string `json:"error"`
				AccessToken string `json:"access_token"`
			}
			_ = json.NewDecoder(resp.Body).Decode(&body)
			if resp.StatusCode != tt.status || body.Error != tt.oauthErr || body.AccessToken != "" {
				t.Errorf("%d %+v, want %d %s", resp.StatusCode, body, tt.status, tt.oauthErr)
			}
		})
	}
}

func TestIssuerFlags(t *testing.T) {
	for _, args := range [][]string{
		{"issuer"},
		{"issuer", "--issuer-url", "login.example.com"},
		{"issuer", "--issuer-url", "http://127.0.0.1/", "--ttl", "2h"},
		{"issuer", "--issuer-url", "http://127.0.0.1/", "--audience", ""},
	} {
		if err := run(t, args...).err; err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

type result struct {
	out, errOut string
	err         error
}

// run runs the cobra command line as main does.
func run(t *testing.T, args ...string) result {
	t.Helper()
	cmd := newRootCmd()
	var out, errOut bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&errOut)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(testCtx(t))
	return result{out.String(), errOut.String(), err}
}

// norm collapses runs of white space: the transcript's columns are for people.
func norm(s string) string { return strings.Join(strings.Fields(s), " ") }

func exitCode(err error) int {
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if err != nil {
		return -1
	}
	return 0
}

// Without mcpgate the agent sees the plain server: with --expect-policy=false every
// expectation holds (delete_product succeeds, ssn visible); with the default
// --expect-policy the same session fails exactly where the demo policy would act.
func TestAgentAgainstPlainInventory(t *testing.T) {
	_, base := startIssuer(t, "/", zap.NewNop())
	mcpURL := startInventory(t)
	args := []string{"agent", "--mcp-url", mcpURL, "--token-url", base + "token", "--client-id", "my-agent"}

	r := run(t, append(args, "--expect-policy=false")...)
	t.Logf("transcript:\n%s", r.out)
	if r.err != nil {
		t.Fatalf("agent: %v\n%s", r.err, r.errOut)
	}
	for _, want := range []string{
		"token ISSUED",
		"tools/list LISTED delete_product, get_customer, get_inventory, list_items, slow_report",
		`get_inventory {product_id: SKU-42} ALLOWED "SKU-42: 42 in stock"`,
		`"ssn":"078-05-1120"`,
		"delete_product {product_id: SKU-7} ALLOWED",
		"slow_report {steps: 3} STREAMED",
		"RESULT: every expectation met",
	} {
		if !strings.Contains(norm(r.out), want) {
			t.Errorf("transcript lacks %q", want)
		}
	}

	r = run(t, args...)
	t.Logf("transcript:\n%s", r.out)
	if exitCode(r.err) != 1 {
		t.Fatalf("agent expecting the policy against a plain server: %v, want exit 1", r.err)
	}
	for _, want := range []string{
		"tools/list LISTED delete_product, get_customer, get_inventory, list_items, slow_report UNEXPECTED: want delete_product filtered out",
		`get_inventory {product_id: "42; drop"} TOOL ERROR "product \"42; drop\" not found" UNEXPECTED: want mcpgate's JSON-RPC denial`,
		"UNEXPECTED: the ssn reached the client",
		`delete_product {product_id: SKU-7} ALLOWED "deleted SKU-7: false" UNEXPECTED: want mcpgate's JSON-RPC denial (rule no-deletes)`,
		"RESULT: 4 expectation(s) not met",
	} {
		if !strings.Contains(norm(r.out), want) {
			t.Errorf("transcript lacks %q", want)
		}
	}
}

// flaky answers 503 to the first n requests, as a sidecar does before it is programmed.
func flaky(n int64, next http.Handler) (http.Handler, *atomic.Int64) {
	var seen atomic.Int64
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if seen.Add(1) <= n {
			http.Error(w, "no healthy upstream", http.StatusServiceUnavailable)
			return
		}
		next.ServeHTTP(w, r)
	}), &seen
}

func TestAgentRetriesTheFirstConnection(t *testing.T) {
	h, seen := flaky(3, mcpapp.NewHandler(mcpapp.Options{DisableLocalhostProtection: true}))
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	r := run(t, "agent", "--mcp-url", srv.URL+mcpapp.Path, "--expect-policy=false", "--wait", "30s")
	if r.err != nil {
		t.Fatalf("agent: %v\n%s\n%s", r.err, r.out, r.errOut)
	}
	// One attempt is two requests when the SDK's server/discover probe fails.
	if !regexp.MustCompile(`\(attempt [23]\)`).MatchString(r.out) || !strings.Contains(r.errOut, "agent: attempt 1: ") ||
		!strings.Contains(r.errOut, "Service Unavailable") || seen.Load() < 4 {
		t.Errorf("want failed attempts, then success:\n%s\n%s", r.out, r.errOut)
	}
	if strings.Contains(r.out, "token") {
		t.Errorf("no --token-url: no token step expected:\n%s", r.out)
	}
}

func TestAgentGivesUp(t *testing.T) {
	h, _ := flaky(1<<62, http.NotFoundHandler())
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	start := time.Now()
	r := run(t, "agent", "--mcp-url", srv.URL+"/mcp", "--wait", "1s")
	if exitCode(r.err) != 1 || !strings.Contains(norm(r.out), "connect FAILED") {
		t.Fatalf("%v\n%s", r.err, r.out)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("gave up after %s, want about --wait 1s", d)
	}
}

func TestAgentTokenErrors(t *testing.T) {
	_, base := startIssuer(t, "/", zap.NewNop())
	r := run(t, "agent", "--mcp-url", "http://127.0.0.1:1/mcp", "--token-url", base+"token", "--client-id", "Not_An_App", "--wait", "300ms")
	if exitCode(r.err) != 1 || !strings.Contains(r.errOut, "invalid_client") {
		t.Fatalf("%v\n%s\n%s", r.err, r.out, r.errOut)
	}
}

func TestAgentLoop(t *testing.T) {
	mcpURL := startInventory(t)
	r := run(t, "agent", "--mcp-url", mcpURL, "--expect-policy=false", "--loop", "10ms", "--max-runs", "2")
	if r.err != nil {
		t.Fatalf("%v\n%s", r.err, r.out)
	}
	if strings.Count(r.out, "RESULT: every expectation met") != 2 || !strings.Contains(r.out, "=== 2 of 2 sessions met every expectation") {
		t.Errorf("transcript:\n%s", r.out)
	}
}

func TestAgentFlags(t *testing.T) {
	for _, args := range [][]string{
		{"agent"},
		{"agent", "--mcp-url", "http://127.0.0.1:1/mcp", "--loop", "1s", "--max-runs", "0"},
		{"agent", "--mcp-url", "http://127.0.0.1:1/mcp", "--wait", "0s"},
	} {
		if r := run(t, args...); r.err == nil || exitCode(r.err) == 1 {
			t.Errorf("%q: %v, want a usage error", args, r.err)
		}
	}
}

// The inventory subcommand serves mcpapp's tools, with its own stock per process.
func TestInventoryServesTheDemoTools(t *testing.T) {
	ctx := testCtx(t)
	cs, err := mcpapp.Connect(ctx, startInventory(t), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	names, err := cs.ToolNames(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{mcpapp.ToolDeleteProduct, mcpapp.ToolGetCustomer, mcpapp.ToolGetInventory, mcpapp.ToolListItems, mcpapp.ToolSlowReport}
	if !slices.Equal(names, want) {
		t.Errorf("tools %v, want %v", names, want)
	}
	// A Host that is not loopback is served (a sidecar forwarding Host: inventory).
	req, _ := http.NewRequestWithContext(ctx, "POST", startInventory(t), strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"ping"}`))
	req.Host = "inventory"
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode == http.StatusForbidden {
		t.Error("Host: inventory got 403: the DNS-rebinding check must be off by default behind a sidecar")
	}
}
