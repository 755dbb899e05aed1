package mcpapp

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t *testing.T, ctx context.Context, o ConnectOptions) *ClientSession {
	t.Helper()
	cs, err := ConnectWith(ctx, o)
	if err != nil {
		t.Fatalf("connect %s: %v", o.Endpoint, err)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs
}

func TestTools(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint()})

	names, err := cs.ToolNames(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{ToolDeleteProduct, ToolGetCustomer, ToolGetInventory, ToolListItems, ToolSlowReport}
	if diff := cmp.Diff(want, names); diff != "" {
		t.Errorf("tools/list (-want +got):\n%s", diff)
	}

	// get_inventory: text + structuredContent.
	res, err := cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "widget-1"})
	if err != nil || res.IsError {
		t.Fatalf("get_inventory: %v %v", err, Text(res))
	}
	var inv InventoryResult
	if err := Structured(res, &inv); err != nil {
		t.Fatal(err)
	}
	if inv != (InventoryResult{ProductID: "widget-1", Quantity: 42}) {
		t.Errorf("get_inventory structured = %+v", inv)
	}
	if got := Text(res); got != "widget-1: 42 in stock" {
		t.Errorf("get_inventory text = %q", got)
	}

	// list_items echoes the limit it received.
	res, err = cs.CallTool(ctx, ToolListItems, map[string]any{"limit": 3, "cursor": "item-5"})
	if err != nil || res.IsError {
		t.Fatalf("list_items: %v %v", err, Text(res))
	}
	var li ListItemsResult
	if err := Structured(res, &li); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(ListItemsResult{Limit: 3, Cursor: "item-5", Items: []string{"item-5", "item-6", "item-7"}, NextCursor: "item-8"}, li); diff != "" {
		t.Errorf("list_items (-want +got):\n%s", diff)
	}
	res, err = cs.CallTool(ctx, ToolListItems, map[string]any{})
	if err != nil || res.IsError {
		t.Fatalf("list_items {}: %v %v", err, Text(res))
	}
	li = ListItemsResult{}
	if err := Structured(res, &li); err != nil {
		t.Fatal(err)
	}
	if li.Limit != 0 || len(li.Items) != DefaultListLimit {
		t.Errorf("list_items {}: limit %d, %d items", li.Limit, len(li.Items))
	}

	// delete_product deletes.
	res, err = cs.CallTool(ctx, ToolDeleteProduct, map[string]any{"product_id": "gizmo-3"})
	if err != nil || res.IsError {
		t.Fatalf("delete_product: %v %v", err, Text(res))
	}
	var del DeleteProductResult
	if err := Structured(res, &del); err != nil || !del.Deleted {
		t.Errorf("delete_product = %+v, %v", del, err)
	}
	if _, ok := s.Inventory("gizmo-3"); ok {
		t.Error("gizmo-3 still in inventory")
	}
	res, err = cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "gizmo-3"})
	if err != nil || !res.IsError {
		t.Errorf("get_inventory of a deleted product: err %v, isError %v", err, res != nil && res.IsError)
	}

	// get_customer: structuredContent and the same as JSON text.
	res, err = cs.CallTool(ctx, ToolGetCustomer, map[string]any{"id": "c-7"})
	if err != nil || res.IsError {
		t.Fatalf("get_customer: %v %v", err, Text(res))
	}
	var cust Customer
	if err := Structured(res, &cust); err != nil {
		t.Fatal(err)
	}
	if cust != CustomerFor("c-7") || cust.SSN == "" {
		t.Errorf("get_customer structured = %+v", cust)
	}
	var fromText Customer
	if err := json.Unmarshal([]byte(Text(res)), &fromText); err != nil || fromText != cust {
		t.Errorf("get_customer text %q: %+v, %v", Text(res), fromText, err)
	}

	// slow_report without a progress token still works.
	res, err = cs.CallTool(ctx, ToolSlowReport, map[string]any{"steps": 2})
	if err != nil || res.IsError {
		t.Fatalf("slow_report: %v %v", err, Text(res))
	}
	var sr SlowReportResult
	if err := Structured(res, &sr); err != nil || sr != (SlowReportResult{Steps: 2}) {
		t.Errorf("slow_report = %+v, %v", sr, err)
	}

	// Calls records exactly what ran, in order, with the arguments received.
	type call struct {
		Tool string
		Args map[string]any
	}
	var got []call
	for _, c := range s.Calls() {
		got = append(got, call{c.Tool, c.Args})
		if c.SessionID != cs.ID() || c.SessionID == "" {
			t.Errorf("call %s: session %q, client session %q", c.Tool, c.SessionID, cs.ID())
		}
	}
	wantCalls := []call{
		{ToolGetInventory, map[string]any{"product_id": "widget-1"}},
		{ToolListItems, map[string]any{"limit": 3.0, "cursor": "item-5"}},
		{ToolListItems, map[string]any{}},
		{ToolDeleteProduct, map[string]any{"product_id": "gizmo-3"}},
		{ToolGetInventory, map[string]any{"product_id": "gizmo-3"}},
		{ToolGetCustomer, map[string]any{"id": "c-7"}},
		{ToolSlowReport, map[string]any{"steps": 2.0}},
	}
	if diff := cmp.Diff(wantCalls, got, cmpopts.EquateEmpty()); diff != "" {
		t.Errorf("Calls (-want +got):\n%s", diff)
	}
	if n := s.CallsTo(ToolListItems); n != 2 {
		t.Errorf("CallsTo(list_items) = %d", n)
	}
}

