package envoyemu

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/extproc"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/xds"
)

// gateEnv is mcpgate in process (ADS, ext_authz and ext_proc on one gRPC server), the
// demo policy with mtls disabled, a local issuer, an upstream standing in for the
// inventory MCP app, and the emulated inventory sidecar in front of it.
type gateEnv struct {
	dir     string
	xds     string // ADS, ext_authz and ext_proc address
	store   *policy.Store
	iss     *bearertest.Issuer
	emu     *Emulator
	inbound string

	mu       sync.Mutex
	received []string // bodies the MCP app received
	// sse, when set, answers the next request as an event stream: it writes its
	// events one at a time, each after the previous was acknowledged on next.
	sse  []string
	next chan struct{}
	// header is added to every answer of the MCP app.
	header http.Header
}

func requireGate(t *testing.T) *gateEnv {
	t.Helper()
	env := &gateEnv{iss: bearertest.NewIssuer(t), next: make(chan struct{})}
	env.dir = copyDemo(t, env.iss.URL(), env.iss.JWKSURL())
	env.store = policy.NewStore(requireLoad(t, env.dir))

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	x, err := xds.NewServer(ctx, xds.Options{Store: env.store})
	if err != nil {
		t.Fatal(err)
	}
	authz, err := extauthz.NewServer(extauthz.Options{Store: env.store, Verifier: bearer.NewVerifier(bearer.Options{HTTPClient: env.iss.Client()})})
	if err != nil {
		t.Fatal(err)
	}
	proc, err := extproc.NewServer(extproc.Options{Store: env.store})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	x.Register(g)
	authv3.RegisterAuthorizationServer(g, authz)
	extprocv3.RegisterExternalProcessorServer(g, proc)
	grpcAddr := requireGRPC(t, g)
	env.xds = grpcAddr
	done := make(chan struct{})
	go func() { _ = x.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); g.Stop(); <-done; authz.Close() })

	up := &http.Server{Handler: http.HandlerFunc(env.serveMCP)}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = up.Serve(lis) }()
	t.Cleanup(func() { _ = up.Close() })

	// The demo's clusters name hosts "inventory" and "mcpgate" (STRICT_DNS): resolve
	// them to the loopback servers.
	hosts := map[string]string{"inventory": lis.Addr().String(), "mcpgate": grpcAddr}
	env.emu = requireEmulator(t, Options{XDSAddress: grpcAddr, NodeCluster: "inventory", NodeID: "inventory-1",
		Resolve: func(host string, port uint32) string {
			if a := hosts[host]; a != "" {
				return a
			}
			return net.JoinHostPort(host, strconv.Itoa(int(port)))
		}})
	env.inbound = env.emu.Listener("inbound")
	if env.inbound == "" {
		t.Fatal("inbound listener not bound")
	}
	return env
}

func (env *gateEnv) serveMCP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	env.mu.Lock()
	env.received = append(env.received, string(b))
	events := env.sse
	env.sse = nil
	for k, v := range env.header {
		w.Header()[k] = v
	}
	env.mu.Unlock()
	var msg struct {
		ID json.RawMessage `json:"id"`
	}
	_ = json.Unmarshal(b, &msg)
	if events != nil {
		w.Header().Set("content-type", "text/event-stream")
		w.WriteHeader(200)
		for i, ev := range events {
			if i > 0 {
				select {
				case <-env.next:
				case <-time.After(5 * time.Second):
					return
				}
			}
			_, _ = io.WriteString(w, ev)
			w.(http.Flusher).Flush()
		}
		return
	}
	w.Header().Set("content-type", "application/json")
	_, _ = io.WriteString(w, `{"jsonrpc":"2.0","id":`+string(msg.ID)+`,"result":{"content":[{"type":"text","text":"42 in stock"}]}}`)
}

func (env *gateEnv) receivedBodies() []string {
	env.mu.Lock()
	defer env.mu.Unlock()
	return append([]string(nil), env.received...)
}

