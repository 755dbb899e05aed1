//go:build integration

package integration

import (
	"bytes"
	"context"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
)

// TestDemoComposeAgent runs the docker-compose demo's programs against the emulated mesh:
// `mcpgate-demo issuer` as the corp issuer (as deploy/compose/policy names it: plain http
// on loopback) and `mcpgate-demo agent --expect-policy` through my-agent's sidecar. The
// agent's expectations (tools/list filtered, delete_product and a malformed id denied,
// ssn redacted, progress streamed) must all hold through mcpgate, as in compose.
func TestDemoComposeAgent(t *testing.T) {
	demoBin := filepath.Join(t.TempDir(), "mcpgate-demo")
	build := exec.Command("go", "build", "-o", demoBin, "../cmd/mcpgate-demo")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build mcpgate-demo: %v\n%s", err, out)
	}

	// The issuer's URL is in the policy, so its port is chosen before it starts.
	issuerAddr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	issuerURL := "http://" + issuerAddr + "/"
	startDemoProcess(t, demoBin, "issuer", "--addr", issuerAddr, "--issuer-url", issuerURL, "--audience", "api://mcp-server")
	requireEventually(t, 10*time.Second, "the issuer's JWKS", func() bool {
		resp, err := http.Get(issuerURL + "keys")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})

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