// A call the SDK rejects before the handler runs reaches the server (it is in
// Requests) but is not in Calls; a tool never called has no calls.
func TestCallsOnlyWhatRan(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint()})

	res, err := cs.CallTool(ctx, ToolDeleteProduct, map[string]any{"product_id": "widget-1", "force": true})
	if err != nil {
		t.Fatal(err)
	}
	if !res.IsError {
		t.Fatalf("unknown argument accepted: %s", Text(res))
	}
	if n := s.CallsTo(ToolDeleteProduct); n != 0 {
		t.Errorf("CallsTo(delete_product) = %d after a rejected call", n)
	}
	if _, ok := s.Inventory("widget-1"); !ok {
		t.Error("widget-1 deleted by a rejected call")
	}
	if reqs := s.RequestsFor("tools/call", ToolDeleteProduct); len(reqs) != 1 {
		t.Errorf("RequestsFor(tools/call, delete_product) = %d requests", len(reqs))
	}
	if _, err := cs.CallTool(ctx, "no_such_tool", map[string]any{}); err == nil {
		t.Error("unknown tool: no error")
	}
	if got := len(s.Calls()); got != 0 {
		t.Errorf("Calls() = %d entries, want 0", got)
	}
}

func TestProgressArrivesBeforeResult(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint()})

	const steps = 5
	tc := cs.CallToolWithProgress(ctx, "", ToolSlowReport, map[string]any{"steps": steps})
	if tc.Err != nil || tc.Result.IsError {
		t.Fatalf("slow_report: %v %s", tc.Err, Text(tc.Result))
	}
	if err := tc.ProgressBeforeResult(steps); err != nil {
		t.Fatal(err)
	}
	for i, p := range tc.Progress {
		if p.Progress != float64(i+1) || p.Total != steps || p.Token != tc.Token {
			t.Errorf("progress %d = %+v", i, p)
		}
		if i > 0 && p.At.Before(tc.Progress[i-1].At) {
			t.Errorf("progress %d arrived before progress %d", i, i-1)
		}
	}
	if got := s.Calls()[0].ProgressToken; got != tc.Token {
		t.Errorf("server saw progress token %v, want %v", got, tc.Token)
	}
	// The progress travelled on the POST's own SSE response.
	reqs := s.RequestsFor("tools/call", ToolSlowReport)
	if len(reqs) != 1 || reqs[0].ContentType != "text/event-stream" {
		t.Errorf("slow_report POST answered with %+v", reqs)
	}
}

