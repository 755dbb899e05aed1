package mcp

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestParseResponseBody(t *testing.T) {
	rb, err := ParseResponseBody([]byte(` {"jsonrpc":"2.0","id":"x","result":{"a":1}} `), Limits{})
	if err != nil || rb.Batch || len(rb.Responses) != 1 {
		t.Fatalf("rb %+v err %v", rb, err)
	}
	if r := rb.Responses[0]; string(r.ID) != `"x"` || string(r.Result) != `{"a":1}` || r.Error != nil || string(r.Raw) != `{"jsonrpc":"2.0","id":"x","result":{"a":1}}` {
		t.Fatalf("response = %+v", r)
	}
	rb, err = ParseResponseBody([]byte(`[{"jsonrpc":"2.0","id":1,"result":{}},{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad"}}]`), Limits{})
	if err != nil || !rb.Batch || len(rb.Responses) != 2 || string(rb.Responses[1].ID) != "null" {
		t.Fatalf("batch: %+v %v", rb, err)
	}
	for _, bad := range []string{
		`{"jsonrpc":"2.0","id":1,"result":{},"result":{}}`,
		`{"jsonrpc":"2.0","id":1,"result":{"x":"\ud800"}}`,
		`{"jsonrpc":"2.0","id":1}`,
		`{"jsonrpc":"2.0","result":{}}`,
		`{"jsonrpc":"2.0","id":1,"result":{},"error":{}}`,
		`{"jsonrpc":"2.0","id":1,"method":"x","result":{}}`,
		`{"id":1,"result":{}}`,
		`{"jsonrpc":"2.0","id":1,"result":[]}`,
		`[]`, `[1]`, `1`,
	} {
		if _, err := ParseResponseBody([]byte(bad), Limits{}); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestSameID(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{`1`, `1`, true}, {`"1"`, `1`, false}, {`1`, `"1"`, false}, {`"a"`, `"a"`, true},
		{`"\u0031"`, `"1"`, true}, {`"a"`, `"b"`, false}, {`1`, `1.0`, true}, {`1`, ` 1 `, true},
		{`9007199254740993`, `9007199254740992`, true}, // equal as IEEE doubles, as a JavaScript client sees them
		{`1e400`, `2e400`, false}, {`null`, `null`, false}, {`1`, ``, false}, {`true`, `true`, false},
		{`"\ud800"`, `"\ud800"`, true}, {`"x`, `"x"`, false},
	} {
		if got := SameID(json.RawMessage(c.a), json.RawMessage(c.b)); got != c.want {
			t.Errorf("SameID(%s, %s) = %v", c.a, c.b, got)
		}
	}
}

func TestRewriteResponse(t *testing.T) {
	body := []byte(`[{"jsonrpc":"2.0","id":1,"result":{"a":1}}, {"jsonrpc":"2.0","id":"1","result":{"b":2}}]`)
	out, found, err := RewriteResponse(body, json.RawMessage(`"1"`), Limits{}, func(resp []byte) ([]byte, error) {
		if string(resp) != `{"jsonrpc":"2.0","id":"1","result":{"b":2}}` {
			t.Fatalf("callback got %s", resp)
		}
		return []byte(`{"jsonrpc":"2.0","id":"1","result":{}}`), nil
	})
	if err != nil || !found {
		t.Fatal(found, err)
	}
	if string(out) != `[{"jsonrpc":"2.0","id":1,"result":{"a":1}}, {"jsonrpc":"2.0","id":"1","result":{}}]` {
		t.Fatalf("out = %s", out)
	}
	out, found, err = RewriteResponse(body, json.RawMessage(`2`), Limits{}, nil)
	if err != nil || found || string(out) != string(body) {
		t.Fatalf("no match: %s %v %v", out, found, err)
	}
}

// toolsList builds a tools/list response with n tools, each with a realistic inputSchema
// of about 300 bytes.
func toolsList(n int) []byte {
	var sb strings.Builder
	sb.WriteString(`{"jsonrpc":"2.0","id":3,"result":{"tools":[`)
	for i := 0; i < n; i++ {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"name":"tool_%d","title":"Tool %d","description":"Looks up inventory records by SKU and warehouse.",`+
			`"inputSchema":{"type":"object","properties":{"sku":{"type":"string","description":"Stock keeping unit","pattern":"^[A-Z]{2}-[0-9]{4}$"},`+
			`"warehouse":{"type":"string","enum":["north","south","east","west"]},"limit":{"type":"integer","minimum":1,"maximum":100,"default":10},`+
			`"include_archived":{"type":"boolean"}},"required":["sku"],"additionalProperties":false},`+
			`"annotations":{"readOnlyHint":true}}`, i, i)
	}
	sb.WriteString(`],"nextCursor":"abc","_meta":{"x":1},"future":[1,2]}}`)
	return []byte(sb.String())
}

func TestFilterList(t *testing.T) {
	resp := toolsList(10)
	out, removed, err := FilterList(resp, "tools", func(name string) bool { return name == "tool_3" || name == "tool_7" })
	if err != nil {
		t.Fatal(err)
	}
	if removed != 8 {
		t.Fatalf("removed = %d", removed)
	}
	var got struct {
		ID     int `json:"id"`
		Result struct {
			Tools []struct {
				Name        string          `json:"name"`
				InputSchema json.RawMessage `json:"inputSchema"`
			} `json:"tools"`
			NextCursor string          `json:"nextCursor"`
			Meta       json.RawMessage `json:"_meta"`
			Future     json.RawMessage `json:"future"`
		} `json:"result"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(got.Result.Tools) != 2 || got.Result.Tools[0].Name != "tool_3" || got.Result.Tools[1].Name != "tool_7" {
		t.Fatalf("tools = %+v", got.Result.Tools)
	}
	if got.ID != 3 || got.Result.NextCursor != "abc" || string(got.Result.Meta) != `{"x":1}` || string(got.Result.Future) != `[1,2]` {
		t.Fatalf("other members lost: %s", out)
	}
	// Kept entries are byte for byte.
	if !strings.Contains(string(out), `{"name":"tool_3","title":"Tool 3"`) {
		t.Fatalf("entry changed: %s", out)
	}
	// Keep all: the same bytes back.
	if out, removed, err := FilterList(resp, "tools", func(string) bool { return true }); err != nil || removed != 0 || string(out) != string(resp) {
		t.Fatalf("keep all: removed %d err %v", removed, err)
	}
	// Keep none: an empty array.
	out, removed, _ = FilterList(resp, "tools", func(string) bool { return false })
	if removed != 10 || !strings.Contains(string(out), `"tools":[],"nextCursor"`) {
		t.Fatalf("keep none: %s", out)
	}
}

