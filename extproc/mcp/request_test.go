package mcp

import (
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// requireCode fails unless err is an *Error with the given code (and, when msgPart is not
// empty, a message containing it).
func requireCode(t *testing.T, err error, code int, msgPart string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error = %v, want *Error with code %d", err, code)
	}
	if e.Code != code {
		t.Fatalf("code = %d (%s), want %d", e.Code, e.Message, code)
	}
	if msgPart != "" && !strings.Contains(e.Message, msgPart) {
		t.Fatalf("message %q does not contain %q", e.Message, msgPart)
	}
	return e
}

func requireParse(t *testing.T, body string, lim Limits) *Body {
	t.Helper()
	b, err := ParseBody([]byte(body), lim)
	if err != nil {
		t.Fatalf("ParseBody(%s): %v", body, err)
	}
	return b
}

func TestParseBodyStrictness(t *testing.T) {
	batch := Limits{AllowBatch: true}
	cases := []struct {
		name string
		body string
		lim  Limits
		code int
		msg  string
	}{
		{"invalid JSON", `{"jsonrpc":"2.0",`, Limits{}, CodeParseError, ""},
		{"empty body", ``, Limits{}, CodeParseError, ""},
		{"whitespace body", " \n", Limits{}, CodeParseError, ""},
		{"bare word", `hello`, Limits{}, CodeParseError, ""},
		{"single quotes", `{'a':1}`, Limits{}, CodeParseError, ""},
		{"trailing comma", `{"jsonrpc":"2.0","method":"x",}`, Limits{}, CodeParseError, ""},
		{"NaN", `{"jsonrpc":"2.0","method":"x","params":{"a":NaN}}`, Limits{}, CodeParseError, ""},
		{"leading zero", `{"jsonrpc":"2.0","id":01,"method":"x"}`, Limits{}, CodeParseError, ""},
		{"BOM", "\ufeff" + `{"jsonrpc":"2.0","method":"x"}`, Limits{}, CodeParseError, ""},
		{"invalid UTF-8 in string", "{\"jsonrpc\":\"2.0\",\"method\":\"a\xffb\"}", Limits{}, CodeParseError, "UTF-8"},
		{"invalid UTF-8 in key", "{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"\xc3\":1}", Limits{}, CodeParseError, "UTF-8"},
		{"overlong UTF-8", "{\"jsonrpc\":\"2.0\",\"method\":\"\xc0\xaf\"}", Limits{}, CodeParseError, "UTF-8"},
		{"UTF-8 encoded surrogate", "{\"jsonrpc\":\"2.0\",\"method\":\"\xed\xa0\x80\"}", Limits{}, CodeParseError, "UTF-8"},
		{"invalid UTF-8 outside strings", "{\"jsonrpc\":\"2.0\",\"method\":\"x\"}\xff", Limits{}, CodeParseError, ""},
		{"lone high surrogate", `{"jsonrpc":"2.0","method":"\ud800"}`, Limits{}, CodeParseError, "surrogate"},
		{"lone low surrogate", `{"jsonrpc":"2.0","method":"\udc00"}`, Limits{}, CodeParseError, "surrogate"},
		{"reversed surrogates", `{"jsonrpc":"2.0","method":"\udc00\ud800"}`, Limits{}, CodeParseError, "surrogate"},
		{"raw control char", "{\"jsonrpc\":\"2.0\",\"method\":\"a\tb\"}", Limits{}, CodeParseError, "control"},
		{"bad escape", `{"jsonrpc":"2.0","method":"\x"}`, Limits{}, CodeParseError, "escape"},
		{"duplicate top-level key", `{"jsonrpc":"2.0","method":"a","method":"b"}`, Limits{}, CodeParseError, `duplicate object key "method"`},
		{"duplicate tool name", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}`, Limits{}, CodeParseError, `duplicate object key "name"`},
		{"duplicate deep in arguments", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"x":[{"k":1,"k":2}]}}}`, Limits{}, CodeParseError, `duplicate object key "k"`},
		{"duplicate via escape", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}`, Limits{}, CodeParseError, `duplicate object key "name"`},
		{"duplicate via escaped slash", `{"jsonrpc":"2.0","method":"x","params":{"a/b":1,"a\/b":2}}`, Limits{}, CodeParseError, `duplicate object key "a/b"`},
		{"duplicate in batch element", `[{"jsonrpc":"2.0","method":"x","jsonrpc":"2.0"}]`, batch, CodeParseError, "duplicate"},
		{"two requests with one id", `[{"jsonrpc":"2.0","id":1,"method":"x"},{"jsonrpc":"2.0","id":2,"method":"y"},{"jsonrpc":"2.0","id":1,"method":"z"}]`, batch, CodeInvalidRequest, "batch element 2: id 1 is the id of an earlier request"},
		// encoding/json matches struct fields without case and keeps the last: a server
		// decoding so would run delete_product, or another method, or other arguments.
		{"tool name in another case", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_inventory","arguments":{},"Name":"delete_product"}}`, Limits{}, CodeParseError, `object keys "name" and "Name" differ only in case`},
		{"method in another case", `{"jsonrpc":"2.0","id":7,"method":"ping","Method":"tools/call"}`, Limits{}, CodeParseError, `"method" and "Method"`},
		{"arguments in another case", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"p":"SKU-1"},"ARGUMENTS":{"p":"../etc"}}}`, Limits{}, CodeParseError, "differ only in case"},
		{"argument in another case", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{"product_id":"SKU-1","Product_ID":"x"}}}`, Limits{}, CodeParseError, "differ only in case"},
		{"long s folds to s", `{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":{},"argument\u017f":{"p":1}}}`, Limits{}, CodeParseError, "differ only in case"},
		{"Kelvin sign folds to k", "{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"x\",\"params\":{\"k\":1,\"\u212a\":2}}", Limits{}, CodeParseError, "differ only in case"},
		{"too deep", `{"jsonrpc":"2.0","method":"x","params":{"a":[[[[1]]]]}}`, Limits{MaxDepth: 5}, CodeParseError, "nesting deeper than 5"},
		{"trailing garbage", `{"jsonrpc":"2.0","method":"x"} {}`, Limits{}, CodeParseError, "trailing"},
		{"trailing garbage 2", `{"jsonrpc":"2.0","method":"x"}x`, Limits{}, CodeParseError, "trailing"},
		{"jsonrpc missing", `{"method":"x"}`, Limits{}, CodeInvalidRequest, "jsonrpc"},
		{"jsonrpc 1.0", `{"jsonrpc":"1.0","method":"x"}`, Limits{}, CodeInvalidRequest, "jsonrpc"},
		{"jsonrpc number", `{"jsonrpc":2.0,"method":"x"}`, Limits{}, CodeInvalidRequest, "jsonrpc"},
		{"jsonrpc with space", `{"jsonrpc":"2.0 ","method":"x"}`, Limits{}, CodeInvalidRequest, "jsonrpc"},
		{"method missing", `{"jsonrpc":"2.0","id":1}`, Limits{}, CodeInvalidRequest, "method"},
		{"method not a string", `{"jsonrpc":"2.0","id":1,"method":1}`, Limits{}, CodeInvalidRequest, "method"},
		{"method null", `{"jsonrpc":"2.0","id":1,"method":null}`, Limits{}, CodeInvalidRequest, "method"},
		{"id null", `{"jsonrpc":"2.0","id":null,"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id boolean", `{"jsonrpc":"2.0","id":true,"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id object", `{"jsonrpc":"2.0","id":{},"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id array", `{"jsonrpc":"2.0","id":[1],"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id fractional", `{"jsonrpc":"2.0","id":1.5,"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id 1.0", `{"jsonrpc":"2.0","id":1.0,"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"id exponent", `{"jsonrpc":"2.0","id":1e3,"method":"x"}`, Limits{}, CodeInvalidRequest, "id"},
		{"params array", `{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}`, Limits{}, CodeInvalidRequest, "params"},
		{"params null", `{"jsonrpc":"2.0","id":1,"method":"x","params":null}`, Limits{}, CodeInvalidRequest, "params"},
		{"params string", `{"jsonrpc":"2.0","id":1,"method":"x","params":"a"}`, Limits{}, CodeInvalidRequest, "params"},
		{"not an object", `"x"`, Limits{}, CodeInvalidRequest, "object"},
		{"batch not allowed", `[{"jsonrpc":"2.0","method":"x"}]`, Limits{}, CodeInvalidRequest, "batch"},
		{"empty batch", `[]`, batch, CodeInvalidRequest, "empty"},
		{"batch of scalars", `[1]`, batch, CodeInvalidRequest, "batch element 0"},
		{"batch with bad element", `[{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","id":null,"method":"x"}]`, batch, CodeInvalidRequest, "batch element 1"},
		{"nested batch", `[[{"jsonrpc":"2.0","method":"x"}]]`, batch, CodeInvalidRequest, "batch element 0"},
		{"result and error", `{"jsonrpc":"2.0","id":1,"result":{},"error":{"code":1,"message":"m"}}`, Limits{}, CodeInvalidRequest, "not both"},
		{"response without id", `{"jsonrpc":"2.0","result":{}}`, Limits{}, CodeInvalidRequest, "id"},
		{"response with null id", `{"jsonrpc":"2.0","id":null,"result":{}}`, Limits{}, CodeInvalidRequest, "id"},
		{"result not object", `{"jsonrpc":"2.0","id":1,"result":1}`, Limits{}, CodeInvalidRequest, "result"},
		{"error not object", `{"jsonrpc":"2.0","id":1,"error":"boom"}`, Limits{}, CodeInvalidRequest, "error"},
		{"request with result", `{"jsonrpc":"2.0","id":1,"method":"x","result":{}}`, Limits{}, CodeInvalidRequest, "result"},
		{"tools/call without params", `{"jsonrpc":"2.0","id":1,"method":"tools/call"}`, Limits{}, CodeInvalidParams, "name"},
		{"tools/call without name", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{}}}`, Limits{}, CodeInvalidParams, "name"},
		{"tools/call name not string", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}`, Limits{}, CodeInvalidParams, "name"},
		{"tools/call empty name", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":""}}`, Limits{}, CodeInvalidParams, "empty"},
		{"tools/call NUL in name", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get\u0000x"}}`, Limits{}, CodeInvalidParams, "control"},
		{"tools/call arguments array", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[]}}`, Limits{}, CodeInvalidParams, "arguments"},
		{"tools/call arguments null", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":null}}`, Limits{}, CodeInvalidParams, "arguments"},
		{"tools/call arguments string", `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":"{}"}}`, Limits{}, CodeInvalidParams, "arguments"},
		{"tools/call notification without name", `{"jsonrpc":"2.0","method":"tools/call","params":{}}`, Limits{}, CodeInvalidParams, "name"},
		{"prompts/get without name", `{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{}}`, Limits{}, CodeInvalidParams, "name"},
		{"resources/read without uri", `{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"name":"x"}}`, Limits{}, CodeInvalidParams, "uri"},
		{"resources/subscribe uri not string", `{"jsonrpc":"2.0","id":1,"method":"resources/subscribe","params":{"uri":1}}`, Limits{}, CodeInvalidParams, "uri"},
		{"resources/unsubscribe without params", `{"jsonrpc":"2.0","id":1,"method":"resources/unsubscribe"}`, Limits{}, CodeInvalidParams, "uri"},
		{"_meta not object", `{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":1}}`, Limits{}, CodeInvalidParams, "_meta"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseBody([]byte(c.body), c.lim)
			requireCode(t, err, c.code, c.msg)
		})
	}
}

