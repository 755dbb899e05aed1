package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/tester"
	"github.com/open-policy-agent/opa/v1/topdown"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mcpgate/mcpgate/policy"
)

// TestDemoRegoPolicy runs the demo policy's own Rego tests (test_* rules), as `opa test`
// does, so they run in CI without the opa binary.
func TestDemoRegoPolicy(t *testing.T) {
	files, err := filepath.Glob("../testdata/demo/rego/*.rego")
	if err != nil || len(files) < 2 {
		t.Fatalf("rego files: %v %v", files, err)
	}
	modules := map[string]*ast.Module{}
	for _, f := range files {
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m, err := ast.ParseModuleWithOpts(f, string(src), ast.ParserOptions{RegoVersion: ast.RegoV1})
		if err != nil {
			t.Fatal(err)
		}
		modules[f] = m
	}
	ch, err := tester.NewRunner().SetModules(modules).RunTests(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for r := range ch {
		n++
		if r.Fail || r.Error != nil {
			t.Errorf("%s: failed (%v)", r.Name, r.Error)
		}
	}
	if n < 8 {
		t.Fatalf("ran %d Rego tests, want the 8+ in inventory_test.rego", n)
	}
}

// TestRegoInputShape pins the input document: it is a contract with users' policies.
func TestRegoInputShape(t *testing.T) {
	r := &Request{
		Caller:          policy.Caller{AppID: "my-agent", Namespace: "default", TrustDomain: "example.org"},
		SpiffeID:        "spiffe://example.org/ns/default/my-agent",
		Subject:         "alice",
		Scopes:          []string{"mcp:tools"},
		ClaimsJSON:      `{"sub":"alice","tier":"gold","n":1}`,
		Target:          "inventory",
		Method:          "tools/call",
		Tool:            "get_inventory",
		Arguments:       map[string]any{"product_id": "SKU-1", "qty": json.Number("2")},
		ID:              json.Number("7"),
		ProtocolVersion: "2025-06-18",
		SessionID:       "sess-1",
		HTTPMethod:      "POST",
		Path:            "/mcp",
		Headers:         map[string]string{"content-type": "application/json"},
	}
	got, err := json.Marshal(RegoInput(r))
	if err != nil {
		t.Fatal(err)
	}
	want := `{
	  "caller": {"app_id": "my-agent", "namespace": "default", "spiffe_id": "spiffe://example.org/ns/default/my-agent"},
	  "subject": {"sub": "alice", "scopes": ["mcp:tools"], "claims": {"sub": "alice", "tier": "gold", "n": 1}},
	  "target": {"app_id": "inventory"},
	  "mcp": {"method": "tools/call", "tool": "get_inventory", "arguments": {"product_id": "SKU-1", "qty": 2}, "id": 7,
	          "protocol_version": "2025-06-18", "session_id": "sess-1"},
	  "http": {"method": "POST", "path": "/mcp", "headers": {"content-type": "application/json"}}
	}`
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("input document:\n%s\nwant:\n%s", got, want)
	}
}

// TestRegoFailsClosed: an undefined decision, a non-object, an evaluation error and a
// malformed patch each deny.
func TestRegoFailsClosed(t *testing.T) {
	for name, src := range map[string]string{
		"undefined":      "package mcpgate\n\ndecision := {\"allow\": true} if input.nope == 1\n",
		"not an object":  "package mcpgate\n\ndecision := true\n",
		"allow not true": "package mcpgate\n\ndecision := {\"allow\": \"yes\"}\n",
		"eval error":     "package mcpgate\n\ndecision := {\"allow\": to_number(\"x\") > 0}\n",
		"bad patch":      "package mcpgate\n\ndecision := {\"allow\": true, \"patch\": [{\"op\": \"move\", \"path\": \"/a\"}]}\n",
		"bad redact":     "package mcpgate\n\ndecision := {\"allow\": true, \"redact\": [\"ssn\"]}\n",
	} {
		t.Run(name, func(t *testing.T) {
			m := loadWithRego(t, src)
			d := Decide(context.Background(), m, &Request{Caller: policy.Caller{AppID: "a"}, Method: "tools/call", Tool: "t"})
			if d.Allow || d.Rule != "rego" || d.Reason == "" {
				t.Fatalf("decision = %+v, want a rego denial with a reason", d)
			}
		})
	}
}

