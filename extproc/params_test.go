package extproc

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/policy"
)

// annotatedList is a tools/list answer whose get_inventory mirrors two arguments, one of
// them nested, into Mcp-Param-* headers.
const annotatedList = `{"jsonrpc":"2.0","id":2,"result":{"tools":[` +
	`{"name":"get_inventory","inputSchema":{"type":"object","properties":{` +
	`"product_id":{"type":"string","x-mcp-header":"Product"},` +
	`"where":{"type":"object","properties":{"shelf":{"type":"integer","x-mcp-header":"Shelf"}}},` +
	`"note":{"type":"string"}}}},` +
	`{"name":"list_items","inputSchema":{"type":"object"}}]}}`

var era2026 = []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "get_inventory"}

func TestParseParamBindings(t *testing.T) {
	tp := parseParamBindings(json.RawMessage(`{"type":"object","properties":{"a":{"type":"string","x-mcp-header":"A"},` +
		`"o":{"type":"object","properties":{"b":{"type":"boolean","x-mcp-header":"B-2"}}}}}`))
	got := map[string]string{}
	for _, b := range tp.bindings {
		got[b.header] = strings.Join(b.path, ".")
	}
	if tp.invalid || len(got) != 2 || got["mcp-param-a"] != "a" || got["mcp-param-b-2"] != "o.b" {
		t.Fatalf("bindings = %v (invalid %v)", got, tp.invalid)
	}
	for name, schema := range map[string]string{
		"object property": `{"properties":{"a":{"type":"object","x-mcp-header":"A"}}}`,
		"not a token":     `{"properties":{"a":{"type":"string","x-mcp-header":"A B"}}}`,
		"empty":           `{"properties":{"a":{"type":"string","x-mcp-header":""}}}`,
		"not a string":    `{"properties":{"a":{"type":"string","x-mcp-header":7}}}`,
		"duplicate":       `{"properties":{"a":{"type":"string","x-mcp-header":"X"},"b":{"type":"string","x-mcp-header":"x"}}}`,
	} {
		if tp := parseParamBindings(json.RawMessage(schema)); !tp.invalid || tp.bindings != nil {
			t.Errorf("%s: %+v, want invalid without bindings", name, tp)
		}
	}
}