func TestParseBodyErrorCarriesID(t *testing.T) {
	_, err := ParseBody([]byte(`{"jsonrpc":"2.0","id":"req-7","method":"tools/call","params":{}}`), Limits{})
	e := requireCode(t, err, CodeInvalidParams, "")
	if string(e.ID) != `"req-7"` {
		t.Fatalf("ID = %s", e.ID)
	}
	resp := ErrorResponse(e.ID, e.Code, e.Message)
	var got struct {
		JSONRPC string          `json:"jsonrpc"`
		ID      json.RawMessage `json:"id"`
		Error   struct {
			Code    int    `json:"code"`
			Message string `json:"message"`
		} `json:"error"`
	}
	if err := json.Unmarshal(resp, &got); err != nil {
		t.Fatalf("ErrorResponse is not JSON: %v: %s", err, resp)
	}
	if got.JSONRPC != "2.0" || string(got.ID) != `"req-7"` || got.Error.Code != CodeInvalidParams || got.Error.Message != e.Message {
		t.Fatalf("ErrorResponse = %s", resp)
	}
	if r := ErrorResponse(nil, -32001, "denied \"x\"\n\xff"); !json.Valid(r) || !strings.Contains(string(r), `"id":null`) {
		t.Fatalf("ErrorResponse(nil) = %s", r)
	}
}

