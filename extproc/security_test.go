package extproc

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"

	extprocfilterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/policy"
)

// The tests of this file pin what the adversarial review of issue 18 found, one class per
// test; the end-to-end versions, through emulated sidecars and real SDK servers, are in
// integration/security_test.go.

const customerSSN = `{"jsonrpc":"2.0","id":%s,"result":{"structuredContent":{"name":"Ann","ssn":"123-45-6789"},"content":[{"type":"text","text":"Ann"}]}}`

// Finding 1: a body is decided on as UTF-8 JSON; any other reading must not reach a server.
func TestRequestCharsetRefused(t *testing.T) {
	s := newDemoServer(t)
	body := call(1, "get_inventory", `{"product_id":"SKU-1"}`)
	for _, ct := range []string{
		"application/json; charset=utf-7",
		"application/json; charset=utf-16",
		"application/json; charset=iso-8859-1",
		"application/json; boundary=x",
		"application/json; charset=utf-8; charset=utf-7",
	} {
		t.Run(ct, func(t *testing.T) {
			res := runEnvoy(t, s, envoyRequest{md: agentMD, contentType: ct, body: body}, envoyUpstream{})
			requireJSONRPCError(t, res.immediate, 415, nil, -32600, "Content-Type")
		})
	}
	for _, ct := range []string{"application/json", "application/json; charset=utf-8", "Application/JSON; Charset=\"UTF-8\""} {
		t.Run(ct, func(t *testing.T) {
			if res := runEnvoy(t, s, envoyRequest{md: agentMD, contentType: ct, body: body}, envoyUpstream{}); res.immediate != nil {
				t.Fatalf("refused: %s", res.immediate.GetBody())
			}
		})
	}
	t.Run("two Content-Type headers", func(t *testing.T) {
		res := runEnvoy(t, s, envoyRequest{md: agentMD, headers: []string{"content-type", "application/json; charset=utf-7"}, body: body}, envoyUpstream{})
		requireJSONRPCError(t, res.immediate, 415, nil, -32600, "more than one Content-Type")
	})
}

// Finding 2: ids every peer reads alike, and no response on a rewritten exchange that
// answers a request nobody made.
func TestRequestIDsEveryPeerReadsAlike(t *testing.T) {
	s := newDemoServer(t)
	msg := func(id string) string {
		return `{"jsonrpc":"2.0","id":` + id + `,"method":"tools/call","params":{"name":"get_customer","arguments":{"id":"c1"}}}`
	}
	for _, id := range []string{"9007199254740992", "-9007199254740992", "18446744073709551617", "1e3", "1.0", "12345678901234567890123"} {
		t.Run("refused "+id, func(t *testing.T) {
			res := runEnvoy(t, s, envoyRequest{md: agentMD, body: msg(id)}, envoyUpstream{})
			requireJSONRPCError(t, res.immediate, 400, nil, -32600, `"id"`)
		})
	}
	for _, id := range []string{"9007199254740991", "-9007199254740991", "0", `"9007199254740993"`} {
		t.Run("accepted "+id, func(t *testing.T) {
			res := runEnvoy(t, s, envoyRequest{md: agentMD, body: msg(id)},
				envoyUpstream{contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, id)}})
			if res.immediate != nil {
				t.Fatalf("refused: %s", res.immediate.GetBody())
			}
			if strings.Contains(res.clientBody, "123-45-6789") {
				t.Fatalf("the ssn reached the client: %s", res.clientBody)
			}
		})
	}
}

