package mcp

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// requireArgs parses body and returns the arguments of message i, decoded by encoding/json.
func requireArgs(t *testing.T, body []byte, i int) map[string]any {
	t.Helper()
	b, err := ParseBody(body, Limits{AllowBatch: true})
	if err != nil {
		t.Fatalf("patched body does not parse: %v\n%s", err, body)
	}
	return b.Messages[i].Arguments
}

func mustJSON(t *testing.T, s string) any {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestPatchArguments(t *testing.T) {
	const body = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search","arguments":{"q":"x","limit":1000,"opts":{"tags":["a","b"],"big":123456789012345678901234567890},"html":"<b>&</b>"},"_meta":{"progressToken":3}}}`
	cases := []struct {
		name string
		ops  []PatchOp
		want string // arguments after the patch
	}{
		{"replace", []PatchOp{{Op: "replace", Path: "/limit", Value: 100}},
			`{"q":"x","limit":100,"opts":{"tags":["a","b"],"big":123456789012345678901234567890},"html":"<b>&</b>"}`},
		{"add member", []PatchOp{{Op: "add", Path: "/tenant", Value: "acme"}},
			`{"q":"x","limit":1000,"opts":{"tags":["a","b"],"big":123456789012345678901234567890},"html":"<b>&</b>","tenant":"acme"}`},
		{"remove", []PatchOp{{Op: "remove", Path: "/opts/big"}},
			`{"q":"x","limit":1000,"opts":{"tags":["a","b"]},"html":"<b>&</b>"}`},
		{"array insert", []PatchOp{{Op: "add", Path: "/opts/tags/1", Value: "z"}},
			`{"q":"x","limit":1000,"opts":{"tags":["a","z","b"],"big":123456789012345678901234567890},"html":"<b>&</b>"}`},
		{"array append", []PatchOp{{Op: "add", Path: "/opts/tags/-", Value: map[string]any{"k": 1.5}}},
			`{"q":"x","limit":1000,"opts":{"tags":["a","b",{"k":1.5}],"big":123456789012345678901234567890},"html":"<b>&</b>"}`},
		{"array remove", []PatchOp{{Op: "remove", Path: "/opts/tags/0"}},
			`{"q":"x","limit":1000,"opts":{"tags":["b"],"big":123456789012345678901234567890},"html":"<b>&</b>"}`},
		{"test then replace", []PatchOp{{Op: "test", Path: "/limit", Value: 1000.0}, {Op: "replace", Path: "/q", Value: nil}},
			`{"q":null,"limit":1000,"opts":{"tags":["a","b"],"big":123456789012345678901234567890},"html":"<b>&</b>"}`},
		{"replace whole", []PatchOp{{Op: "replace", Path: "", Value: map[string]any{"only": true}}}, `{"only":true}`},
		{"escaped pointer", []PatchOp{{Op: "add", Path: "/a~1b~0c", Value: json.RawMessage(`[1, 2]`)}},
			`{"q":"x","limit":1000,"opts":{"tags":["a","b"],"big":123456789012345678901234567890},"html":"<b>&</b>","a/b~c":[1,2]}`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := requireParse(t, body, Limits{})
			out, err := PatchArguments(b, []byte(body), 0, c.ops)
			if err != nil {
				t.Fatal(err)
			}
			got := requireArgs(t, out, 0)
			if want := mustJSON(t, c.want); !reflect.DeepEqual(any(got), want) {
				t.Fatalf("arguments = %#v\nwant %#v", got, want)
			}
			// The rest of the message is unchanged in meaning.
			m := requireParse(t, string(out), Limits{}).Messages[0]
			if m.Tool != "search" || string(m.ID) != "1" || string(m.ProgressToken) != "3" {
				t.Fatalf("message changed: %+v", m)
			}
			if !strings.Contains(string(out), `<b>&</b>`) && strings.Contains(c.want, "<b>") {
				t.Fatalf("HTML-escaped: %s", out)
			}
			// The parsed message the policy saw is not mutated.
			if b.Messages[0].Arguments["limit"] != json.Number("1000") || len(b.Messages[0].Arguments) != 4 {
				t.Fatalf("original arguments mutated: %#v", b.Messages[0].Arguments)
			}
		})
	}
}