func TestParseBodyTooLarge(t *testing.T) {
	body := `{"jsonrpc":"2.0","method":"x","params":{"pad":"` + strings.Repeat("a", 100) + `"}}`
	if _, err := ParseBody([]byte(body), Limits{MaxBytes: 64}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("err = %v, want ErrTooLarge", err)
	}
	if _, err := ParseBody([]byte(body), Limits{MaxBytes: len(body)}); err != nil {
		t.Fatalf("at the limit: %v", err)
	}
	big := make([]byte, DefaultMaxBytes+1)
	if _, err := ParseBody(big, Limits{}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("default limit: err = %v", err)
	}
}

func TestParseBodyDepthBoundary(t *testing.T) {
	nest := func(n int) string {
		return `{"jsonrpc":"2.0","method":"x","params":{"a":` + strings.Repeat("[", n) + strings.Repeat("]", n) + `}}`
	}
	// The message is depth 1, params 2, so n arrays reach depth 2+n.
	requireParse(t, nest(DefaultMaxDepth-2), Limits{})
	_, err := ParseBody([]byte(nest(DefaultMaxDepth-1)), Limits{})
	requireCode(t, err, CodeParseError, "nesting")
	// Far deeper than any limit: must fail fast, not overflow anything.
	_, err = ParseBody([]byte(strings.Repeat("[", 500000)), Limits{})
	requireCode(t, err, CodeParseError, "nesting")
}

