//go:build integration

package integration

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// TestDemoComposeAgent runs the docker-compose demo's programs against the emulated mesh:
// `mcpgate-demo issuer` as the corp issuer (as deploy/compose/policy names it: plain http
// on loopback) and `mcpgate-demo agent --expect-policy` through my-agent's sidecar. The
// agent's expectations (tools/list filtered, delete_product and a malformed id denied,
// ssn redacted, progress streamed) must all hold through mcpgate, as in compose.
func TestDemoComposeAgent(t *testing.T) {
	demoBin := buildDemo(t)
	issuerURL := startDemoIssuer(t, demoBin)

	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		mesh := filepath.Join(m.dir, "mesh.yaml")
		replaceInFile(t, mesh, "jwksUri: "+m.iss.JWKSURL(), "jwksUri: "+issuerURL+"keys")
		replaceInFile(t, mesh, "issuer: "+m.iss.URL(), "issuer: "+issuerURL)
	})

	agent := func(clientID string, extra ...string) (string, error) {
		args := append([]string{"agent", "--mcp-url", m.invokeURL, "--token-url", issuerURL + "token", "--client-id", clientID}, extra...)
		cmd := exec.Command(demoBin, args...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		t.Logf("mcpgate-demo %s:\n%s%s", strings.Join(args, " "), out.String(), errOut.String())
		return out.String(), err
	}

	out, err := agent("my-agent", "--wait", "30s")
	if err != nil {
		t.Fatalf("the agent's expectations failed through mcpgate: %v", err)
	}
	for _, want := range []string{"FILTERED", "DENIED", `denied by rule \"no-deletes\"`, "REDACTED", "STREAMED", "RESULT: every expectation met"} {
		if !strings.Contains(out, want) && !strings.Contains(out, strings.ReplaceAll(want, `\"`, `"`)) {
			t.Errorf("transcript lacks %q", want)
		}
	}
	if n := m.app.CallsTo("delete_product"); n != 0 {
		t.Errorf("delete_product reached the server %d times", n)
	}

	// The same agent expecting a server without mcpgate fails where the policy acts.
	if _, err := agent("my-agent", "--expect-policy=false", "--wait", "30s"); err == nil {
		t.Error("--expect-policy=false through mcpgate: want exit 1")
	}
	// An App inventory does not allow never connects (403), and the agent gives up.
	if _, err := agent("stranger", "--wait", "1s"); err == nil {
		t.Error("client-id stranger: want exit 1")
	}
}

// buildDemo builds cmd/mcpgate-demo for the test.
func buildDemo(t *testing.T) string {
	t.Helper()
	demoBin := filepath.Join(t.TempDir(), "mcpgate-demo")
	build := exec.Command("go", "build", "-o", demoBin, "../cmd/mcpgate-demo")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build mcpgate-demo: %v\n%s", err, out)
	}
	return demoBin
}

