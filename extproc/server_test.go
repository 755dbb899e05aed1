package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

// newDemoServer serves the demo policy (testdata/demo): inventory with tool rules, Rego
// argument conditions, tools/list filtering and redaction of get_customer's ssn.
func newDemoServer(t testing.TB) *Server {
	t.Helper()
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(Options{Store: policy.NewStore(snap)})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newMeteredDemoServer is newDemoServer with its metrics read by the returned reader.
func newMeteredDemoServer(t testing.TB) (*Server, *sdkmetric.ManualReader) {
	t.Helper()
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	reader := sdkmetric.NewManualReader()
	s, err := NewServer(Options{Store: policy.NewStore(snap), Meter: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("t")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s, reader
}

// collectMetric returns the data of the metric named name, or nil.
func collectMetric(t testing.TB, reader *sdkmetric.ManualReader, name string) metricdata.Aggregation {
	t.Helper()
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		t.Fatal(err)
	}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if m.Name == name {
				return m.Data
			}
		}
	}
	return nil
}

var agentMD = metadata("inventory", "my-agent", "mcp:tools", "inventory:read")

func call(id int, tool string, args string) string {
	return fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":%q,"arguments":%s}}`, id, tool, args)
}

// requireJSONRPCError checks an immediate response is a JSON-RPC error for id.
func requireJSONRPCError(t *testing.T, ir *extprocv3.ImmediateResponse, httpCode int, id any, code int, msgPart string) {
	t.Helper()
	if ir == nil {
		t.Fatal("request was not answered by mcpgate")
	}
	if int(ir.GetStatus().GetCode()) != httpCode {
		t.Fatalf("HTTP %d, want %d; body %s", ir.GetStatus().GetCode(), httpCode, ir.GetBody())
	}
	var resp struct {
		JSONRPC string `json:"jsonrpc"`
		ID      any    `json:"id"`
		Error   struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(ir.GetBody(), &resp); err != nil {
		t.Fatalf("body %q: %v", ir.GetBody(), err)
	}
	if resp.JSONRPC != "2.0" || fmt.Sprint(resp.ID) != fmt.Sprint(id) || resp.Error.Code != code || !strings.Contains(resp.Error.Message, msgPart) {
		t.Fatalf("JSON-RPC error = %+v, want id %v code %d message containing %q", resp, id, code, msgPart)
	}
	if !strings.Contains(resp.Error.Message, "(decision ") {
		t.Errorf("message %q does not name the decision id", resp.Error.Message)
	}
}

func TestAllowedCallPassesUntouched(t *testing.T) {
	s := newDemoServer(t)
	body := call(1, "get_inventory", `{"product_id":"SKU-42"}`)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body},
		envoyUpstream{contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":1,"result":{"content":[]}}`}})
	if res.immediate != nil {
		t.Fatalf("denied: %s", res.immediate.GetBody())
	}
	if res.forwardedBody != body {
		t.Errorf("body changed: %s", res.forwardedBody)
	}
	if res.responseMode != extprocfilterv3.ProcessingMode_NONE {
		t.Errorf("response body mode %v for a call that needs no rewriting", res.responseMode)
	}
	if len(res.responseSet[contract.HeaderDecisionID]) != 32 {
		t.Errorf("response headers %v lack the decision id", res.responseSet)
	}
}

func TestDeniedCalls(t *testing.T) {
	s := newDemoServer(t)
	tests := []struct {
		name   string
		md     string // caller
		scopes []string
		body   string
		reason string
	}{
		{"rule denies delete_*", "my-agent", []string{"inventory:read"}, call(7, "delete_product", `{"product_id":"SKU-1"}`), `rule "no-deletes"`},
		{"no rule: defaultAction deny", "my-agent", []string{"inventory:read"}, call(7, "drop_tables", `{}`), `no rule allows tool "drop_tables"`},
		{"rule needs a scope the token lacks", "my-agent", nil, call(7, "get_inventory", `{"product_id":"SKU-1"}`), `no rule allows tool "get_inventory"`},
		{"rule is for another caller", "other-agent", []string{"inventory:read"}, call(7, "get_inventory", `{"product_id":"SKU-1"}`), `no rule allows`},
		{"rego argument condition", "my-agent", []string{"inventory:read"}, call(7, "get_inventory", `{"product_id":"abc"}`), "product_id must look like SKU-<digits>"},
		{"rego: argument missing", "my-agent", []string{"inventory:read"}, call(7, "get_inventory", `{}`), "product_id must look like SKU-<digits>"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := runEnvoy(t, s, envoyRequest{md: metadata("inventory", tt.md, tt.scopes...), body: tt.body}, envoyUpstream{})
			requireJSONRPCError(t, res.immediate, 200, 7, -32001, tt.reason)
			if res.forwardedBody != "" {
				t.Error("a denied call reached the server")
			}
		})
	}
}