func TestResponseToAnotherIDFailsClosed(t *testing.T) {
	s := newDemoServer(t)
	req := envoyRequest{md: agentMD, body: call(7, "get_customer", `{"id":"c1"}`)}
	for name, up := range map[string]envoyUpstream{
		"json":           {contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "8")}},
		"json, rounded":  {contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "7.000001")}},
		"json, no id":    {contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","result":{"structuredContent":{"ssn":"123-45-6789"}}}`}},
		"sse":            {contentType: "text/event-stream", chunks: []string{"event: message\ndata: " + fmt.Sprintf(customerSSN, "8") + "\n\n"}},
		"sse, in batch":  {contentType: "text/event-stream", chunks: []string{"data: [" + fmt.Sprintf(customerSSN, "7") + "," + fmt.Sprintf(customerSSN, `"7"`) + "]\n\n"}},
		"sse, 2nd event": {contentType: "text/event-stream", chunks: []string{"data: " + fmt.Sprintf(customerSSN, "7") + "\n\n", "data: " + fmt.Sprintf(customerSSN, "70") + "\n\n"}},
		// encoding/json matches keys without case and keeps the last: a client decoding
		// so would read the unredacted member.
		"json, a key in two cases": {contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":7,"result":{"structuredContent":{"name":"Ann"},"StructuredContent":{"ssn":"123-45-6789"}}}`}},
		"sse, a key in two cases":  {contentType: "text/event-stream", chunks: []string{`data: {"jsonrpc":"2.0","id":7,"result":{"structuredContent":{"name":"Ann"},"StructuredContent":{"ssn":"123-45-6789"}}}` + "\n\n"}},
	} {
		t.Run(name, func(t *testing.T) {
			res := runEnvoy(t, s, req, up)
			if res.immediate == nil {
				t.Fatalf("the response reached the client: %s", res.clientBody)
			}
			requireJSONRPCError(t, res.immediate, 502, nil, -32603, "")
		})
	}
	// The response to the request itself still passes, redacted.
	res := runEnvoy(t, s, req, envoyUpstream{contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "7")}})
	if res.immediate != nil || strings.Contains(res.clientBody, "123-45-6789") || !strings.Contains(res.clientBody, "Ann") {
		t.Fatalf("immediate %v, client body %s", res.immediate, res.clientBody)
	}
}

// Finding 3: a response mcpgate must rewrite is one it can read.
func TestUnreadableResponsesFailClosed(t *testing.T) {
	s := newDemoServer(t)
	req := envoyRequest{md: agentMD, body: call(4, "get_customer", `{"id":"c1"}`), headers: []string{"accept-encoding", "gzip, br"}}
	res := runEnvoy(t, s, req, envoyUpstream{contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "4")}})
	if res.immediate != nil {
		t.Fatal(res.immediate)
	}
	if !strings.Contains(strings.Join(res.requestRemove, ","), "accept-encoding") {
		t.Errorf("Accept-Encoding not removed for an app whose responses are redacted: removed %v", res.requestRemove)
	}
	for name, up := range map[string]envoyUpstream{
		"gzip json":          {contentType: "application/json", headers: []string{"content-encoding", "gzip"}, chunks: []string{"\x1f\x8b..."}},
		"br event stream":    {contentType: "text/event-stream", headers: []string{"content-encoding", "br"}, chunks: []string{"..."}},
		"utf-16 json":        {contentType: "application/json; charset=utf-16", chunks: []string{"{}"}},
		"text/plain":         {contentType: "text/plain", chunks: []string{fmt.Sprintf(customerSSN, "4")}},
		"no content type":    {chunks: []string{fmt.Sprintf(customerSSN, "4")}},
		"201, gzip":          {status: 201, contentType: "application/json", headers: []string{"content-encoding", "gzip"}, chunks: []string{"x"}},
		"unparseable header": {contentType: "application/json; =", chunks: []string{fmt.Sprintf(customerSSN, "4")}},
		// Go's Header.Get reads the first, mcpgate read the last: JSON taken for an event
		// stream passed unfiltered, gzip taken for identity likewise.
		"two content types": {contentType: "application/json", headers: []string{"content-type", "text/event-stream"}, chunks: []string{fmt.Sprintf(customerSSN, "4")}},
		"two encodings":     {contentType: "text/event-stream", headers: []string{"content-encoding", "gzip", "content-encoding", "identity"}, chunks: []string{"\x1f\x8b..."}},
	} {
		t.Run(name, func(t *testing.T) {
			res := runEnvoy(t, s, req, up)
			if res.immediate == nil {
				t.Fatalf("the response reached the client: %q", res.clientBody)
			}
			requireJSONRPCError(t, res.immediate, 502, nil, -32603, "cannot filter")
		})
	}
	// Any 2xx is read by clients as the answer, so any 2xx is redacted.
	res = runEnvoy(t, s, req, envoyUpstream{status: 203, contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "4")}})
	if res.immediate != nil || strings.Contains(res.clientBody, "123-45-6789") {
		t.Fatalf("203: immediate %v, client body %s", res.immediate, res.clientBody)
	}
	// identity is no encoding.
	res = runEnvoy(t, s, req, envoyUpstream{contentType: "application/json", headers: []string{"content-encoding", "identity"}, chunks: []string{fmt.Sprintf(customerSSN, "4")}})
	if res.immediate != nil || strings.Contains(res.clientBody, "123-45-6789") {
		t.Fatalf("identity: immediate %v, client body %s", res.immediate, res.clientBody)
	}
}