func TestPatchArgumentsErrors(t *testing.T) {
	const body = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"s","arguments":{"a":{"b":[1]},"n":1}}}`
	b := requireParse(t, body, Limits{})
	bad := []PatchOp{
		{Op: "replace", Path: "/missing", Value: 1},
		{Op: "remove", Path: "/missing"},
		{Op: "add", Path: "/x/y", Value: 1},
		{Op: "add", Path: "/a/b/2", Value: 1},
		{Op: "add", Path: "/a/b/01", Value: 1},
		{Op: "replace", Path: "/a/b/-", Value: 1},
		{Op: "remove", Path: "/a/b/-1"},
		{Op: "add", Path: "/n/x", Value: 1},
		{Op: "add", Path: "a", Value: 1},
		{Op: "add", Path: "/a~2", Value: 1},
		{Op: "remove", Path: ""},
		{Op: "replace", Path: "", Value: []int{1}},
		{Op: "test", Path: "/n", Value: 2},
		{Op: "test", Path: "/nope", Value: 2},
		{Op: "move", Path: "/n"},
		{Op: "copy", Path: "/n"},
		{Op: "frobnicate", Path: "/n"},
		{Op: "add", Path: "/f", Value: func() {}},
	}
	for _, op := range bad {
		if _, err := PatchArguments(b, []byte(body), 0, []PatchOp{op}); !errors.Is(err, ErrPatch) {
			t.Errorf("%+v: err = %v, want ErrPatch", op, err)
		}
	}
	// All or nothing: a failing second op leaves no trace (the body is not returned).
	if out, err := PatchArguments(b, []byte(body), 0, []PatchOp{{Op: "remove", Path: "/n"}, {Op: "remove", Path: "/n"}}); err == nil || out != nil {
		t.Fatalf("out %s err %v", out, err)
	}
	if _, err := PatchArguments(b, []byte(body+" "), 0, nil); err == nil {
		t.Fatal("accepted bytes of another body")
	}
	if _, err := PatchArguments(b, []byte(body), 1, nil); err == nil {
		t.Fatal("accepted a message index out of range")
	}
	nb := `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`
	if _, err := PatchArguments(requireParse(t, nb, Limits{}), []byte(nb), 0, nil); err == nil {
		t.Fatal("patched a tools/list")
	}
}

func TestPatchArgumentsInsertsMissingArguments(t *testing.T) {
	for _, body := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"s"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{ "name" : "s" , "_meta" : {} }  }`,
	} {
		b := requireParse(t, body, Limits{})
		out, err := PatchArguments(b, []byte(body), 0, []PatchOp{{Op: "add", Path: "/x", Value: 1}})
		if err != nil {
			t.Fatal(err)
		}
		if got := requireArgs(t, out, 0); !reflect.DeepEqual(got, map[string]any{"x": json.Number("1")}) {
			t.Fatalf("%s -> %s", body, out)
		}
	}
}

func TestPatchArgumentsBatchTouchesOnlyOneMessage(t *testing.T) {
	body := `[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"v":1}}},` +
		` {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"b","arguments":{"v":2}}},` +
		` {"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":0}}]`
	b := requireParse(t, body, Limits{AllowBatch: true})
	out, err := PatchArguments(b, []byte(body), 1, []PatchOp{{Op: "replace", Path: "/v", Value: "two"}})
	if err != nil {
		t.Fatal(err)
	}
	first := body[:strings.Index(body, "},")+2]
	last := body[strings.Index(body, ` {"jsonrpc":"2.0","method"`):]
	if !strings.HasPrefix(string(out), first) || !strings.HasSuffix(string(out), last) {
		t.Fatalf("other messages changed:\n%s", out)
	}
	if got := requireArgs(t, out, 1); got["v"] != "two" {
		t.Fatalf("message 1 arguments = %#v", got)
	}
}

