//go:build integration

package integration

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/redistest"
)

// limitedMesh is a mesh whose mcpgate counts limits in the Redis at addr, with
// inventory's perCaller limit at 3 an hour (the demo's is 100/m) and no perTool limit.
func limitedMesh(t *testing.T, addr string) *mesh {
	t.Helper()
	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		meshFile := filepath.Join(m.dir, "mesh.yaml")
		b, err := os.ReadFile(meshFile)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, "  rateLimits:\n    redis: {address: \""+addr+"\"}\n    failureMode: local\n"...)
		if err := os.WriteFile(meshFile, b, 0o644); err != nil {
			t.Fatal(err)
		}
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "perCaller: 100/m", "perCaller: 3/h")
		replaceInFile(t, filepath.Join(m.dir, "inventory.yaml"), "      perTool:\n        get_inventory: 10/s\n", "")
	})
	return m
}

type readyRateLimits struct {
	RateLimits struct {
		Store     string `json:"store"`
		Address   string `json:"address"`
		Reachable bool   `json:"reachable"`
		Error     string `json:"error"`
		Effect    string `json:"effect"`
	} `json:"rate_limits"`
}

func (m *mesh) readyz(t *testing.T) readyRateLimits {
	t.Helper()
	code, body := m.gate.get(t, "/readyz")
	if code != http.StatusOK {
		t.Fatalf("/readyz = %d: %s", code, body)
	}
	var r readyRateLimits
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("/readyz %s: %v", body, err)
	}
	return r
}

// requireInitialize posts an initialize through m's sidecars and requires want.
func (m *mesh) requireInitialize(t *testing.T, want int, what string) *http.Response {
	t.Helper()
	resp, body := m.post(t, m.token(t, nil), initialize)
	if resp.StatusCode != want {
		t.Fatalf("%s: HTTP %d, want %d: %s", what, resp.StatusCode, want, body)
	}
	if want == http.StatusTooManyRequests && !strings.Contains(body, "limits.perCaller 3/h for this caller") {
		t.Fatalf("%s: body %s does not name the limit", what, body)
	}
	return resp
}

// Two mcpgate replicas (each with its own sidecars, as two pods behind one Service)
// share one limit in Redis, through the policy files, the real binary and Envoy's HTTP
// answer; with Redis killed they count per replica and say so; with Redis back the
// limit is shared again, without a restart.
func TestRateLimitsSharedByReplicas(t *testing.T) {
	srv := redistest.Start(t)
	m1, m2 := limitedMesh(t, srv.Addr()), limitedMesh(t, srv.Addr())

	for i, m := range []*mesh{m1, m2} {
		m.requireInitialize(t, http.StatusOK, "call "+string(rune('1'+i)))
	}
	// A request of a protocol after 2025-03-26 (one message per POST), to an app without
	// perTool limits, is decided on its headers while Envoy buffers its body: the same
	// bucket, the same Redis.
	if early, body := m1.postAs(t, "", initialize, "Mcp-Protocol-Version", "2025-06-18"); early.StatusCode != http.StatusOK {
		t.Fatalf("3rd call, decided on its headers: HTTP %d: %s", early.StatusCode, body)
	}
	resp := m2.requireInitialize(t, http.StatusTooManyRequests, "4th call, on the other replica")
	if ra := resp.Header.Get("Retry-After"); ra == "" || ra == "0" {
		t.Errorf("Retry-After = %q", ra)
	}
	if got, want := resp.Header.Get("RateLimit-Policy"), `"perCaller";q=3;w=3600`; got != want {
		t.Errorf("RateLimit-Policy = %q, want %q", got, want)
	}
	if got := resp.Header.Get("RateLimit"); !strings.HasPrefix(got, `"perCaller";r=0;t=`) {
		t.Errorf("RateLimit = %q", got)
	}
	for _, m := range []*mesh{m1, m2} {
		if r := m.readyz(t).RateLimits; r.Store != "redis" || r.Address != srv.Addr() || !r.Reachable {
			t.Errorf("/readyz rate_limits with Redis up: %+v", r)
		}
	}
	_, metrics := m2.gate.get(t, "/metrics")
	if !strings.Contains(metrics, `mcpgate_ratelimit_decisions_total{decision="refused",key="caller",target="inventory"} 1`) {
		t.Errorf("/metrics lacks the refused decision:\n%s", grepLines(metrics, "mcpgate_ratelimit"))
	}
	// The dashboard's labels, against what a real mcpgate shows after real traffic.
	checkDashboardLabels(t, metrics, "mcpgate_authz_decisions_total", "mcpgate_authz_duration_seconds_bucket",
		"mcpgate_mcp_decisions_total", "mcpgate_mcp_decision_duration_seconds_bucket", "mcpgate_ratelimit_decisions_total",
		"mcpgate_mcp_cache_entries", "mcpgate_policy_reloads_total", "mcpgate_xds_snapshots_total")

	// Redis down: failureMode local, so each replica counts its own 3.
	srv.Kill()
	m1.requireInitialize(t, http.StatusOK, "with Redis down")
	r := m1.readyz(t).RateLimits
	if r.Reachable || r.Error == "" || !strings.Contains(r.Effect, "failureMode local") {
		t.Errorf("/readyz rate_limits with Redis down: %+v", r)
	}
	requireEventually(t, 10*time.Second, "the log says the store is down", func() bool {
		return m1.gate.logs.find(msgIs("rate-limit store unreachable: limited calls follow the failure mode until it answers")) != nil
	})
	for range 2 {
		m1.requireInitialize(t, http.StatusOK, "local allowance")
	}
	m1.requireInitialize(t, http.StatusTooManyRequests, "local allowance spent")
	_, metrics = m1.gate.get(t, "/metrics")
	if !strings.Contains(metrics, `decision="local_refused",key="caller",target="inventory"} 1`) {
		t.Errorf("/metrics lacks the local decision:\n%s", grepLines(metrics, "mcpgate_ratelimit"))
	}

	// Redis back (empty: no persistence): shared again once each replica sees it.
	srv.Restart(t)
	for _, m := range []*mesh{m1, m2} {
		requireEventually(t, 10*time.Second, "readyz sees Redis again", func() bool { return m.readyz(t).RateLimits.Reachable })
	}
	for i, m := range []*mesh{m2, m1, m2} {
		m.requireInitialize(t, http.StatusOK, "shared call "+string(rune('1'+i))+" after the restart")
	}
	m1.requireInitialize(t, http.StatusTooManyRequests, "4th shared call after the restart")
	requireEventually(t, 10*time.Second, "the log says the store is back", func() bool {
		return m1.gate.logs.find(msgIs("rate-limit store reachable again: limits are shared by the replicas")) != nil
	})
}

func grepLines(s, part string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, part) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
