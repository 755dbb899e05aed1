package policy

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const meshYAML = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata:
  name: default
spec:
  trustDomain: example.org
  mtls: strict
  authz:
    address: mcpgate:9001
  sds:
    certDir: /certs
  issuers:
    - name: corp
      issuer: https://login.example.com/
      audiences: [api://mcp, https://inventory.example.com/mcp]
`

const appYAML = `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata:
  name: inventory
spec:
  address: inventory:8000
  sidecar: {address: inventory-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    resource: https://inventory.example.com/mcp
    authentication:
      required: true
      issuers: [corp]
      scopes: [mcp:tools]
    accessControl:
      defaultAction: deny
      policies:
        - {appId: my-agent, defaultAction: allow}
    tools:
      rules:
        - name: readers
          callers: [my-agent]
          tools: [get_inventory, "list_*"]
          action: allow
`

// writePolicy writes files into a temporary policy directory.
func writePolicy(t testing.TB, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func requireLoad(t *testing.T, files map[string]string) *Snapshot {
	t.Helper()
	snap, err := LoadDir(context.Background(), writePolicy(t, files))
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	return snap
}

func TestLoadDemo(t *testing.T) {
	snap, err := LoadDir(context.Background(), "../testdata/demo")
	if err != nil {
		t.Fatalf("demo policy must load: %v", err)
	}
	inv := snap.App("inventory")
	if inv == nil || inv.MCP == nil {
		t.Fatalf("inventory app with mcp missing: %+v", snap.Apps)
	}
	if got, want := inv.SpiffeID, "spiffe://example.org/ns/default/inventory"; got != want {
		t.Errorf("SpiffeID = %q, want %q", got, want)
	}
	if got, want := inv.MCP.MetadataURL, "https://inventory.example.com/.well-known/oauth-protected-resource/mcp"; got != want {
		t.Errorf("MetadataURL = %q, want %q", got, want)
	}
	if inv.MCP.Tools.Rego == nil {
		t.Error("demo rego not compiled")
	}
	if got := inv.MCP.Limits.PerCaller; got == nil || got.N != 100 || got.Per != time.Minute {
		t.Errorf("perCaller = %+v", got)
	}
	if got := inv.MCP.Resiliency.Timeout; got != 30*time.Second {
		t.Errorf("timeout = %v", got)
	}
	if len(inv.MCP.Authentication.Issuers) != 1 || inv.MCP.Authentication.Issuers[0].Issuer != "https://login.example.com/" {
		t.Errorf("issuers = %+v", inv.MCP.Authentication.Issuers)
	}
	if snap.Endpoints["github-mcp"] == nil {
		t.Error("github-mcp HTTPEndpoint missing")
	}
	if len(snap.Version) != 16 {
		t.Errorf("version %q", snap.Version)
	}
}

func TestLoadVersionIsContentHash(t *testing.T) {
	files := map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML}
	a, b := requireLoad(t, files), requireLoad(t, files)
	if a.Version != b.Version {
		t.Fatalf("same content, different versions %s %s", a.Version, b.Version)
	}
	files["app.yaml"] = strings.Replace(appYAML, "get_inventory", "get_stock", 1)
	if c := requireLoad(t, files); c.Version == a.Version {
		t.Fatal("changed content, same version")
	}
}

// TestLoadProblems pins that every kind of mistake is reported at its file and line.
func TestLoadProblems(t *testing.T) {
	tests := []struct {
		name  string
		files map[string]string
		want  []string // each must appear among the problems, as "file:line: ..." substrings
	}{
		{
			name:  "unknown field in spec",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "  address: inventory:8000\n", "  address: inventory:8000\n  adress: x\n", 1)},
			want:  []string{`app.yaml:7: spec: unknown field "adress"`},
		},
		{
			name:  "unknown field with a case hint",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "audiences:", "Audiences:", 1)},
			want:  []string{`mesh.yaml:15: spec.issuers[0]: unknown field "Audiences" (did you mean "audiences"?)`},
		},
		{
			name:  "unknown top-level field",
			files: map[string]string{"mesh.yaml": meshYAML + "status: {}\n"},
			want:  []string{`mesh.yaml:16: document: unknown field "status"`},
		},
		{
			name:  "duplicate key",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "  mtls: strict\n", "  mtls: strict\n  mtls: disabled\n", 1)},
			want:  []string{`mesh.yaml:8: spec: duplicate field "mtls" (first at line 7)`},
		},
		{
			name:  "wrong type",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "inboundPort: 15006", "inboundPort: high", 1)},
			want:  []string{`app.yaml:7: spec.sidecar.inboundPort: expected an integer, got "high"`},
		},
		{
			name:  "list where a mapping belongs",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "  authz:\n    address: mcpgate:9001\n", "  authz: [mcpgate:9001]\n", 1)},
			want:  []string{`mesh.yaml:8: spec.authz: expected a mapping, got a list`},
		},
		{
			name:  "duplicate app",
			files: map[string]string{"mesh.yaml": meshYAML, "a.yaml": appYAML, "b.yaml": appYAML},
			want:  []string{`b.yaml:4: metadata.name: duplicate App "inventory" in namespace "default"`},
		},
		{
			name:  "app id not a DNS label",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "name: inventory", "name: Inventory_1", 1)},
			want:  []string{`app.yaml:4: metadata.name: "Inventory_1" is not a DNS label`},
		},
		{
			name:  "no mesh",
			files: map[string]string{"app.yaml": strings.Replace(appYAML, "issuers: [corp]", "issuers: []", 1)},
			want:  []string{`no Mesh document`},
		},
		{
			name:  "two meshes",
			files: map[string]string{"mesh.yaml": meshYAML, "mesh2.yaml": strings.Replace(meshYAML, "name: default", "name: other", 1)},
			want:  []string{`mesh2.yaml:2: kind: a second Mesh document`},
		},
		{
			name:  "undefined issuer",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "issuers: [corp]", "issuers: [corp, partner]", 1)},
			want:  []string{`app.yaml:12: spec.mcp.authentication.issuers[1]: issuer "partner" is not defined in the Mesh`},
		},
		{
			name:  "app's resource not among its issuers' audiences",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, ", https://inventory.example.com/mcp]", "]", 1), "app.yaml": appYAML},
			want:  []string{`app.yaml:9: spec.mcp.resource: audience "https://inventory.example.com/mcp" is not among the audiences of issuers corp, so no token could pass both: list it in an issuer's audiences, or set authentication.audiences to the aud your tokens carry`},
		},
		{
			name:  "app audience not among its issuers' audiences",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "issuers: [corp]", "issuers: [corp]\n      audiences: [api://mcp, api://other, \"\"]", 1)},
			want: []string{
				`app.yaml:13: spec.mcp.authentication.audiences[1]: audience "api://other" is not among the audiences of issuers corp, so no token could pass both: list it in an issuer's audiences`,
				`app.yaml:13: spec.mcp.authentication.audiences[2]: is empty`,
			},
		},
		{
			name:  "audiences without issuers",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(strings.Replace(appYAML, "required: true", "required: false", 1), "issuers: [corp]\n      scopes: [mcp:tools]", "audiences: [api://mcp]", 1)},
			want:  []string{`app.yaml:12: spec.mcp.authentication.audiences: audiences need an issuer to come from`},
		},
		{
			name:  "bad glob",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, `"list_*"`, `"list items"`, 1)},
			want:  []string{`app.yaml:22: spec.mcp.tools.rules[0].tools[1]: "list items" contains whitespace`},
		},
		{
			name: "bad rate and duration",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    limits: {perCaller: 100/day, perTool: {get_inventory: ten/s}}
    resiliency: {timeout: soon}
`},
			want: []string{`app.yaml:24: spec.mcp.limits.perCaller: "100/day" is not a rate`, `spec.mcp.limits.perTool.get_inventory: "ten/s" is not a rate`, `app.yaml:25: spec.mcp.resiliency.timeout: "soon" is not a positive duration`},
		},
		{
			name:  "http issuer off loopback",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "https://login.example.com/", "http://login.example.com/", 1)},
			want:  []string{`mesh.yaml:14: spec.issuers[0].issuer: "http://login.example.com/": https is required`},
		},
		{
			name:  "bad trust domain and mtls",
			files: map[string]string{"mesh.yaml": strings.NewReplacer("example.org", "Example Org", "mtls: strict", "mtls: maybe").Replace(meshYAML)},
			want:  []string{`mesh.yaml:6: spec.trustDomain: "Example Org" is not a SPIFFE trust domain`, `mesh.yaml:7: spec.mtls: must be strict, permissive or disabled`},
		},
		{
			name:  "mcpgate's SPIFFE ID in another trust domain",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "address: mcpgate:9001", "address: mcpgate:9001\n    spiffeId: spiffe://evil.org/mcpgate", 1)},
			want:  []string{`mesh.yaml:10: spec.authz.spiffeId: "spiffe://evil.org/mcpgate" is not in trust domain "example.org"`},
		},
		{
			name:  "mcpgate's SPIFFE ID without mesh mTLS",
			files: map[string]string{"mesh.yaml": strings.NewReplacer("address: mcpgate:9001", "address: mcpgate:9001\n    spiffeId: spiffe://example.org/mcpgate", "mtls: strict", "mtls: disabled").Replace(meshYAML)},
			want:  []string{`spec.authz.spiffeId: needs mtls strict or permissive`},
		},
		{
			name:  "mcpgate's SPIFFE ID malformed",
			files: map[string]string{"mesh.yaml": strings.Replace(meshYAML, "address: mcpgate:9001", "address: mcpgate:9001\n    spiffeId: mcpgate", 1)},
			want:  []string{`spec.authz.spiffeId: "mcpgate" is not a SPIFFE ID`},
		},
		{
			name:  "access policy without action",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "{appId: my-agent, defaultAction: allow}", "{appId: my-agent}", 1)},
			want:  []string{`app.yaml:17: spec.mcp.accessControl.policies[0].defaultAction: is required (allow or deny)`},
		},
		{
			name:  "rule without action",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "          action: allow\n", "", 1)},
			want:  []string{`spec.mcp.tools.rules[0].action: must be allow or deny, got ""`},
		},
		{
			name:  "scope that would break WWW-Authenticate",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "scopes: [mcp:tools]", `scopes: ['mcp" error="x']`, 1)},
			want:  []string{`spec.mcp.authentication.scopes[0]: "mcp\" error=\"x" is not an OAuth scope`},
		},
		{
			name:  "yaml syntax error",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": "apiVersion: mcpgate.dev/v1alpha1\nkind: App\nmetadata: {name: x\n"},
			want:  []string{`app.yaml:`, `invalid YAML`},
		},
		{
			name:  "aliases refused",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "callers: [my-agent]", "callers: &c [my-agent]", 1)},
			want:  []string{`spec.mcp.tools.rules[0].callers: YAML anchors and aliases are not allowed`},
		},
		{
			name:  "wrong apiVersion and unknown kind",
			files: map[string]string{"mesh.yaml": meshYAML, "x.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"},
			want:  []string{`x.yaml:2: kind: unknown kind "ConfigMap"`, `x.yaml:1: apiVersion: must be "mcpgate.dev/v1alpha1", got "v1"`},
		},
		{
			name:  "rego syntax error at its own line",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "      rego: rego/p.rego\n", "rego/p.rego": "package mcpgate\n\ndecision := {\"allow\": true} if {\n  input.x ==\n}\n"},
			want:  []string{`rego/p.rego:5: rego:`},
		},
		{
			name:  "rego wrong package",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "      rego: p.rego\n", "p.rego": "package other\n\ndecision := {\"allow\": true}\n"},
			want:  []string{`p.rego:1: package must be mcpgate`},
		},
		{
			name:  "rego network built-in refused",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "      rego: p.rego\n", "p.rego": "package mcpgate\n\ndecision := http.send({\"method\": \"get\", \"url\": \"http://x\"}).body\n"},
			want:  []string{`p.rego:3: rego:`, `http.send`},
		},
		{
			// "$ref" would fetch any URL (the caller's claims in it) or read any file.
			name: "rego JSON Schema built-ins refused",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "      rego: p.rego\n", "p.rego": `package mcpgate

a := json.match_schema({}, {"$ref": "file:///etc/passwd"})

b := json.verify_schema({"$ref": "http://x/"})

decision := {"allow": false, "reason": sprintf("%v %v", [a, b])}
`},
			want: []string{`p.rego:3: rego:`, `json.match_schema`, `p.rego:5: rego:`, `json.verify_schema`},
		},
		{
			name:  "rego outside the policy directory",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "      rego: ../p.rego\n"},
			want:  []string{`app.yaml:24: spec.mcp.tools.rego: "../p.rego" must be a relative path inside the policy directory`},
		},
		{
			name: "gateway route to a missing app",
			files: map[string]string{"mesh.yaml": meshYAML, "gw.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  listener: {port: 8443}
  routes:
    - {path: /mcp, app: nope}
    - {path: /x, app: a, endpoint: b}
`},
			want: []string{`gw.yaml:7: spec.routes[0].app: no App "nope"`, `gw.yaml:8: spec.routes[1]: set exactly one of app or endpoint`},
		},
		{
			name: "endpoint name clashes with an app",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML, "ep.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: inventory}
spec: {baseUrl: "https://x.example.com/mcp"}
`},
			want: []string{`name "inventory" is already used by App`},
		},
		{
			name:  "bad perSubject",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "    limits: {perSubject: lots}\n"},
			want:  []string{`spec.mcp.limits.perSubject:`},
		},
		{
			name: "bad rate limits",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    limits:
      perCaller: {rate: 10/s, per: subject}
      perTenant: {burst: 5}
      perTool:
        get_inventory: {rate: 10/s, per: everyone}
        list_items: {rate: 1/s, burst: -1, rat: 2/s}
        "del*": {rate: 1/s, claim: oid}
        slow: {rate: 1/h, burst: 400000}
`},
			want: []string{
				`app.yaml:25: spec.mcp.limits.perCaller.per: only applies to perTool limits`,
				`app.yaml:26: spec.mcp.limits.perTenant.rate: is required`,
				`app.yaml:28: spec.mcp.limits.perTool.get_inventory.per: must be app, caller, subject or tenant, got "everyone"`,
				`app.yaml:29: spec.mcp.limits.perTool.list_items: unknown field "rat"`,
				`spec.mcp.limits.perTool.del*.claim: only applies to perSubject, perTenant, and perTool limits per subject or tenant`,
				`app.yaml:31: spec.mcp.limits.perTool.slow.burst: 400000 at 1/h takes 46 years to refill: at most 10`,
			},
		},
		{
			name:  "responseHeaders not a boolean",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "    limits: {perCaller: 10/s, responseHeaders: always}\n"},
			want:  []string{`app.yaml:24: spec.mcp.limits.responseHeaders:`},
		},
		{
			name: "bad rate-limit store",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis: {address: "rediss://redis:6379", db: 16, passwordFile: secrets/redis, tls: yes-please}
    failureMode: open
    timeout: 5s
`},
			want: []string{
				`mesh.yaml:17: spec.rateLimits.redis.tls: expected true, false or a mapping {caFile, serverName}, got "yes-please"`,
			},
		},
		{
			name: "bad rate-limit store values",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis: {address: "rediss://redis:6379", db: 16, passwordFile: secrets/redis}
    failureMode: open
    timeout: 5s
`},
			want: []string{
				`mesh.yaml:17: spec.rateLimits.redis.address: "rediss://redis:6379": write host:port or unix:///path`,
				`spec.rateLimits.redis.db: must be between 0 and 15, got 16`,
				`spec.rateLimits.redis.passwordFile: must be an absolute path`,
				`mesh.yaml:18: spec.rateLimits.failureMode: must be local, deny or allow, got "open"`,
				`mesh.yaml:19: spec.rateLimits.timeout: "5s" is not a duration between 1ms and 1s`,
			},
		},
		{
			name: "bad tracing",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  tracing:
    samplingRate: "1.5"
    otlp: {address: "http://collector:4317"}
`},
			want: []string{
				`mesh.yaml:17: spec.tracing.samplingRate: "1.5" is not a fraction from "0" to "1"`,
				`mesh.yaml:18: spec.tracing.otlp.address: "http://collector:4317" is not host:port`,
			},
		},
		{
			name: "bad key prefix",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis: {address: "redis:6379", keyPrefix: "{mesh}:"}
`},
			want: []string{`mesh.yaml:17: spec.rateLimits.redis.keyPrefix: "{mesh}:": at most 64 printable ASCII characters, no spaces or braces`},
		},
		{
			name: "cluster on a unix socket or another database",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis: {address: "unix:///run/redis.sock", cluster: true, db: 3}
`},
			want: []string{
				`mesh.yaml:17: spec.rateLimits.redis.cluster: needs a host:port address: cluster nodes are reached on TCP`,
				`mesh.yaml:17: spec.rateLimits.redis.db: must be 0 with cluster: true (a Redis Cluster has only database 0), got 3`,
			},
		},
		{
			name: "bad sentinel",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis:
      address: redis:6379
      cluster: true
      sentinel: {addresses: ["sentinel", "s2:26379"], passwordFile: secrets/sentinel}
`},
			want: []string{
				`mesh.yaml:18: spec.rateLimits.redis.address: must be empty with sentinel`,
				`mesh.yaml:19: spec.rateLimits.redis.cluster: does not go with sentinel`,
				`mesh.yaml:20: spec.rateLimits.redis.sentinel.masterName: is required`,
				`mesh.yaml:20: spec.rateLimits.redis.sentinel.addresses[0]: "sentinel" is not host:port`,
				`mesh.yaml:20: spec.rateLimits.redis.sentinel.passwordFile: must be an absolute path, got "secrets/sentinel"`,
			},
		},
		{
			name: "sentinel without addresses",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + `  rateLimits:
    redis: {sentinel: {masterName: mymaster}}
`},
			want: []string{`mesh.yaml:17: spec.rateLimits.redis.sentinel.addresses: is required: one or more sentinels, host:port`},
		},
		{
			name:  "failure mode without redis",
			files: map[string]string{"app.yaml": appYAML, "mesh.yaml": meshYAML + "  rateLimits: {failureMode: deny}\n"},
			want:  []string{`spec.rateLimits.redis: is required with failureMode`},
		},
		{
			name: "bad client credentials options",
			files: map[string]string{"mesh.yaml": meshYAML, "ep.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: remote}
spec:
  baseUrl: "https://x.example.com/mcp"
  auth:
    clientCredentials: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s, authMethod: private_key_jwt, resource: "not a uri"}
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: remote2}
spec:
  baseUrl: "https://x.example.com/mcp"
  callers: ["*"]
  auth:
    clientCredentials: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s, authMethod: tls_client_auth, privateKeyFile: /k}