func TestFilterListKinds(t *testing.T) {
	resp := []byte(`{"jsonrpc":"2.0","id":1,"result":{"resources":[{"uri":"file:///a","name":"a"},{"uri":"file:///b"},{"name":"no uri"},{"uri":7},"junk"],` +
		`"resourceTemplates":[{"uriTemplate":"db://{x}","name":"t"}],"prompts":[{"name":"p\u0031"}]}}`)
	out, removed, err := FilterList(resp, "resources", func(uri string) bool { return true })
	if err != nil || removed != 3 {
		t.Fatalf("removed %d err %v", removed, err)
	}
	if !strings.Contains(string(out), `"resources":[{"uri":"file:///a","name":"a"},{"uri":"file:///b"}],`) {
		t.Fatalf("out = %s", out)
	}
	var seen []string
	rec := func(s string) bool { seen = append(seen, s); return false }
	if _, _, err := FilterList(resp, "resourceTemplates", rec); err != nil {
		t.Fatal(err)
	}
	if _, _, err := FilterList(resp, "prompts", rec); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(seen, []string{"db://{x}", "p1"}) {
		t.Fatalf("names = %q", seen)
	}
	if _, _, err := FilterList(resp, "widgets", rec); err == nil {
		t.Fatal("unknown list accepted")
	}
	// Responses without the list come back unchanged.
	errResp := []byte(`{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}`)
	if out, n, err := FilterList(errResp, "tools", rec); err != nil || n != 0 || string(out) != string(errResp) {
		t.Fatalf("error response: %s %d %v", out, n, err)
	}
	for _, bad := range []string{
		`{"jsonrpc":"2.0","id":1,"result":{"tools":{}}}`,
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","name":"b"}]}}`, // the parser differential
		`{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"hidden"}]}}`,
		`{"jsonrpc":"2.0","id":1,"result":[]}`,
		`[{"jsonrpc":"2.0","id":1,"result":{}}]`,
	} {
		if _, _, err := FilterList([]byte(bad), "tools", rec); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}

func TestRedact(t *testing.T) {
	text := `{"name":"Ann","ssn":"123-45-6789","cards":[{"n":"4111","cvv":"123"},{"n":"5500"}],"a/b":1}`
	resp := []byte(`{"jsonrpc":"2.0","id":9,"result":{"content":[` +
		`{"type":"text","text":` + string(appendQuoted(nil, []byte(text))) + `},` +
		`{"type":"text","text":"ssn is secret, this is prose"},` +
		`{"type":"text","text":"[INFO] not json {"},` +
		`{"type":"image","data":"AAAA","mimeType":"image/png"},` +
		`{"type":"text","text":"[1, {\"ssn\": 2}]"}` +
		`],"structuredContent":` + text + `,"isError":false}}`)
	ptrs := [][]string{{"structuredContent", "ssn"}, {"structuredContent", "cards", "0", "cvv"}, {"structuredContent", "a/b"}, {"structuredContent", "missing"}}
	out, removed, err := Redact(resp, ptrs)
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Result struct {
			Content []struct {
				Type string `json:"type"`
				Text string `json:"text"`
			} `json:"content"`
			StructuredContent map[string]any `json:"structuredContent"`
			IsError           *bool          `json:"isError"`
		} `json:"result"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	wantSC := map[string]any{"name": "Ann", "cards": []any{map[string]any{"n": "4111"}, map[string]any{"n": "5500"}}}
	if !reflect.DeepEqual(got.Result.StructuredContent, wantSC) {
		t.Fatalf("structuredContent = %#v", got.Result.StructuredContent)
	}
	if got.Result.Content[0].Text != `{"name":"Ann","cards":[{"n":"4111"},{"n":"5500"}]}` {
		t.Fatalf("text mirror = %s", got.Result.Content[0].Text)
	}
	if got.Result.Content[1].Text != "ssn is secret, this is prose" || got.Result.Content[2].Text != "[INFO] not json {" {
		t.Fatalf("prose changed: %+v", got.Result.Content)
	}
	if got.Result.Content[4].Text != "[1, {\"ssn\": 2}]" || got.Result.IsError == nil {
		t.Fatalf("unrelated content changed: %s", out)
	}
	if removed != 6 { // 3 in structuredContent, 3 in the mirror
		t.Fatalf("removed = %d", removed)
	}
	// Nothing to remove: the same bytes back.
	if out, n, err := Redact(resp, [][]string{{"structuredContent", "nope"}}); err != nil || n != 0 || string(out) != string(resp) {
		t.Fatalf("no-op: %d %v", n, err)
	}
}

func TestRedactEdges(t *testing.T) {
	resp := []byte(`{"jsonrpc":"2.0","id":9,"result":{"content":[{"type":"text","text":"{\"a\":1}"},{"type":"text","text":"hi"}],"structuredContent":{"a":1},"other":{"x":[1,2,3]}}}`)
	// Removing structuredContent altogether also drops its JSON mirrors.
	out, n, err := Redact(resp, [][]string{{"structuredContent"}})
	if err != nil || n != 2 {
		t.Fatalf("n %d err %v", n, err)
	}
	if string(out) != `{"jsonrpc":"2.0","id":9,"result":{"content":[{"type":"text","text":"hi"}],"other":{"x":[1,2,3]}}}` {
		t.Fatalf("out = %s", out)
	}
	// Pointers outside structuredContent apply to the result as it is.
	out, n, err = Redact(resp, [][]string{{"other", "x", "1"}, {"other", "x", "-"}, {"other", "x", "9"}})
	if err != nil || n != 1 || !strings.Contains(string(out), `"other":{"x":[1,3]}`) {
		t.Fatalf("array element: %s %d %v", out, n, err)
	}
	if _, _, err := Redact(resp, [][]string{{}}); err == nil {
		t.Fatal("empty pointer accepted")
	}
	// A JSON mirror that is not strict JSON cannot be redacted reliably.
	dup := []byte(`{"jsonrpc":"2.0","id":9,"result":{"content":[{"type":"text","text":"{\"ssn\":1,\"ssn\":2}"}],"structuredContent":{"ssn":1}}}`)
	if _, _, err := Redact(dup, [][]string{{"structuredContent", "ssn"}}); err == nil {
		t.Fatal("duplicate keys in the text mirror accepted")
	}
	// Error responses have nothing to redact.
	e := []byte(`{"jsonrpc":"2.0","id":9,"error":{"code":1,"message":"m","data":{"ssn":1}}}`)
	if out, n, err := Redact(e, [][]string{{"structuredContent", "ssn"}}); err != nil || n != 0 || string(out) != string(e) {
		t.Fatalf("error response: %s %d %v", out, n, err)
	}
}

// The Python SDK writes the text mirror with pydantic_core.to_json, which writes NaN,
// Infinity and -Infinity bare: not strict JSON, yet no prose either.
func TestRedactTextMirrorWithNonFinite(t *testing.T) {
	withText := func(text string) []byte {
		return []byte(`{"jsonrpc":"2.0","id":9,"result":{"content":[{"type":"text","text":` + string(appendQuoted(nil, []byte(text))) +
			`}],"structuredContent":{"name":"Ann","ssn":"123-45-6789","score":null}}}`)
	}
	mirrorOf := func(out []byte) string {
		var got struct {
			Result struct {
				Content []struct{ Text string } `json:"content"`
			} `json:"result"`
		}
		if err := json.Unmarshal(out, &got); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if len(got.Result.Content) == 0 {
			return ""
		}
		return got.Result.Content[0].Text
	}
	ssn := [][]string{{"structuredContent", "ssn"}}
	for text, want := range map[string]string{
		"{\n  \"name\": \"Ann\",\n  \"ssn\": \"123-45-6789\",\n  \"score\": NaN\n}": "{\n  \"name\": \"Ann\",\n  \"score\": NaN\n}",
		`{"score":Infinity,"ssn":"123-45-6789","low":-Infinity}`:                    `{"score":Infinity,"low":-Infinity}`,
		`[{"ssn":"123-45-6789"},NaN]`:                                               `[{"ssn":"123-45-6789"},NaN]`, // not a pointer's target
		`{"s":"NaN \"Infinity\"","score":NaN,"ssn":"123-45-6789"}`:                  `{"s":"NaN \"Infinity\"","score":NaN}`,
		`{"name":"Ann","score":NaN}`:                                                `{"name":"Ann","score":NaN}`,
	} {
		out, _, err := Redact(withText(text), ssn)
		if err != nil {
			t.Fatalf("%q: %v", text, err)
		}
		if got := mirrorOf(out); got != want {
			t.Errorf("%q: mirror = %q, want %q", text, got, want)
		}
	}
	// A pointer of just structuredContent drops such a mirror too.
	if out, _, err := Redact(withText(`{"ssn":"123-45-6789","score":NaN}`), [][]string{{"structuredContent"}}); err != nil || mirrorOf(out) != "" {
		t.Fatalf("dropped mirror: %s %v", out, err)
	}
	// Prose still passes; text that is no JSON even so is prose.
	for _, text := range []string{"[INFO] 5 items", "[INFO] NaN items, Infinity left", "{NaN}", `[NaN, "x"`} {
		if out, _, err := Redact(withText(text), ssn); err != nil || mirrorOf(out) != text {
			t.Errorf("%q: %q %v", text, mirrorOf(out), err)
		}
	}
	// Strict reading otherwise: duplicate keys, and a string that reads as a placeholder.
	for _, text := range []string{`{"ssn":1,"ssn":2,"score":NaN}`, `{"a":"\u0000NaN","score":NaN,"ssn":1}`} {
		if _, _, err := Redact(withText(text), ssn); err == nil {
			t.Errorf("%q accepted", text)
		}
	}
}

func TestRemovePointer(t *testing.T) {
	for _, c := range []struct {
		doc  string
		toks []string
		want string
	}{
		{`{"a":1}`, []string{"a"}, `{}`},
		{`{ "a" : 1 , "b" : 2 }`, []string{"a"}, `{ "b" : 2 }`},
		{`{ "a" : 1 , "b" : 2 }`, []string{"b"}, `{ "a" : 1 }`},
		{`{"a":1,"b":2,"c":3}`, []string{"b"}, `{"a":1,"c":3}`},
		{`[1,2,3]`, []string{"0"}, `[2,3]`},
		{`[1,2,3]`, []string{"2"}, `[1,2]`},
		{`[[1,{"k\"":"v"}]]`, []string{"0", "1", `k"`}, `[[1,{}]]`},
		{`{"a":{"b":[{"c":1}]}}`, []string{"a", "b", "0", "c"}, `{"a":{"b":[{}]}}`},
		{`{"a":1}`, []string{"a", "b"}, `{"a":1}`},
		{`{"a":[1]}`, []string{"a", "01"}, `{"a":[1]}`},
		{`{"\u0061":1}`, []string{"a"}, `{}`},
	} {
		got, _ := removePointer([]byte(c.doc), c.toks)
		if string(got) != c.want {
			t.Errorf("removePointer(%s, %q) = %s, want %s", c.doc, c.toks, got, c.want)
		}
	}
}

// TestFilterListBatch: every named entry is asked about once, in order; unnamed entries
// are removed without being asked; an answer of the wrong length fails closed.
func TestFilterListBatch(t *testing.T) {
	resp := []byte(`{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"title":"no name"},{"name":"b"},{"name":"c"}]}}`)
	var asked []string
	out, removed, err := FilterListBatch(resp, "tools", func(names []string) []bool {
		asked = append(asked, names...)
		return []bool{true, false, true}
	})
	if err != nil || removed != 2 || strings.Join(asked, ",") != "a,b,c" {
		t.Fatalf("asked %v, removed %d, err %v", asked, removed, err)
	}
	if want := `{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"c"}]}}`; string(out) != want {
		t.Fatalf("got %s", out)
	}
	if _, _, err := FilterListBatch(resp, "tools", func(names []string) []bool { return []bool{true} }); err == nil {
		t.Fatal("a short answer was accepted")
	}
}