func TestSameNumber(t *testing.T) {
	for _, c := range []struct {
		a, b string
		want bool
	}{
		{"1", "1", true}, {"1", "1.0", true}, {"1", "10e-1", true}, {"100", "1e2", true},
		{"0", "-0", true}, {"0", "0e5", true}, {"0.0", "-0.000e-3", true}, {"1", "2", false},
		{"-1", "1", false}, {"1e999999999", "1e999999998", false}, {"1e999999999", "10e999999998", true},
		{"123456789012345678901234567890", "123456789012345678901234567891", false},
	} {
		if got := sameNumber(c.a, c.b); got != c.want {
			t.Errorf("sameNumber(%s, %s) = %v", c.a, c.b, got)
		}
	}
}

func TestPatchTestOpAndNestedPaths(t *testing.T) {
	const body = `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"s","arguments":{"o":{"a":[1,{"b":2.50}],"s":"x","t":true,"n":null}}}}`
	b := requireParse(t, body, Limits{})
	pass := []PatchOp{
		{Op: "test", Path: "/o", Value: map[string]any{"a": []any{1, map[string]any{"b": 2.5}}, "s": "x", "t": true, "n": nil}},
		{Op: "test", Path: "/o/a/1/b", Value: json.Number("25e-1")},
		{Op: "replace", Path: "/o/a/1/b", Value: 3},
		{Op: "remove", Path: "/o/a/0"},
		{Op: "test", Path: "/o/a/0/b", Value: 3},
	}
	out, err := PatchArguments(b, []byte(body), 0, pass)
	if err != nil {
		t.Fatal(err)
	}
	if got := requireArgs(t, out, 0); !reflect.DeepEqual(any(got), mustJSON(t, `{"o":{"a":[{"b":3}],"s":"x","t":true,"n":null}}`)) {
		t.Fatalf("arguments = %#v", got)
	}
	for _, op := range []PatchOp{
		{Op: "test", Path: "/o", Value: map[string]any{"a": []any{1}, "s": "x", "t": true, "n": nil}},
		{Op: "test", Path: "/o", Value: map[string]any{"a": []any{1, 2}, "s": "x", "t": true, "n": nil}},
		{Op: "test", Path: "/o/a", Value: []any{1, map[string]any{"b": 2.5, "c": 1}}},
		{Op: "test", Path: "/o/a", Value: map[string]any{}},
		{Op: "test", Path: "/o/s", Value: 1},
		{Op: "test", Path: "/o/t", Value: false},
		{Op: "test", Path: "/o/n", Value: 0},
		{Op: "test", Path: "/o/a/5", Value: 0},
		{Op: "test", Path: "/o/s/x", Value: 0},
		{Op: "replace", Path: "/o/a/9/b", Value: 0},
		{Op: "replace", Path: "/o/s/x", Value: 0},
	} {
		if _, err := PatchArguments(b, []byte(body), 0, []PatchOp{op}); !errors.Is(err, ErrPatch) {
			t.Errorf("%+v: err = %v", op, err)
		}
	}
}

func TestAppendQuoted(t *testing.T) {
	for _, s := range []string{"", "plain", "q\"b\\s/", "\x00\x01\x1f\t\n\r", "é😀", "\u2028\u2029", "<&>"} {
		q := appendQuoted(nil, []byte(s))
		var back string
		if err := json.Unmarshal(q, &back); err != nil || back != s {
			t.Errorf("appendQuoted(%q) = %s (%v)", s, q, err)
		}
		if validate(q, 1) != nil {
			t.Errorf("appendQuoted(%q) = %s is not strict JSON", s, q)
		}
	}
	if got := string(appendQuoted(nil, []byte("\u2028<"))); got != `"\u2028<"` {
		t.Fatalf("got %s", got)
	}
}