func TestParseToolsCall(t *testing.T) {
	body := `{"jsonrpc":"2.0","id":42,"method":"tools/call","params":{"name":"get_inventory",` +
		`"arguments":{"sku":"A-1","limit":10,"big":12345678901234567890123,"price":1.10,"exp":1E+2,` +
		`"nested":{"list":[1,"two",true,null,{"x":-0.0}]},"esc":"\u00e9\n\ud83d\ude00<&>"},` +
		`"_meta":{"progressToken":"tok-1"}}}`
	b := requireParse(t, body, Limits{})
	if b.Batch || len(b.Messages) != 1 {
		t.Fatalf("body = %+v", b)
	}
	m := b.Messages[0]
	if m.Kind != KindRequest || string(m.ID) != "42" || m.Method != "tools/call" || m.Tool != "get_inventory" {
		t.Fatalf("message = %+v", m)
	}
	if string(m.ProgressToken) != `"tok-1"` {
		t.Fatalf("ProgressToken = %s", m.ProgressToken)
	}
	dec := json.NewDecoder(strings.NewReader(string(m.Params)))
	dec.UseNumber()
	var params struct {
		Arguments map[string]any `json:"arguments"`
	}
	if err := dec.Decode(&params); err != nil {
		t.Fatal(err)
	}
	want := params.Arguments
	if !reflect.DeepEqual(m.Arguments, want) {
		t.Fatalf("Arguments = %#v\nwant %#v", m.Arguments, want)
	}
	// Numbers round-trip exactly.
	for k, lit := range map[string]string{"limit": "10", "big": "12345678901234567890123", "price": "1.10", "exp": "1E+2"} {
		if n, ok := m.Arguments[k].(json.Number); !ok || string(n) != lit {
			t.Fatalf("Arguments[%s] = %#v, want json.Number(%s)", k, m.Arguments[k], lit)
		}
	}
	if m.Arguments["esc"] != "é\n😀<&>" {
		t.Fatalf("esc = %q", m.Arguments["esc"])
	}
}

func TestParseBodyKinds(t *testing.T) {
	body := `[
	  {"jsonrpc":"2.0","id":"a","method":"prompts/get","params":{"name":"greet"}},
	  {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":5}},
	  {"jsonrpc":"2.0","id":7,"result":{"content":[]}},
	  {"jsonrpc":"2.0","id":-3,"error":{"code":-1,"message":"no"}},
	  {"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///etc/motd"}},
	  {"jsonrpc":"2.0","id":3,"method":"resources/subscribe","params":{"uri":"db://x"}},
	  {"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"noargs"}},
	  {"jsonrpc":"2.0","id":5,"method":"tools/list","extra":"ignored"},
	  {"jsonrpc":"2.0","method":"tools/call","params":{"name":"as_notification","arguments":{}}}
	]`
	b := requireParse(t, body, Limits{AllowBatch: true})
	if !b.Batch || len(b.Messages) != 9 {
		t.Fatalf("got %d messages, batch %v", len(b.Messages), b.Batch)
	}
	ms := b.Messages
	check := func(i int, kind Kind, id, method string) {
		t.Helper()
		if ms[i].Kind != kind || string(ms[i].ID) != id || ms[i].Method != method {
			t.Fatalf("message %d = %v %s %q", i, ms[i].Kind, ms[i].ID, ms[i].Method)
		}
	}
	check(0, KindRequest, `"a"`, "prompts/get")
	check(1, KindNotification, "", "notifications/progress")
	check(2, KindResponse, "7", "")
	check(3, KindResponse, "-3", "")
	check(4, KindRequest, "2", "resources/read")
	check(6, KindRequest, "4", "tools/call")
	check(7, KindRequest, "5", "tools/list")
	check(8, KindNotification, "", "tools/call")
	if ms[0].Prompt != "greet" || ms[4].URI != "file:///etc/motd" || ms[5].URI != "db://x" {
		t.Fatalf("prompt %q uri %q %q", ms[0].Prompt, ms[4].URI, ms[5].URI)
	}
	if ms[6].Tool != "noargs" || ms[6].Arguments != nil {
		t.Fatalf("noargs: %q %#v", ms[6].Tool, ms[6].Arguments)
	}
	if ms[8].Tool != "as_notification" || ms[8].Arguments == nil {
		t.Fatalf("tools/call notification not extracted: %+v", ms[8])
	}
	if ms[1].ID != nil || ms[1].ProgressToken != nil {
		t.Fatalf("notification: id %s token %s", ms[1].ID, ms[1].ProgressToken)
	}
}