func TestRegoPatchRewritesArguments(t *testing.T) {
	s := newDemoServer(t)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: call(3, "list_items", `{"limit":500,"cursor":"x"}`)}, envoyUpstream{})
	if res.immediate != nil {
		t.Fatalf("denied: %s", res.immediate.GetBody())
	}
	var got struct {
		Params struct {
			Arguments map[string]any `json:"arguments"`
		} `json:"params"`
	}
	if err := json.Unmarshal([]byte(res.forwardedBody), &got); err != nil {
		t.Fatal(err)
	}
	if got.Params.Arguments["limit"] != float64(100) || got.Params.Arguments["cursor"] != "x" {
		t.Errorf("arguments = %v, want limit capped at 100", got.Params.Arguments)
	}
	if res.requestSet["content-length"] != fmt.Sprint(len(res.forwardedBody)) {
		t.Errorf("content-length %q for a %d-byte body", res.requestSet["content-length"], len(res.forwardedBody))
	}
}

const toolsList = `{"jsonrpc":"2.0","id":2,"result":{"tools":[` +
	`{"name":"get_inventory","inputSchema":{"type":"object"}},` +
	`{"name":"delete_product","inputSchema":{"type":"object"}},` +
	`{"name":"list_items","inputSchema":{"type":"object"}},` +
	`{"name":"secret_admin","inputSchema":{"type":"object"}}],"nextCursor":"c2"}}`

func toolNames(t *testing.T, resp string) []string {
	t.Helper()
	var r struct {
		Result struct {
			Tools []struct {
				Name string `json:"name"`
			} `json:"tools"`
			NextCursor string `json:"nextCursor"`
		} `json:"result"`
	}
	if err := json.Unmarshal([]byte(resp), &r); err != nil {
		t.Fatalf("%q: %v", resp, err)
	}
	if r.Result.NextCursor != "c2" {
		t.Errorf("nextCursor lost: %s", resp)
	}
	var names []string
	for _, tl := range r.Result.Tools {
		names = append(names, tl.Name)
	}
	return names
}