// A failed status is no answer, but clients show its body: the TypeScript SDK puts it in
// the error it throws, and agents hand that to the model. So an error response to an
// exchange whose responses are rewritten is filtered too, and one mcpgate cannot read
// loses its body, never its status or headers.
func TestErrorResponsesFiltered(t *testing.T) {
	s := newDemoServer(t)
	req := envoyRequest{md: agentMD, body: call(4, "get_customer", `{"id":"c1"}`)}
	note := "mcpgate removed the body of this "
	for name, tc := range map[string]struct {
		up       envoyUpstream
		replaced bool
	}{
		"500 echoing the result": {up: envoyUpstream{status: 500, contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "4")}}},
		"500 text":               {up: envoyUpstream{status: 500, contentType: "text/plain", chunks: []string{"boom: " + fmt.Sprintf(customerSSN, "4")}}, replaced: true},
		"502 html":               {up: envoyUpstream{status: 502, contentType: "text/html", chunks: []string{"<pre>123-45-6789</pre>"}}, replaced: true},
		"500 gzip json":          {up: envoyUpstream{status: 500, contentType: "application/json", headers: []string{"content-encoding", "gzip"}, chunks: []string{"\x1f\x8b..."}}, replaced: true},
		"500 json, not json-rpc": {up: envoyUpstream{status: 500, contentType: "application/json", chunks: []string{`{"detail":{"ssn":"123-45-6789"}}`}}, replaced: true},
		"500 another id":         {up: envoyUpstream{status: 500, contentType: "application/json", chunks: []string{fmt.Sprintf(customerSSN, "5")}}, replaced: true},
		"500 utf-16":             {up: envoyUpstream{status: 500, contentType: "application/json; charset=utf-16", chunks: []string{fmt.Sprintf(customerSSN, "4")}}, replaced: true},
		"500 event stream":       {up: envoyUpstream{status: 500, contentType: "text/event-stream", chunks: []string{"data: " + fmt.Sprintf(customerSSN, "4") + "\n\n"}}, replaced: true},
		"500 no content type":    {up: envoyUpstream{status: 500, chunks: []string{fmt.Sprintf(customerSSN, "4")}}, replaced: true},
		"307":                    {up: envoyUpstream{status: 307, contentType: "text/plain", headers: []string{"location", "/elsewhere"}, chunks: []string{"123-45-6789"}}, replaced: true},
	} {
		t.Run(name, func(t *testing.T) {
			res := runEnvoy(t, s, req, tc.up)
			if res.immediate != nil {
				t.Fatalf("the server's status was replaced: %v", res.immediate)
			}
			if res.responseMode != extprocfilterv3.ProcessingMode_BUFFERED || strings.Contains(res.clientBody, "123-45-6789") {
				t.Fatalf("mode %v, the client read %q", res.responseMode, res.clientBody)
			}
			if got := strings.HasPrefix(res.clientBody, note+strconv.Itoa(tc.up.status)+" response"); got != tc.replaced {
				t.Fatalf("replaced %v, want %v: %q", got, tc.replaced, res.clientBody)
			}
			if !tc.replaced {
				if !strings.Contains(res.clientBody, "Ann") {
					t.Fatalf("the result was not kept, redacted: %q", res.clientBody)
				}
				return
			}
			if res.responseSet["content-type"] != "text/plain; charset=utf-8" || res.responseSet["content-length"] != strconv.Itoa(len(res.clientBody)) ||
				!slices.Contains(res.responseRemove, "content-encoding") {
				t.Fatalf("headers set %v, removed %v", res.responseSet, res.responseRemove)
			}
		})
	}
	// JSON-RPC errors pass as sent, whatever their ids: the TypeScript SDK's 404 for an
	// unknown session has id null, and no error carries a result.
	for _, body := range []string{
		`{"jsonrpc":"2.0","error":{"code":-32001,"message":"Session not found"},"id":null}`,
		`{"jsonrpc":"2.0","id":4,"error":{"code":-32603,"message":"internal error"}}`,
		`[{"jsonrpc":"2.0","id":4,"error":{"code":-32603,"message":"internal error"}}]`,
	} {
		res := runEnvoy(t, s, req, envoyUpstream{status: 404, contentType: "application/json", chunks: []string{body}})
		if res.immediate != nil || res.clientBody != body {
			t.Fatalf("%s: immediate %v, client body %q", body, res.immediate, res.clientBody)
		}
	}
	// tools/list is filtered on a failed status as on a 2xx.
	list := envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`}
	tools := `{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"get_inventory","inputSchema":{"type":"object"}},{"name":"delete_product","inputSchema":{"type":"object"}}]}}`
	res := runEnvoy(t, s, list, envoyUpstream{status: 500, contentType: "application/json", chunks: []string{tools}})
	if res.immediate != nil || strings.Contains(res.clientBody, "delete_product") || !strings.Contains(res.clientBody, "get_inventory") {
		t.Fatalf("tools/list on a 500: immediate %v, client body %q", res.immediate, res.clientBody)
	}
	// An exchange nothing rewrites is not read at all, whatever its status.
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: `{"jsonrpc":"2.0","id":3,"method":"ping"}`},
		envoyUpstream{status: 500, contentType: "text/plain", chunks: []string{"boom"}})
	if res.immediate != nil || res.responseMode != extprocfilterv3.ProcessingMode_NONE || res.clientBody != "boom" {
		t.Fatalf("ping on a 500: immediate %v, mode %v, client body %q", res.immediate, res.responseMode, res.clientBody)
	}
}

// Finding 5: batches are bounded, patched in one pass, and not decided for nobody.
func TestBatchBounded(t *testing.T) {
	s := newDemoServer(t)
	var msgs []string
	for i := range 101 {
		msgs = append(msgs, fmt.Sprintf(`{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":%d,"progress":1}}`, i))
	}
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: "[" + strings.Join(msgs, ",") + "]"}, envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 400, nil, -32600, "at most 100 messages")
	if res := runEnvoy(t, s, envoyRequest{md: agentMD, body: "[" + strings.Join(msgs[:100], ",") + "]"}, envoyUpstream{}); res.immediate != nil {
		t.Fatalf("a batch of 100 refused: %s", res.immediate.GetBody())
	}
}

