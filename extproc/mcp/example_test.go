package mcp_test

import (
	"encoding/json"
	"fmt"

	"github.com/mcpgate/mcpgate/extproc/mcp"
)

func ExampleParseBody() {
	body := []byte(`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_inventory","arguments":{"sku":"A-1","limit":10}}}`)
	b, err := mcp.ParseBody(body, mcp.Limits{})
	if err != nil {
		// *mcp.Error: answer it with mcp.ErrorResponse(e.ID, e.Code, e.Message);
		// mcp.ErrTooLarge: answer HTTP 413.
		panic(err)
	}
	m := b.Messages[0]
	fmt.Println(m.Kind, m.Method, m.Tool, m.Arguments["limit"])

	_, err = mcp.ParseBody([]byte(`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}`), mcp.Limits{})
	fmt.Println(err)
	// Output:
	// request tools/call get_inventory 10
	// jsonrpc error -32700: parse error: duplicate object key "name" at offset 67
}

func ExampleRewriter() {
	// Redact the response to request 7 in an event stream, whatever the chunking.
	redact := func(resp []byte) ([]byte, error) {
		out, _, err := mcp.Redact(resp, [][]string{{"structuredContent", "ssn"}})
		return out, err
	}
	r := mcp.NewRewriter(json.RawMessage(`7`), mcp.Limits{}, redact)
	for _, chunk := range []string{
		"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":7,\"progress\":1}}\n\n",
		"event: message\nid: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[],",
		"\"structuredContent\":{\"name\":\"Ann\",\"ssn\":\"123\"}}}\r\n\r\n",
	} {
		out, err := r.Feed([]byte(chunk), false)
		if err != nil {
			panic(err) // abort the stream: fail closed
		}
		fmt.Printf("%q\n", out)
	}
	// Output:
	// "event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{\"progressToken\":7,\"progress\":1}}\n\n"
	// ""
	// "event: message\nid: 2\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"content\":[],\"structuredContent\":{\"name\":\"Ann\"}}}\n\n"
}

func ExampleFilterList() {
	resp := []byte(`{"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"get_inventory","inputSchema":{"type":"object"}},{"name":"delete_all","inputSchema":{"type":"object"}}],"nextCursor":"c2"}}`)
	out, removed, err := mcp.FilterList(resp, "tools", func(name string) bool { return name != "delete_all" })
	fmt.Println(string(out), removed, err)
	// Output:
	// {"jsonrpc":"2.0","id":3,"result":{"tools":[{"name":"get_inventory","inputSchema":{"type":"object"}}],"nextCursor":"c2"}} 1 <nil>
}