`},
			want: []string{`spec.auth.clientCredentials.privateKeyFile: is required with authMethod private_key_jwt`,
				`spec.auth.clientCredentials.clientSecretFile: must not be set with authMethod private_key_jwt`,
				`spec.auth.clientCredentials.resource: must be an absolute URI`,
				`spec.auth.clientCredentials.privateKeyFile: only applies with authMethod private_key_jwt`,
				`spec.auth.clientCredentials.authMethod: must be client_secret_basic, client_secret_post or private_key_jwt, got "tls_client_auth"`},
		},
		{
			name: "endpoint auth without callers, with passthrough and an Authorization header",
			files: map[string]string{"mesh.yaml": meshYAML, "ep.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: remote}
spec:
  baseUrl: "https://x.example.com/mcp"
  passthrough: true
  headers: {Authorization: "Bearer x"}
  auth:
    clientCredentials: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s}
`},
			want: []string{`ep.yaml:6: spec.passthrough: cannot be combined with spec.auth`, `ep.yaml:7: spec.headers.Authorization: conflicts with spec.auth`,
				`ep.yaml:5: spec.callers: is required with spec.auth`},
		},
		{
			name: "endpoint callers that are not Apps, and callers without auth",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML, "ep.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: remote}
spec:
  baseUrl: "https://x.example.com/mcp"
  callers: [inventory, nobody, "Bad_ID"]
  auth:
    clientCredentials: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s}
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: plain}
spec:
  baseUrl: "https://y.example.com/mcp"
  callers: [inventory]
