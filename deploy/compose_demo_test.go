package deploy

import (
	"context"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/policy"
)

// The compose services that run cmd/mcpgate-demo, and their subcommands.
const (
	issuerService = "issuer"
	// issuerKeysPath is where `mcpgate-demo issuer` serves its JWKS and token endpoint,
	// under the path of --issuer-url (cmd/mcpgate-demo/issuer.go).
	issuerKeysPath  = "keys"
	issuerTokenPath = "token"
)

// composeIssuer is the issuer of the demo policy that the compose issuer service
// replaces: the one inventory's authentication names (exactly one in the demo).
func composeIssuer(t *testing.T, snap *policy.Snapshot) *policy.Issuer {
	t.Helper()
	var found []*policy.Issuer
	for _, app := range snap.Apps {
		if app.MCP != nil {
			for _, is := range app.MCP.Authentication.Issuers {
				if !slices.Contains(found, is) {
					found = append(found, is)
				}
			}
		}
	}
	if len(found) != 1 {
		t.Fatalf("the demo policy's Apps require %d issuers, want exactly one for the compose issuer to stand in for", len(found))
	}
	return found[0]
}

// issuerURL is the compose issuer service's --issuer-url.
func issuerURL(t *testing.T, c compose) string {
	t.Helper()
	s, ok := c.Services[issuerService]
	if !ok {
		t.Fatalf("no compose service %s", issuerService)
	}
	u, ok := flagValue(s.Command, "issuer-url")
	if !ok || u == "" {
		t.Fatalf("service %s: no --issuer-url in %q", issuerService, s.Command)
	}
	return u
}

func jwksURLOf(issuerURL string) string {
	return strings.TrimSuffix(issuerURL, "/") + "/" + issuerKeysPath
}

// wantComposePolicy is what deploy/compose/policy must hold: the shipped demo policy
// (deployedFiles: testdata/demo with mcpgate's SPIFFE ID in the Mesh) byte for byte,
// except that the issuer inventory requires has the compose issuer's issuer and jwksUri,
// and a header saying what differs.
func wantComposePolicy(t *testing.T) map[string]string {
	t.Helper()
	snap := loadDemo(t)
	is := composeIssuer(t, snap)
	newIss := issuerURL(t, loadCompose(t))
	files, reasons := deployedEdits(t, snap)
	replaced := map[string]int{}
	for name, content := range files {
		lines := strings.SplitAfter(content, "\n")
		changed := false
		for i, l := range lines {
			key, val, ok := strings.Cut(strings.TrimSpace(l), ": ")
			indent := l[:len(l)-len(strings.TrimLeft(l, " "))]
			switch {
			case ok && key == "issuer" && val == is.Issuer:
				lines[i] = indent + "issuer: " + newIss + "\n"
			case ok && key == "jwksUri" && val == is.JWKSURI && is.JWKSURI != "":
				lines[i] = indent + "jwksUri: " + jwksURLOf(newIss) + "\n"
			default:
				continue
			}
			replaced[key]++
			changed = true
		}
		if changed {
			files[name] = strings.Join(lines, "")
			reasons[name] = append(reasons[name], "the issuer "+is.Name+" is docker-compose.yaml's development issuer (service "+issuerService+", in\n"+
				"mcpgate's network namespace, hence a loopback URL), because "+is.Issuer+"\ndoes not exist there.")
		}
	}
	if replaced["issuer"] != 1 || (is.JWKSURI != "" && replaced["jwksUri"] != 1) {
		t.Fatalf("testdata/demo: found the issuer %s's issuer %d times and jwksUri %d times, want once each", is.Name, replaced["issuer"], replaced["jwksUri"])
	}
	for name, why := range reasons {
		files[name] = generatedHeader(name, "go test ./deploy -run TestComposePolicy -update", why,
			"Lasting changes belong in testdata/demo; live edits here (deploy/README.md)\nmake `go test ./deploy` fail until reverted.") + files[name]
	}
	return files
}

