//go:build integration

package integration

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/envoyemu"
)

// mesh is the whole path on loopback: an MCP client → the agent's sidecar (Dapr-style
// outbound listener) → the inventory sidecar (ext_authz, ext_proc) → the MCP server App,
// every Envoy programmed by the real `mcpgate serve` over xDS. The Envoys are emulators,
// or real Envoy processes when ENVOY_BIN names an Envoy binary (see envoy_bin_test.go).
type mesh struct {
	iss       *bearertest.Issuer
	dir       string
	app       *mcpapp.Server
	gate      *gate
	addrs     meshAddrs
	inventory sidecar
	agent     sidecar
	invokeURL string // the agent sidecar's /v1.0/invoke/inventory/method/mcp
	// appAddr, if set, is where the policy sends inventory's traffic instead of app (an
	// MCP server on another SDK).
	appAddr string
	// stranger, if set, is the mTLS certificate of a workload that inventory does not
	// allow (mtls: strict names callers by certificate); nil: callers are named by their
	// token, and the stranger is a token's azp.
	stranger *tls.Certificate
}

// sidecar is one Envoy of the mesh.
type sidecar interface {
	// Listener returns the loopback address the named listener accepts on.
	Listener(name string) string
}

// meshAddrs are the loopback addresses the mesh's policy names. Emulators bind ephemeral
// ports and map these through Resolve; real Envoys bind them.
type meshAddrs struct {
	grpc, xds, admin          string // mcpgate
	inventoryIn, inventoryOut int
	agentIn, agentOut         int
}

// freePort asks the kernel for an unused loopback port. Only real Envoys need ports
// chosen in advance (their listeners come from the policy); emulators never bind these.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// meshPolicy copies the demo policy with every host a loopback address: the app, both
// sidecars (ports of their own, as two sidecars share this host) and mcpgate itself.
func (m *mesh) meshPolicy(t *testing.T, mtls string) {
	t.Helper()
	m.dir = copyDemo(t, m.iss.URL(), m.iss.JWKSURL())
	m.addrs = meshAddrs{
		grpc: "127.0.0.1:" + strconv.Itoa(freePort(t)), xds: "127.0.0.1:" + strconv.Itoa(freePort(t)),
		admin:       "127.0.0.1:" + strconv.Itoa(freePort(t)),
		inventoryIn: freePort(t), inventoryOut: freePort(t), agentIn: freePort(t), agentOut: freePort(t),
	}
	mesh := filepath.Join(m.dir, "mesh.yaml")
	replaceInFile(t, mesh, "mtls: strict", "mtls: "+mtls)
	replaceInFile(t, mesh, "address: mcpgate:9001", "address: "+m.addrs.grpc)
	apps := filepath.Join(m.dir, "inventory.yaml")
	appAddr := m.appAddr
	if appAddr == "" {
		appAddr = m.app.Addr()
	}
	replaceInFile(t, apps, "address: inventory:8000", "address: "+appAddr)
	replaceInFile(t, apps, "sidecar:\n    address: inventory-envoy\n    inboundPort: 15006\n    outboundPort: 3500",
		fmt.Sprintf("sidecar:\n    address: 127.0.0.1\n    inboundPort: %d\n    outboundPort: %d", m.addrs.inventoryIn, m.addrs.inventoryOut))
	replaceInFile(t, apps, "sidecar:\n    address: my-agent-envoy\n    inboundPort: 15006\n    outboundPort: 3500",
		fmt.Sprintf("sidecar:\n    address: 127.0.0.1\n    inboundPort: %d\n    outboundPort: %d", m.addrs.agentIn, m.addrs.agentOut))
}

// startMeshWith starts mcpgate and the two sidecars. fileRoots give each emulated
// sidecar its own certificate files (mTLS); nil for plaintext. edit, if set, changes the
// policy copy before mcpgate reads it.
// m.app, if already set, is the App to use.
func startMeshWith(t *testing.T, m *mesh, mtls string, fileRoots map[string]string, edit func()) {
	t.Helper()
	if m.app == nil {
		m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true})
	}
	m.meshPolicy(t, mtls)
	if edit != nil {
		edit()
	}
	m.gate = startGate(t, m.dir, "--shutdown-timeout", "2s",
		"--grpc-addr", m.addrs.grpc, "--xds-addr", m.addrs.xds, "--admin-addr", m.addrs.admin)
	m.inventory = m.startSidecar(t, "inventory", fileRoots["inventory"])
	m.agent = m.startSidecar(t, "my-agent", fileRoots["my-agent"])
	m.invokeURL = "http://" + m.agent.Listener("outbound") + "/v1.0/invoke/inventory/method/mcp"
}