// TestParamHeadersChecked: once a list showed get_inventory's annotations, a 2026-07-28
// call must mirror exactly the annotated arguments; every disagreement is -32020 before
// anything is decided, and headers nothing validated do not reach the server.
func TestParamHeadersChecked(t *testing.T) {
	s := newDemoServer(t)
	// Before any list: the headers pass to the server, which checks them itself.
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: call(1, "get_inventory", `{"product_id":"SKU-1"}`),
		headers: append(slices.Clone(era2026), "mcp-param-product", "SKU-9")}, envoyUpstream{})
	if res.immediate != nil || slices.Contains(res.requestRemove, "mcp-param-product") {
		t.Fatalf("unknown annotations: answered %v, removed %v", res.immediate, res.requestRemove)
	}
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`,
		headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/list"}},
		envoyUpstream{contentType: "application/json", chunks: []string{annotatedList}})
	if res.immediate != nil {
		t.Fatalf("list: %s", res.immediate.GetBody())
	}

	for _, tc := range []struct {
		name, args string
		headers    []string
		mismatch   string // in the -32020 message; "" when forwarded
		removed    []string
	}{
		{name: "both mirrored", args: `{"product_id":"SKU-1","where":{"shelf":4}}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-shelf", "4"}},
		{name: "base64", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "=?base64?U0tVLTE=?="}},
		{name: "integers numerically", args: `{"product_id":"SKU-1","where":{"shelf":4.0}}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-shelf", "4"}},
		{name: "null argument, no header", args: `{"product_id":"SKU-1","where":{"shelf":null}}`, headers: []string{"mcp-param-product", "SKU-1"}},
		{name: "unannotated header removed", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-note", "x"}, removed: []string{"mcp-param-note"}},
		{name: "different value", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "SKU-2"}, mismatch: "Mcp-Param-Product does not match"},
		{name: "literal not decoded", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "=?base64?U0tVLTE="}, mismatch: "does not match"},
		{name: "missing header", args: `{"product_id":"SKU-1","where":{"shelf":4}}`, headers: []string{"mcp-param-product", "SKU-1"}, mismatch: `missing Mcp-Param-Shelf for argument \"where.shelf\"`},
		{name: "header without argument", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-shelf", "4"}, mismatch: "absent or null"},
		{name: "sent twice", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-product", "SKU-1"}, mismatch: "more than once"},
		{name: "bad base64", args: `{"product_id":"SKU-1"}`, headers: []string{"mcp-param-product", "=?base64?!!?="}, mismatch: "not valid"},
		{name: "wrong shelf", args: `{"product_id":"SKU-1","where":{"shelf":4}}`, headers: []string{"mcp-param-product", "SKU-1", "mcp-param-shelf", "5"}, mismatch: "does not match"},
	} {
		res := runEnvoy(t, s, envoyRequest{md: agentMD, body: call(3, "get_inventory", tc.args), headers: append(slices.Clone(era2026), tc.headers...)}, envoyUpstream{})
		if tc.mismatch == "" {
			if res.immediate != nil {
				t.Errorf("%s: answered %s", tc.name, res.immediate.GetBody())
			}
			for _, h := range tc.removed {
				if !slices.Contains(res.requestRemove, h) {
					t.Errorf("%s: %s reaches the server (removed %v)", tc.name, h, res.requestRemove)
				}
			}
			if slices.Contains(res.requestRemove, "mcp-param-product") {
				t.Errorf("%s: a validated header was removed", tc.name)
			}
			continue
		}
		if res.immediate == nil || res.immediate.GetStatus().GetCode() != 400 {
			t.Errorf("%s: forwarded, want 400 -32020", tc.name)
			continue
		}
		body := string(res.immediate.GetBody())
		if !strings.Contains(body, "-32020") || !strings.Contains(body, tc.mismatch) {
			t.Errorf("%s: %s, want -32020 saying %q", tc.name, body, tc.mismatch)
		}
	}

	// A method without annotations: its Mcp-Param-* headers are not forwarded.
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: call(4, "list_items", `{}`),
		headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "list_items", "mcp-param-product", "x"}}, envoyUpstream{})
	if res.immediate != nil || !slices.Contains(res.requestRemove, "mcp-param-product") {
		t.Errorf("unannotated tool: answered %v, removed %v", res.immediate, res.requestRemove)
	}
	// A legacy request is never checked: the headers are only removed.
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: call(5, "get_inventory", `{"product_id":"SKU-1"}`),
		headers: []string{"mcp-protocol-version", "2025-11-25", "mcp-param-product", "SKU-2"}}, envoyUpstream{})
	if res.immediate != nil || !slices.Contains(res.requestRemove, "mcp-param-product") {
		t.Errorf("legacy: answered %v, removed %v", res.immediate, res.requestRemove)
	}
}

