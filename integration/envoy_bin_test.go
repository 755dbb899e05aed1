//go:build integration

package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// envoyBin names a real Envoy binary. When set, the end-to-end scenarios and the demo run
// with real Envoy processes, started from `mcpgate bootstrap` output, instead of the
// emulator: for users' CI, since no Envoy can be installed where mcpgate is developed.
//
//	ENVOY_BIN=$(which envoy) make test-integration
var envoyBin = os.Getenv("ENVOY_BIN")

// realEnvoy is an Envoy process of the mesh; its listeners are where the policy puts them.
type realEnvoy struct {
	listeners map[string]string
}

func (e *realEnvoy) Listener(name string) string { return e.listeners[name] }

func (m *mesh) startRealEnvoy(t *testing.T, app string) *realEnvoy {
	t.Helper()
	in, out := m.addrs.inventoryIn, m.addrs.inventoryOut
	if app != "inventory" {
		in, out = m.addrs.agentIn, m.addrs.agentOut
	}
	admin := freePort(t)
	boot, err := exec.Command(mcpgateBin, "bootstrap", "--app", app, "--node-id", app+"-1",
		"--xds-address", m.addrs.xds, "--admin-port", strconv.Itoa(admin), "--config", m.dir, "--no-spire").Output()
	if err != nil {
		t.Fatalf("mcpgate bootstrap --app %s: %v", app, err)
	}
	path := filepath.Join(t.TempDir(), app+".yaml")
	if err := os.WriteFile(path, boot, 0o644); err != nil {
		t.Fatal(err)
	}
	// --use-dynamic-base-id: several Envoys on one host need distinct shared-memory ids.
	cmd := exec.Command(envoyBin, "-c", path, "--use-dynamic-base-id", "--log-level", "warn")
	var logs strings.Builder
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", envoyBin, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("envoy %s logs:\n%s", app, logs.String())
		}
	})
	e := &realEnvoy{listeners: map[string]string{
		"inbound":  fmt.Sprintf("127.0.0.1:%d", in),
		"outbound": fmt.Sprintf("127.0.0.1:%d", out),
	}}
	// Ready once the admin interface says LIVE (initial xDS fetched, listeners warmed).
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", fmt.Sprintf("http://127.0.0.1:%d/ready", admin), nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return e
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("envoy %s not ready within 30s:\n%s", app, logs.String())
		case <-time.After(50 * time.Millisecond): // polling interval
		}
	}
}