`},
			want: []string{`spec.callers[1]: no App "nobody" in the policy`, `spec.callers[2]: "Bad_ID" is not an App ID`,
				`ep.yaml:15: spec.callers: only applies with spec.auth`},
		},
		{
			name: "token exchange options",
			files: map[string]string{"mesh.yaml": meshYAML, "ep.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: remote}
spec:
  baseUrl: "https://x.example.com/mcp"
  callers: ["*"]
  auth:
    tokenExchange: {tokenUrl: "http://idp.example.com/token", clientSecretFile: /s, subjectIssuers: [corp, nope]}
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: both}
spec:
  baseUrl: "https://x.example.com/mcp"
  callers: ["*"]
  auth:
    clientCredentials: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s}
    tokenExchange: {tokenUrl: "https://idp.example.com/token", clientId: a, clientSecretFile: /s, audience: x, subjectIssuers: [corp]}
`},
			want: []string{`spec.auth.tokenExchange.tokenUrl: "http://idp.example.com/token": https is required`, `spec.auth.tokenExchange.clientId: is required`,
				`spec.auth.tokenExchange: audience or resource is required`, `spec.auth.tokenExchange.subjectIssuers[1]: issuer "nope" is not defined in the Mesh`,
				`ep.yaml:17: spec.auth: clientCredentials and tokenExchange are exclusive`},
		},
		{
			name:  "bad redaction pointer",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + "    responses: {redact: [{tools: [get_customer], pointers: [ssn, /a~2]}]}\n"},
			want:  []string{`spec.mcp.responses.redact[0].pointers[0]: "ssn" is not a JSON pointer`, `pointers[1]: "/a~2" is not a JSON pointer`},
		},
		{
			name:  "unknown mcp transport",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: http2\n", 1)},
			want:  []string{`app.yaml:9: spec.mcp.transport: must be streamable-http or grpc, got "http2"`},
		},
		{
			name:  "mcp path with transport grpc",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: grpc\n    path: /mcp\n", 1)},
			want:  []string{`app.yaml:10: spec.mcp.path: must not be set with transport grpc: the service path /mcpgate.mcp.v1.McpService/ is fixed`},
		},
		{
			name: "gateway routes to a gRPC app",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: grpc\n", 1), "gw.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  listener: {port: 8443}
  routes:
    - {host: a.example.com, path: /mcp, app: inventory}
    - {host: b.example.com, app: inventory}
    - {host: b.example.com, app: inventory}
`},
			want: []string{
				`gw.yaml:7: spec.routes[0].path: must not be set for App "inventory", which serves gRPC MCP at the fixed service path /mcpgate.mcp.v1.McpService/`,
				`gw.yaml:9: spec.routes[2].app: host "b.example.com" already routes gRPC MCP (/mcpgate.mcp.v1.McpService/) to App "inventory"`,
			},
		},
		{
			// A Gateway's SPIFFE ID has an App's form: one named like an App would accept
			// the App's certificate as its own at the sidecars' gateway_inbound listeners.
			name: "gateway named like an app or another gateway, in any namespace",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML, "gw.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: inventory, namespace: edge}
spec:
  listener: {port: 8443}
  routes:
    - {path: /x, endpoint: nope}
---
apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge, namespace: team-a}
spec:
  listener: {port: 8443}
  routes:
    - {path: /x, endpoint: nope}
---
apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge, namespace: team-b}
spec:
  listener: {port: 8443}
  routes:
    - {path: /x, endpoint: nope}
`},
			want: []string{
				`gw.yaml:3: metadata.name: name "inventory" is already used by App at app.yaml:1 (App, HTTPEndpoint and Gateway names are unique across namespaces)`,
				`gw.yaml:19: metadata.name: name "edge" is already used by Gateway at gw.yaml:9 (App, HTTPEndpoint and Gateway names are unique across namespaces)`,
			},
		},
		{
			// A Gateway must not need the app's own port: it goes through the sidecar.
			name: "gateway route to an app without gatewayPort under mTLS",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML, "gw.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: Gateway
metadata: {name: edge}
spec:
  listener: {port: 8443}
  routes:
    - {path: /mcp, app: inventory}
`},
			want: []string{`gw.yaml:7: spec.routes[0].app: App "inventory" has no spec.sidecar.gatewayPort: with mesh mTLS a Gateway reaches the app through its sidecar on that port`},
		},
		{
			name: "gatewayPort out of range, reused, or on an app without MCP",
			files: map[string]string{"mesh.yaml": meshYAML,
				"app.yaml": strings.Replace(appYAML, "outboundPort: 3500}", "outboundPort: 3500, gatewayPort: 3500}", 1),
				"agent.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: agent}
spec:
  sidecar: {address: agent-envoy, inboundPort: 15006, outboundPort: 3500, gatewayPort: 15008}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: big}
spec:
  address: big:8000
  sidecar: {address: big-envoy, inboundPort: 15006, outboundPort: 3500, gatewayPort: 70000}
  mcp: {resource: https://big.example.com/mcp}
`},
			want: []string{
				`app.yaml:7: spec.sidecar.gatewayPort: must differ from inboundPort and outboundPort`,
				`agent.yaml:5: spec.sidecar.gatewayPort: is only for an app that serves MCP (Gateways route to MCP apps)`,
				`agent.yaml:12: spec.sidecar.gatewayPort: must be a port between 1 and 65535, got 70000`,
			},
		},
		{
			name:  "operation wildcard misuse",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "{appId: my-agent, defaultAction: allow}", "{appId: my-agent, defaultAction: allow, operations: [{name: /a/**/b, httpVerb: [POST], action: deny}, {name: /c, httpVerb: [FETCH], action: allow}]}", 1)},
			want:  []string{`operations[0].name: "/a/**/b": "**" may only be the last segment`, `operations[1].httpVerb[0]: "FETCH" is not an HTTP verb`},
		},
		{
			name: "cors origins",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors:
      allowOrigins:
        - https://app.example.com/
        - HTTPS://App.example.com
        - https://app.example.com:443
        - app.example.com
        - "null"
        - https://app.example.com?x=1
        - https://app.example.com
        - https://app.example.com
`},
			want: []string{
				`app.yaml:26: spec.mcp.cors.allowOrigins[0]: "https://app.example.com/" is not an origin: no user, path`,
				`app.yaml:27: spec.mcp.cors.allowOrigins[1]: "HTTPS://App.example.com" must be lowercase`,
				`app.yaml:28: spec.mcp.cors.allowOrigins[2]: "https://app.example.com:443" names the default port`,
				`app.yaml:29: spec.mcp.cors.allowOrigins[3]: "app.example.com" is not an origin: want scheme://host[:port]`,
				`app.yaml:30: spec.mcp.cors.allowOrigins[4]: "null" is not allowed`,
				`app.yaml:31: spec.mcp.cors.allowOrigins[5]: "https://app.example.com?x=1" is not an origin`,
				`app.yaml:33: spec.mcp.cors.allowOrigins[7]: duplicate origin "https://app.example.com"`,
			},
		},
		{
			name: "cors wildcard with credentials",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors:
      allowOrigins: ["*", https://app.example.com]
      allowCredentials: true
`},
			want: []string{
				`app.yaml:25: spec.mcp.cors.allowOrigins: "*" allows every origin: it must be the only entry`,
				`app.yaml:26: spec.mcp.cors.allowCredentials: must not be true with allowOrigins "*"`,
			},
		},
		{
			name: "cors empty, bad tokens, max age, unknown field",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors:
      allowOrigins: []
      allowMethods: [POST, "GET POST"]
      allowHeaders: ["*"]
      exposeHeaders: ["mcp-session-id", "x:y"]
      maxAge: 1500ms
      allowOrigin: [https://app.example.com]
`},
			want: []string{
				`app.yaml:25: spec.mcp.cors.allowOrigins: at least one origin is required`,
				`app.yaml:26: spec.mcp.cors.allowMethods[1]: "GET POST" is not an HTTP token`,
				`app.yaml:27: spec.mcp.cors.allowHeaders[0]: "*" is not allowed: list the names`,
				`app.yaml:28: spec.mcp.cors.exposeHeaders[1]: "x:y" is not an HTTP token`,
				`app.yaml:29: spec.mcp.cors.maxAge: "1500ms" is not a whole number of seconds`,
				`app.yaml:30: spec.mcp.cors: unknown field "allowOrigin"`,
			},
		},
		{
			name: "cors max age not a duration",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors: {allowOrigins: ["*"], maxAge: forever}
`},
			want: []string{`app.yaml:24: spec.mcp.cors.maxAge: "forever" is not a duration of at least 1s`},
		},
		{
			name: "cors on a grpc app",
			files: map[string]string{"mesh.yaml": meshYAML, "app.yaml": strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: grpc\n", 1) + `    cors: {allowOrigins: ["*"]}
`},
			want: []string{`app.yaml:25: spec.mcp.cors: is only for transport streamable-http`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := writePolicy(t, tt.files)
			_, err := LoadDir(context.Background(), dir)
			if err == nil {
				t.Fatal("load succeeded, want problems")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("error does not wrap ErrInvalid: %v", err)
			}
			got := strings.ReplaceAll(err.Error(), dir+string(filepath.Separator), "")
			for _, w := range tt.want {
				if !strings.Contains(got, w) {
					t.Errorf("problems do not contain %q; got:\n%s", w, got)
				}
			}
		})
	}
}

func TestLoadCollectsAllProblems(t *testing.T) {
	app := strings.NewReplacer("inboundPort: 15006", "inboundPort: 0", `"list_*"`, `""`, "defaultAction: deny", "defaultAction: maybe").Replace(appYAML)
	_, err := LoadDir(context.Background(), writePolicy(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": app}))
	var le *LoadError
	if !errors.As(err, &le) {
		t.Fatalf("want LoadError, got %v", err)
	}
	if len(le.Problems) < 3 {
		t.Fatalf("want at least 3 problems reported together, got %d:\n%v", len(le.Problems), err)
	}
	for i := 1; i < len(le.Problems); i++ {
		if le.Problems[i].Line < le.Problems[i-1].Line {
			t.Errorf("problems not sorted by line: %v", err)
		}
	}
}

func TestLoadSkipsConfigMapInternals(t *testing.T) {
	// ConfigMap volumes hold "..data" and "..<timestamp>" entries beside the files.
	snap := requireLoad(t, map[string]string{
		"mesh.yaml":           meshYAML,
		"..2026_11_23/x.yaml": "not: [valid",
		".hidden.yaml":        "not: [valid",
		"README.md":           "# notes",
	})
	if len(snap.Files) != 1 || snap.Files[0] != "mesh.yaml" {
		t.Fatalf("files = %v", snap.Files)
	}
}

func TestLoadEmptyDirectory(t *testing.T) {
	_, err := LoadDir(context.Background(), t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "no policy files") {
		t.Fatalf("err = %v", err)
	}
}

func TestLoadFileTooLarge(t *testing.T) {
	big := meshYAML + "# " + strings.Repeat("x", MaxFileBytes) + "\n"
	_, err := LoadDir(context.Background(), writePolicy(t, map[string]string{"mesh.yaml": big}))
	if err == nil || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err = %v", err)
	}
}

// TestLoadGRPCApp pins a gRPC MCP app: the transport is kept, the path is the service's,
// and the rest of the MCP policy (and the RFC 9728 metadata URL) compiles as for
// Streamable HTTP.
func TestLoadGRPCApp(t *testing.T) {
	app := strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: grpc\n", 1) +
		"    resiliency: {timeout: 30s, retries: 2}\n    responses: {filterToolsList: true}\n"
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": app})
	m := snap.App("inventory").MCP
	if m.Transport != TransportGRPC || m.Path != "/mcpgate.mcp.v1.McpService/" {
		t.Errorf("transport %q path %q, want grpc at the service path", m.Transport, m.Path)
	}
	if got, want := m.MetadataURL, "https://inventory.example.com/.well-known/oauth-protected-resource/mcp"; got != want {
		t.Errorf("MetadataURL = %q, want %q", got, want)
	}
	if len(m.Tools.Rules) != 1 || !m.Authentication.Required || m.Resiliency.Timeout != 30*time.Second || !m.Responses.FilterToolsList {
		t.Errorf("the MCP policy must compile as for streamable-http: %+v", m)
	}
	explicit := strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: streamable-http\n", 1)
	for _, files := range []map[string]string{{"mesh.yaml": meshYAML, "app.yaml": appYAML}, {"mesh.yaml": meshYAML, "app.yaml": explicit}} {
		if m := requireLoad(t, files).App("inventory").MCP; m.Transport != TransportStreamableHTTP || m.Path != "/mcp" {
			t.Errorf("transport %q path %q, want streamable-http at /mcp", m.Transport, m.Path)
		}
	}
}

func TestLoadDefaults(t *testing.T) {
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML})
	m := snap.App("inventory").MCP
	switch {
	case m.Path != "/mcp":
		t.Errorf("path default = %q", m.Path)
	case m.Tools.DefaultAction != Deny || m.AccessControl.DefaultAction != Deny:
		t.Errorf("defaults must deny: tools %q access %q", m.Tools.DefaultAction, m.AccessControl.DefaultAction)
	case m.Tools.ErrorCode != -32001:
		t.Errorf("error code default = %d", m.Tools.ErrorCode)
	case m.Limits.MaxRequestBytes != 1<<20:
		t.Errorf("maxRequestBytes default = %d", m.Limits.MaxRequestBytes)
	case snap.Mesh.Issuers["corp"].Leeway != 30*time.Second:
		t.Errorf("leeway default = %v", snap.Mesh.Issuers["corp"].Leeway)
	}
}

func TestLoadRateLimits(t *testing.T) {
	mesh := meshYAML + `  rateLimits:
    redis: {address: "redis:6379", db: 2, passwordFile: /secrets/redis, tls: {caFile: /etc/redis-ca.pem}, keyPrefix: "prod:"}
`
	app := appYAML + `    limits:
      perCaller: 100/m
      perSubject: {rate: 60/m, burst: 10, claim: oid}
      perTenant: 1000/m
      perTool:
        get_inventory: {rate: 10/s, per: subject}
        "list_*": 5/s
        delete_product: {rate: 1/h, per: tenant, claim: org}
      responseHeaders: true
`
	snap := requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": app})
	want := &RateLimitStore{Address: "redis:6379", DB: 2, PasswordFile: "/secrets/redis", TLS: true, CAFile: "/etc/redis-ca.pem", KeyPrefix: "prod:",
		FailureMode: FailLocal, Timeout: DefaultRateLimitTimeout}
	if got := snap.Mesh.RateLimits; !got.Equal(want) {
		t.Errorf("Mesh.RateLimits = %+v, want %+v", got, want)
	}
	lim := snap.App("inventory").MCP.Limits
	if lim.PerCaller == nil || *lim.PerCaller != (RateLimit{N: 100, Per: time.Minute}) {
		t.Errorf("perCaller = %+v (the short form must keep working)", lim.PerCaller)
	}
	if lim.PerSubject == nil || *lim.PerSubject != (RateLimit{N: 60, Per: time.Minute, Burst: 10}) || lim.SubjectClaim != "oid" {
		t.Errorf("perSubject = %+v claim %q", lim.PerSubject, lim.SubjectClaim)
	}
	if lim.PerTenant == nil || lim.PerTenant.N != 1000 || lim.TenantClaim != DefaultTenantClaim {
		t.Errorf("perTenant = %+v claim %q", lim.PerTenant, lim.TenantClaim)
	}
	if !lim.ResponseHeaders {
		t.Error("responseHeaders: true was not loaded")
	}
	type tr struct {
		tool  string
		rate  RateLimit
		per   LimitScope
		claim string
	}
	var got []tr
	for _, r := range lim.PerTool {
		got = append(got, tr{r.Tool.String(), r.Rate, r.Per, r.Claim})
	}
	wantTools := []tr{
		{"delete_product", RateLimit{N: 1, Per: time.Hour}, PerTenant, "org"},
		{"get_inventory", RateLimit{N: 10, Per: time.Second}, PerSubject, "oid"},
		{"list_*", RateLimit{N: 5, Per: time.Second}, PerApp, ""},
	}
	if len(got) != len(wantTools) {
		t.Fatalf("perTool = %+v, want %+v", got, wantTools)
	}
	for i := range got {
		if got[i] != wantTools[i] {
			t.Errorf("perTool[%d] = %+v, want %+v", i, got[i], wantTools[i])
		}
	}

	// tls: true, and defaults: failure mode local, no store without redis.
	mesh = meshYAML + "  rateLimits: {redis: {address: \"unix:///run/redis.sock\"}, failureMode: deny, timeout: 20ms}\n"
	snap = requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": appYAML})
	if got := snap.Mesh.RateLimits; got == nil || got.Address != "unix:///run/redis.sock" || got.FailureMode != FailDeny || got.Timeout != 20*time.Millisecond || got.TLS {
		t.Errorf("Mesh.RateLimits = %+v", got)
	}
	mesh = meshYAML + "  rateLimits: {redis: {address: \"redis:6380\", tls: true}}\n"
	if got := requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": appYAML}).Mesh.RateLimits; got == nil || !got.TLS || got.CAFile != "" {
		t.Errorf("tls: true = %+v", got)
	}
	mesh = meshYAML + "  rateLimits: {redis: {address: \"clustercfg.example.com:6379\", cluster: true, tls: true}}\n"
	if got := requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": appYAML}).Mesh.RateLimits; got == nil || !got.Cluster || got.Address != "clustercfg.example.com:6379" {
		t.Errorf("cluster: true = %+v", got)
	}
	if got := snap.Mesh.RateLimits; got.Cluster || got.Sentinel != nil {
		t.Errorf("cluster or sentinel by default: %+v", got)
	}
	mesh = meshYAML + `  rateLimits:
    redis:
      sentinel: {masterName: mymaster, addresses: ["sentinel-0:26379", "sentinel-1:26379"], passwordFile: /secrets/sentinel}
      passwordFile: /secrets/redis
`
	rl := requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": appYAML}).Mesh.RateLimits
	wantSentinel := &RateLimitStore{PasswordFile: "/secrets/redis", FailureMode: FailLocal, Timeout: DefaultRateLimitTimeout,
		Sentinel: &SentinelStore{MasterName: "mymaster", Addrs: []string{"sentinel-0:26379", "sentinel-1:26379"}, PasswordFile: "/secrets/sentinel"}}
	if !rl.Equal(wantSentinel) {
		t.Errorf("sentinel = %+v %+v, want %+v", rl, rl.Sentinel, wantSentinel.Sentinel)
	}
	if w := rl.Where(); w != "mymaster (sentinel sentinel-0:26379,sentinel-1:26379)" {
		t.Errorf("Where() = %q", w)
	}
	if got := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML}).Mesh.RateLimits; got != nil {
		t.Errorf("without rateLimits the store is %+v, want nil (per replica)", got)
	}
}

// The README's rate-limit example says it copies as it is: its Mesh part and its limits
// part, dropped into a Mesh and an App, must load and mean what the README says.
func TestREADMERateLimitExample(t *testing.T) {
	block := readmeBlock(t, "### Limits", "```yaml\n")
	meshPart, appPart, ok := strings.Cut(block, "# inventory.yaml, under spec.mcp:\n")
	_, meshPart, ok2 := strings.Cut(meshPart, "\nspec:\n")
	if !ok || !ok2 {
		t.Fatalf("the block is not a mesh.yaml part then an inventory.yaml part:\n%s", block)
	}
	snap := requireLoad(t, map[string]string{"mesh.yaml": meshYAML + meshPart, "app.yaml": appYAML + appPart})
	if rl := snap.Mesh.RateLimits; rl == nil || rl.Address != "redis:6379" || rl.FailureMode != FailLocal || rl.PasswordFile == "" {
		t.Errorf("rateLimits = %+v", rl)
	}
	lim := snap.App("inventory").MCP.Limits
	if lim.PerSubject == nil || lim.PerSubject.N != 100 || lim.PerTenant == nil || lim.TenantClaim != "tid" ||
		lim.PerCaller == nil || lim.PerCaller.Burst != 50 || len(lim.PerTool) != 2 || !lim.ResponseHeaders {
		t.Errorf("limits = %+v", lim)
	}
}

