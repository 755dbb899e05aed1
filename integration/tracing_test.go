//go:build integration

package integration

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/mcpgate/mcpgate/extauthz/bearer/bearertest"
	"github.com/mcpgate/mcpgate/integration/otlptest"
)

// tracedMesh is a mesh whose policy traces at rate to col.
func tracedMesh(t *testing.T, col *otlptest.Collector, rate string) *mesh {
	t.Helper()
	m := &mesh{iss: bearertest.NewIssuer(t)}
	startMeshWith(t, m, "disabled", nil, func() {
		meshFile := filepath.Join(m.dir, "mesh.yaml")
		b, err := os.ReadFile(meshFile)
		if err != nil {
			t.Fatal(err)
		}
		b = append(b, "  tracing: {samplingRate: \""+rate+"\", otlp: {address: \""+col.Addr()+"\"}}\n"...)
		if err := os.WriteFile(meshFile, b, 0o644); err != nil {
			t.Fatal(err)
		}
	})
	return m
}

// traceTree is the spans of one trace by id, with their children.
type traceTree struct {
	spans    map[string]otlptest.Span
	children map[string][]otlptest.Span
	roots    []otlptest.Span
}

func newTraceTree(spans []otlptest.Span) traceTree {
	tt := traceTree{spans: map[string]otlptest.Span{}, children: map[string][]otlptest.Span{}}
	for _, s := range spans {
		tt.spans[s.SpanID] = s
	}
	for _, s := range spans {
		if _, ok := tt.spans[s.ParentID]; ok {
			tt.children[s.ParentID] = append(tt.children[s.ParentID], s)
		} else {
			tt.roots = append(tt.roots, s)
		}
	}
	for _, c := range tt.children {
		sort.Slice(c, func(i, j int) bool { return c[i].Service+c[i].Name < c[j].Service+c[j].Name })
	}
	return tt
}

// child is the one child of parent from service named name (a prefix for "egress <host>").
func (tt traceTree) child(t *testing.T, parent otlptest.Span, service, name string) otlptest.Span {
	t.Helper()
	for _, c := range tt.children[parent.SpanID] {
		if c.Service == service && strings.HasPrefix(c.Name, name) {
			return c
		}
	}
	t.Fatalf("no span %s %q under %s %q; the trace:\n%s", service, name, parent.Service, parent.Name, tt)
	return otlptest.Span{}
}

// String renders the tree as the README shows it: one line per span, indented under
// its parent, with its kind and the attributes that say what happened.
func (tt traceTree) String() string {
	var b strings.Builder
	keys := []string{"http.method", "http.status_code", "upstream_cluster", "grpc.status_code",
		"mcpgate.caller.app_id", "mcpgate.target.app_id", "mcp.method.name", "gen_ai.tool.name",
		"mcpgate.decision", "mcpgate.reason", "mcpgate.rule"}
	var walk func(s otlptest.Span, depth int)
	walk = func(s otlptest.Span, depth int) {
		fmt.Fprintf(&b, "%s%s  [%s] %s", strings.Repeat("  ", depth), s.Service, s.Kind, s.Name)
		for _, k := range keys {
			if v, ok := s.Attrs[k]; ok && v != "" {
				fmt.Fprintf(&b, "  %s=%s", k, v)
			}
		}
		if s.Status == "Error" {
			b.WriteString("  status=Error")
		}
		b.WriteString("\n")
		for _, c := range tt.children[s.SpanID] {
			walk(c, depth+1)
		}
	}
	for _, r := range tt.roots {
		walk(r, 0)
	}
	return b.String()
}

// waitTrace waits for the trace of mcpgate's span matching match to hold at least n
// spans, and returns it.
func waitTrace(t *testing.T, col *otlptest.Collector, n int, match func(otlptest.Span) bool) traceTree {
	t.Helper()
	s := col.Wait(t, 20*time.Second, 1, match)[0]
	return newTraceTree(col.Wait(t, 20*time.Second, n, func(x otlptest.Span) bool { return x.TraceID == s.TraceID }))
}