func TestToolsListFilteredJSON(t *testing.T) {
	s := newDemoServer(t)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`},
		envoyUpstream{contentType: "application/json", chunks: []string{toolsList}})
	if res.responseMode != extprocfilterv3.ProcessingMode_BUFFERED {
		t.Fatalf("mode override %v, want BUFFERED", res.responseMode)
	}
	if got := strings.Join(toolNames(t, res.clientBody), ","); got != "get_inventory,list_items" {
		t.Errorf("tools = %s, want get_inventory,list_items", got)
	}
	if res.responseSet["content-length"] != fmt.Sprint(len(res.clientBody)) {
		t.Errorf("content-length %q for %d bytes", res.responseSet["content-length"], len(res.clientBody))
	}
}

func TestToolsListFilteredSSEAcrossChunks(t *testing.T) {
	s := newDemoServer(t)
	progress := "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":1,\"progress\":1}}\n\n"
	result := "id: 9\r\nevent: message\r\ndata: " + toolsList + "\r\n\r\n"
	stream := progress + result
	// Split everywhere awkward: inside "data:", inside the JSON, between \r and \n.
	cut1, cut2, cut3 := 7, len(progress)+20, len(stream)-3
	chunks := []string{stream[:cut1], stream[cut1:cut2], stream[cut2:cut3], stream[cut3:]}
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`},
		envoyUpstream{contentType: "text/event-stream", chunks: chunks})
	if res.responseMode != extprocfilterv3.ProcessingMode_STREAMED {
		t.Fatalf("mode override %v, want STREAMED", res.responseMode)
	}
	if !strings.HasPrefix(res.clientBody, progress) {
		t.Errorf("progress notification not passed through first:\n%q", res.clientBody)
	}
	_, ev, _ := strings.Cut(res.clientBody, progress)
	var data string
	for _, line := range strings.Split(strings.ReplaceAll(ev, "\r\n", "\n"), "\n") {
		if v, ok := strings.CutPrefix(line, "data:"); ok {
			data += strings.TrimPrefix(v, " ")
		}
	}
	if got := strings.Join(toolNames(t, data), ","); got != "get_inventory,list_items" {
		t.Errorf("tools = %s in %q", got, res.clientBody)
	}
	if !strings.Contains(ev, "id: 9") {
		t.Errorf("event id lost: %q", ev)
	}
}

func TestProgressFlowsBeforeResult(t *testing.T) {
	// The progress event must be released with the chunk that completes it, not held.
	s := newDemoServer(t)
	f, _ := openStream(t, s)
	f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json")}}})
	f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(call(5, "get_customer", `{"id":"c1"}`)), EndOfStream: true}}})
	resp := f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{
		ResponseHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":status", "200", "content-type", "text/event-stream")}}})
	if resp.GetModeOverride().GetResponseBodyMode() != extprocfilterv3.ProcessingMode_STREAMED {
		t.Fatalf("want STREAMED for a redacted tool's event stream, got %v", resp.GetModeOverride())
	}
	progress := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":\"p\",\"progress\":50}}\n\n"
	resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte(progress + "data: {\"jsonrpc\":\"2.0\",\"id\":5,")}}})
	out := string(resp.GetResponseBody().GetResponse().GetBodyMutation().GetBody())
	if out != progress {
		t.Fatalf("first chunk released %q, want exactly the complete progress event", out)
	}
	resp = f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{
		ResponseBody: &extprocv3.HttpBody{Body: []byte(`"result":{"structuredContent":{"name":"Ann","ssn":"123-45-6789"},"content":[{"type":"text","text":"{\"name\":\"Ann\",\"ssn\":\"123-45-6789\"}"}]}}` + "\n\n"), EndOfStream: true}}})
	out = string(resp.GetResponseBody().GetResponse().GetBodyMutation().GetBody())
	if strings.Contains(out, "123-45-6789") || !strings.Contains(out, "Ann") {
		t.Fatalf("result not redacted: %q", out)
	}
}

func TestRedactionJSON(t *testing.T) {
	s := newDemoServer(t)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: call(4, "get_customer", `{"id":"c1"}`)},
		envoyUpstream{contentType: "application/json; charset=utf-8", chunks: []string{
			`{"jsonrpc":"2.0","id":4,"result":{"structuredContent":{"name":"Ann","ssn":"123-45-6789"},"content":[{"type":"text","text":"{\"name\":\"Ann\",\"ssn\":\"123-45-6789\"}"}]}}`}})
	if strings.Contains(res.clientBody, "123-45-6789") || !strings.Contains(res.clientBody, `"name":"Ann"`) {
		t.Fatalf("client got %s", res.clientBody)
	}
}

