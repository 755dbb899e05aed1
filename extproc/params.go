package extproc

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy"
)

// Mcp-Param-{Name} headers (MCP 2026-07-28, Streamable HTTP "Custom Headers from Tool
// Parameters"): a tool's inputSchema may annotate a property with x-mcp-header, and a
// client calling the tool then mirrors the argument's value into Mcp-Param-{Name} so
// intermediaries can act on it without reading the body. mcpgate never decides on these
// headers, but whatever sits after it might, so it checks them against the body before
// anything else sees them:
//
//   - The bindings (property path → header name) are learned from the tools/list
//     responses mcpgate reads for the app (paramState), per replica.
//   - A tools/call of a tool whose bindings are known must carry exactly the annotated
//     arguments' values: a header for an absent or null argument, a missing header for
//     a present one, a value that differs (after =?base64?…?= decoding; integers compare
//     numerically), a header sent twice, or an undecodable one → 400 and -32020.
//   - Mcp-Param-* headers no binding accounts for (other methods, unannotated names) are
//     removed before the upstream: nothing validated them.
//   - A tool no list has shown through this replica yet has unknown bindings: its headers
//     pass unchanged to the server, which the specification requires to make the same
//     check (a client mirrors only what a list told it, so refusing would break every
//     call after a restart until the next list).
//   - Rego patches that change an annotated argument rewrite its header to match, so the
//     server never sees a disagreement mcpgate caused.

// paramHeaderPrefix is the lower-cased prefix of the mirrored argument headers.
const paramHeaderPrefix = contract.HeaderMCPParamPrefix

// paramBinding is one x-mcp-header annotation of a tool's inputSchema.
type paramBinding struct {
	path   []string // property names from arguments down to the annotated property
	header string   // the full header name, lower-cased: "mcp-param-region"
	name   string   // as the schema writes it: "Mcp-Param-Region"
}

// toolParams is what the lists showed of one tool's annotations.
type toolParams struct {
	bindings []paramBinding
	// invalid: the annotations break the specification's constraints (clients must not
	// use such a tool); its headers are not checked, only passed to the server.
	invalid bool
}

// paramState is what the tools/list responses showed of each app's annotations.
type paramState struct {
	mu    sync.RWMutex
	tools map[string]map[string]toolParams // app → tool → annotations
}

func newParamState() *paramState {
	return &paramState{tools: map[string]map[string]toolParams{}}
}

