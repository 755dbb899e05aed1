//go:build integration

package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/idp"
)

// Audiences of the two remote MCP servers: tokens for one are refused by the other.
const (
	githubAudience = "https://github.example.com/mcp/"
	oboAudience    = "https://files.example.com/mcp/"
	agentAudience  = "api://my-agent" // what the users' tokens the agent holds are for
)

// outboundMesh is the demo mesh plus what an agent's outbound calls need: a real OAuth
// 2.0 authorization server (zitadel/oidc's OP), and two remote MCP servers on the
// official Go SDK that require a token for their own audience. github-mcp is reached
// with client credentials, files-mcp with a token exchanged for the user's.
type outboundMesh struct {
	*mesh
	as          *idp.Server
	github      *idp.ProtectedMCP
	files       *idp.ProtectedMCP
	secrets     string // directory of the client secret files
	githubURL   string // my-agent's sidecar: /v1.0/invoke/github-mcp/method/
	filesURL    string
	githubToken time.Duration
}

func startOutboundMesh(t *testing.T, githubTokenLifetime time.Duration) *outboundMesh {
	t.Helper()
	om := &outboundMesh{mesh: &mesh{iss: bearertest.NewIssuer(t)}, githubToken: githubTokenLifetime}
	om.as = idp.Start(t,
		idp.Client{ID: "mcpgate-github", Secret: "github-secret-1", Audiences: []string{githubAudience}, Scopes: []string{"repo:read"}, TokenLifetime: githubTokenLifetime},
		idp.Client{ID: "mcpgate-cold", Secret: "cold-secret", Audiences: []string{githubAudience}},
		idp.Client{ID: "mcpgate-obo", Secret: "obo-secret", TokenExchange: true, // zitadel authenticates exchanges with HTTP Basic only
			Audiences: []string{oboAudience}, Scopes: []string{"files:read"}},
	)
	om.github = idp.StartProtectedMCP(t, om.as, githubAudience)
	om.files = idp.StartProtectedMCP(t, om.as, oboAudience)
	om.secrets = t.TempDir()
	om.writeSecret(t, "github", "github-secret-1")
	om.writeSecret(t, "cold", "cold-secret")
	om.writeSecret(t, "wrong", "not-the-secret")
	om.writeSecret(t, "obo", "obo-secret")
	startMeshWith(t, om.mesh, "disabled", nil, func() {
		dir := om.mesh.dir
		replaceInFile(t, filepath.Join(dir, "mesh.yaml"), "  issuers:\n", fmt.Sprintf(
			"  issuers:\n    - {name: users, issuer: %q, jwksUri: %q, audiences: [%s]}\n", om.as.Issuer(), om.as.JWKSURL(), agentAudience))
		github := filepath.Join(dir, "github.yaml")
		replaceInFile(t, github, "baseUrl: https://api.githubcopilot.com/mcp/", "baseUrl: "+om.github.URL())
		replaceInFile(t, github, "tokenUrl: https://login.example.com/oauth2/token", "tokenUrl: "+om.as.TokenURL())
		replaceInFile(t, github, "clientId: mcpgate\n", "clientId: mcpgate-github\n")
		replaceInFile(t, github, "clientSecretFile: /secrets/github-client-secret", "clientSecretFile: "+filepath.Join(om.secrets, "github"))
		replaceInFile(t, github, "scopes: [mcp]", "scopes: [repo:read]")
		replaceInFile(t, github, "audience: https://api.githubcopilot.com/mcp/", "audience: "+githubAudience)
		endpoint := func(name, base, auth string) string {
			return fmt.Sprintf("---\napiVersion: mcpgate.dev/v1alpha1\nkind: HTTPEndpoint\nmetadata: {name: %s}\nspec:\n  baseUrl: %s\n  callers: [my-agent]\n  auth:\n%s", name, base, auth)
		}
		extra := endpoint("wrong-mcp", om.github.URL(), fmt.Sprintf("    clientCredentials: {tokenUrl: %q, clientId: mcpgate-github, clientSecretFile: %q}\n", om.as.TokenURL(), filepath.Join(om.secrets, "wrong"))) +
			endpoint("files-mcp", om.files.URL(), fmt.Sprintf("    tokenExchange: {tokenUrl: %q, clientId: mcpgate-obo, clientSecretFile: %q, audience: %q, scopes: [files:read], subjectIssuers: [users]}\n",
				om.as.TokenURL(), filepath.Join(om.secrets, "obo"), oboAudience)) +
			// No auth: the agent's Authorization header is removed all the same.
			"---\napiVersion: mcpgate.dev/v1alpha1\nkind: HTTPEndpoint\nmetadata: {name: open-mcp}\nspec:\n  baseUrl: " + om.github.URL() + "\n"
		if err := os.WriteFile(filepath.Join(dir, "outbound.yaml"), []byte(extra), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	out := "http://" + om.agent.Listener("outbound")
	om.githubURL, om.filesURL = out+"/v1.0/invoke/github-mcp/method/", out+"/v1.0/invoke/files-mcp/method/"
	return om
}

// tokenRequests are the token endpoint's requests from one client (mcpgate renews the
// tokens of endpoints once called, and retries refused ones, in the background).
func (om *outboundMesh) tokenRequests(clientID string) []idp.Request {
	var out []idp.Request
	for _, r := range om.as.Requests() {
		if r.ClientID == clientID {
			out = append(out, r)
		}
	}
	return out
}

func (om *outboundMesh) writeSecret(t *testing.T, name, secret string) {
	t.Helper()
	// Written and renamed, as a Kubernetes Secret volume updates.
	tmp := filepath.Join(om.secrets, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(om.secrets, name)); err != nil {
		t.Fatal(err)
	}
}

// whoami calls the remote server's whoami tool through my-agent's sidecar with the
// official Go SDK client, sending the headers given (the agent's own).
func whoami(t *testing.T, url string, headers map[string]string) string {
	t.Helper()
	s, err := mcpapp.Connect(callCtx(t), url, nil, headers)
	if err != nil {
		t.Fatalf("connect to %s through the sidecar: %v", url, err)
	}
	defer s.Close()
	res, err := s.CallTool(callCtx(t), "whoami", map[string]any{})
	if err != nil || res.IsError {
		t.Fatalf("whoami: %v %v", err, res)
	}
	return mcpapp.Text(res)
}

// rawCall is one POST through my-agent's sidecar, for the answers an SDK client turns
// into errors.
func rawCall(t *testing.T, url, auth string) (int, string) {
	t.Helper()
	req := mcpPost(t, url, auth, initialize)
	resp, err := (&http.Client{Timeout: 20 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestOutboundClientCredentials(t *testing.T) {
	om := startOutboundMesh(t, time.Hour)
	const agentHeld = "Bearer agent-held-token-for-someone-else"
	for i := range 5 {
		got := whoami(t, om.githubURL, map[string]string{"Authorization": agentHeld})
		if !strings.Contains(got, "sub=mcpgate-github") || !strings.Contains(got, "aud="+githubAudience) || !strings.Contains(got, "scope=repo:read") {
			t.Fatalf("call %d: the remote server saw %q", i, got)
		}
	}
	// One token for every request of five sessions (initialize, notifications, calls,
	// DELETE): acquired once by the sidecar's mcpgate, reused.
	if n := om.as.Count("client_credentials"); n != 1 {
		t.Errorf("%d tokens issued, want 1", n)
	}
	auths := om.github.Authorizations()
	if len(auths) < 10 {
		t.Fatalf("the remote server saw %d requests", len(auths))
	}
	for _, a := range auths {
		if a == agentHeld || !strings.HasPrefix(a, "Bearer ey") {
			t.Fatalf("the remote server received Authorization %q", a)
		}
	}
	reqs := om.tokenRequests("mcpgate-github")
	if reqs[0].Audience != githubAudience || reqs[0].Scope != "repo:read" || reqs[0].ClientID != "mcpgate-github" {
		t.Errorf("token request = %+v", reqs[0])
	}
	// Without auth on the endpoint the agent's header is removed too.
	if code, _ := rawCall(t, strings.Replace(om.githubURL, "github-mcp", "open-mcp", 1), agentHeld); code != http.StatusUnauthorized {
		t.Errorf("open-mcp: HTTP %d, want the remote server's 401 (no token reached it)", code)
	}
	if last := om.github.Authorizations(); last[len(last)-1] != "" {
		t.Errorf("open-mcp passed Authorization %q through", last[len(last)-1])
	}
	// inventory's sidecar may not spend github-mcp's credentials (spec.callers).
	inv := "http://" + om.inventory.Listener("outbound") + "/v1.0/invoke/github-mcp/method/"
	if code, body := rawCall(t, inv, ""); code != http.StatusForbidden || !strings.Contains(body, "App inventory may not call HTTPEndpoint github-mcp") {
		t.Errorf("inventory → github-mcp: %d %s", code, body)
	}
	om.requireNoSecretsLogged(t)
}

func TestOutboundTokenRefreshAndRotation(t *testing.T) {
	// A 6s token is renewed in the background from 5s before it expires (a tenth of
	// its lifetime, at least 5s): within a second of being issued.
	om := startOutboundMesh(t, 6*time.Second)
	first := whoami(t, om.githubURL, nil)
	requireEventually(t, 15*time.Second, "a background refresh", func() bool {
		whoami(t, om.githubURL, nil)
		return om.as.Count("client_credentials") >= 2
	})
	if !strings.Contains(first, "sub=mcpgate-github") {
		t.Fatal(first)
	}
	// Rotation: the authorization server takes only the new secret; the file changes;
	// the next fetch reads it. No restart, no reload.
	before := om.as.Count("client_credentials")
	om.as.SetSecret("mcpgate-github", "github-secret-2")
	om.writeSecret(t, "github", "github-secret-2")
	requireEventually(t, 15*time.Second, "a token fetched with the rotated secret", func() bool {
		whoami(t, om.githubURL, nil)
		return om.as.Count("client_credentials") > before
	})
}

// TestOutboundTokenEndpointDown: the sidecar's injected token keeps working during an
// outage until it expires; then the route asks ext_authz again, which answers 503 naming
// the endpoint; once the token endpoint is back, calls work again. An endpoint added
// during the outage (no token ever) and one with a wrong secret get the same 503.
func TestOutboundTokenEndpointDown(t *testing.T) {
	om := startOutboundMesh(t, 6*time.Second)
	whoami(t, om.githubURL, nil) // github-mcp has its token
	om.as.Stop()
	if got := whoami(t, om.githubURL, nil); !strings.Contains(got, "sub=mcpgate-github") {
		t.Fatalf("with a cached token, during the outage: %q", got)
	}
	unavailable := func(url, endpoint string) (bool, string) {
		code, body := rawCall(t, url, "")
		var denial struct{ Error, Reason, Endpoint string }
		_ = json.Unmarshal([]byte(body), &denial)
		return code == http.StatusServiceUnavailable && denial.Endpoint == endpoint && denial.Error == "temporarily_unavailable" &&
			strings.Contains(denial.Reason, fmt.Sprintf("endpoint %q", endpoint)), fmt.Sprintf("%d %s", code, body)
	}
	requireEventually(t, 20*time.Second, "github-mcp's expired token withdrawn (503 naming it)", func() bool {
		ok, _ := unavailable(om.githubURL, "github-mcp")
		return ok
	})
	om.editPolicy(t, "cold-mcp added during the outage", func() {
		cold := fmt.Sprintf("---\napiVersion: mcpgate.dev/v1alpha1\nkind: HTTPEndpoint\nmetadata: {name: cold-mcp}\nspec:\n  baseUrl: %s\n  callers: [my-agent]\n  auth:\n"+
			"    clientCredentials: {tokenUrl: %q, clientId: mcpgate-cold, clientSecretFile: %q}\n", om.github.URL(), om.as.TokenURL(), filepath.Join(om.secrets, "cold"))
		if err := os.WriteFile(filepath.Join(om.mesh.dir, "cold.yaml"), []byte(cold), 0o644); err != nil {
			t.Fatal(err)
		}
	})
	coldURL := strings.Replace(om.githubURL, "github-mcp", "cold-mcp", 1)
	requireEventually(t, 10*time.Second, "cold-mcp routed", func() bool {
		code, _ := rawCall(t, coldURL, "")
		return code != http.StatusNotFound
	})
	if ok, got := unavailable(coldURL, "cold-mcp"); !ok {
		t.Fatalf("no token ever, token endpoint down: %s", got)
	}
	om.as.Restart(t)
	for _, url := range []string{om.githubURL, coldURL} {
		requireEventually(t, 15*time.Second, url+" to work once the token endpoint is back", func() bool {
			code, _ := rawCall(t, url, "")
			return code == http.StatusOK
		})
	}
	// A wrong secret: 503 naming the endpoint and the OAuth error.
	code, body := rawCall(t, strings.Replace(om.githubURL, "github-mcp", "wrong-mcp", 1), "")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, `"oauth_error":"invalid_client"`) || !strings.Contains(body, `"endpoint":"wrong-mcp"`) {
		t.Fatalf("wrong secret: %d %s", code, body)
	}
	if strings.Contains(body, "not-the-secret") {
		t.Fatal("the body holds the secret")
	}
	om.requireNoSecretsLogged(t)
}

func TestOutboundTokenExchange(t *testing.T) {
	om := startOutboundMesh(t, time.Hour)
	alice := om.as.UserToken(t, "alice", []string{agentAudience}, []string{"files:read"}, time.Hour)
	for range 3 {
		got := whoami(t, om.filesURL, map[string]string{"Authorization": "Bearer " + alice})
		if !strings.Contains(got, "sub=alice") || !strings.Contains(got, "aud="+oboAudience) || !strings.Contains(got, "scope=files:read") {
			t.Fatalf("files-mcp saw %q", got)
		}
	}
	for _, a := range om.files.Authorizations() {
		if strings.Contains(a, alice) {
			t.Fatal("files-mcp received alice's own token")
		}
	}
	if n := om.as.Count(oauthtestTokenExchange); n != 1 {
		t.Errorf("%d exchanges for one user's calls, want 1 (cached per subject token)", n)
	}
	// No user token: 401 from the sidecar, nothing reaches files-mcp.
	before := len(om.files.Authorizations())
	if code, _ := rawCall(t, om.filesURL, ""); code != http.StatusUnauthorized {
		t.Errorf("without a token: HTTP %d", code)
	}
	// A token for another audience is not exchanged.
	other := om.as.UserToken(t, "alice", []string{"api://billing"}, nil, time.Hour)
	if code, _ := rawCall(t, om.filesURL, "Bearer "+other); code != http.StatusUnauthorized {
		t.Errorf("token for another audience: HTTP %d", code)
	}
	if after := len(om.files.Authorizations()); after != before {
		t.Errorf("refused calls reached files-mcp (%d requests)", after-before)
	}
	om.requireNoSecretsLogged(t)
	if strings.Contains(om.gate.logs.String(), alice) {
		t.Error("mcpgate logged the user's token")
	}
}

const oauthtestTokenExchange = "urn:ietf:params:oauth:grant-type:token-exchange"

// requireNoSecretsLogged checks mcpgate's logs, metrics and snapshot for the client
// secrets and for any token the authorization server issued.
func (om *outboundMesh) requireNoSecretsLogged(t *testing.T) {
	t.Helper()
	_, metrics := om.gate.get(t, "/metrics")
	_, snapshot := om.gate.get(t, "/debug/snapshot")
	for where, text := range map[string]string{"logs": om.gate.logs.String(), "/metrics": metrics, "/debug/snapshot": snapshot} {
		for _, secret := range []string{"github-secret-1", "github-secret-2", "cold-secret", "obo-secret", "not-the-secret"} {
			if strings.Contains(text, secret) {
				t.Errorf("%s holds the client secret %q", where, secret)
			}
		}
		for _, a := range append(om.github.Authorizations(), om.files.Authorizations()...) {
			if tok := strings.TrimPrefix(a, "Bearer "); len(tok) > 20 && strings.Contains(text, tok) {
				t.Errorf("%s holds an upstream token", where)
			}
		}
	}
}
