package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

// refScan is an independent reading of a JSON document with encoding/json's tokenizer: it
// reports duplicate keys (compared decoded, as every parser compares them) and the deepest
// nesting. It is slow and simple on purpose.
func refScan(data []byte) (dup bool, depth int, ok bool) {
	type frame struct {
		obj     bool
		wantKey bool
		keys    map[string]bool
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			return dup, depth, len(stack) == 0
		}
		if err != nil {
			return dup, depth, false
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		switch d := tok.(type) {
		case json.Delim:
			switch d {
			case '{', '[':
				if top != nil && top.obj {
					top.wantKey = true // after this value, a key again
				}
				stack = append(stack, &frame{obj: d == '{', wantKey: true, keys: map[string]bool{}})
				depth = max(depth, len(stack))
			default:
				stack = stack[:len(stack)-1]
			}
		default:
			if top != nil && top.obj {
				if top.wantKey {
					k := tok.(string)
					for other := range top.keys {
						// Keys equal but for case count as duplicates: encoding/json
						// would match either to one struct field.
						if strings.EqualFold(other, k) {
							dup = true
						}
					}
					top.keys[k] = true
					top.wantKey = false
				} else {
					top.wantKey = true
				}
			}
		}
	}
}

// refDecode decodes raw as encoding/json does with UseNumber.
func refDecode(t *testing.T, raw []byte, v any) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("encoding/json rejects what ParseBody accepted: %v\n%q", err, raw)
	}
}

func FuzzParseBody(f *testing.F) {
	for _, s := range []string{
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_inventory","arguments":{"sku":"A-1","limit":10.50,"n":[1,{"a":null}]},"_meta":{"progressToken":"p"}}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}`,
		`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","n\u0061me":"b"}}`,
		`[{"jsonrpc":"2.0","id":"x","method":"prompts/get","params":{"name":"p"}},{"jsonrpc":"2.0","method":"notifications/initialized"}]`,
		`{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///\u00e9"}}`,
		`{"jsonrpc":"2.0","id":3,"result":{"content":[]}}`,
		`{"jsonrpc":"2.0","id":3,"error":{"code":-1,"message":"x"}}`,
		"{\"jsonrpc\":\"2.0\",\"method\":\"\xff\"}",
		`{"jsonrpc":"2.0","method":"\ud83d\ude00\ud800"}`,
		`[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]`,
		`{"a":{"b":{"a":1,"b":2,"a":3}}}`,
		`{"jsonrpc":"2.0","id":-0,"method":"x"} `,
		`1e5`, `"\u0000"`, `[]`, ``,
	} {
		f.Add([]byte(s), true)
		f.Add([]byte(s), false)
	}
	const maxDepth = 32
	f.Fuzz(func(t *testing.T, body []byte, batch bool) {
		lim := Limits{AllowBatch: batch, MaxDepth: maxDepth, MaxBytes: 1 << 16}
		b, err := ParseBody(body, lim)

		// The validator against independent references.
		dup, depth, refOK := refScan(body)
		verr := validate(body, maxDepth)
		if verr == nil {
			switch {
			case !json.Valid(body) || !refOK:
				t.Fatalf("validator accepted invalid JSON %q", body)
			case dup:
				t.Fatalf("validator accepted duplicate keys %q", body)
			case !utf8.Valid(body):
				t.Fatalf("validator accepted invalid UTF-8 %q", body)
			case depth > maxDepth:
				t.Fatalf("validator accepted depth %d %q", depth, body)
			}
		} else if json.Valid(body) && utf8.Valid(body) && !dup && depth <= maxDepth && !bytes.Contains(body, []byte(`\u`)) {
			t.Fatalf("validator rejected unambiguous JSON: %v\n%q", verr, body)
		}

		if err != nil {
			var e *Error
			if !errors.Is(err, ErrTooLarge) && !errors.As(err, &e) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			if e != nil && e.Code != CodeParseError && e.Code != CodeInvalidRequest && e.Code != CodeInvalidParams {
				t.Fatalf("unexpected code %d", e.Code)
			}
			if e != nil && !json.Valid(ErrorResponse(e.ID, e.Code, e.Message)) {
				t.Fatalf("invalid error response for %v", e)
			}
			return
		}
		if verr != nil || dup {
			t.Fatalf("ParseBody accepted what the validator refused: %q", body)
		}
		if len(b.Messages) == 0 || (len(b.Messages) > 1 && !b.Batch) || (b.Batch && !batch) {
			t.Fatalf("body = %+v", b)
		}

		// What ParseBody extracted is what encoding/json reads.
		for _, m := range b.Messages {
			var top map[string]json.RawMessage
			refDecode(t, body[m.start:m.end], &top)
			if string(m.ID) != string(top["id"]) {
				t.Fatalf("id %s vs %s", m.ID, top["id"])
			}
			if m.Kind == KindResponse {
				continue
			}
			var method string
			refDecode(t, top["method"], &method)
			if method != m.Method || string(m.Params) != string(top["params"]) {
				t.Fatalf("method %q vs %q, params %s vs %s", m.Method, method, m.Params, top["params"])
			}
			var params map[string]json.RawMessage
			if m.Params != nil {
				refDecode(t, m.Params, &params)
			}
			str := func(raw json.RawMessage) string {
				var s string
				if raw != nil {
					refDecode(t, raw, &s)
				}
				return s
			}
			switch m.Method {
			case "tools/call":
				if m.Tool != str(params["name"]) {
					t.Fatalf("tool %q vs %q", m.Tool, str(params["name"]))
				}
				if raw, ok := params["arguments"]; ok {
					var want map[string]any
					refDecode(t, raw, &want)
					if !reflect.DeepEqual(m.Arguments, want) {
						t.Fatalf("arguments %#v vs %#v", m.Arguments, want)
					}
					// Re-marshalling the arguments reads back the same (numbers exactly).
					again, err := marshalCompact(m.Arguments)
					if err != nil {
						t.Fatal(err)
					}
					var back map[string]any
					refDecode(t, again, &back)
					if !reflect.DeepEqual(back, want) {
						t.Fatalf("round trip %#v vs %#v", back, want)
					}
				} else if m.Arguments != nil {
					t.Fatal("arguments without arguments")
				}
			case "prompts/get":
				if m.Prompt != str(params["name"]) {
					t.Fatalf("prompt %q", m.Prompt)
				}
			case "resources/read", "resources/subscribe", "resources/unsubscribe":
				if m.URI != str(params["uri"]) {
					t.Fatalf("uri %q", m.URI)
				}
			}
			if m.ProgressToken != nil {
				var meta map[string]json.RawMessage
				refDecode(t, params["_meta"], &meta)
				if string(meta["progressToken"]) != string(m.ProgressToken) {
					t.Fatalf("progressToken %s vs %s", m.ProgressToken, meta["progressToken"])
				}
			}
		}
	})
}

