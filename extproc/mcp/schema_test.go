package mcp

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestPruneOutputSchema(t *testing.T) {
	ptr := func(p string) []string { return strings.Split(strings.TrimPrefix(p, "/"), "/") }
	cases := []struct {
		name, entry string
		pointers    []string
		want        string // the outputSchema after; "" when the entry must be unchanged; "-" removed
	}{
		{"flat required, additionalProperties false",
			`{"name":"get_customer","outputSchema":{"type":"object","properties":{"name":{"type":"string"},"ssn":{"type":"string"}},"required":["name","ssn"],"additionalProperties":false}}`,
			[]string{"/structuredContent/ssn"},
			`{"additionalProperties":false,"properties":{"name":{"type":"string"}},"required":["name"],"type":"object"}`},
		{"last required name removes required",
			`{"name":"t","outputSchema":{"type":"object","properties":{"ssn":{"type":"string"}},"required":["ssn"]}}`,
			[]string{"/structuredContent/ssn"},
			`{"properties":{},"type":"object"}`},
		{"nested",
			`{"name":"t","outputSchema":{"type":"object","properties":{"owner":{"type":"object","properties":{"ssn":{},"id":{}},"required":["id","ssn"]}},"required":["owner"]}}`,
			[]string{"/structuredContent/owner/ssn"},
			`{"properties":{"owner":{"properties":{"id":{}},"required":["id"],"type":"object"}},"required":["owner"],"type":"object"}`},
		{"array items",
			`{"name":"t","outputSchema":{"type":"object","properties":{"rows":{"type":"array","items":{"type":"object","properties":{"ssn":{}},"required":["ssn"]}}}}}`,
			[]string{"/structuredContent/rows/0/ssn"},
			`{"properties":{"rows":{"items":{"properties":{},"type":"object"},"type":"array"}},"type":"object"}`},
		{"oneOf becomes anyOf, ref dropped, dependentRequired",
			`{"name":"t","outputSchema":{"$ref":"#/$defs/C","oneOf":[{"required":["ssn"]},{"required":["id"]}],"dependentRequired":{"id":["ssn"],"ssn":["id"]},"minProperties":2}}`,
			[]string{"/structuredContent/ssn"},
			`{"anyOf":[{},{"required":["id"]}],"dependentRequired":{"id":[]}}`},
		{"whole structuredContent removes the schema",
			`{"name":"t","outputSchema":{"type":"object"},"description":"d"}`,
			[]string{"/structuredContent"}, "-"},
		{"pointer outside structuredContent", `{"name":"t","outputSchema":{"required":["content"]}}`, []string{"/content"}, ""},
		{"no outputSchema", `{"name":"t","inputSchema":{}}`, []string{"/structuredContent/ssn"}, ""},
		{"property not described", `{"name":"t","outputSchema":{"type":"object","properties":{"a":{}}}}`, []string{"/structuredContent/ssn"}, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var ptrs [][]string
			for _, p := range c.pointers {
				ptrs = append(ptrs, ptr(p))
			}
			out, changed, err := PruneOutputSchema([]byte(c.entry), ptrs)
			if err != nil {
				t.Fatal(err)
			}
			if c.want == "" {
				if changed || string(out) != c.entry {
					t.Fatalf("changed to %s", out)
				}
				return
			}
			if !changed {
				t.Fatalf("unchanged: %s", out)
			}
			var got map[string]json.RawMessage
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("%s: %v", out, err)
			}
			if c.want == "-" {
				if _, ok := got["outputSchema"]; ok || got["description"] == nil {
					t.Fatalf("got %s", out)
				}
				return
			}
			var g, w any
			_ = json.Unmarshal(got["outputSchema"], &g)
			_ = json.Unmarshal([]byte(c.want), &w)
			if !reflect.DeepEqual(g, w) {
				t.Errorf("outputSchema = %s\nwant %s", got["outputSchema"], c.want)
			}
			if string(got["name"]) == "" {
				t.Errorf("name lost: %s", out)
			}
		})
	}
}

func TestPruneOutputSchemaRefusesBadJSON(t *testing.T) {
	if _, _, err := PruneOutputSchema([]byte(`{"name":"t","outputSchema":{"a":1,"a":2}}`), [][]string{{"structuredContent", "a"}}); err == nil {
		t.Fatal("duplicate keys accepted")
	}
	if _, _, err := PruneOutputSchema([]byte(`["x"]`), [][]string{{"structuredContent", "a"}}); err == nil {
		t.Fatal("a non-object accepted")
	}
}

func TestEditListEntriesReplaces(t *testing.T) {
	resp := `{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b","x":1},{"name":"c"}],"nextCursor":"n"}}`
	out, removed, err := EditListEntries([]byte(resp), "tools", func(names []string, entries [][]byte) ([]bool, [][]byte, error) {
		return []bool{true, true, false}, [][]byte{nil, []byte(`{"name":"b"}`), nil}, nil
	})
	if err != nil || removed != 1 {
		t.Fatal(removed, err)
	}
	if want := `{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a"},{"name":"b"}],"nextCursor":"n"}}`; string(out) != want {
		t.Fatalf("got  %s\nwant %s", out, want)
	}
}

func TestTaskRequestsAndHandles(t *testing.T) {
	b, err := ParseBody([]byte(`{"jsonrpc":"2.0","id":1,"method":"tasks/result","params":{"taskId":"t-1"}}`), Limits{})
	if err != nil || b.Messages[0].TaskID != "t-1" {
		t.Fatalf("%v %+v", err, b)
	}
	for _, bad := range []string{`{"taskId":7}`, `{}`, `{"taskId":"a\u0000b"}`} {
		if _, err := ParseBody([]byte(`{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":`+bad+`}`), Limits{}); err == nil {
			t.Errorf("tasks/get with params %s accepted", bad)
		}
	}
	id, ttl, ok, err := TaskHandle([]byte(`{"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"t-\u0031","status":"working","ttl":60000}}}`))
	if err != nil || !ok || id != "t-1" || ttl != 60000 {
		t.Fatalf("TaskHandle = %q %d %v %v", id, ttl, ok, err)
	}
	for _, resp := range []string{`{"jsonrpc":"2.0","id":1,"result":{"content":[]}}`, `{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}`, `{"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":1}}}`} {
		if _, _, ok, err := TaskHandle([]byte(resp)); ok || err != nil {
			t.Errorf("TaskHandle(%s) = %v %v", resp, ok, err)
		}
	}
}