// TestComposePolicy keeps deploy/compose/policy equal to testdata/demo except for
// mcpgate's SPIFFE ID and the issuer block; -update rewrites it.
func TestComposePolicy(t *testing.T) {
	want := wantComposePolicy(t)
	if *update {
		if err := os.RemoveAll(composePolicyDir); err != nil {
			t.Fatal(err)
		}
		for name, content := range want {
			p := filepath.Join(composePolicyDir, filepath.FromSlash(name))
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, err := filesUnder(t, composePolicyDir)
	if err != nil {
		t.Fatalf("%v (go test ./deploy -run TestComposePolicy -update)", err)
	}
	for name, w := range want {
		if g, ok := got[name]; !ok {
			t.Errorf("deploy/%s lacks %s of testdata/demo (go test ./deploy -run TestComposePolicy -update)", composePolicyDir, name)
		} else if g != w {
			t.Errorf("deploy/%s/%s differs from testdata/demo/%s beyond mcpgate's SPIFFE ID and the issuer (go test ./deploy -run TestComposePolicy -update)", composePolicyDir, name, name)
		}
	}
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("deploy/%s/%s is not in testdata/demo", composePolicyDir, name)
		}
	}

	// mcpgate accepts it: a plain-http issuer is allowed only on loopback.
	snap, err := policy.LoadDir(context.Background(), composePolicyDir)
	if err != nil {
		t.Fatalf("mcpgate rejects deploy/%s: %v", composePolicyDir, err)
	}
	is := composeIssuer(t, snap)
	iss := issuerURL(t, loadCompose(t))
	if is.Issuer != iss || is.JWKSURI != jwksURLOf(iss) {
		t.Errorf("compose policy issuer %s: issuer %q jwksUri %q, want the issuer service's %q and %q", is.Name, is.Issuer, is.JWKSURI, iss, jwksURLOf(iss))
	}
}

// demoService checks that a compose service runs `mcpgate-demo <sub>` from the Dockerfile's
// demo stage and returns its flags.
func demoService(t *testing.T, c compose, name, sub string) []string {
	t.Helper()
	s, ok := c.Services[name]
	if !ok {
		t.Fatalf("no compose service %s", name)
	}
	if str(get(s.Build, "context")) != "." || str(get(s.Build, "dockerfile")) != "Dockerfile" || str(get(s.Build, "target")) != demoTarget {
		t.Errorf("service %s must be built from ./Dockerfile with target %s, build: %v", name, demoTarget, s.Build)
	}
	if parseDockerfile(t).stage(demoTarget) == nil {
		t.Errorf("service %s builds target %s, which the Dockerfile lacks", name, demoTarget)
	}
	if len(s.Entrypoint) != 0 {
		t.Errorf("service %s overrides the entrypoint %s", name, demoEntrypoint)
	}
	if len(s.Command) == 0 || s.Command[0] != sub {
		t.Fatalf("service %s: command %q, want %s ...", name, s.Command, sub)
	}
	return s.Command[1:]
}

// TestComposeDemoPrograms checks the inventory, issuer and agent services against the
// policy they run under (deploy/compose/policy) and against each other.
func TestComposeDemoPrograms(t *testing.T) {
	c := loadCompose(t)
	snap, server, agent := composeApps(t)
	authzHost, _ := hostPort(t, "authz.address", snap.Mesh.AuthzAddress)

	// The MCP server: the service at inventory's address (which TestComposeSidecarsAndApps
	// puts in its sidecar's netns) serves on the address's port.
	host, port := hostPort(t, "App "+server.ID+" address", server.Address)
	args := demoService(t, c, host, "inventory")
	if p := listenPort(t, args, "addr"); p != port {
		t.Errorf("service %s: --addr port %d, want %d (App %s address %s)", host, p, port, server.ID, server.Address)
	}

	// The issuer: iss and the JWKS URL are loopback URLs (the policy allows plain http
	// only there), so it must run in mcpgate's network namespace and listen on their port.
	is := composeIssuer(t, snap)
	iss := issuerURL(t, c)
	iargs := demoService(t, c, issuerService, "issuer")
	iu, err := url.Parse(iss)
	if err != nil {
		t.Fatal(err)
	}
	ip := net.ParseIP(iu.Hostname())
	if iu.Scheme == "http" {
		if (ip == nil || !ip.IsLoopback()) && iu.Hostname() != "localhost" {
			t.Errorf("--issuer-url %s: plain http on a non-loopback host, which mcpgate rejects", iss)
		}
		if ns := c.Services[issuerService].NetworkMode; ns != "service:"+authzHost {
			t.Errorf("service %s: network_mode %q, want service:%s (mcpgate fetches %s on its own loopback)", issuerService, ns, authzHost, is.JWKSURI)
		}
	}
	issuerPort := listenPort(t, iargs, "addr")
	if u, err := url.Parse(is.JWKSURI); err != nil || u.Port() != strconv.Itoa(issuerPort) {
		t.Errorf("service %s listens on %d, the policy's jwksUri is %s", issuerService, issuerPort, is.JWKSURI)
	}
	if a, _ := flagValue(iargs, "audience"); !slices.Contains(is.Audiences, a) {
		t.Errorf("service %s: --audience %q, the policy's issuer %s accepts %v", issuerService, a, is.Name, is.Audiences)
	}
	if is.AppIDClaim != "azp" {
		t.Errorf("issuer %s appIdClaim %q: mcpgate-demo issuer puts the client_id in azp", is.Name, is.AppIDClaim)
	}

	// The agent: the service at my-agent's address, calling inventory through its own
	// sidecar's outbound port, with a token from the issuer for an App inventory allows.
	ahost, _ := hostPort(t, "App "+agent.ID+" address", agent.Address)
	aargs := demoService(t, c, ahost, "agent")
	wantURL := "http://127.0.0.1:" + strconv.Itoa(agent.Sidecar.OutboundPort) + "/v1.0/invoke/" + server.ID + "/method" + server.MCP.Path
	if u, _ := flagValue(aargs, "mcp-url"); u != wantURL {
		t.Errorf("service %s: --mcp-url %q, want %q (its sidecar's outboundPort, App %s, mcp.path)", ahost, u, wantURL, server.ID)
	}
	tu, _ := flagValue(aargs, "token-url")
	u, err := url.Parse(tu)
	if err != nil || u.Scheme != "http" || u.Port() != strconv.Itoa(issuerPort) || u.Path != path.Join(iu.Path, issuerTokenPath) {
		t.Errorf("service %s: --token-url %q, want http://<issuer>:%d%s", ahost, tu, issuerPort, path.Join(iu.Path, issuerTokenPath))
	} else if h := u.Hostname(); h != issuerService && h != authzHost || h == issuerService && !slices.Contains(c.Services[authzHost].aliases(), issuerService) {
		t.Errorf("service %s: --token-url host %q does not reach the issuer (mcpgate's netns: %s, or its alias %s)", ahost, h, authzHost, issuerService)
	}
	checkAgentAuthorized(t, "service "+ahost+":", aargs, snap, server, agent)
	if v, _ := flagValue(aargs, "expect-policy"); !slices.Contains(aargs, "--expect-policy=true") && v != "true" {
		t.Errorf("service %s must run with --expect-policy=true: it runs through mcpgate", ahost)
	}
}