func TestBatchWithOneDenialDeniesAll(t *testing.T) {
	s := newDemoServer(t)
	body := "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(2, "delete_product", `{}`) + `,{"jsonrpc":"2.0","method":"notifications/initialized"}]`
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body, headers: []string{"mcp-protocol-version", "2025-03-26"}}, envoyUpstream{})
	if res.immediate == nil || res.immediate.GetStatus().GetCode() != 200 {
		t.Fatalf("batch not answered: %v", res.immediate)
	}
	var out []struct {
		ID    int `json:"id"`
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(res.immediate.GetBody(), &out); err != nil {
		t.Fatalf("%s: %v", res.immediate.GetBody(), err)
	}
	if len(out) != 2 || out[0].ID != 1 || !strings.Contains(out[0].Error.Message, "another message of the batch was denied") ||
		out[1].ID != 2 || !strings.Contains(out[1].Error.Message, `rule "no-deletes"`) {
		t.Fatalf("batch answer = %s", res.immediate.GetBody())
	}
	// Protocol 2025-06-18 removed batches.
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "]", headers: []string{"mcp-protocol-version", "2025-06-18"}}, envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 400, nil, -32600, "batch")
}

func TestMalformedBodies(t *testing.T) {
	s := newDemoServer(t)
	tests := []struct {
		name     string
		body     string
		headers  []string
		httpCode int
		code     int
		msg      string
	}{
		{"duplicate keys", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_inventory","name":"delete_product"}}`, nil, 400, -32700, "duplicate"},
		{"invalid JSON", `{"jsonrpc":"2.0",`, nil, 400, -32700, ""},
		{"invalid UTF-8", "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"get_inventory\xff\"}}", nil, 400, -32700, ""},
		{"too deep", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":` + strings.Repeat(`{"a":`, 100) + "1" + strings.Repeat("}", 100) + "}}", nil, 400, -32700, ""},
		{"not JSON content type", call(1, "get_inventory", `{}`), []string{"content-type", "text/plain"}, 415, -32600, "Content-Type"},
		{"header mismatch", call(1, "get_inventory", `{"product_id":"SKU-1"}`), []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "list_items"}, 400, CodeHeaderMismatch, "do not match"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := runEnvoy(t, s, envoyRequest{md: agentMD, body: tt.body, headers: tt.headers}, envoyUpstream{})
			if res.immediate == nil {
				t.Fatal("not answered")
			}
			var id any
			if tt.code == CodeHeaderMismatch {
				id = 1
			}
			requireJSONRPCError(t, res.immediate, tt.httpCode, id, tt.code, tt.msg)
		})
	}
}

func TestTooLarge(t *testing.T) {
	s := newDemoServer(t)
	big := call(1, "get_inventory", `{"product_id":"SKU-1","pad":"`+strings.Repeat("x", 1<<20)+`"}`)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: big}, envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 413, nil, -32600, "larger than")
}

func TestHeaderDecidedEarly(t *testing.T) {
	s := newDemoServer(t)
	f, _ := openStream(t, s)
	resp := f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json",
			"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "delete_product")}}})
	requireJSONRPCError(t, resp.GetImmediateResponse(), 403, nil, -32001, `rule "no-deletes"`)
}

// Before 2026-07-28 the mirror headers mean nothing: a legacy request is decided on its
// body alone, is not refused for headers that disagree with it, and the headers do not
// reach the server; from 2026-07-28 on a disagreement is a 400 with -32020.
func TestMirrorHeadersByEra(t *testing.T) {
	s := newDemoServer(t)
	body := call(1, "get_inventory", `{"product_id":"SKU-1"}`)
	lie := []string{"mcp-method", "tools/call", "mcp-name", "delete_product", "mcp-param-region", "=?base64?ZXU=?="}
	for _, version := range []string{"", "2025-06-18", "2025-11-25"} {
		h := lie
		if version != "" {
			h = append([]string{"mcp-protocol-version", version}, lie...)
		}
		res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body, headers: h}, envoyUpstream{})
		if res.immediate != nil {
			t.Errorf("legacy %q: answered %s", version, res.immediate.GetBody())
			continue
		}
		removed := strings.Join(res.requestRemove, ",")
		for _, k := range []string{"mcp-method", "mcp-name", "mcp-param-region"} {
			if !strings.Contains(removed, k) {
				t.Errorf("legacy %q: %s reaches the server (removed: %s)", version, k, removed)
			}
		}
	}
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body, headers: append([]string{"mcp-protocol-version", "2026-07-28"}, lie...)}, envoyUpstream{})
	if res.immediate == nil {
		t.Fatal("2026-07-28 with headers that contradict the body was forwarded")
	}
	honest := []string{"mcp-protocol-version", "2026-07-28", "mcp-method", "tools/call", "mcp-name", "get_inventory"}
	if res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body, headers: honest}, envoyUpstream{}); res.immediate != nil || slices.Contains(res.requestRemove, "mcp-method") {
		t.Errorf("2026-07-28 with matching headers: answered %v, removed %v", res.immediate, res.requestRemove)
	}
}