// startDemoIssuer runs `mcpgate-demo issuer` on loopback, waits for its JWKS and returns
// its URL. The URL is in the policy, so its port is chosen before it starts.
func startDemoIssuer(t *testing.T, demoBin string) string {
	t.Helper()
	issuerAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	issuerURL := "http://" + issuerAddr + "/"
	startDemoProcess(t, demoBin, "issuer", "--addr", issuerAddr, "--issuer-url", issuerURL, "--audience", "https://inventory.example.com/mcp")
	requireEventually(t, 10*time.Second, "the issuer's JWKS", func() bool {
		resp, err := http.Get(issuerURL + "keys")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return issuerURL
}

// composeCommands are the commands of docker-compose.yaml's services.
func composeCommands(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile("../docker-compose.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var c struct {
		Services map[string]struct {
			Command []string `yaml:"command"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("docker-compose.yaml: %v", err)
	}
	out := map[string][]string{}
	for name, s := range c.Services {
		out[name] = s.Command
	}
	return out
}

// setFlag replaces the value of --name in args ("--name v" or "--name=v"); the flag must
// be there, so that what the test moves is what compose sets.
func setFlag(t *testing.T, args []string, name, value string) []string {
	t.Helper()
	args = slices.Clone(args)
	for i, a := range args {
		if a == "--"+name && i+1 < len(args) {
			args[i+1] = value
			return args
		}
		if strings.HasPrefix(a, "--"+name+"=") {
			args[i] = "--" + name + "=" + value
			return args
		}
	}
	t.Fatalf("no --%s in %q", name, args)
	return nil
}

func flagOf(args []string, name string) string {
	for i, a := range args {
		if a == "--"+name && i+1 < len(args) {
			return args[i+1]
		}
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// TestDemoComposeSPIRE runs mcpgate as docker-compose.yaml starts it, over a real SPIRE
// server and agent: the compose service's own serve flags, with only what is specific
// to a container moved onto this host (the listen addresses onto loopback, the policy
// directory, the agent socket), serving deploy/compose/policy's Mesh (authz.spiffeId:
// mcpgate's SPIFFE ID). mcpgate must serve both gRPC listeners over SPIFFE mTLS with
// that SVID and refuse plaintext; the emulated sidecars, started from `mcpgate bootstrap`
// over that policy, reach xDS and ext_authz/ext_proc over mTLS; and the compose agent's
// command, through them, sees every expectation of the demo policy met. SPIRE's docker
// workload attestor (compose) is replaced by the unix one: the entry for mcpgate's ID
// selects the mcpgate binary, those of the sidecars the test binary.
func TestDemoComposeSPIRE(t *testing.T) {
	if envoyBin != "" {
		t.Skip("real Envoy on one host: SPIRE would give both sidecars the same selectors; emulator only")
	}
	cmds := composeCommands(t)
	serveArgs := cmds["mcpgate"]
	if len(serveArgs) == 0 || serveArgs[0] != "serve" {
		t.Fatalf("compose mcpgate command %q, want serve ...", serveArgs)
	}
	composeMesh, err := os.ReadFile("../deploy/compose/policy/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var meshDoc struct {
		Spec struct {
			Authz struct {
				SpiffeID string `yaml:"spiffeId"`
			} `yaml:"authz"`
		} `yaml:"spec"`
	}
	if err := yaml.Unmarshal(composeMesh, &meshDoc); err != nil {
		t.Fatal(err)
	}
	mcpgateID := meshDoc.Spec.Authz.SpiffeID
	if mcpgateID == "" {
		t.Fatal("deploy/compose/policy/mesh.yaml names no authz.spiffeId: the Envoys would reach mcpgate in plaintext")
	}

	demoBin := buildDemo(t)
	sp := startSPIRE(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, app := range []string{"inventory", "my-agent"} {
		sp.register(t, spiffeID(app), self)
	}
	sp.register(t, mcpgateID, mcpgateBin)
	requireEventually(t, 45*time.Second, "the agent to serve the sidecars' SVIDs over SDS", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, id := range []string{spiffeID("inventory"), spiffeID("my-agent"), "spiffe://example.org"} {
			if _, err := sp.fetch(ctx, id); err != nil {
				return false
			}
		}
		return true
	})

	issuerURL := startDemoIssuer(t, demoBin)
	composeIssuer := flagOf(cmds["issuer"], "issuer-url")
	if composeIssuer == "" || !bytes.Contains(composeMesh, []byte("issuer: "+composeIssuer)) {
		t.Fatalf("compose issuer --issuer-url %q is not the compose policy's issuer", composeIssuer)
	}
	m := &mesh{iss: bearertest.NewIssuer(t)}
	m.app = startMCPApp(t, mcpapp.Options{DisableLocalhostProtection: true})
	m.meshPolicy(t, "strict") // testdata/demo on loopback; its mesh.yaml is replaced below
	// deploy/compose/policy differs from testdata/demo only in mesh.yaml (go test ./deploy).
	mesh := filepath.Join(m.dir, "mesh.yaml")
	if err := os.WriteFile(mesh, composeMesh, 0o644); err != nil {
		t.Fatal(err)
	}
	replaceInFile(t, mesh, "address: mcpgate:9001", "address: "+m.addrs.grpc)
	replaceInFile(t, mesh, "spireAgentSocket: /run/spire/agent.sock", "spireAgentSocket: "+sp.agentSock)
	replaceInFile(t, mesh, "issuer: "+composeIssuer, "issuer: "+issuerURL)
	replaceInFile(t, mesh, "jwksUri: "+composeIssuer+"keys", "jwksUri: "+issuerURL+"keys")

	args := serveArgs[1:]
	for name, v := range map[string]string{
		"config": m.dir, "grpc-addr": m.addrs.grpc, "xds-addr": m.addrs.xds, "admin-addr": m.addrs.admin,
		"spiffe-socket": "unix://" + sp.agentSock,
	} {
		args = setFlag(t, args, name, v)
	}
	m.gate = startGate(t, "", append(args, "--shutdown-timeout", "2s")...)
	l := m.gate.logs.find(msgIs("grpc listeners use SPIFFE mTLS"))
	if l == nil || l["spiffe_id"] != mcpgateID {
		t.Fatalf("mcpgate does not serve SPIFFE mTLS as %s: %v", mcpgateID, l)
	}
	if m.gate.logs.find(func(l map[string]any) bool {
		return l["level"] == "warn" && strings.Contains(fmt.Sprint(l["msg"]), "authz.spiffeId")
	}) != nil {
		t.Error("mcpgate warns that the policy and its listeners disagree on mTLS")
	}

	// Plaintext is refused on both listeners (the handshake fails: Unavailable).
	for _, addr := range []string{m.gate.grpcAddr, m.gate.xdsAddr} {
		conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		conn.Close()
		if status.Code(err) != codes.Unavailable {
			t.Errorf("%s answered a plaintext client: %v", addr, err)
		}
	}

	m.inventory = m.startSPIREEmulator(t, "inventory")
	m.agent = m.startSPIREEmulator(t, "my-agent")
	m.invokeURL = "http://" + m.agent.Listener("outbound") + "/v1.0/invoke/inventory/method/mcp"

	// The compose agent's command, pointed at this host's sidecar and issuer, run once.
	agentArgs := cmds["my-agent"]
	if len(agentArgs) == 0 || agentArgs[0] != "agent" {
		t.Fatalf("compose my-agent command %q, want agent ...", agentArgs)
	}
	agentArgs = setFlag(t, agentArgs, "mcp-url", m.invokeURL)
	agentArgs = setFlag(t, agentArgs, "token-url", issuerURL+"token")
	agentArgs = setFlag(t, agentArgs, "loop", "0")
	agentArgs = append(agentArgs, "--wait", "30s")
	cmd := exec.Command(demoBin, agentArgs...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	t.Logf("mcpgate-demo %s:\n%s%s", strings.Join(agentArgs, " "), out.String(), errOut.String())
	if err != nil {
		t.Fatalf("the compose agent's expectations failed through mcpgate over SPIFFE mTLS: %v", err)
	}
	if !strings.Contains(out.String(), "RESULT: every expectation met") {
		t.Error("transcript lacks the result line")
	}
	if n := m.app.CallsTo("delete_product"); n != 0 {
		t.Errorf("delete_product reached the server %d times", n)
	}
	// mcpgate decided, reached over mTLS: the caller is the agent sidecar's SVID.
	requireEventually(t, 10*time.Second, "a decision for my-agent's SVID in mcpgate's log", func() bool {
		return m.gate.logs.count(func(l map[string]any) bool {
			return l["msg"] == "authz decision" && l["caller"] == "my-agent" && l["spiffe_id"] == spiffeID("my-agent")
		}) > 0
	})
}

// startDemoProcess runs mcpgate-demo until the test ends.
func startDemoProcess(t *testing.T, bin string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, args...)
	var logs bytes.Buffer
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("mcpgate-demo %s logs:\n%s", args[0], logs.String())
		}
	})
}