// One MCP call is one trace: the agent's sidecar starts it (egress), inventory's sidecar
// continues it (ingress) with a child span per ext_authz Check and ext_proc stream, and
// mcpgate's decisions are children of those, with the decision's attributes. A denied
// call's trace carries the denial reason; the decision log names the trace.
func TestTracingThroughTheMesh(t *testing.T) {
	col := otlptest.Start(t)
	m := tracedMesh(t, col, "1")
	resp, body := m.post(t, m.token(t, nil), initialize)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("initialize: %d %s", resp.StatusCode, body)
	}
	tt := waitTrace(t, col, 6, func(s otlptest.Span) bool {
		return s.Name == "mcpgate ext_proc" && s.Attrs["mcp.method.name"] == "initialize"
	})
	t.Logf("the trace of initialize:\n%s", tt)
	if len(tt.roots) != 1 {
		t.Fatalf("%d roots, want one trace from the agent's sidecar:\n%s", len(tt.roots), tt)
	}
	egress := tt.roots[0]
	if egress.Service != "my-agent-envoy" || !strings.HasPrefix(egress.Name, "egress ") || egress.Kind != "Client" || egress.Attrs["http.status_code"] != "200" {
		t.Errorf("root span %+v: want my-agent-envoy's egress client span, 200", egress)
	}
	ingress := tt.child(t, egress, "inventory-envoy", "ingress")
	if ingress.Kind != "Server" || ingress.Attrs["http.method"] != "POST" || ingress.Attrs["node_id"] == "" || ingress.Attrs["guid:x-request-id"] == "" {
		t.Errorf("inventory-envoy's ingress span: %+v", ingress)
	}
	asyncCheck := tt.child(t, ingress, "inventory-envoy", "async envoy.service.auth.v3.Authorization.Check egress")
	check := tt.child(t, asyncCheck, "mcpgate", "mcpgate ext_authz Check")
	if check.Attrs["mcpgate.decision"] != "allow" || check.Attrs["mcpgate.target.app_id"] != "inventory" || check.Attrs["mcpgate.caller.app_id"] != "my-agent" ||
		asyncCheck.Attrs["grpc.status_code"] != "0" || asyncCheck.Attrs["upstream_cluster"] == "" {
		t.Errorf("Check spans: %+v under %+v", check, asyncCheck)
	}
	asyncProc := tt.child(t, ingress, "inventory-envoy", "async envoy.service.ext_proc.v3.ExternalProcessor.Process egress")
	proc := tt.child(t, asyncProc, "mcpgate", "mcpgate ext_proc")
	if proc.Attrs["mcpgate.caller.app_id"] != "my-agent" || proc.Attrs["mcpgate.decision"] != "allow" || proc.Attrs["mcpgate.decision_id"] == "" {
		t.Errorf("ext_proc span: %+v", proc)
	}
	requireEventually(t, 10*time.Second, "the decision log names the Check's trace", func() bool {
		return m.gate.logs.find(func(l map[string]any) bool {
			return l["msg"] == "authz decision" && l["trace_id"] == check.TraceID && l["span_id"] == check.SpanID
		}) != nil
	})

	// Denied: no token. inventory's sidecar answers 401 from mcpgate's Check.
	resp, body = m.post(t, "", initialize)
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("initialize without a token: %d %s", resp.StatusCode, body)
	}
	denied := waitTrace(t, col, 4, func(s otlptest.Span) bool {
		return s.Name == "mcpgate ext_authz Check" && s.Attrs["mcpgate.reason"] == "token_missing"
	})
	t.Logf("the trace of a call without a token:\n%s", denied)
	if len(denied.roots) != 1 || denied.roots[0].Service != "my-agent-envoy" {
		t.Fatalf("denied call's trace:\n%s", denied)
	}
	din := denied.child(t, denied.roots[0], "inventory-envoy", "ingress")
	dcheck := denied.child(t, denied.child(t, din, "inventory-envoy", "async envoy.service.auth.v3.Authorization.Check"), "mcpgate", "mcpgate ext_authz Check")
	if din.Attrs["http.status_code"] != "401" || dcheck.Status != "Error" || dcheck.Attrs["mcpgate.decision"] != "deny" {
		t.Errorf("denied call: ingress %+v, Check %+v", din, dcheck)
	}
}

// samplingRate 0: the sidecars start no sampled trace, so neither they nor mcpgate
// export a span, and calls still succeed. A marker call whose caller sends a sampled
// traceparent (kept whatever the rate, as Envoy does) shows that spans would have come.
func TestTracingSamplingZero(t *testing.T) {
	col := otlptest.Start(t)
	m := tracedMesh(t, col, "0")
	for i := 0; i < 3; i++ {
		if resp, body := m.post(t, m.token(t, nil), initialize); resp.StatusCode != http.StatusOK {
			t.Fatalf("initialize: %d %s", resp.StatusCode, body)
		}
	}
	const marker = "0af7651916cd43dd8448eb211c80319c"
	req := mcpPost(t, m.invokeURL, m.token(t, nil), initialize)
	req.Header.Set("traceparent", "00-"+marker+"-b7ad6b7169203331-01")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("marker initialize: %d", resp.StatusCode)
	}
	tt := waitTrace(t, col, 6, func(s otlptest.Span) bool { return s.TraceID == marker && s.Name == "mcpgate ext_proc" })
	for _, s := range col.Spans() {
		if s.TraceID != marker {
			t.Errorf("samplingRate 0 exported a span of another trace: %+v", s)
		}
	}
	if root := tt.roots[0]; len(tt.roots) != 1 || root.ParentID != "b7ad6b7169203331" || root.Service != "my-agent-envoy" {
		t.Errorf("the marker trace should hang under the caller's span:\n%s", tt)
	}
}