// loadPlainApp loads a one-app policy ("app") whose responses mcpgate does not filter,
// with extra under spec.mcp.tools.
func loadPlainApp(t *testing.T, tools string) *Server {
	t.Helper()
	snap := loadFiles(t, map[string]string{
		"app.yaml": "apiVersion: mcpgate.dev/v1alpha1\nkind: App\nmetadata: {name: app}\nspec:\n  address: app:1\n  sidecar: {address: s, inboundPort: 1, outboundPort: 2}\n  mcp: {tools: {defaultAction: allow" + tools + "}}\n",
		"p.rego": "package mcpgate\n\ndecision := {\"allow\": true, \"patch\": [{\"op\": \"replace\", \"path\": \"/region\", \"value\": \"eu-west1\"}]} if input.mcp.arguments.region\n" +
			"decision := {\"allow\": true} if not input.mcp.arguments.region\n",
	})
	s, err := NewServer(Options{Store: policy.NewStore(snap)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

const regionList = `{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"run","inputSchema":{"type":"object","properties":{` +
	`"region":{"type":"string","x-mcp-header":"Region"}}}}]}}`

var appMD = metadata("app", "my-agent", "mcp:tools")

// TestParamAnnotationsLearnedUnfiltered: for an app whose responses mcpgate does not
// filter, a 2026-07-28 tools/list is still read (uncompressed, unchanged) to learn the
// annotations; one it cannot read passes unchanged; a legacy list is not read at all.
func TestParamAnnotationsLearnedUnfiltered(t *testing.T) {
	s := loadPlainApp(t, "")
	list := envoyRequest{md: appMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`}
	legacy := list
	legacy.headers = []string{"mcp-protocol-version", "2025-11-25"}
	if res := runEnvoy(t, s, legacy, envoyUpstream{contentType: "application/json", chunks: []string{regionList}}); res.immediate != nil ||
		slices.Contains(res.requestRemove, "accept-encoding") || s.params.tools["app"] != nil {
		t.Fatalf("legacy list: answered %v, removed %v, learned %v", res.immediate, res.requestRemove, s.params.tools)
	}
	current := list
	current.headers = []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/list"}
	res := runEnvoy(t, s, current, envoyUpstream{contentType: "application/json", chunks: []string{"\x1f\x8b not json"}, headers: []string{"content-encoding", "gzip"}})
	if res.immediate != nil || res.clientBody != "\x1f\x8b not json" {
		t.Fatalf("compressed list: answered %v, client got %q", res.immediate, res.clientBody)
	}
	res = runEnvoy(t, s, current, envoyUpstream{contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":2,"result":{"tools":[`}})
	if res.immediate != nil || res.clientBody != `{"jsonrpc":"2.0","id":2,"result":{"tools":[` {
		t.Fatalf("unreadable list: answered %v, client got %q", res.immediate, res.clientBody)
	}
	res = runEnvoy(t, s, current, envoyUpstream{contentType: "text/event-stream", chunks: []string{"event: message\ndata: " + regionList + "\n\n"}})
	if res.immediate != nil || !slices.Contains(res.requestRemove, "accept-encoding") || !strings.Contains(res.clientBody, regionList) {
		t.Fatalf("list: answered %v, removed %v, client got %q", res.immediate, res.requestRemove, res.clientBody)
	}
	if tp, ok := s.params.lookup("app", "run"); !ok || len(tp.bindings) != 1 {
		t.Fatalf("annotations of run not learned: %+v %v", tp, ok)
	}
	res = runEnvoy(t, s, envoyRequest{md: appMD, body: call(3, "run", `{"region":"us-east1"}`),
		headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "run"}}, envoyUpstream{})
	if res.immediate == nil || !strings.Contains(string(res.immediate.GetBody()), "missing Mcp-Param-Region") {
		t.Fatalf("call without its header: %v", res.immediate)
	}
}

// TestParamHeadersFollowPatches: a Rego patch that changes an annotated argument
// rewrites its header, so the server never sees a disagreement mcpgate made.
func TestParamHeadersFollowPatches(t *testing.T) {
	s := loadPlainApp(t, ", rego: p.rego")
	res := runEnvoy(t, s, envoyRequest{md: appMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`,
		headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/list"}},
		envoyUpstream{contentType: "application/json", chunks: []string{regionList}})
	if res.immediate != nil {
		t.Fatalf("list: %s", res.immediate.GetBody())
	}
	res = runEnvoy(t, s, envoyRequest{md: appMD, body: call(3, "run", `{"region":"us-east1"}`),
		headers: []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "run", "mcp-param-region", "us-east1"}}, envoyUpstream{})
	if res.immediate != nil {
		t.Fatalf("patched call: %s", res.immediate.GetBody())
	}
	if !strings.Contains(res.forwardedBody, `"eu-west1"`) || res.requestSet["Mcp-Param-Region"] != "eu-west1" {
		t.Fatalf("server got body %s with header %q (set %v)", res.forwardedBody, res.requestSet["Mcp-Param-Region"], res.requestSet)
	}
}

// TestParamLearnSkipsOnlyWhatCannotBind: the fast path that skips tools without the
// annotation's name still learns an annotation spelled with escapes, and records that a
// tool lost its annotations.
func TestParamLearnSkipsOnlyWhatCannotBind(t *testing.T) {
	p := &paramState{tools: map[string]map[string]toolParams{}}
	p.learn("app", []string{"a", "b"}, [][]byte{
		[]byte(`{"name":"a","inputSchema":{"properties":{"q":{"type":"string","x\u002dmcp-header":"Q"}}}}`),
		[]byte(`{"name":"b","inputSchema":{"properties":{"q":{"type":"string","x-mcp-header":"Q"}}}}`),
	})
	for _, name := range []string{"a", "b"} {
		if tp, ok := p.lookup("app", name); !ok || len(tp.bindings) != 1 {
			t.Fatalf("%s: %+v %v", name, tp, ok)
		}
	}
	p.learn("app", []string{"b"}, [][]byte{[]byte(`{"name":"b","inputSchema":{"properties":{"q":{"type":"string"}}}}`)})
	if tp, ok := p.lookup("app", "b"); !ok || len(tp.bindings) != 0 {
		t.Fatalf("b after losing its annotation: %+v %v", tp, ok)
	}
}
