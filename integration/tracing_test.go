//go:build integration

package integration

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/otlptest"
)

// With spec.tracing, the sidecars take the tracer configuration (no NACK) and the real
// mcpgate binary exports a Check span and an ext_proc span per MCP call to the
// collector's receiver, both carrying the decision, and the decision log names the trace.
func TestTracingThroughTheMesh(t *testing.T) {
	col := otlptest.Start(t)
	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		meshFile := filepath.Join(m.dir, "mesh.yaml")
		b, err := os.ReadFile(meshFile)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, "  tracing: {samplingRate: \"1\", otlp: {address: \""+col.Addr()+"\"}}\n"...)
		if err := os.WriteFile(meshFile, b, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	resp, body := m.post(t, m.token(t, nil), initialize)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("initialize: %d %s", resp.StatusCode, body)
	}
	check := col.Wait(t, 15*time.Second, 1, func(s otlptest.Span) bool {
		return s.Name == "mcpgate ext_authz Check" && s.Attrs["mcpgate.target.app_id"] == "inventory" && s.Attrs["mcpgate.decision"] == "allow"
	})[0]
	proc := col.Wait(t, 15*time.Second, 1, func(s otlptest.Span) bool {
		return s.Name == "mcpgate ext_proc" && s.Attrs["mcp.method.name"] == "initialize"
	})[0]
	if check.Service != "mcpgate" || proc.Attrs["mcpgate.caller.app_id"] != "my-agent" || proc.Attrs["mcpgate.decision"] != "allow" {
		t.Errorf("spans: %+v %+v", check, proc)
	}
	requireEventually(t, 10*time.Second, "the decision log names the Check's trace", func() bool {
		return m.gate.logs.find(func(l map[string]any) bool {
			return l["msg"] == "authz decision" && l["trace_id"] == check.TraceID && l["span_id"] == check.SpanID
		}) != nil
	})
}