func loadWithRego(t testing.TB, src string) *policy.MCP {
	t.Helper()
	return loadSnapWithRego(t, src).App("app").MCP
}

// loadSnapWithRego loads a one-app policy ("app", tools allowed by default, then src).
func loadSnapWithRego(t testing.TB, src string) *policy.Snapshot {
	t.Helper()
	return loadFiles(t, map[string]string{
		"app.yaml": "apiVersion: mcpgate.dev/v1alpha1\nkind: App\nmetadata: {name: app}\nspec:\n  address: app:1\n  sidecar: {address: s, inboundPort: 1, outboundPort: 2}\n  mcp: {tools: {defaultAction: allow, rego: p.rego}}\n",
		"p.rego":   src,
	})
}

// loadFiles loads a policy directory of files (name → content), with a minimal Mesh
// unless files has its own mesh.yaml.
func loadFiles(t testing.TB, files map[string]string) *policy.Snapshot {
	t.Helper()
	dir := t.TempDir()
	if _, ok := files["mesh.yaml"]; !ok {
		files["mesh.yaml"] = "apiVersion: mcpgate.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {trustDomain: example.org, mtls: disabled, authz: {address: \"a:1\"}}\n"
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// TestLargeListDecidedConcurrently: a list long enough to be decided on several
// goroutines gets, entry by entry, the decision Decide makes for it alone, and a second
// listing is served from the cache with the same answers.
func TestLargeListDecidedConcurrently(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(4))
	const n = 300
	if listWorkers(n) < 2 {
		t.Fatalf("listWorkers(%d) = %d: the concurrent path would not run", n, listWorkers(n))
	}
	snap := loadSnapWithRego(t, "package mcpgate\n\ndefault decision := {\"allow\": false, \"reason\": \"odd\"}\n\n"+
		"decision := {\"allow\": true} if regex.match(`[02468]$`, input.mcp.tool)\n")
	srv, err := NewServer(Options{Store: policy.NewStore(snap)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	req := Request{Caller: policy.Caller{AppID: "a", Namespace: "default"}, Target: "app", Method: "tools/list"}
	st := &stream{s: srv, snap: snap, app: snap.App("app"), req: req}
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("tool_%d", i)
	}
	decide := st.listFilter(context.Background(), "tools/list")
	for round := range 2 {
		keep := decide(names)
		kept := 0
		for i, name := range names {
			r := req
			r.Method, r.Tool, r.Listing = "tools/call", name, true
			if want := Decide(context.Background(), snap.App("app").MCP, &r).Allow; keep[i] != want {
				t.Fatalf("round %d: %s kept=%v, Decide says %v", round, name, keep[i], want)
			}
			if keep[i] {
				kept++
			}
		}
		if kept != n/2 {
			t.Fatalf("round %d: kept %d of %d", round, kept, n)
		}
	}
}

// TestRegoInputValueMatchesDocument: the fast OPA-value input is the documented one.
func TestRegoInputValueMatchesDocument(t *testing.T) {
	r := &Request{
		Caller: policy.Caller{AppID: "my-agent", Namespace: "default"}, SpiffeID: "spiffe://example.org/ns/default/my-agent",
		Subject: "alice", Scopes: []string{"a", "b"}, ClaimsJSON: `{"tier":"gold","n":1.5}`, Target: "inventory",
		Method: "prompts/get", Prompt: "p", Arguments: map[string]any{"x": json.Number("12345678901234567890")},
		ID: "abc", Listing: true, HTTPMethod: "POST", Path: "/mcp", Headers: map[string]string{"accept": "x"},
	}
	fast, err := regoInputValue(r)
	if err != nil {
		t.Fatal(err)
	}
	slow, err := ast.InterfaceToValue(RegoInput(r))
	if err != nil {
		t.Fatal(err)
	}
	if fast.Compare(slow) != 0 {
		t.Fatalf("fast input %v\nslow input %v", fast, slow)
	}
}

// TestRegoEvaluationCancelledWithStream: an evaluation runs under its stream's canceller,
// so one whose stream has ended stops and fails closed instead of running on.
func TestRegoEvaluationCancelledWithStream(t *testing.T) {
	m := loadWithRego(t, "package mcpgate\n\ndecision := {\"allow\": true}\n")
	r := &Request{Caller: policy.Caller{AppID: "a"}, Method: "tools/call", Tool: "t"}
	r.base = newRegoBase(r, nil)
	r.base.cancel = topdown.NewCancel()
	if d := Decide(context.Background(), m, r); !d.Allow {
		t.Fatalf("before the stream ended: %+v", d)
	}
	r.base.cancel.Cancel()
	d := Decide(context.Background(), m, r)
	if d.Allow || !strings.Contains(d.Reason, "cancel") {
		t.Fatalf("after the stream ended: %+v", d)
	}
}

// A result that is not the term OPA returns with EvalRuleTerms-style options (a plain Go
// value, a nil term) is a denial, never a panic.
func TestDecisionObjectOfOddResults(t *testing.T) {
	for name, rs := range map[string]rego.ResultSet{
		"empty":      nil,
		"no exprs":   {{}},
		"nil term":   {{Expressions: []*rego.ExpressionValue{{Value: (*ast.Term)(nil)}}}},
		"go value":   {{Expressions: []*rego.ExpressionValue{{Value: map[string]any{"allow": true}}}}},
		"not object": {{Expressions: []*rego.ExpressionValue{{Value: ast.BooleanTerm(true)}}}},
		"nil value":  {{Expressions: []*rego.ExpressionValue{{Value: nil}}}},
	} {
		if obj, why := decisionObject(rs); obj != nil || why == "" {
			t.Errorf("%s: object %v, reason %q", name, obj, why)
		}
	}
	obj, why := decisionObject(rego.ResultSet{{Expressions: []*rego.ExpressionValue{{Value: ast.ObjectTerm(ast.Item(ast.StringTerm("allow"), ast.BooleanTerm(true)))}}}})
	if obj == nil || why != "" {
		t.Errorf("an object: %v %q", obj, why)
	}
}

// Rego input caches belong to their Server, and their sizes are in metrics.
func TestRegoCachesPerServer(t *testing.T) {
	a, reader := newMeteredDemoServer(t)
	b := newDemoServer(t)
	runEnvoy(t, a, envoyRequest{md: agentMD, body: call(1, "get_inventory", `{"product_id":"SKU-1"}`)}, envoyUpstream{})
	if a.rego.identities.len() != 1 || a.rego.targets.len() != 1 {
		t.Fatalf("server a caches %d identities, %d targets; want 1 each", a.rego.identities.len(), a.rego.targets.len())
	}
	if b.rego.identities.len() != 0 || b.rego.targets.len() != 0 {
		t.Fatalf("server b shares server a's caches")
	}
	got := map[string]int64{}
	gauge, _ := collectMetric(t, reader, "mcpgate.mcp.cache.entries").(metricdata.Gauge[int64])
	for _, p := range gauge.DataPoints {
		c, _ := p.Attributes.Value("cache")
		got[c.AsString()] = p.Value
	}
	if got["rego_identities"] != 1 || got["rego_targets"] != 1 || got["ratelimit_buckets"] < 1 {
		t.Errorf("cache entries in metrics: %v", got)
	}
}