// With the server holding the result back after the first progress
// notification, that notification must reach the client: it is streamed, not
// buffered until the response ends. Bounded by the context, never by sleeps.
func TestProgressIsStreamed(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint()})

	s.Hold()
	token := NewProgressToken()
	done := make(chan *ToolCall, 1)
	go func() { done <- cs.CallToolWithProgress(ctx, token, ToolSlowReport, map[string]any{"steps": 3}) }()

	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	got, err := cs.WaitProgress(waitCtx, token, 1)
	s.Release()
	if err != nil {
		t.Fatalf("first progress notification did not arrive while the result was held: %v", err)
	}
	select {
	case tc := <-done:
		t.Fatalf("result arrived while held: %+v", tc)
	default:
	}
	tc := <-done
	if tc.Err != nil {
		t.Fatal(tc.Err)
	}
	if err := tc.ProgressBeforeResult(3); err != nil {
		t.Fatal(err)
	}
	if !got[0].At.Before(tc.ResultAt) {
		t.Error("first progress not before result")
	}
}

func TestHeadersReachServer(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{
		Endpoint:        s.Endpoint(),
		Headers:         map[string]string{"Authorization": "Bearer token-1", "dapr-app-id": "inventory"},
		ProtocolVersion: LegacyProtocolVersion,
	})
	if _, err := cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "widget-1"}); err != nil {
		t.Fatal(err)
	}
	h := s.LastHeader()
	if h.Get("Authorization") != "Bearer token-1" || h.Get("Dapr-App-Id") != "inventory" {
		t.Errorf("last request headers: %v", h)
	}
	if h.Get("Mcp-Session-Id") != cs.ID() || h.Get("Mcp-Protocol-Version") != LegacyProtocolVersion {
		t.Errorf("MCP headers: session %q (client %q), version %q", h.Get("Mcp-Session-Id"), cs.ID(), h.Get("Mcp-Protocol-Version"))
	}
	if c := s.Calls()[0]; c.Header.Get("Authorization") != "Bearer token-1" {
		t.Errorf("call header: %v", c.Header)
	}

	// Swap the token without reconnecting.
	cs.SetHeader("Authorization", "Bearer token-2")
	if _, err := cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "widget-1"}); err != nil {
		t.Fatal(err)
	}
	if got := s.Calls()[1].Header.Get("Authorization"); got != "Bearer token-2" {
		t.Errorf("after SetHeader: Authorization %q", got)
	}
	if _, err := s.WaitRequest(ctx, func(r Request) bool { return r.Method == http.MethodGet }); err != nil {
		t.Fatal(err)
	}
	if err := cs.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitRequest(ctx, func(r Request) bool { return r.Method == http.MethodDelete }); err != nil {
		t.Fatal(err)
	}
	// Every request the SDK made, including GET (standalone SSE) and DELETE,
	// carried dapr-app-id.
	for _, r := range s.Requests() {
		if r.Header.Get("Dapr-App-Id") != "inventory" {
			t.Errorf("%s %s (%s) lacks dapr-app-id", r.Method, r.Path, r.RPCMethod)
		}
	}
}