func TestMissingMetadataFailsClosed(t *testing.T) {
	s := newDemoServer(t)
	res := runEnvoy(t, s, envoyRequest{body: call(1, "get_inventory", `{"product_id":"SKU-1"}`)}, envoyUpstream{})
	if res.immediate == nil || res.immediate.GetStatus().GetCode() != 403 || !strings.Contains(string(res.immediate.GetBody()), "ext_authz") {
		t.Fatalf("want 403 naming ext_authz, got %v", res.immediate)
	}
}

func TestHeaderOnlyGET(t *testing.T) {
	s := newDemoServer(t)
	notification := "data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/tools/list_changed\"}\n\n"
	res := runEnvoy(t, s, envoyRequest{md: agentMD, method: "GET"}, envoyUpstream{contentType: "text/event-stream", chunks: []string{notification[:10], notification[10:]}})
	if res.immediate != nil || res.clientBody != notification {
		t.Fatalf("GET stream: %+v", res)
	}
	// The demo app filters responses: a response on its GET stream ends the stream, and
	// resumption, which would replay responses to earlier calls unfiltered, is refused.
	res = runEnvoy(t, s, envoyRequest{md: agentMD, method: "GET"}, envoyUpstream{contentType: "text/event-stream",
		chunks: []string{notification, `data: {"jsonrpc":"2.0","id":4,"result":{"structuredContent":{"ssn":"123-45-6789"}}}` + "\n\n"}})
	if res.immediate == nil || res.immediate.GetStatus().GetCode() != 502 || strings.Contains(res.clientBody, "123-45-6789") {
		t.Fatalf("response on a GET stream: %+v", res)
	}
	res = runEnvoy(t, s, envoyRequest{md: agentMD, method: "GET", headers: []string{"last-event-id", "41"}}, envoyUpstream{})
	if res.immediate.GetStatus().GetCode() != 403 || !strings.Contains(string(res.immediate.GetBody()), "resumption") {
		t.Fatalf("resumption: %v", res.immediate)
	}
	res = runEnvoy(t, s, envoyRequest{md: agentMD, method: "PUT"}, envoyUpstream{})
	if res.immediate.GetStatus().GetCode() != 405 {
		t.Fatalf("PUT: %v", res.immediate)
	}
}