func TestLoadTracing(t *testing.T) {
	mesh := meshYAML + "  tracing: {samplingRate: \"0.25\", otlp: {address: \"collector:4317\"}}\n"
	snap := requireLoad(t, map[string]string{"mesh.yaml": mesh, "app.yaml": appYAML})
	if got, want := snap.Mesh.Tracing, (&Tracing{SamplingRate: 0.25, Address: "collector:4317"}); got == nil || *got != *want {
		t.Errorf("Tracing = %+v, want %+v", got, want)
	}
	if requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML}).Mesh.Tracing != nil {
		t.Error("without spec.tracing, tracing must be off")
	}
}

// TestLoadCORS pins the compiled CORS policy: the defaults a browser-based MCP client
// needs when only origins are given, what the file says otherwise, and no CORS at all
// when the block is absent.
func TestLoadCORS(t *testing.T) {
	if m := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML}).App("inventory").MCP; m.CORS != nil {
		t.Fatalf("no cors block, got %+v", m.CORS)
	}
	defaults := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors:
      allowOrigins: [https://app.example.com, "http://localhost:5173"]
`}).App("inventory").MCP.CORS
	want := &CORS{
		AllowOrigins:  []string{"https://app.example.com", "http://localhost:5173"},
		AllowMethods:  []string{"GET", "POST", "DELETE", "OPTIONS"},
		AllowHeaders:  []string{"content-type", "accept", "authorization", "mcp-protocol-version", "mcp-session-id", "last-event-id", "mcp-method", "mcp-name"},
		ExposeHeaders: []string{"mcp-session-id", "mcp-protocol-version", "www-authenticate"},
		MaxAge:        10 * time.Minute,
	}
	if diff := cmp.Diff(want, defaults); diff != "" {
		t.Errorf("defaults (-want +got):\n%s", diff)
	}
	explicit := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors:
      allowOrigins: ["*"]
      allowMethods: [POST]
      allowHeaders: [content-type, authorization]
      exposeHeaders: [mcp-session-id]
      maxAge: 1h
`}).App("inventory").MCP.CORS
	want = &CORS{AnyOrigin: true, AllowMethods: []string{"POST"}, AllowHeaders: []string{"content-type", "authorization"},
		ExposeHeaders: []string{"mcp-session-id"}, MaxAge: time.Hour}
	if diff := cmp.Diff(want, explicit); diff != "" {
		t.Errorf("explicit (-want +got):\n%s", diff)
	}
	creds := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + `    cors: {allowOrigins: ["https://app.example.com:8443"], allowCredentials: true}
`}).App("inventory").MCP.CORS
	if !creds.AllowCredentials || creds.AnyOrigin || len(creds.AllowOrigins) != 1 {
		t.Errorf("credentials: %+v", creds)
	}
}

