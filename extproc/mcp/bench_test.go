package mcp

import (
	"encoding/json"
	"strconv"
	"strings"
	"testing"
)

// toolsCallBody is a typical tools/call body of about 300 bytes.
var toolsCallBody = []byte(`{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"get_inventory",` +
	`"arguments":{"sku":"AB-1234","warehouse":"north","limit":25,"include_archived":false,` +
	`"filters":{"min_qty":10,"tags":["electronics","clearance"],"updated_after":"2025-06-01T00:00:00Z"},` +
	`"note":"customer asked twice"},"_meta":{"progressToken":"tok-17"}}}`)

func BenchmarkParseToolsCall(b *testing.B) {
	b.SetBytes(int64(len(toolsCallBody)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseBody(toolsCallBody, Limits{}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseToolsCallEncodingJSON is the baseline: what encoding/json alone takes to
// decode the same body into a struct, without any of the strictness.
func BenchmarkParseToolsCallEncodingJSON(b *testing.B) {
	b.SetBytes(int64(len(toolsCallBody)))
	b.ReportAllocs()
	for b.Loop() {
		var m struct {
			JSONRPC string          `json:"jsonrpc"`
			ID      json.RawMessage `json:"id"`
			Method  string          `json:"method"`
			Params  struct {
				Name      string         `json:"name"`
				Arguments map[string]any `json:"arguments"`
			} `json:"params"`
		}
		if err := json.Unmarshal(toolsCallBody, &m); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkValidate(b *testing.B) {
	for _, c := range []struct {
		name string
		data []byte
	}{{"toolsCall", toolsCallBody}, {"toolsList500", toolsList(500)}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.data)))
			b.ReportAllocs()
			for b.Loop() {
				if err := validate(c.data, DefaultMaxDepth); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkFilterToolsList500(b *testing.B) {
	resp := toolsList(500)
	keep := func(name string) bool { n, _ := strconv.Atoi(strings.TrimPrefix(name, "tool_")); return n%2 == 0 }
	b.SetBytes(int64(len(resp)))
	b.ReportAllocs()
	for b.Loop() {
		if _, n, err := FilterList(resp, "tools", keep); err != nil || n != 250 {
			b.Fatal(n, err)
		}
	}
}

func BenchmarkPatchArguments(b *testing.B) {
	body, err := ParseBody(toolsCallBody, Limits{})
	if err != nil {
		b.Fatal(err)
	}
	ops := []PatchOp{{Op: "replace", Path: "/limit", Value: 10}, {Op: "remove", Path: "/note"}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := PatchArguments(body, toolsCallBody, 0, ops); err != nil {
			b.Fatal(err)
		}
	}
}

var toolResult = []byte(`{"jsonrpc":"2.0","id":17,"result":{"content":[{"type":"text","text":` +
	string(appendQuoted(nil, []byte(`{"name":"Ann","ssn":"123-45-6789","orders":[{"id":1,"total":"19.99"},{"id":2,"total":"5.00"}],"address":{"city":"Oslo"}}`))) +
	`}],"structuredContent":{"name":"Ann","ssn":"123-45-6789","orders":[{"id":1,"total":"19.99"},{"id":2,"total":"5.00"}],"address":{"city":"Oslo"}},"isError":false}}`)

func BenchmarkRedact(b *testing.B) {
	ptrs := [][]string{{"structuredContent", "ssn"}, {"structuredContent", "address", "city"}}
	b.SetBytes(int64(len(toolResult)))
	b.ReportAllocs()
	for b.Loop() {
		if _, n, err := Redact(toolResult, ptrs); err != nil || n != 4 {
			b.Fatal(n, err)
		}
	}
}

// sseStream is 100 progress notifications and the response, as an MCP server streams them.
func sseStream() []byte {
	var sb strings.Builder
	for i := 0; i < 100; i++ {
		sb.WriteString("event: message\nid: " + strconv.Itoa(i) + "\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":\"tok-17\",\"progress\":" + strconv.Itoa(i) + ",\"total\":100}}\n\n")
	}
	sb.WriteString("event: message\nid: 100\ndata: " + string(toolResult) + "\n\n")
	return []byte(sb.String())
}

func benchRewriter(b *testing.B, chunk int) {
	stream := sseStream()
	ptrs := [][]string{{"structuredContent", "ssn"}}
	fn := func(resp []byte) ([]byte, error) {
		out, _, err := Redact(resp, ptrs)
		return out, err
	}
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	for b.Loop() {
		r := NewRewriter(json.RawMessage(`17`), Limits{}, fn)
		for i := 0; i < len(stream); i += chunk {
			end := min(i+chunk, len(stream))
			if _, err := r.Feed(stream[i:end], end == len(stream)); err != nil {
				b.Fatal(err)
			}
		}
		if r.Rewritten() != 1 {
			b.Fatal("not rewritten")
		}
	}
}

func BenchmarkRewriterStream(b *testing.B) {
	for _, chunk := range []int{16 << 10, 1000, 64} {
		b.Run("chunk"+strconv.Itoa(chunk), func(b *testing.B) { benchRewriter(b, chunk) })
	}
}