func TestParseBodyEscapedMemberNames(t *testing.T) {
	// Escaped spellings of the JSON-RPC member names are the same names to every parser.
	b := requireParse(t, `{"json\u0072pc":"2.\u0030","\u0069d":1,"method":"tools\/call","params":{"n\u0061me":"x\u0079"}}`, Limits{})
	if m := b.Messages[0]; m.Method != "tools/call" || m.Tool != "xy" || string(m.ID) != "1" {
		t.Fatalf("message = %+v", m)
	}
	// Case matters: encoding/json would map "Method" onto a struct field "method"; we do not.
	_, err := ParseBody([]byte(`{"jsonrpc":"2.0","id":1,"Method":"tools/call"}`), Limits{})
	requireCode(t, err, CodeInvalidRequest, "method")
}

func TestParseBodyManyKeys(t *testing.T) {
	// Past the linear-scan threshold the key set switches to a map; duplicates are still
	// found wherever they are.
	var sb strings.Builder
	sb.WriteString(`{"jsonrpc":"2.0","method":"x","params":{`)
	for i := 0; i < 200; i++ {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(`"k` + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + strconv.Itoa(i) + `":1`)
	}
	ok := sb.String() + `}}`
	requireParse(t, ok, Limits{})
	for _, dupAt := range []int{1, 15, 16, 17, 150} {
		dup := sb.String() + `,"k` + strings.Repeat("x", dupAt%7) + string(rune('a'+dupAt%26)) + strconv.Itoa(dupAt) + `":2}}`
		_, err := ParseBody([]byte(dup), Limits{})
		requireCode(t, err, CodeParseError, "duplicate")
		// And in another case, in the map too.
		dup = sb.String() + `,"K` + strings.Repeat("X", dupAt%7) + string(rune('A'+dupAt%26)) + strconv.Itoa(dupAt) + `":2}}`
		_, err = ParseBody([]byte(dup), Limits{})
		requireCode(t, err, CodeParseError, "differ only in case")
	}
	// Sibling objects at the same depth do not share keys.
	requireParse(t, `{"jsonrpc":"2.0","method":"x","params":{"a":{"k":1},"b":{"k":1},"c":[{"k":1},{"k":1}]}}`, Limits{})
}

func TestParseBodyLimitsCeilingAndClippedKeys(t *testing.T) {
	// A huge MaxDepth is lowered to the ceiling: parsing recurses once per level.
	deep := strings.Repeat("[", MaxDepthCeiling+1) + strings.Repeat("]", MaxDepthCeiling+1)
	_, err := ParseBody([]byte(deep), Limits{MaxDepth: 1 << 30, AllowBatch: true})
	requireCode(t, err, CodeParseError, "nesting deeper than 10000")
	// Error messages quote at most 64 bytes of a duplicate key.
	long := strings.Repeat("é", 100)
	_, err = ParseBody([]byte(`{"jsonrpc":"2.0","method":"x","params":{"`+long+`":1,"`+long+`":2}}`), Limits{})
	e := requireCode(t, err, CodeParseError, "duplicate")
	if len(e.Message) > 160 || !utf8.ValidString(e.Message) {
		t.Fatalf("message %d bytes: %q", len(e.Message), e.Message)
	}
}