// readmeBlock returns the first code block of the README's section heading that starts
// with start (start excluded), up to its closing fence.
func readmeBlock(t *testing.T, heading, start string) string {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("README has no %s section", heading)
	}
	_, rest, ok = strings.Cut(rest, start)
	block, _, ok2 := strings.Cut(rest, "```\n")
	if !ok || !ok2 {
		t.Fatalf("README's %s section has no block starting %q", heading, start)
	}
	return block
}

// TestREADMECORSExample loads the README's cors example, so that what users copy works.
func TestREADMECORSExample(t *testing.T) {
	block := readmeBlock(t, "## Browsers and CORS", "```yaml\n# inventory.yaml, under spec.mcp:\n")
	c := requireLoad(t, map[string]string{"mesh.yaml": meshYAML, "app.yaml": appYAML + block}).App("inventory").MCP.CORS
	want := &CORS{
		AllowOrigins: []string{"https://app.example.com", "http://localhost:5173"}, AllowCredentials: true,
		AllowMethods: DefaultCORSMethods, AllowHeaders: DefaultCORSHeaders, ExposeHeaders: DefaultCORSExposeHeaders,
		MaxAge: DefaultCORSMaxAge,
	}
	if diff := cmp.Diff(want, c); diff != "" {
		t.Errorf("README example (-want +got):\n%s", diff)
	}
}

