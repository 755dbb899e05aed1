package xds

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/mcpgate/mcpgate/policy"
)

// writeManyApps writes a policy of n MCP apps with rules tool rules each.
func writeManyApps(tb testing.TB, dir string, n, rules, maxRequests int) {
	tb.Helper()
	var b strings.Builder
	b.WriteString(`apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  authz: {address: "mcpgate:9001"}
  sds: {spireAgentSocket: /run/spire/agent.sock}
  issuers: [{name: corp, issuer: "https://login.example.com/", audiences: [api://mcp]}]
`)
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, `---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: app%04d}
spec:
  address: app%04d:8000
  sidecar: {address: app%04d-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    resource: https://app%04d.example.com/mcp
    authentication: {issuers: [corp], audiences: [api://mcp]}
    resiliency: {timeout: 30s, retries: 1, circuitBreaker: {maxRequests: %d}}
    tools:
      rules:
`, i, i, i, i, maxRequests)
		for r := 0; r < rules; r++ {
			fmt.Fprintf(&b, "        - {name: r%d, callers: [\"app%04d\"], tools: [\"tool%d_*\"], action: allow}\n", r, (i+r)%n, r)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(b.String()), 0o644); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkTranslate1000Apps translates the policy of 1,000 MCP apps with 20 rules each
// for one sidecar: its inbound listener and an outbound route and mTLS cluster per app.
// Target: under 200 ms.
func BenchmarkTranslate1000Apps(b *testing.B) {
	dir := b.TempDir()
	writeManyApps(b, dir, 1000, 20, 100)
	snap := requireLoad(b, dir)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		res, err := Translate(snap, "app0500")
		if err != nil {
			b.Fatal(err)
		}
		_ = res.Hash()
	}
}

// BenchmarkEditTo100Streams measures a policy edit (load, validate, compile, publish)
// until 100 connected ADS streams, one node group each, have received the new clusters.
// Target: under 1 s.
func BenchmarkEditTo100Streams(b *testing.B) {
	env := requireADSServer(b)
	writeManyApps(b, env.dir, 100, 20, 100)
	_ = os.Remove(filepath.Join(env.dir, "inventory.yaml"))
	_ = os.Remove(filepath.Join(env.dir, "mesh.yaml"))
	_ = os.Remove(filepath.Join(env.dir, "github.yaml"))
	env.store.Set(requireLoad(b, env.dir))
	clients := make([]*adsClient, 100)
	versions := make([]string, 100)
	for i := range clients {
		clients[i] = requireADSClient(b, env.addr, fmt.Sprintf("app%04d", i), fmt.Sprintf("n%d", i))
		clients[i].send(b, resource.ClusterType, "", "", nil)
	}
	for i, c := range clients {
		r := c.recv(b, 10*time.Second)
		versions[i] = r.VersionInfo
		c.send(b, resource.ClusterType, r.VersionInfo, r.Nonce, nil)
	}
	max := 100
	b.ResetTimer()
	for b.Loop() {
		max++
		writeManyApps(b, env.dir, 100, 20, max)
		snap, err := policy.LoadDir(context.Background(), env.dir)
		if err != nil {
			b.Fatal(err)
		}
		env.store.Set(snap)
		for i, c := range clients {
			r := c.recv(b, 5*time.Second)
			if r.VersionInfo == versions[i] {
				b.Fatal("same version")
			}
			versions[i] = r.VersionInfo
			c.send(b, resource.ClusterType, r.VersionInfo, r.Nonce, nil)
		}
	}
}