func (env *gateEnv) token(t *testing.T) string {
	return "Bearer " + env.iss.Mint(t, map[string]any{
		"sub": "alice@example.com", "aud": "https://inventory.example.com/mcp", "azp": "my-agent",
		"scope": "mcp:tools inventory:read",
		"iat":   time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
	})
}

func (env *gateEnv) post(t *testing.T, auth, body string) (*http.Response, string) {
	t.Helper()
	hdr := []string{"content-type", "application/json", "accept", "application/json, text/event-stream",
		"mcp-protocol-version", "2025-06-18"}
	if auth != "" {
		hdr = append(hdr, "authorization", auth)
	}
	return do(t, "POST", "http://"+env.inbound+"/mcp", body, hdr...)
}

func toolCall(id int, tool, args string) string {
	return `{"jsonrpc":"2.0","id":` + strconv.Itoa(id) + `,"method":"tools/call","params":{"name":"` + tool + `","arguments":` + args + `}}`
}

func TestMCPGateAllowedCallReachesApp(t *testing.T) {
	env := requireGate(t)
	call := toolCall(1, "get_inventory", `{"product_id":"SKU-123"}`)
	resp, body := env.post(t, env.token(t), call)
	if resp.StatusCode != 200 || !strings.Contains(body, "42 in stock") {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	if resp.Header.Get(contract.HeaderDecisionID) == "" {
		t.Errorf("no %s on the response: %v", contract.HeaderDecisionID, resp.Header)
	}
	if v := resp.Header.Values("RateLimit"); len(v) != 0 {
		t.Errorf("RateLimit %q on an admitted call without limits.responseHeaders", v)
	}
	if got := env.receivedBodies(); len(got) != 1 || got[0] != call {
		t.Fatalf("the app received %q", got)
	}
}

// perTenant counts by a claim that only ext_authz has read: it hands the claims to
// ext_proc for the limit, on an app without Rego too, so each tenant has its allowance.
// (Once, ext_authz sent them only for Rego, and every tenant shared the bucket of "".)
func TestMCPGatePerTenantWithoutRego(t *testing.T) {
	env := requireGate(t)
	edit(t, filepath.Join(env.dir, "inventory.yaml"), "      rego: rego/inventory.rego\n", "")
	edit(t, filepath.Join(env.dir, "inventory.yaml"), "      perCaller: 100/m\n", "      perTenant: {rate: 1/h, claim: org}\n")
	env.store.Set(requireLoad(t, env.dir))
	if env.store.Current().App("inventory").MCP.Tools.Rego != nil {
		t.Fatal("the app still has Rego")
	}
	token := func(sub, org string) string {
		return "Bearer " + env.iss.Mint(t, map[string]any{
			"sub": sub, "org": org, "aud": "https://inventory.example.com/mcp", "azp": "my-agent", "scope": "mcp:tools inventory:read",
			"iat": time.Now().Unix(), "exp": time.Now().Add(time.Hour).Unix(),
		})
	}
	call := toolCall(1, "list_items", `{}`)
	for _, c := range []struct {
		who, org string
		status   int
	}{{"alice", "acme", 200}, {"carol", "acme", 429}, {"bob", "globex", 200}} {
		if resp, body := env.post(t, token(c.who, c.org), call); resp.StatusCode != c.status {
			t.Errorf("%s of %s: %d %s, want %d", c.who, c.org, resp.StatusCode, body, c.status)
		}
	}
}

// limits.responseHeaders: an admitted call's answer lists mcpgate's limits beside the
// MCP server's own RateLimit fields, as two field lines of one list.
func TestMCPGateRateLimitFields(t *testing.T) {
	env := requireGate(t)
	edit(t, filepath.Join(env.dir, "inventory.yaml"), "      perCaller: 100/m\n", "      perCaller: 100/h\n      responseHeaders: true\n")
	env.store.Set(requireLoad(t, env.dir))
	env.mu.Lock()
	env.header = http.Header{"Ratelimit-Policy": {`"server";q=1000;w=86400`}, "Ratelimit": {`"server";r=998;t=7200`}}
	env.mu.Unlock()
	resp, body := env.post(t, env.token(t), toolCall(1, "get_inventory", `{"product_id":"SKU-123"}`))
	if resp.StatusCode != 200 || !strings.Contains(body, "42 in stock") {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	wantPolicy := []string{`"server";q=1000;w=86400`, `"perCaller";q=100;w=3600, "perTool.get_inventory";q=10;w=1`}
	wantLeft := []string{`"server";r=998;t=7200`, `"perCaller";r=99;t=36, "perTool.get_inventory";r=9;t=1`}
	if got := resp.Header.Values("RateLimit-Policy"); !slices.Equal(got, wantPolicy) {
		t.Errorf("RateLimit-Policy = %q, want %q", got, wantPolicy)
	}
	if got := resp.Header.Values("RateLimit"); !slices.Equal(got, wantLeft) {
		t.Errorf("RateLimit = %q, want %q", got, wantLeft)
	}
}

func TestMCPGateDeniedToolNeverReachesApp(t *testing.T) {
	env := requireGate(t)
	resp, body := env.post(t, env.token(t), toolCall(2, "delete_product", `{"product_id":"SKU-1"}`))
	if resp.StatusCode != 200 || !strings.Contains(body, `"error"`) || !strings.Contains(body, "-32001") {
		t.Fatalf("got %d %q, want a JSON-RPC error", resp.StatusCode, body)
	}
	if got := env.receivedBodies(); len(got) != 0 {
		t.Fatalf("a denied call reached the app: %q", got)
	}
}

func TestMCPGateNoTokenIs401WithPRM(t *testing.T) {
	env := requireGate(t)
	resp, _ := env.post(t, "", toolCall(3, "get_inventory", `{"product_id":"SKU-123"}`))
	wa := resp.Header.Get("www-authenticate")
	if resp.StatusCode != 401 || !strings.Contains(wa, `resource_metadata="https://inventory.example.com/.well-known/oauth-protected-resource/mcp"`) {
		t.Fatalf("got %d, WWW-Authenticate %q", resp.StatusCode, wa)
	}
	if got := env.receivedBodies(); len(got) != 0 {
		t.Fatalf("an unauthenticated call reached the app: %q", got)
	}
	// The document is served by the sidecar itself (direct_response, filters disabled).
	resp, body := do(t, "GET", "http://"+env.inbound+"/.well-known/oauth-protected-resource/mcp", "")
	var prm struct {
		Resource             string   `json:"resource"`
		AuthorizationServers []string `json:"authorization_servers"`
	}
	if resp.StatusCode != 200 || resp.Header.Get("content-type") != "application/json" || json.Unmarshal([]byte(body), &prm) != nil ||
		prm.Resource != "https://inventory.example.com/mcp" || len(prm.AuthorizationServers) != 1 {
		t.Fatalf("PRM: %d %q %q", resp.StatusCode, resp.Header.Get("content-type"), body)
	}
	// Anything else is Envoy's own 404, without credentials.
	if resp, _ := do(t, "GET", "http://"+env.inbound+"/nope", ""); resp.StatusCode != 404 {
		t.Fatalf("unknown path: %d", resp.StatusCode)
	}
}

func TestMCPGateSSEFlowsEventByEvent(t *testing.T) {
	env := requireGate(t)
	progress := "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":1,\"progress\":1}}\n\n"
	result := "event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":4,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"done\"}]}}\n\n"
	env.mu.Lock()
	env.sse = []string{progress, result}
	env.mu.Unlock()

	req, _ := http.NewRequest("POST", "http://"+env.inbound+"/mcp", strings.NewReader(toolCall(4, "get_inventory", `{"product_id":"SKU-7"}`)))
	req.Header.Set("content-type", "application/json")
	req.Header.Set("accept", "application/json, text/event-stream")
	req.Header.Set("mcp-protocol-version", "2025-06-18")
	req.Header.Set("authorization", env.token(t))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("content-type") != "text/event-stream" {
		t.Fatalf("got %d %q", resp.StatusCode, resp.Header.Get("content-type"))
	}
	rd := bufio.NewReader(resp.Body)
	// The first event arrives while the app still holds the second: nothing buffers it.
	first := readEvent(t, rd)
	if !strings.Contains(first, "notifications/progress") {
		t.Fatalf("first event %q", first)
	}
	env.next <- struct{}{}
	second := readEvent(t, rd)
	if !strings.Contains(second, `"done"`) {
		t.Fatalf("second event %q", second)
	}
}

func readEvent(t *testing.T, rd *bufio.Reader) string {
	t.Helper()
	var ev strings.Builder
	for {
		line, err := rd.ReadString('\n')
		if err != nil {
			t.Fatalf("reading an event: %v (so far %q)", err, ev.String())
		}
		if line == "\n" {
			return ev.String()
		}
		ev.WriteString(line)
	}
}

// A policy edit reaches the emulator over ADS and the next request follows it.
func TestMCPGatePolicyEditAppliesLive(t *testing.T) {
	env := requireGate(t)
	before := env.emu.Version(resource.RouteType)
	edit(t, filepath.Join(env.dir, "inventory.yaml"), "resource: https://inventory.example.com/mcp", "resource: https://inventory.example.com/tools")
	// The tokens in use keep their audience (the issuer's, the old resource).
	edit(t, filepath.Join(env.dir, "inventory.yaml"), "issuers: [corp]", "issuers: [corp]\n      audiences: [https://inventory.example.com/mcp]")
	env.store.Set(requireLoad(t, env.dir))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := env.emu.Wait(ctx, func(e *Emulator) bool { return e.Version(resource.RouteType) != before }); err != nil {
		t.Fatal(err)
	}
	if resp, _ := do(t, "GET", "http://"+env.inbound+"/.well-known/oauth-protected-resource/tools", ""); resp.StatusCode != 200 {
		t.Fatalf("new PRM path: %d", resp.StatusCode)
	}
	if resp, _ := do(t, "GET", "http://"+env.inbound+"/.well-known/oauth-protected-resource/mcp", ""); resp.StatusCode != 404 {
		t.Fatalf("old PRM path: %d", resp.StatusCode)
	}
	if n := env.emu.NACKs(); len(n) != 0 {
		t.Fatalf("NACKs: %v", n)
	}
}

func requireLoad(t *testing.T, dir string) *policy.Snapshot {
	t.Helper()
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

func edit(t *testing.T, path, old, new string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), old) {
		t.Fatalf("%s does not contain %q", path, old)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(string(b), old, new, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// copyDemo copies testdata/demo with mtls disabled (these tests drive plaintext) and
// the corp issuer pointed at a local one.
func copyDemo(t *testing.T, issuerURL, jwksURL string) string {
	t.Helper()
	dst := t.TempDir()
	src := filepath.Join("..", "..", "testdata", "demo")
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if rel == "mesh.yaml" {
			b = []byte(strings.NewReplacer(
				"mtls: strict", "mtls: disabled",
				"https://login.example.com/keys", jwksURL,
				"https://login.example.com/", issuerURL,
			).Replace(string(b)))
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o644)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

// mcpgate's authorization service unreachable: ext_authz fails closed with
// status_on_error (503), and nothing reaches the app.
func TestMCPGateAuthzDownFailsClosed(t *testing.T) {
	env := requireGate(t)
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := dead.Addr().String()
	_ = dead.Close()
	emu := requireEmulator(t, Options{XDSAddress: env.xds, NodeCluster: "inventory", NodeID: "inventory-2",
		ClusterAddress: map[string]string{"mcpgate": deadAddr}})
	resp, _ := do(t, "POST", "http://"+emu.Listener("inbound")+"/mcp", toolCall(5, "get_inventory", `{"product_id":"SKU-1"}`),
		"content-type", "application/json", "authorization", env.token(t))
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("got %d, want 503", resp.StatusCode)
	}
	if got := env.receivedBodies(); len(got) != 0 {
		t.Fatalf("the app was reached: %q", got)
	}
}