// TestRateLimitStoreEqual checks what makes two stores the same, Sentinel included
// (a replica keeps its connections when a reload changes none of it).
func TestRateLimitStoreEqual(t *testing.T) {
	base := func() *RateLimitStore {
		return &RateLimitStore{PasswordFile: "/p", FailureMode: FailLocal, Timeout: time.Second,
			Sentinel: &SentinelStore{MasterName: "m", Addrs: []string{"a:1", "b:2"}}}
	}
	if !base().Equal(base()) {
		t.Error("equal stores differ")
	}
	var none *RateLimitStore
	if !none.Equal(nil) || none.Equal(base()) || base().Equal(nil) {
		t.Error("nil equals only nil")
	}
	for name, change := range map[string]func(*RateLimitStore){
		"addrs":       func(s *RateLimitStore) { s.Sentinel.Addrs = []string{"a:1"} },
		"order":       func(s *RateLimitStore) { s.Sentinel.Addrs = []string{"b:2", "a:1"} },
		"master":      func(s *RateLimitStore) { s.Sentinel.MasterName = "n" },
		"password":    func(s *RateLimitStore) { s.Sentinel.PasswordFile = "/s" },
		"no sentinel": func(s *RateLimitStore) { s.Sentinel, s.Address = nil, "a:1" },
		"timeout":     func(s *RateLimitStore) { s.Timeout = time.Millisecond },
	} {
		s := base()
		change(s)
		if s.Equal(base()) || base().Equal(s) {
			t.Errorf("%s changed: still equal", name)
		}
	}
}