// A JSON batch response answers each request once: a second response with a request's
// id would pass as the server wrote it (only the first is rewritten), so it is refused;
// and a batch request cannot give two requests one id.
func TestBatchResponseAnswersEachRequestOnce(t *testing.T) {
	s := newDemoServer(t)
	req := envoyRequest{md: agentMD, body: "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(2, "get_customer", `{"id":"c1"}`) + "]"}
	inv := `{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"5 left"}]}}`
	res := runEnvoy(t, s, req, envoyUpstream{contentType: "application/json", chunks: []string{"[" + inv + "," + fmt.Sprintf(customerSSN, "2") + "]"}})
	if res.immediate != nil || strings.Contains(res.clientBody, "123-45-6789") || !strings.Contains(res.clientBody, "5 left") {
		t.Fatalf("one response each: immediate %v, client body %s", res.immediate, res.clientBody)
	}
	res = runEnvoy(t, s, req, envoyUpstream{contentType: "application/json", chunks: []string{"[" + fmt.Sprintf(customerSSN, "2") + "," + inv + "," + fmt.Sprintf(customerSSN, "2") + "]"}})
	if res.immediate == nil {
		t.Fatalf("a second response to request 2 reached the client: %s", res.clientBody)
	}
	requireJSONRPCError(t, res.immediate, 502, nil, -32603, "two responses with id 2")

	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(1, "get_customer", `{"id":"c1"}`) + "]"}, envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 400, nil, -32600, "id 1 is the id of an earlier request")
}