func TestTrailersPresent(t *testing.T) {
	s := newDemoServer(t)
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`},
		envoyUpstream{contentType: "application/json", chunks: []string{toolsList}, trailers: true})
	if got := strings.Join(toolNames(t, res.clientBody), ","); got != "get_inventory,list_items" {
		t.Errorf("tools = %s", got)
	}
}

func TestProtocolMethodsAllowed(t *testing.T) {
	s := newDemoServer(t)
	for _, body := range []string{
		`{"jsonrpc":"2.0","id":"d","method":"server/discover","params":{}}`,
		`{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`,
		`{"jsonrpc":"2.0","method":"notifications/initialized"}`,
		`{"jsonrpc":"2.0","id":"p","method":"ping"}`,
		`{"jsonrpc":"2.0","id":"e","result":{"action":"accept"}}`, // client answers an elicitation
	} {
		if res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body}, envoyUpstream{}); res.immediate != nil {
			t.Errorf("%s denied: %s", body, res.immediate.GetBody())
		}
	}
}

func TestStreamProtocolViolations(t *testing.T) {
	s := newDemoServer(t)
	t.Run("response body before response headers", func(t *testing.T) {
		f, _ := openStream(t, s)
		f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "GET", ":path", "/mcp"), EndOfStream: true}}})
		f.in <- &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseBody{ResponseBody: &extprocv3.HttpBody{Body: []byte("x")}}}
		if err := <-f.done; status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("err = %v, want FailedPrecondition", err)
		}
	})
	t.Run("message after a denial", func(t *testing.T) {
		f, _ := openStream(t, s)
		f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json")}}})
		resp := f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
			RequestBody: &extprocv3.HttpBody{Body: []byte(call(1, "delete_product", `{}`)), EndOfStream: true}}})
		if resp.GetImmediateResponse() == nil {
			t.Fatal("not denied")
		}
		f.in <- &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_ResponseHeaders{ResponseHeaders: &extprocv3.HttpHeaders{}}}
		if err := <-f.done; status.Code(err) != codes.FailedPrecondition {
			t.Fatalf("err = %v, want FailedPrecondition", err)
		}
	})
	t.Run("client cancels mid-stream", func(t *testing.T) {
		f, cancel := openStream(t, s)
		f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json")}}})
		cancel()
		select {
		case err := <-f.done:
			if err != nil {
				t.Fatalf("cancel is a normal end, got %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Process did not return after cancel")
		}
	})
	t.Run("body not buffered", func(t *testing.T) {
		f, _ := openStream(t, s)
		f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: agentMD, Request: &extprocv3.ProcessingRequest_RequestHeaders{
			RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json")}}})
		resp := f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
			RequestBody: &extprocv3.HttpBody{Body: []byte(`{"jsonrpc":`), EndOfStream: false}}})
		if resp.GetImmediateResponse().GetStatus().GetCode() != 500 {
			t.Fatalf("partial body must fail closed, got %v", resp)
		}
	})
}

// TestListCacheIsPerIdentity: a cached list-time decision for one caller must never
// answer for another (here: a token without the scope the rule needs).
func TestListCacheIsPerIdentity(t *testing.T) {
	s := newDemoServer(t)
	list := func(md string, scopes ...string) string {
		res := runEnvoy(t, s, envoyRequest{md: metadata("inventory", md, scopes...), body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`},
			envoyUpstream{contentType: "application/json", chunks: []string{toolsList}})
		return strings.Join(toolNames(t, res.clientBody), ",")
	}
	for range 2 { // the second round is served from the cache
		if got := list("my-agent", "mcp:tools", "inventory:read"); got != "get_inventory,list_items" {
			t.Fatalf("with inventory:read: %s", got)
		}
		if got := list("my-agent", "mcp:tools"); got != "" {
			t.Fatalf("without inventory:read: %s", got)
		}
		if got := list("other-agent", "mcp:tools", "inventory:read"); got != "" {
			t.Fatalf("other caller: %s", got)
		}
	}
}

