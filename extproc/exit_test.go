package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/policy"
)

// TestOneExit: only refuse answers a request itself, and only refuse and admit record
// decisions. A new exit that answers or records on its own fails here.
func TestOneExit(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	allowed := map[string]map[string]bool{
		"immediate": {"refuse": true},
		"Add":       {"refuse": true, "admit": true}, // s.records.Add
	}
	fset := token.NewFileSet()
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				continue
			}
			ast.Inspect(fn.Body, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				callers, watched := allowed[sel.Sel.Name]
				if !watched {
					return true
				}
				if sel.Sel.Name == "Add" {
					if inner, ok := sel.X.(*ast.SelectorExpr); !ok || inner.Sel.Name != "records" {
						return true
					}
				}
				checked++
				if !callers[fn.Name.Name] {
					t.Errorf("%s: %s calls %s: every answer and record goes through refuse or admit", fset.Position(call.Pos()), fn.Name.Name, sel.Sel.Name)
				}
				return true
			})
		}
	}
	if checked < 3 {
		t.Fatalf("found %d calls to check: the test no longer sees the code it guards", checked)
	}
}

// TestEveryExitRecordsOnce drives each way a request ends and checks the answer's status
// and that exactly one decision line names the rule that ended it.
func TestEveryExitRecordsOnce(t *testing.T) {
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	var buf lockedBuffer
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	s, err := NewServer(Options{Store: policy.NewStore(snap), DecisionLog: zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zap.InfoLevel))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	customer := call(4, "get_customer", `{"id":"c1"}`)
	cases := []struct {
		name   string
		req    envoyRequest
		up     envoyUpstream
		status int // 0: forwarded
		rule   string
		lines  int // decision lines (default 1)
	}{
		{"allowed", envoyRequest{md: agentMD, body: call(1, "get_inventory", `{"product_id":"SKU-1"}`)}, envoyUpstream{}, 0, "readers", 1},
		{"denied by rule", envoyRequest{md: agentMD, body: call(2, "delete_product", `{}`)}, envoyUpstream{}, 200, "no-deletes", 1},
		{"denied by rego", envoyRequest{md: agentMD, body: call(3, "get_inventory", `{"product_id":"bad id"}`)}, envoyUpstream{}, 200, "rego", 1},
		{"denied on the Mcp-Method header", envoyRequest{md: agentMD, body: call(2, "delete_product", `{}`), headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "delete_product"}}, envoyUpstream{}, 403, "no-deletes", 1},
		{"no metadata", envoyRequest{body: customer}, envoyUpstream{}, 403, ruleIdentity, 1},
		{"no mcp policy", envoyRequest{md: metadata("github-mcp", "my-agent"), body: customer}, envoyUpstream{}, 403, ruleIdentity, 1},
		{"method", envoyRequest{md: agentMD, method: "PUT"}, envoyUpstream{}, 405, ruleProtocol, 1},
		{"content type", envoyRequest{md: agentMD, body: customer, contentType: "text/plain"}, envoyUpstream{}, 415, ruleContentType, 1},
		{"malformed", envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":1,"method":`}, envoyUpstream{}, 400, ruleParse, 1},
		{"header mismatch", envoyRequest{md: agentMD, body: customer, headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "get_inventory"}}, envoyUpstream{}, 400, ruleHeaders, 1},
		{"session", envoyRequest{md: agentMD, body: customer, headers: []string{"mcp-session-id", "forged"}}, envoyUpstream{}, 404, ruleSession, 1},
		{"task", envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":5,"method":"tasks/get","params":{"taskId":"nobody-made-it"}}`}, envoyUpstream{}, 200, ruleTask, 1},
		{"batch", envoyRequest{md: agentMD, body: "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(2, "delete_product", `{}`) + "]"}, envoyUpstream{}, 200, ruleBatch, 2},
		{"response unreadable", envoyRequest{md: agentMD, body: customer}, envoyUpstream{contentType: "application/json", headers: []string{"content-encoding", "gzip"}, chunks: []string{"x"}}, 502, ruleResponse, 2},
		{"GET", envoyRequest{md: agentMD, method: "GET"}, envoyUpstream{}, 0, ruleProtocol, 1},
		{"too large", envoyRequest{md: agentMD, body: call(6, "get_inventory", `{"product_id":"`+strings.Repeat("x", 1<<20)+`"}`)}, envoyUpstream{}, 413, ruleTooLarge, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s.Flush()
			before := len(strings.Split(strings.TrimSpace(buf.String()), "\n"))
			if buf.String() == "" {
				before = 0
			}
			res := runEnvoy(t, s, c.req, c.up)
			got := 0
			if res.immediate != nil {
				got = int(res.immediate.GetStatus().GetCode())
				if !json.Valid(res.immediate.GetBody()) {
					t.Errorf("answer body is not JSON: %q", res.immediate.GetBody())
				}
			}
			if got != c.status {
				t.Fatalf("status %d, want %d (%s)", got, c.status, res.immediate.GetBody())
			}
			s.Flush()
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")[before:]
			if len(lines) != c.lines {
				t.Fatalf("%d decision lines, want %d:\n%s", len(lines), c.lines, strings.Join(lines, "\n"))
			}
			found := false
			for _, l := range lines {
				var m map[string]any
				if err := json.Unmarshal([]byte(l), &m); err != nil {
					t.Fatal(err)
				}
				if m["rule"] == c.rule {
					found = true
					if c.status != 0 && fmt.Sprint(m["status"]) != fmt.Sprint(c.status) && m["decision"] == "deny" {
						t.Errorf("line %s: status %v, want %d", l, m["status"], c.status)
					}
				}
			}
			if !found {
				t.Errorf("no line with rule %q:\n%s", c.rule, strings.Join(lines, "\n"))
			}
		})
	}
}

// Error bodies are JSON whatever the reason holds.
func FuzzErrorBodies(f *testing.F) {
	for _, s := range []string{"plain", `quote " and \ backslash`, "ctl \x00\x1f\x7f", "bad utf-8 \xff\xfe", "line\u2028sep\u2029", "\"}],{"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, reason string) {
		var v map[string]any
		if err := json.Unmarshal(httpErrorBody("access_denied", reason, "id"), &v); err != nil {
			t.Fatalf("httpErrorBody(%q): %v", reason, err)
		}
		if v["error"] != "access_denied" || v["decision_id"] != "id" || len(v) != 3 {
			t.Fatalf("httpErrorBody(%q) = %v", reason, v)
		}
		if err := json.Unmarshal(errorResponse(nil, -32600, reason), &v); err != nil {
			t.Fatalf("errorResponse(%q): %v", reason, err)
		}
		if strings.ToValidUTF8(reason, "\uFFFD") == reason && v["error"].(map[string]any)["message"] != reason {
			t.Fatalf("errorResponse(%q) message = %q", reason, v["error"].(map[string]any)["message"])
		}
	})
}