// checkAgentAuthorized checks the agent's flags aargs (who names the agent in errors)
// against server's policy in snap: --client-id is agent's App ID, which server's
// accessControl allows; --scope has the scopes server's authentication requires and
// those of some allow rule that names the agent.
func checkAgentAuthorized(t *testing.T, who string, aargs []string, snap *policy.Snapshot, server, agent *policy.App) {
	t.Helper()
	clientID, _ := flagValue(aargs, "client-id")
	if clientID != agent.ID {
		t.Errorf("%s --client-id %q, want its App ID %q (the token's azp)", who, clientID, agent.ID)
	}
	caller := policy.Caller{AppID: clientID, Namespace: agent.Namespace, TrustDomain: snap.Mesh.TrustDomain}
	if a, why := server.MCP.AccessControl.Decide(caller, "POST", server.MCP.Path); a != policy.Allow {
		t.Errorf("App %s's accessControl does not allow %s: %s", server.ID, clientID, why)
	}
	scope, _ := flagValue(aargs, "scope")
	scopes := strings.Fields(scope)
	for _, s := range server.MCP.Authentication.Scopes {
		if !slices.Contains(scopes, s) {
			t.Errorf("%s --scope %q lacks %s, which App %s's authentication requires", who, scope, s, server.ID)
		}
	}
	// Some allow rule names the agent and is satisfied by its scopes (rule readers).
	ruled := false
	for _, r := range server.MCP.Tools.Rules {
		if r.Action == policy.Allow && slices.Contains(r.Callers, clientID) && len(r.Tools) > 0 {
			ok := true
			for _, s := range r.Scopes {
				ok = ok && slices.Contains(scopes, s)
			}
			ruled = ruled || ok
		}
	}
	if !ruled {
		t.Errorf("no allow rule of App %s names %s with scopes within %q: the agent could call no tool", server.ID, clientID, scope)
	}
}

// composeApps loads the policy the demo runs under and returns its MCP server and the App
// calling it (both with sidecars).
func composeApps(t *testing.T) (snap *policy.Snapshot, server, agent *policy.App) {
	t.Helper()
	snap, err := policy.LoadDir(context.Background(), composePolicyDir)
	if err != nil {
		t.Fatalf("load %s: %v", composePolicyDir, err)
	}
	for _, app := range snap.Apps {
		if app.Sidecar == nil {
			continue
		}
		if app.MCP != nil {
			server = app
		} else {
			agent = app
		}
	}
	if server == nil || agent == nil {
		t.Fatal("the compose policy needs an App serving MCP and an App calling it, both with sidecars")
	}
	return snap, server, agent
}