func TestRateLimits(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{
		"mesh.yaml": "apiVersion: mcpgate.dev/v1alpha1\nkind: Mesh\nmetadata: {name: m}\nspec: {trustDomain: example.org, mtls: disabled, authz: {address: \"a:1\"}}\n",
		"app.yaml": `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: inventory}
spec:
  address: app:1
  sidecar: {address: s, inboundPort: 1, outboundPort: 2}
  mcp:
    tools: {defaultAction: allow}
    limits: {perCaller: 4/h, perTool: {"get_*": 2/h}}
`,
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(Options{Store: policy.NewStore(snap)})
	if err != nil {
		t.Fatal(err)
	}
	post := func(caller, body string) *extprocv3.ImmediateResponse {
		return runEnvoy(t, s, envoyRequest{md: metadata("inventory", caller), body: body}, envoyUpstream{}).immediate
	}
	// perTool get_*: 2 per hour across callers.
	for i, caller := range []string{"a", "b"} {
		if ir := post(caller, call(i, "get_stock", `{}`)); ir != nil {
			t.Fatalf("call %d limited too early: %s", i, ir.GetBody())
		}
	}
	ir := post("c", call(9, "get_price", `{}`))
	requireJSONRPCError(t, ir, 429, 9, -32001, "limits.perTool get_* 2/h")
	retry := ""
	for _, h := range ir.GetHeaders().GetSetHeaders() {
		if h.GetHeader().GetKey() == "retry-after" {
			retry = string(h.GetHeader().GetRawValue())
		}
	}
	if retry == "" || retry == "0" {
		t.Errorf("Retry-After = %q", retry)
	}
	// Another tool is not limited by get_*; caller "a" has spent 1 of its 4 per hour.
	for i := range 3 {
		if ir := post("a", call(20+i, "list_items", `{}`)); ir != nil {
			t.Fatalf("list_items %d limited: %s", i, ir.GetBody())
		}
	}
	requireJSONRPCError(t, post("a", call(30, "list_items", `{}`)), 429, 30, -32001, "limits.perCaller 4/h")
	// Caller "b" has its own allowance.
	if ir := post("b", call(31, "list_items", `{}`)); ir != nil {
		t.Fatalf("caller b limited by a's use: %s", ir.GetBody())
	}

	// reload rewrites the app with limits and loads it as mcpgate's watcher would.
	reload := func(limits string) {
		t.Helper()
		app := `apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: inventory}
spec:
  address: app:2
  sidecar: {address: s, inboundPort: 1, outboundPort: 2}
  mcp:
    tools: {defaultAction: allow}
    limits: ` + limits + "\n"
		if err := os.WriteFile(filepath.Join(dir, "app.yaml"), []byte(app), 0o644); err != nil {
			t.Fatal(err)
		}
		next, err := policy.LoadDir(context.Background(), dir)
		if err != nil {
			t.Fatal(err)
		}
		if next.Version == s.store.Current().Version {
			t.Fatal("the edit did not change the policy version")
		}
		s.store.Set(next)
	}
	// An edit that leaves the limits alone leaves what callers have spent: "a" stays
	// limited (a reload must not hand out fresh allowances).
	reload(`{perCaller: 4/h, perTool: {"get_*": 2/h}}`)
	requireJSONRPCError(t, post("a", call(32, "list_items", `{}`)), 429, 32, -32001, "limits.perCaller 4/h")
	// An edited rate applies at once, with a fresh bucket.
	reload(`{perCaller: 5/h, perTool: {"get_*": 2/h}}`)
	if ir := post("a", call(33, "list_items", `{}`)); ir != nil {
		t.Fatalf("after raising the limit, caller a is still limited: %s", ir.GetBody())
	}
}

// TestDecisionLog: one line per decision, with what decided and why, never credentials.
func TestDecisionLog(t *testing.T) {
	var buf lockedBuffer
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	enc := zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig())
	s, err := NewServer(Options{Store: policy.NewStore(snap), DecisionLog: zap.New(zapcore.NewCore(enc, zapcore.AddSync(&buf), zap.InfoLevel))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	runEnvoy(t, s, envoyRequest{md: agentMD, body: call(1, "get_inventory", `{"product_id":"SKU-1"}`)}, envoyUpstream{})
	runEnvoy(t, s, envoyRequest{md: agentMD, body: call(2, "delete_product", `{}`)}, envoyUpstream{})
	s.Flush()
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("want 2 decision lines, got %d:\n%s", len(lines), buf.String())
	}
	var allow, deny map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &allow); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &deny); err != nil {
		t.Fatal(err)
	}
	if allow["decision"] != "allow" || allow["rule"] != "readers" || allow["name"] != "get_inventory" || allow["caller"] != "my-agent" || allow["id"] != "1" {
		t.Errorf("allow line = %v", allow)
	}
	if deny["decision"] != "deny" || deny["rule"] != "no-deletes" || deny["authz_decision_id"] != "authz-1" || len(deny["decision_id"].(string)) != 32 {
		t.Errorf("deny line = %v", deny)
	}
	if strings.Contains(buf.String(), "secret-token") || strings.Contains(buf.String(), "tier") {
		t.Fatalf("decision log leaks credentials or claims: %s", buf.String())
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