func FuzzFramer(f *testing.F) {
	for _, s := range []string{
		"data: a\n\n",
		"data: a\r\n\r\ndata: b\r\n\r\n",
		"data: a\r\rdata: b\r\r",
		"event: message\nid: 1\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
		"data: {\"jsonrpc\":\"2.0\",\n" + "data: \"id\":1,\"result\":{\"a\":[1,2]}}\r\n\r\n: c\n\n",
		"data: [{\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{}},{\"id\":2,\"result\":{}}]\n\n",
		"\xEF\xBB\xBFdata: {\"id\":1,\"result\":{}}\r\n\r",
		"id: 0\ndata:\n\n: ping\n\ndata: x",
		"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"x\":1,\"x\":2}}\n\n",
		"data: {\"id\":1,\"result\":{}}\n",
	} {
		f.Add([]byte(s), uint16(len(s)/2), uint16(5))
	}
	fn := func(resp []byte) ([]byte, error) {
		return []byte(`{"jsonrpc":"2.0","id":1,"result":{"n":` + fmt.Sprint(len(resp)) + "}\r\n}"), nil
	}
	f.Fuzz(func(t *testing.T, stream []byte, cut, cut2 uint16) {
		const maxEv = 256
		c1, c2 := 0, 0
		if len(stream) > 0 {
			c1, c2 = int(cut)%(len(stream)+1), int(cut2)%(len(stream)+1)
		}
		if c1 > c2 {
			c1, c2 = c2, c1
		}
		for _, cuts := range [][]int{{c1}, {c1, c2}} {
			wholeEvs, wholeRaw, wholeErr := frame(t, stream, nil, maxEv)
			evs, raw, err := frame(t, stream, cuts, maxEv)
			if (err == nil) != (wholeErr == nil) {
				t.Fatalf("cuts %v: error %v vs %v", cuts, err, wholeErr)
			}
			if !bytes.Equal(raw, wholeRaw) || (err == nil && !bytes.Equal(raw, stream)) {
				t.Fatalf("cuts %v: raw %q vs %q", cuts, raw, wholeRaw)
			}
			if fmt.Sprint(fieldsOf(evs)) != fmt.Sprint(fieldsOf(wholeEvs)) {
				t.Fatalf("cuts %v: fields\n%+v\n%+v", cuts, fieldsOf(evs), fieldsOf(wholeEvs))
			}

			wholeOut, wn, wholeErr := rewriteChunksID(stream, nil, fn)
			out, n, err := rewriteChunksID(stream, cuts, fn)
			if (err == nil) != (wholeErr == nil) || !bytes.Equal(out, wholeOut) || n != wn {
				t.Fatalf("cuts %v: rewriter\n%q %v\n%q %v", cuts, out, err, wholeOut, wholeErr)
			}
			// Nothing rewritten: the stream as it came, but for an unterminated last event
			// with data, which is dropped (its leading LF ends the event before it).
			want := stream
			if k := len(wholeEvs); k > 0 && wholeEvs[k-1].Incomplete && wholeEvs[k-1].HasData {
				last := &wholeEvs[k-1]
				want = stream[:len(stream)-len(last.Raw)]
				if last.leadLF {
					want = stream[:len(want)+1]
				}
			}
			if wn == 0 && wholeErr == nil && !bytes.Equal(wholeOut, want) {
				t.Fatalf("nothing rewritten, yet the output differs:\n%q\n%q", wholeOut, want)
			}
		}
	})
}