// ReadsClaims says when ext_authz must hand ext_proc the token's claims for a limit:
// any claim but the verified subject.
func TestLimitsReadsClaims(t *testing.T) {
	r := &RateLimit{N: 1, Per: time.Second}
	g, err := CompileGlob("get_*")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		l    Limits
		want bool
	}{
		{"none", Limits{}, false},
		{"perCaller", Limits{PerCaller: r}, false},
		{"perSubject by sub", Limits{PerSubject: r, SubjectClaim: "sub"}, false},
		{"perSubject by oid", Limits{PerSubject: r, SubjectClaim: "oid"}, true},
		{"perTenant", Limits{PerTenant: r, TenantClaim: "tid"}, true},
		{"perTool per subject by sub", Limits{PerTool: []ToolRate{{Tool: g, Rate: *r, Per: PerSubject, Claim: "sub"}}}, false},
		{"perTool per tenant", Limits{PerTool: []ToolRate{{Tool: g, Rate: *r, Per: PerTenant, Claim: "tid"}}}, true},
		{"perTool per caller", Limits{PerTool: []ToolRate{{Tool: g, Rate: *r, Per: PerCaller}}}, false},
	} {
		if got := tc.l.ReadsClaims(); got != tc.want {
			t.Errorf("%s: ReadsClaims = %v, want %v", tc.name, got, tc.want)
		}
	}
}