func startMesh(t *testing.T) *mesh {
	t.Helper()
	m := &mesh{iss: bearertest.NewIssuer(t)}
	// Callers are named by their token's azp (the demo's appIdClaim) in this mesh;
	// e2e_mtls_test.go runs it with SPIFFE mTLS.
	startMeshWith(t, m, "disabled", nil, nil)
	return m
}

func (m *mesh) startSidecar(t *testing.T, app, fileRoot string) sidecar {
	t.Helper()
	if envoyBin != "" {
		return m.startRealEnvoy(t, app)
	}
	return m.startEmulator(t, app, fileRoot)
}

// startEmulator starts an emulated Envoy. It binds ephemeral ports, so Resolve maps the
// policy's loopback addresses (mcpgate's are real; a sidecar's are its listeners').
func (m *mesh) startEmulator(t *testing.T, app, fileRoot string) *envoyemu.Emulator {
	t.Helper()
	return m.runEmulator(t, app, 15*time.Second, envoyemu.Options{
		XDSAddress: m.addrs.xds, NodeCluster: app, NodeID: app + "-1", FileRoot: fileRoot,
	})
}

// runEmulator starts the emulated Envoy of app with o (Resolve and Logf set here) and
// waits, at most within, until it serves.
func (m *mesh) runEmulator(t *testing.T, app string, within time.Duration, o envoyemu.Options) *envoyemu.Emulator {
	t.Helper()
	o.Resolve = func(host string, port uint32) string {
		if int(port) == m.addrs.inventoryIn {
			if inv, ok := m.inventory.(*envoyemu.Emulator); ok {
				return inv.Listener("inbound")
			}
		}
		return net.JoinHostPort(host, strconv.Itoa(int(port)))
	}
	o.Logf = t.Logf
	e, err := envoyemu.Start(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if err := e.WaitReady(ctx); err != nil {
		t.Fatalf("%s sidecar: %v (NACKs: %v)", app, err, e.NACKs())
	}
	if app == "inventory" && e.Listener("inbound") == "" {
		t.Fatal("inventory's inbound listener is not bound")
	}
	return e
}

func (m *mesh) token(t *testing.T, overrides map[string]any) string {
	claims := map[string]any{
		"iss": m.iss.URL(), "sub": "alice@example.com", "aud": "https://inventory.example.com/mcp", "azp": "my-agent",
		"scope": "mcp:tools inventory:read", "exp": time.Now().Add(time.Hour).Unix(), "iat": time.Now().Unix(),
	}
	for k, v := range overrides {
		claims[k] = v
	}
	return "Bearer " + m.iss.Mint(t, claims)
}

func (m *mesh) connect(t *testing.T, endpoint string, headers map[string]string) *mcpapp.ClientSession {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := mcpapp.Connect(ctx, endpoint, nil, headers)
	if err != nil {
		t.Fatalf("connect through the sidecars: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// post sends one raw MCP POST through the agent sidecar.
func (m *mesh) post(t *testing.T, auth, body string) (*http.Response, string) {
	t.Helper()
	req := mcpPost(t, m.invokeURL, auth, body)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

const initialize = `{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}`

func callCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestEndToEnd runs the end-to-end scenarios on a mesh whose callers are named by their
// tokens; TestSPIRE runs them over SPIRE-issued mTLS.
func TestEndToEnd(t *testing.T) {
	runEndToEnd(t, startMesh(t))
}

// strangerPost sends an MCP initialize, with a valid token, as a caller inventory does
// not allow: from a workload with its own SVID straight to inventory's sidecar (mTLS),
// or through the agent's sidecar with a token naming another App ID.
func (m *mesh) strangerPost(t *testing.T) (int, string) {
	t.Helper()
	if m.stranger == nil {
		resp, body := m.post(t, m.token(t, map[string]any{"azp": "stranger"}), initialize)
		return resp.StatusCode, body
	}
	code, body, err := tlsPost(t, m.inventory.Listener("inbound"), m.token(t, nil), *m.stranger)
	if err != nil {
		t.Fatalf("the stranger's handshake: %v", err)
	}
	return code, body
}

// runEndToEnd runs issue 5's scenarios on one mesh, in order: the last ones stop and
// restart mcpgate.
func runEndToEnd(t *testing.T, m *mesh) {
	auth := map[string]string{"Authorization": m.token(t, nil)}
	s := m.connect(t, m.invokeURL, auth)

	t.Run("allowed call reaches the server", func(t *testing.T) {
		before := m.app.CallsTo("get_inventory")
		res, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"})
		if err != nil || res.IsError {
			t.Fatalf("get_inventory: %v %v", err, res)
		}
		var got struct {
			Quantity int `json:"quantity"`
		}
		if err := mcpapp.Structured(res, &got); err != nil || got.Quantity != 42 {
			t.Fatalf("result %+v (%v)", got, err)
		}
		if n := m.app.CallsTo("get_inventory") - before; n != 1 {
			t.Fatalf("server executed get_inventory %d times", n)
		}
	})

	t.Run("denied tool never reaches the server", func(t *testing.T) {
		_, err := s.CallTool(callCtx(t), "delete_product", map[string]any{"product_id": "SKU-7"})
		if err == nil || !strings.Contains(err.Error(), `denied by rule "no-deletes"`) {
			t.Fatalf("want a JSON-RPC denial, got %v", err)
		}
		if n := m.app.CallsTo("delete_product"); n != 0 || !stocked(m.app, "SKU-7", 7) {
			t.Fatalf("the denied call reached the server (%d calls)", n)
		}
		// Rego's argument condition, also answered by mcpgate.
		if _, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "7; drop"}); err == nil ||
			!strings.Contains(err.Error(), "product_id must look like SKU-<digits>") {
			t.Fatalf("want Rego's reason, got %v", err)
		}
	})

	t.Run("tools/list is filtered", func(t *testing.T) {
		names, err := s.ToolNames(callCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(names)
		if strings.Join(names, ",") != "get_customer,get_inventory,list_items,slow_report" {
			t.Fatalf("tools = %v (the server offers delete_product too)", names)
		}
	})

	t.Run("redacted field is absent", func(t *testing.T) {
		res, err := s.CallTool(callCtx(t), "get_customer", map[string]any{"id": "c1"})
		if err != nil || res.IsError {
			t.Fatalf("get_customer: %v %v", err, res)
		}
		b, _ := json.Marshal(res)
		if want := mcpapp.CustomerFor("c1"); strings.Contains(string(b), want.SSN) || !strings.Contains(string(b), want.Name) {
			t.Fatalf("client got %s", b)
		}
	})

	t.Run("progress arrives before the result", func(t *testing.T) {
		call := s.CallToolWithProgress(callCtx(t), mcpapp.NewProgressToken(), "slow_report", map[string]any{"steps": 3})
		if call.Err != nil {
			t.Fatal(call.Err)
		}
		if err := call.ProgressBeforeResult(3); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("dapr-app-id header routing", func(t *testing.T) {
		other := m.connect(t, "http://"+m.agent.Listener("outbound")+"/mcp",
			map[string]string{"Authorization": m.token(t, nil), "dapr-app-id": "inventory"})
		if _, err := other.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-7"}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("TypeScript SDK client", func(t *testing.T) {
		before := m.app.CallsTo("get_inventory")
		steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)},
			`[{"op":"list"},{"op":"call","name":"get_inventory","arguments":{"product_id":"SKU-42"}},{"op":"call","name":"delete_product","arguments":{"product_id":"SKU-42"}}]`)
		if len(steps) != 4 || !steps[0].OK {
			t.Fatalf("steps = %+v", steps)
		}
		if slices.Contains(steps[1].Tools, "delete_product") || !slices.Contains(steps[1].Tools, "get_inventory") {
			t.Errorf("listed %v", steps[1].Tools)
		}
		if !steps[2].OK || m.app.CallsTo("get_inventory") != before+1 {
			t.Errorf("get_inventory = %+v", steps[2])
		}
		if steps[3].OK || steps[3].Error == nil || !strings.Contains(steps[3].Error.Message, "no-deletes") || m.app.CallsTo("delete_product") != 0 {
			t.Errorf("delete_product = %+v", steps[3])
		}
	})

	t.Run("caller not allowed is 403", func(t *testing.T) {
		calls := len(m.app.Requests())
		code, body := m.strangerPost(t)
		if code != 403 || !strings.Contains(body, "access_denied") {
			t.Fatalf("%d %s", code, body)
		}
		if len(m.app.Requests()) != calls {
			t.Fatal("the refused call reached the server")
		}
	})

	t.Run("no token is 401 and the metadata document can be fetched", func(t *testing.T) {
		resp, _ := m.post(t, "", initialize)
		www := resp.Header.Get("WWW-Authenticate")
		if resp.StatusCode != 401 || !strings.Contains(www, `resource_metadata="`) {
			t.Fatalf("%d, WWW-Authenticate %q", resp.StatusCode, www)
		}
		raw := strings.SplitN(strings.SplitN(www, `resource_metadata="`, 2)[1], `"`, 2)[0]
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		// The client reaches the app through its sidecar; the document's path is the same.
		docURL := "http://" + m.agent.Listener("outbound") + "/v1.0/invoke/inventory/method" + u.Path
		doc, err := http.Get(docURL)
		if err != nil {
			t.Fatal(err)
		}
		defer doc.Body.Close()
		var prm struct {
			Resource             string   `json:"resource"`
			AuthorizationServers []string `json:"authorization_servers"`
		}
		if err := json.NewDecoder(doc.Body).Decode(&prm); err != nil || doc.StatusCode != 200 {
			t.Fatalf("%s: %d %v", docURL, doc.StatusCode, err)
		}
		if prm.Resource != "https://inventory.example.com/mcp" || !slices.Contains(prm.AuthorizationServers, m.iss.URL()) {
			t.Fatalf("metadata document %+v", prm)
		}
	})

	t.Run("expired token is 401", func(t *testing.T) {
		resp, _ := m.post(t, m.token(t, map[string]any{"exp": time.Now().Add(-time.Hour).Unix()}), initialize)
		if resp.StatusCode != 401 || !strings.Contains(resp.Header.Get("WWW-Authenticate"), `error="invalid_token"`) {
			t.Fatalf("%d %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"))
		}
	})

	t.Run("a policy edit applies to an open session", func(t *testing.T) {
		if _, err := s.CallTool(callCtx(t), "get_customer", map[string]any{"id": "c2"}); err != nil {
			t.Fatalf("before the edit: %v", err)
		}
		calls := m.app.CallsTo("get_customer")
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "        - name: readers\n",
			"        - name: freeze\n          tools: [get_customer]\n          action: deny\n        - name: readers\n")
		requireEventually(t, 5*time.Second, "the edit to apply", func() bool {
			return m.gate.logs.count(msgIs("policy applied")) >= 1
		})
		_, err := s.CallTool(callCtx(t), "get_customer", map[string]any{"id": "c2"})
		if err == nil || !strings.Contains(err.Error(), `rule "freeze"`) {
			t.Fatalf("after the edit, same session: %v", err)
		}
		if m.app.CallsTo("get_customer") != calls {
			t.Fatal("the call denied after the edit reached the server")
		}
	})

	t.Run("mcpgate stopped: calls fail closed", func(t *testing.T) {
		args := m.gate.restartArgs()
		calls := len(m.app.Calls())
		m.gate.stop(t)
		resp, _ := m.post(t, m.token(t, nil), initialize)
		if resp.StatusCode < 400 {
			t.Fatalf("with mcpgate down the call got %d", resp.StatusCode)
		}
		if _, err := s.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"}); err == nil {
			t.Fatal("a call succeeded with mcpgate down")
		}
		if len(m.app.Calls()) != calls {
			t.Fatal("a call reached the server with mcpgate down")
		}

		t.Run("restarted: calls succeed again", func(t *testing.T) {
			m.gate = startGate(t, m.dir, append([]string{"--shutdown-timeout", "2s"}, args...)...)
			requireEventually(t, 30*time.Second, "calls to succeed after the restart", func() bool {
				resp, _ := m.post(t, m.token(t, nil), initialize)
				return resp.StatusCode == 200
			})
			again := m.connect(t, m.invokeURL, map[string]string{"Authorization": m.token(t, nil)})
			if _, err := again.CallTool(callCtx(t), "get_inventory", map[string]any{"product_id": "SKU-42"}); err != nil {
				t.Fatal(err)
			}
		})
	})
}

func stocked(app *mcpapp.Server, id string, want int) bool {
	q, ok := app.Inventory(id)
	return ok && q == want
}