// rewriteChunksID runs a new Rewriter for id 1, with small limits, over stream cut at
// cuts.
func rewriteChunksID(stream []byte, cuts []int, fn func([]byte) ([]byte, error)) ([]byte, int, error) {
	r := NewRewriter(json.RawMessage(`1`), Limits{MaxBytes: 256, MaxDepth: 16}, fn)
	var out []byte
	err := feedChunks(stream, cuts, false, func(chunk []byte, last bool) error {
		got, err := r.Feed(chunk, last)
		out = append(out, got...)
		return err
	})
	return out, r.Rewritten(), err
}

// FuzzResponse checks the response rewriters on hostile input: no panics, and whatever they
// return is strict JSON again.
func FuzzResponse(f *testing.F) {
	f.Add([]byte(`{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","inputSchema":{}},{"name":"b"},{"x":1}],"nextCursor":"c"}}`), "a")
	f.Add([]byte(`{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"{\"ssn\":1,\"k\":[1,2]}"}],"structuredContent":{"ssn":1,"k":[1,2]}}}`), "ssn")
	f.Add([]byte(`[{"jsonrpc":"2.0","id":1,"result":{}}]`), "k")
	f.Fuzz(func(t *testing.T, resp []byte, name string) {
		if rb, err := ParseResponseBody(resp, Limits{AllowBatch: true}); err == nil {
			for i := range rb.Responses {
				if !bytes.Equal(rb.Replace(resp, i, rb.Responses[i].Raw), resp) {
					t.Fatal("Replace with the same response changed the body")
				}
			}
		}
		for _, key := range []string{"tools", "resources"} {
			out, n, err := FilterList(resp, key, func(s string) bool { return s == name })
			if err == nil && n > 0 && validate(out, respMaxDepth) != nil {
				t.Fatalf("FilterList produced invalid JSON: %q", out)
			}
		}
		ptrs := [][]string{{"structuredContent", name}, {"structuredContent", "k", "0"}, {"content", "0"}, {name}}
		out, n, err := Redact(resp, ptrs)
		if err == nil && n > 0 {
			if validate(out, respMaxDepth) != nil {
				t.Fatalf("Redact produced invalid JSON: %q", out)
			}
			if again, n2, err := Redact(out, ptrs[:1]); err != nil || n2 != 0 || !bytes.Equal(again, out) {
				t.Fatalf("Redact is not idempotent: %d %v", n2, err)
			}
		}
	})
}

// FuzzPruneOutputSchema: a server's tool definition is untrusted input. Pruning never
// panics, and what it returns is one valid JSON object that no longer describes the
// pruned property at its place in properties or required.
func FuzzPruneOutputSchema(f *testing.F) {
	for _, s := range []string{
		`{"name":"t","outputSchema":{"type":"object","properties":{"ssn":{}},"required":["ssn"],"additionalProperties":false}}`,
		`{"name":"t","outputSchema":{"oneOf":[{"required":["ssn"]},{"$ref":"#/x"}],"anyOf":[true],"dependentRequired":{"ssn":["a"],"a":["ssn"]}}}`,
		`{"name":"t","outputSchema":{"properties":{"ssn":{"properties":{"ssn":{}}}},"items":{"properties":{"ssn":{}}},"prefixItems":[{"required":["ssn"]}]}}`,
		`{"name":"t","outputSchema":true}`,
		`{"name":"t","outputSchema":{"then":{"required":["ssn"]},"else":7,"dependentSchemas":{"a":{"required":["ssn"]}}}}`,
	} {
		f.Add([]byte(s), "ssn")
		f.Add([]byte(s), "0/ssn")
	}
	f.Fuzz(func(t *testing.T, entry []byte, pointer string) {
		toks := append([]string{"structuredContent"}, strings.Split(pointer, "/")...)
		out, changed, err := PruneOutputSchema(entry, [][]string{toks})
		if err != nil {
			return
		}
		if !changed {
			if string(out) != string(entry) {
				t.Fatalf("unchanged but rewritten: %q -> %q", entry, out)
			}
			return
		}
		var v map[string]any
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatalf("pruned %q into invalid JSON %q: %v", entry, out, err)
		}
		if len(toks) == 2 {
			if s, ok := v["outputSchema"].(map[string]any); ok {
				if p, ok := s["properties"].(map[string]any); ok {
					if _, still := p[toks[1]]; still {
						t.Fatalf("%q still describes %q: %s", entry, toks[1], out)
					}
				}
				if r, ok := s["required"].([]any); ok && slices.Contains(r, any(toks[1])) {
					t.Fatalf("%q still requires %q: %s", entry, toks[1], out)
				}
			}
		}
	})
}