func TestBatchPatchedInOnePass(t *testing.T) {
	s := newDemoServer(t)
	// rego/inventory.rego caps list_items' limit at 100.
	body := "[" + call(1, "list_items", `{"limit":500}`) + "," + call(2, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(3, "list_items", `{"limit":900,"cursor":"c"}`) + "]"
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: body}, envoyUpstream{})
	if res.immediate != nil {
		t.Fatalf("refused: %s", res.immediate.GetBody())
	}
	want := "[" + call(1, "list_items", `{"limit":100}`) + "," + call(2, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(3, "list_items", `{"cursor":"c","limit":100}`) + "]"
	if res.forwardedBody != want {
		t.Fatalf("forwarded\n%s\nwant\n%s", res.forwardedBody, want)
	}
	if res.requestSet["content-length"] != fmt.Sprint(len(want)) {
		t.Errorf("content-length %q, want %d", res.requestSet["content-length"], len(want))
	}
}

func TestAbandonedRequestIsNotDecided(t *testing.T) {
	s := newDemoServer(t)
	st := &stream{s: s, cancel: nil}
	hdr := &extprocv3.HttpHeaders{Headers: headerMap(":method", "POST", ":path", "/mcp", "content-type", "application/json")}
	if r := st.requestHeaders(context.Background(), &extprocv3.ProcessingRequest{MetadataContext: agentMD}, hdr); r.GetImmediateResponse() != nil {
		t.Fatal(r.GetImmediateResponse())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := st.requestBody(ctx, &extprocv3.HttpBody{Body: []byte(call(1, "get_inventory", `{"product_id":"SKU-1"}`)), EndOfStream: true})
	requireJSONRPCError(t, r.GetImmediateResponse(), 503, nil, -32603, "ended before")
	s.Flush()
}

// Finding 6: callers cannot mint metric series; a flood of junk methods leaves every
// later decision in its own series.
func TestMetricLabelsBounded(t *testing.T) {
	s, reader := newMeteredDemoServer(t)
	const junk = 2500 // above the SDK's default cardinality limit of 2000
	for i := range junk {
		runEnvoy(t, s, envoyRequest{md: agentMD, body: fmt.Sprintf(`{"jsonrpc":"2.0","method":"notifications/x%d"}`, i)}, envoyUpstream{})
	}
	runEnvoy(t, s, envoyRequest{md: agentMD, body: call(1, "delete_product", `{"product_id":"SKU-1"}`)}, envoyUpstream{})
	s.Flush()
	sum, _ := collectMetric(t, reader, "mcpgate.mcp.decisions").(metricdata.Sum[int64])
	points := sum.DataPoints
	if len(points) == 0 || len(points) > 10 {
		t.Fatalf("%d decision series after %d junk methods, want a handful", len(points), junk)
	}
	var junkCount, denial int64
	for _, p := range points {
		if _, overflow := p.Attributes.Value(attribute.Key("otel.metric.overflow")); overflow {
			t.Errorf("overflow series: %v", p.Attributes)
		}
		method, _ := p.Attributes.Value("method")
		tool, _ := p.Attributes.Value("tool")
		switch {
		case method.AsString() == "other":
			junkCount += p.Value
		case method.AsString() == "tools/call" && tool.AsString() == "delete_product":
			denial += p.Value
		}
	}
	if junkCount != junk || denial != 1 {
		t.Errorf("junk methods counted %d times under method=other (want %d); the denial %d times (want 1): %v", junkCount, junk, denial, points)
	}
}

// Mcp-Session-Id is bound to the caller that opened the session: the client sees the
// server's id with a tag, and only the same identity can present it.
func TestSessionBoundToCaller(t *testing.T) {
	key := bytes.Repeat([]byte{7}, SessionKeyBytes)
	newServer := func(key []byte) *Server {
		snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
		if err != nil {
			t.Fatal(err)
		}
		s, err := NewServer(Options{Store: policy.NewStore(snap), SessionKey: key})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	s := newServer(key)
	init := `{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}`
	res := runEnvoy(t, s, envoyRequest{md: agentMD, body: init}, envoyUpstream{
		contentType: "application/json", headers: []string{"mcp-session-id", "server-session-1"},
		chunks: []string{`{"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18","capabilities":{},"serverInfo":{"name":"s","version":"1"}}}`},
	})
	bound := res.responseSet["mcp-session-id"]
	if !strings.HasPrefix(bound, "server-session-1.") || len(bound) < len("server-session-1.")+16 {
		t.Fatalf("the client got session id %q, want the server's bound to the caller", bound)
	}
	ping := `{"jsonrpc":"2.0","id":1,"method":"ping"}`
	res = runEnvoy(t, s, envoyRequest{md: agentMD, body: ping, headers: []string{"mcp-session-id", bound}}, envoyUpstream{})
	if res.immediate != nil || res.requestSet["mcp-session-id"] != "server-session-1" {
		t.Fatalf("the opener's request: immediate %v, upstream session %q", res.immediate, res.requestSet["mcp-session-id"])
	}
	// A replica with the same key accepts it too.
	if res := runEnvoy(t, newServer(key), envoyRequest{md: agentMD, body: ping, headers: []string{"mcp-session-id", bound}}, envoyUpstream{}); res.immediate != nil {
		t.Fatalf("a replica with the same key refused the session: %s", res.immediate.GetBody())
	}
	for name, req := range map[string]envoyRequest{
		"another caller":      {md: metadata("inventory", "other-agent", "mcp:tools", "inventory:read"), body: ping, headers: []string{"mcp-session-id", bound}},
		"the server's raw id": {md: agentMD, body: ping, headers: []string{"mcp-session-id", "server-session-1"}},
		"a forged tag":        {md: agentMD, body: ping, headers: []string{"mcp-session-id", "server-session-1.AAAAAAAAAAAAAAAAAAAAAA"}},
		"a GET stream":        {md: metadata("inventory", "other-agent"), method: "GET", headers: []string{"mcp-session-id", bound}},
		"another key":         {md: agentMD, body: ping, headers: []string{"mcp-session-id", bound}},
	} {
		t.Run(name, func(t *testing.T) {
			srv := s
			if name == "another key" {
				srv = newServer(bytes.Repeat([]byte{8}, SessionKeyBytes))
			}
			res := runEnvoy(t, srv, req, envoyUpstream{})
			requireJSONRPCError(t, res.immediate, 404, nil, -32001, "session not found")
		})
	}
	t.Run("two session headers", func(t *testing.T) {
		res := runEnvoy(t, s, envoyRequest{md: agentMD, body: ping, headers: []string{"mcp-session-id", bound, "mcp-session-id", bound}}, envoyUpstream{})
		requireJSONRPCError(t, res.immediate, 400, nil, -32600, "more than one Mcp-Session-Id")
	})
	if _, err := NewServer(Options{Store: s.store, SessionKey: []byte("short")}); err == nil {
		t.Error("a 5-byte session key was accepted")
	}
}