// learn records the annotations of a tools/list response's entries (names[i] is the
// name of entries[i]).
func (p *paramState) learn(app string, names []string, entries [][]byte) {
	learned := make(map[string]toolParams, len(names))
	for i, raw := range entries {
		if !bytes.Contains(raw, []byte("x-mcp-header")) && !bytes.Contains(raw, []byte(`\u`)) {
			// No annotation can be in it (a key spelled with \u escapes takes the long way):
			// most tools, decoded for nothing, were most of a list's cost. entries come from
			// a validated response and names[i] was read from raw.
			learned[names[i]] = toolParams{}
			continue
		}
		var e struct {
			Name        string          `json:"name"`
			InputSchema json.RawMessage `json:"inputSchema"`
		}
		if json.Unmarshal(raw, &e) != nil || e.Name != names[i] {
			continue
		}
		learned[e.Name] = parseParamBindings(e.InputSchema)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	tools := p.tools[app]
	if tools == nil {
		tools = map[string]toolParams{}
		p.tools[app] = tools
	}
	for name, tp := range learned {
		if _, known := tools[name]; known || len(tools) < maxPinnedTools {
			tools[name] = tp
		}
	}
}

// lookup returns what the lists showed of tool's annotations, if any list did.
func (p *paramState) lookup(app, tool string) (toolParams, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	tp, ok := p.tools[app][tool]
	return tp, ok
}

// schemaProperty is what an annotation needs of a JSON Schema.
type schemaProperty struct {
	Type       json.RawMessage           `json:"type"`
	XMCPHeader json.RawMessage           `json:"x-mcp-header"`
	Properties map[string]schemaProperty `json:"properties"`
}

// parseParamBindings reads the x-mcp-header annotations of an inputSchema, reachable
// through properties, and checks the constraints the specification puts on them: a
// non-empty RFC 9110 token, unique case-insensitively, on a string, integer or boolean
// property (number too: the conformance suite and the SDKs accept it).
func parseParamBindings(schema json.RawMessage) toolParams {
	if len(schema) == 0 {
		return toolParams{}
	}
	var root schemaProperty
	if json.Unmarshal(schema, &root) != nil {
		return toolParams{invalid: true}
	}
	var tp toolParams
	seen := map[string]bool{}
	var walk func(props map[string]schemaProperty, prefix []string)
	walk = func(props map[string]schemaProperty, prefix []string) {
		for name, prop := range props {
			path := append(append([]string(nil), prefix...), name)
			if prop.XMCPHeader != nil {
				var header, typ string
				_ = json.Unmarshal(prop.Type, &typ)
				if json.Unmarshal(prop.XMCPHeader, &header) != nil || !policy.IsToken(header) || seen[strings.ToLower(header)] ||
					(typ != "string" && typ != "integer" && typ != "boolean" && typ != "number") {
					tp.invalid = true
				} else {
					seen[strings.ToLower(header)] = true
					tp.bindings = append(tp.bindings, paramBinding{path: path, header: paramHeaderPrefix + strings.ToLower(header), name: "Mcp-Param-" + header})
				}
			}
			walk(prop.Properties, path)
		}
	}
	walk(root.Properties, nil)
	if tp.invalid {
		tp.bindings = nil
	}
	return tp
}

// argumentAt returns the argument at path, and whether it is present and not null.
func argumentAt(args map[string]any, path []string) (any, bool) {
	var cur any = args
	for _, name := range path {
		obj, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = obj[name]; !ok {
			return nil, false
		}
	}
	return cur, cur != nil
}

// paramCheck is the outcome of checking one request's Mcp-Param-* headers.
type paramCheck struct {
	mismatch string                      // why the headers disagree with the body; "" when they agree
	remove   []string                    // headers to remove before the upstream (not validated)
	set      []*corev3.HeaderValueOption // headers rewritten after a Rego patch (remirror)
}

// checkParams checks the Mcp-Param-* headers of a request (lower-cased name → every
// value sent) against its body. known says whether tp is what a list showed of the tool
// (only tools/call has annotations).
func checkParams(headers map[string][]string, method string, tp toolParams, known bool, args map[string]any) paramCheck {
	var c paramCheck
	if method != "tools/call" || !known {
		if method != "tools/call" {
			for h := range headers {
				c.remove = append(c.remove, h)
			}
		}
		return c
	}
	if tp.invalid {
		return c
	}
	bound := make(map[string]bool, len(tp.bindings))
	for _, b := range tp.bindings {
		bound[b.header] = true
		vals := headers[b.header]
		arg, present := argumentAt(args, b.path)
		where := strings.Join(b.path, ".")
		switch {
		case len(vals) > 1:
			c.mismatch = b.name + " sent more than once"
		case !present && len(vals) == 1:
			c.mismatch = b.name + " sent for absent or null argument " + strconvQuote(where)
		case !present:
			continue
		case len(vals) == 0:
			c.mismatch = "missing " + b.name + " for argument " + strconvQuote(where)
		default:
			if why := compareParam(vals[0], arg); why != "" {
				c.mismatch = b.name + " " + why + " argument " + strconvQuote(where)
			}
		}
		if c.mismatch != "" {
			return c
		}
	}
	for h := range headers {
		if !bound[h] {
			c.remove = append(c.remove, h)
		}
	}
	return c
}

// compareParam says how a header value disagrees with the argument, or "".
func compareParam(header string, arg any) string {
	decoded, ok := decodeParam(header)
	if !ok {
		return "is not valid =?base64?…?= for"
	}
	switch v := arg.(type) {
	case string:
		if decoded == v {
			return ""
		}
	case bool:
		if decoded == strconv.FormatBool(v) {
			return ""
		}
	case json.Number:
		// Integers (and numbers) compare numerically: 42.0 and 42 agree.
		want, err := strconv.ParseFloat(v.String(), 64)
		got, err2 := strconv.ParseFloat(decoded, 64)
		if err == nil && err2 == nil && got == want && !math.IsInf(got, 0) {
			return ""
		}
	default:
		return "cannot mirror the (non-primitive)"
	}
	return "does not match"
}

// decodeParam decodes a header value sent as =?base64?…?=; any other value is literal.
func decodeParam(v string) (string, bool) {
	if inner, ok := strings.CutPrefix(v, "=?base64?"); ok {
		if inner, ok = strings.CutSuffix(inner, "?="); ok {
			b, err := base64.StdEncoding.DecodeString(inner)
			return string(b), err == nil
		}
	}
	return v, true
}

// encodeParam is the header value a client sends for an argument (for rewriting the
// header of an argument a Rego patch changed), and whether the argument can be mirrored.
func encodeParam(arg any) (string, bool) {
	var s string
	switch v := arg.(type) {
	case string:
		s = v
	case bool:
		s = strconv.FormatBool(v)
	case json.Number:
		s = v.String()
	default:
		return "", false
	}
	plain := s == strings.TrimSpace(s) && !(strings.HasPrefix(s, "=?base64?") && strings.HasSuffix(s, "?="))
	for i := 0; plain && i < len(s); i++ {
		plain = s[i] >= 0x20 && s[i] <= 0x7e
	}
	if plain {
		return s, true
	}
	return "=?base64?" + base64.StdEncoding.EncodeToString([]byte(s)) + "?=", true
}

// remirror is the header mutation that makes the annotated headers say what args (the
// arguments after a Rego patch) say: set where the argument is there, removed where not.
func remirror(tp toolParams, args map[string]any, remove []string) ([]*corev3.HeaderValueOption, []string) {
	var set []*corev3.HeaderValueOption
	for _, b := range tp.bindings {
		arg, present := argumentAt(args, b.path)
		if v, ok := encodeParam(arg); present && ok {
			set = append(set, rawHeader(b.name, v))
		} else if !slices.Contains(remove, b.header) {
			remove = append(remove, b.header)
		}
	}
	return set, remove
}

// checkParamHeaders checks a 2026-07-28 request's Mcp-Param-* headers against its body
// (see the top of this file); it returns the tool's annotations as the lists showed them.
func (st *stream) checkParamHeaders(b *mcp.Body) (paramCheck, toolParams, refusal, bool) {
	if len(b.Messages) != 1 || b.Messages[0].Kind != kindRequest {
		var c paramCheck
		for h := range st.params {
			c.remove = append(c.remove, h)
		}
		return c, toolParams{}, refusal{}, true
	}
	m := b.Messages[0]
	var tp toolParams
	known := false
	if m.Method == "tools/call" {
		tp, known = st.s.params.lookup(st.app.ID, m.Tool)
	}
	c := checkParams(st.params, m.Method, tp, known, m.Arguments)
	if c.mismatch != "" {
		return c, tp, refusal{status: 400, rule: ruleHeaders, code: CodeHeaderMismatch, id: m.ID,
			reason: "Mcp-Param headers do not match the body: " + c.mismatch}, false
	}
	return c, tp, refusal{}, true
}

// paramLearner records the annotations of a tools/list response's entries.
func (st *stream) paramLearner() func(names []string, entries [][]byte) {
	app, p := st.app.ID, st.s.params
	return func(names []string, entries [][]byte) { p.learn(app, names, entries) }
}

// learnsParams reports whether the response is read to learn tool annotations.
func (st *stream) learnsParams() bool {
	return slices.ContainsFunc(st.plan, func(s responseStep) bool { return s.learn != nil })
}