// Documents the v1.8.0 handshake the proxy will see.
func TestHandshake(t *testing.T) {
	ctx := testCtx(t)
	for _, tc := range []struct {
		name    string
		version string
		want    []string // "METHOD rpc status content-type Mcp-Protocol-Version"
	}{
		// The stateful server answers server/discover (200, SSE) with
		// supportedVersions that lack 2026-07-28, so the client falls back
		// to initialize.
		{"sdk-default", "", []string{
			"POST server/discover 200 text/event-stream 2026-07-28",
			"POST initialize 200 text/event-stream ",
			"POST notifications/initialized 202  2025-11-25",
			"POST tools/list 200 text/event-stream 2025-11-25",
			"DELETE  204  2025-11-25",
		}},
		{"legacy", LegacyProtocolVersion, []string{
			"POST initialize 200 text/event-stream ",
			"POST notifications/initialized 202  2025-11-25",
			"POST tools/list 200 text/event-stream 2025-11-25",
			"DELETE  204  2025-11-25",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startServer(t, Options{})
			cs, err := ConnectWith(ctx, ConnectOptions{Endpoint: s.Endpoint(), ProtocolVersion: tc.version, DisableStandaloneSSE: true})
			if err != nil {
				t.Fatal(err)
			}
			if cs.ProtocolVersion() != LegacyProtocolVersion || cs.ID() == "" {
				t.Errorf("negotiated %q, session %q", cs.ProtocolVersion(), cs.ID())
			}
			if _, err := cs.ListTools(ctx); err != nil {
				t.Fatal(err)
			}
			if err := cs.Close(); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range s.Requests() {
				got = append(got, r.Method+" "+r.RPCMethod+" "+strconv.Itoa(r.Status)+" "+r.ContentType+" "+r.Header.Get("Mcp-Protocol-Version"))
				if r.RPCMethod != "initialize" && r.RPCMethod != "server/discover" && r.Header.Get("Mcp-Session-Id") != cs.ID() {
					t.Errorf("%s %s without the session id", r.Method, r.RPCMethod)
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("requests (-want +got):\n%s", diff)
			}
		})
	}
}

func TestStandaloneSSE(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint(), ProtocolVersion: LegacyProtocolVersion})
	if _, err := cs.ListTools(ctx); err != nil {
		t.Fatal(err)
	}
	// The SDK opens the GET asynchronously after initialize.
	r, err := s.WaitRequest(ctx, func(r Request) bool { return r.Method == http.MethodGet })
	if err != nil {
		t.Fatal(err)
	}
	if r.Header.Get("Accept") != "text/event-stream" || r.Header.Get("Mcp-Session-Id") != cs.ID() {
		t.Errorf("GET headers: %v", r.Header)
	}
}

func TestJSONResponseOption(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{JSONResponse: true})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s.Endpoint(), ProtocolVersion: LegacyProtocolVersion})
	res, err := cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "gadget-2"})
	if err != nil || res.IsError {
		t.Fatalf("get_inventory: %v %s", err, Text(res))
	}
	reqs := s.RequestsFor("tools/call")
	if len(reqs) != 1 || reqs[0].ContentType != "application/json" {
		t.Errorf("tools/call answered with %+v", reqs)
	}
}

// The SDK rejects a non-loopback Host on a loopback listener unless the
// protection is disabled (what a Host-rewriting proxy needs).
func TestLocalhostProtection(t *testing.T) {
	ctx := testCtx(t)
	s := startServer(t, Options{})
	_, err := ConnectWith(ctx, ConnectOptions{Endpoint: s.Endpoint(), Headers: map[string]string{"Host": "inventory"}, ProtocolVersion: LegacyProtocolVersion})
	if err == nil {
		t.Fatal("non-loopback Host accepted")
	}
	if !slices.ContainsFunc(s.Requests(), func(r Request) bool { return r.Status == http.StatusForbidden }) {
		t.Errorf("no 403 recorded: %+v", s.Requests())
	}

	s2 := startServer(t, Options{DisableLocalhostProtection: true})
	cs := connect(t, ctx, ConnectOptions{Endpoint: s2.Endpoint(), Headers: map[string]string{"Host": "inventory"}, ProtocolVersion: LegacyProtocolVersion})
	if _, err := cs.CallTool(ctx, ToolGetInventory, map[string]any{"product_id": "widget-1"}); err != nil {
		t.Fatal(err)
	}
}

// startServer starts the App and closes it when the test ends.
func startServer(t testing.TB, opts Options) *Server {
	t.Helper()
	s, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}
