package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
)

// respMaxDepth bounds the nesting FilterList and Redact accept. They re-check their input
// for safety only; the policy limit is enforced where bodies and events enter
// (ParseResponseBody, Rewriter), with the caller's Limits.
const respMaxDepth = 1000

// Response is one JSON-RPC response of a JSON response body. Raw fields alias the body.
type Response struct {
	ID     json.RawMessage // raw id; null for errors about unreadable requests
	Result json.RawMessage // raw result object, or nil
	Error  json.RawMessage // raw error object, or nil
	Raw    json.RawMessage // the whole response object
	start  int
}

// ResponseBody is a parsed application/json response body.
type ResponseBody struct {
	Responses []Response
	Batch     bool
}

// ParseResponseBody parses a JSON response body: one JSON-RPC response or a batch of them
// (lim.AllowBatch is not consulted: the client decides whether it sent a batch).
// It is as strict as ParseBody (the server's bytes are decided on here and read by another
// parser in the client). Errors are ErrTooLarge or *Error; a caller treats them as a bad
// upstream response.
func ParseResponseBody(body []byte, lim Limits) (*ResponseBody, error) {
	lim = lim.withDefaults()
	if len(body) > lim.MaxBytes {
		return nil, ErrTooLarge
	}
	v, err := validateIndexed(body, lim.MaxDepth, 3) // batch, response, result
	defer v.release()
	if err != nil {
		return nil, newError(CodeParseError, nil, "parse error: %v", err)
	}
	x := v.index()
	rb := &ResponseBody{}
	i := skipWS(body, 0)
	switch body[i] {
	case '{':
		r, err := parseResponse(body, i, x)
		if err != nil {
			return nil, err
		}
		rb.Responses = []Response{r}
	case '[':
		rb.Batch = true
		for it := newElements(body, i, x); ; {
			start, _, ok := it.next()
			if !ok {
				break
			}
			if body[start] != '{' {
				return nil, newError(CodeInvalidRequest, nil, "batch element %d is not an object", len(rb.Responses))
			}
			r, err := parseResponse(body, start, x)
			if err != nil {
				return nil, err
			}
			rb.Responses = append(rb.Responses, r)
		}
		if len(rb.Responses) == 0 {
			return nil, newError(CodeInvalidRequest, nil, "empty JSON-RPC batch")
		}
	default:
		return nil, newError(CodeInvalidRequest, nil, "a JSON-RPC response must be an object")
	}
	return rb, nil
}

func parseResponse(body []byte, i int, x spanIndex) (Response, *Error) {
	r := Response{start: i}
	var method, version bool
	var mb member
	it := newMembers(body, i, x)
	for it.next(&mb) {
		switch {
		case mb.is("id"):
			r.ID = raw(body, span{mb.start, mb.end})
		case mb.is("result"):
			r.Result = raw(body, span{mb.start, mb.end})
		case mb.is("error"):
			r.Error = raw(body, span{mb.start, mb.end})
		case mb.is("method"):
			method = true
		case mb.is("jsonrpc"):
			version = body[mb.start] == '"' && stringValue(body, mb.start, mb.end) == "2.0"
		}
	}
	r.Raw = raw(body, span{i, it.end})
	switch {
	case !version:
		return r, newError(CodeInvalidRequest, r.ID, `"jsonrpc" must be "2.0"`)
	case method:
		return r, newError(CodeInvalidRequest, r.ID, "a request or notification where a response was expected")
	case r.ID == nil:
		return r, newError(CodeInvalidRequest, nil, `a response must have an "id"`)
	case (r.Result == nil) == (r.Error == nil):
		return r, newError(CodeInvalidRequest, r.ID, `a response has exactly one of "result" and "error"`)
	case r.Result != nil && r.Result[0] != '{':
		return r, newError(CodeInvalidRequest, r.ID, `"result" must be an object`)
	case r.Error != nil && r.Error[0] != '{':
		return r, newError(CodeInvalidRequest, r.ID, `"error" must be an object`)
	}
	return r, nil
}

// Find returns the index of the first response whose id is the same as id (see SameID),
// or -1.
func (rb *ResponseBody) Find(id json.RawMessage) int {
	for i := range rb.Responses {
		if SameID(rb.Responses[i].ID, id) {
			return i
		}
	}
	return -1
}

// Replace returns body, from which rb was parsed, with response i replaced by resp.
func (rb *ResponseBody) Replace(body []byte, i int, resp []byte) []byte {
	r := &rb.Responses[i]
	end := r.start + len(r.Raw)
	out := make([]byte, 0, len(body)-len(r.Raw)+len(resp))
	out = append(out, body[:r.start]...)
	out = append(out, resp...)
	return append(out, body[end:]...)
}

// RewriteResponse rewrites, in a JSON response body, the response whose id is the same as
// id with fn, and returns the new body and whether such a response was found. fn receives
// the response object and returns its replacement (e.g. via FilterList or Redact); it is
// the same callback a Rewriter takes for event streams.
func RewriteResponse(body []byte, id json.RawMessage, lim Limits, fn func(resp []byte) ([]byte, error)) ([]byte, bool, error) {
	rb, err := ParseResponseBody(body, lim)
	if err != nil {
		return nil, false, err
	}
	i := rb.Find(id)
	if i < 0 {
		return body, false, nil
	}
	resp, err := fn(rb.Responses[i].Raw)
	if err != nil {
		return nil, true, err
	}
	// The callback's output goes to the client: refuse to emit what we would refuse to read.
	if err := validate(resp, MaxDepthCeiling); err != nil {
		return nil, true, fmt.Errorf("mcp: rewritten response is not strict JSON: %w", err)
	}
	return rb.Replace(body, i, resp), true, nil
}

// SameID reports whether two raw JSON-RPC ids name the same request. A string never equals
// a number ("1" is not 1); strings compare decoded ("\u0031" is "1"); numbers compare by
// value, and also as IEEE doubles, the way JavaScript clients match ids, so a server
// cannot slip a response past a rewrite with an id that only a JavaScript client would
// confuse with ours. null equals nothing.
func SameID(a, b json.RawMessage) bool {
	a, b = trimWS(a), trimWS(b)
	if len(a) == 0 || len(b) == 0 {
		return false
	}
	switch {
	case a[0] == '"' && b[0] == '"':
		if string(a) == string(b) {
			return true
		}
		if validate(a, 1) != nil || validate(b, 1) != nil {
			return false
		}
		return stringValue(a, 0, len(a)) == stringValue(b, 0, len(b))
	case isNumberStart(a[0]) && isNumberStart(b[0]):
		if validate(a, 1) != nil || validate(b, 1) != nil {
			return false
		}
		if sameNumber(string(a), string(b)) {
			return true
		}
		fa, erra := strconv.ParseFloat(string(a), 64)
		fb, errb := strconv.ParseFloat(string(b), 64)
		return erra == nil && errb == nil && !math.IsInf(fa, 0) && fa == fb
	}
	return false
}

func isNumberStart(c byte) bool { return c == '-' || isDigit(c) }

func trimWS(b []byte) []byte {
	i := skipWS(b, 0)
	j := len(b)
	for j > i && (b[j-1] == ' ' || b[j-1] == '\t' || b[j-1] == '\n' || b[j-1] == '\r') {
		j--
	}
	return b[i:j]
}

// listKeys maps the result member FilterList filters to the member naming each entry.
var listKeys = map[string]string{
	"tools":             "name",
	"prompts":           "name",
	"resources":         "uri",
	"resourceTemplates": "uriTemplate",
	"tasks":             "taskId",
}

// TaskHandle reads result.task of a JSON-RPC response object: the handle a task-augmented
// request is answered with (MCP 2025-11-25 CreateTaskResult). ok is false when the
// response has no result.task.taskId string (an error, or a plain result); ttl is
// result.task.ttl in milliseconds, 0 when absent or null (unlimited).
func TaskHandle(resp []byte) (taskID string, ttl int64, ok bool, err error) {
	v, err := validateIndexed(resp, respMaxDepth, 3)
	defer v.release()
	if err != nil {
		return "", 0, false, newError(CodeParseError, nil, "parse error: %v", err)
	}
	idx := v.index()
	task, err := findResultMember(resp, "task", idx)
	if err != nil || !task.ok() || resp[task.start] != '{' {
		return "", 0, false, err
	}
	id := findMember(resp, task.start, "taskId", idx)
	if !id.ok() || resp[id.start] != '"' {
		return "", 0, false, nil
	}
	if t := findMember(resp, task.start, "ttl", idx); t.ok() && isNumberStart(resp[t.start]) {
		if n, err := strconv.ParseFloat(string(resp[t.start:t.end]), 64); err == nil && n > 0 {
			ttl = int64(min(n, math.MaxInt64/2))
		}
	}
	return stringValue(resp, id.start, id.end), ttl, true, nil
}

// FilterList keeps, in the result.<key> array of a JSON-RPC response object, only the
// entries for which keep(name) is true, and returns the rewritten response and how many
// entries it removed. key is "tools" or "prompts" (entries named by "name"), "resources"
// (by "uri") or "resourceTemplates" (by "uriTemplate"). Entries without a string name are
// removed (fail closed). Everything else (nextCursor, _meta, unknown members, the kept
// entries themselves) is preserved byte for byte; a response without result.<key> (an
// error response) is returned unchanged. Entries are never decoded beyond their name.
func FilterList(resp []byte, key string, keep func(name string) bool) ([]byte, int, error) {
	return FilterListBatch(resp, key, func(names []string) []bool {
		out := make([]bool, len(names))
		for i, n := range names {
			out[i] = keep(n)
		}
		return out
	})
}

// FilterListBatch is FilterList with every decision asked at once: decide receives the
// names of the named entries, in order, and returns whether to keep each (a caller may
// then decide them concurrently). A result of another length is an error.
func FilterListBatch(resp []byte, key string, decide func(names []string) []bool) ([]byte, int, error) {
	return FilterListEntries(resp, key, func(names []string, _ [][]byte) []bool { return decide(names) })
}

// FilterListEntries is FilterListBatch with each named entry's JSON as well (what a tool
// definition pin is computed from); entries[i] is the entry names[i] was read from.
func FilterListEntries(resp []byte, key string, decide func(names []string, entries [][]byte) []bool) ([]byte, int, error) {
	return EditListEntries(resp, key, func(names []string, entries [][]byte) ([]bool, [][]byte, error) {
		return decide(names, entries), nil, nil
	})
}

// EditListEntries is FilterListEntries that may also replace kept entries: decide returns
// the keep decisions and, optionally, a replacement for each entry (nil: unchanged). A
// replacement must be one valid JSON value; an error from decide is returned as it is.
func EditListEntries(resp []byte, key string, decide func(names []string, entries [][]byte) (keep []bool, replace [][]byte, err error)) ([]byte, int, error) {
	field, ok := listKeys[key]
	if !ok {
		return nil, 0, fmt.Errorf("mcp: FilterList: unknown list %q", key)
	}
	// Index the containers down to the entries (response, result, list, entry), so that
	// after the one validating pass each entry is read only up to its name.
	v, err := validateIndexed(resp, respMaxDepth, 4)
	defer v.release()
	if err != nil {
		return nil, 0, newError(CodeParseError, nil, "parse error: %v", err)
	}
	idx := v.index()
	list, err := findResultMember(resp, key, idx)
	if err != nil || !list.ok() {
		return resp, 0, err
	}
	if resp[list.start] != '[' {
		return nil, 0, fmt.Errorf("mcp: FilterList: result.%s is not an array", key)
	}
	type entry struct {
		start, end int
		name       int // index in names; -1: no string name
	}
	var entries []entry
	var names []string
	var raws [][]byte
	for i := skipWS(resp, list.start+1); resp[i] != ']'; {
		e := entry{start: i, end: idx.skip(resp, i), name: -1}
		if resp[i] == '{' {
			if s := findMember(resp, i, field, idx); s.ok() && resp[s.start] == '"' {
				e.name = len(names)
				names = append(names, stringValue(resp, s.start, s.end))
				raws = append(raws, resp[e.start:e.end:e.end])
			}
		}
		entries = append(entries, e)
		if i = skipWS(resp, e.end); resp[i] == ',' {
			i = skipWS(resp, i+1)
		}
	}
	keep, replace, err := decide(names, raws)
	if err != nil {
		return nil, 0, err
	}
	if len(keep) != len(names) || (replace != nil && len(replace) != len(names)) {
		return nil, 0, fmt.Errorf("mcp: FilterList: %d decisions for %d names", len(keep), len(names))
	}
	out := make([]byte, 0, len(resp))
	out = append(out, resp[:list.start+1]...)
	removed, kept, replaced := 0, 0, 0
	for _, e := range entries {
		if e.name >= 0 && keep[e.name] {
			if kept > 0 {
				out = append(out, ',')
			}
			if replace != nil && replace[e.name] != nil {
				out = append(out, replace[e.name]...)
				replaced++
			} else {
				out = append(out, resp[e.start:e.end]...)
			}
			kept++
		} else {
			removed++ // entries without a string name are removed: fail closed
		}
	}
	if removed == 0 && replaced == 0 {
		return resp, 0, nil
	}
	out = append(out, ']')
	return append(out, resp[list.end:]...), removed, nil
}

// findResultMember returns the span of result.<key> in a validated response, or absent.
func findResultMember(resp []byte, key string, idx spanIndex) (span, error) {
	i := skipWS(resp, 0)
	if resp[i] != '{' {
		return absent, errors.New("mcp: a JSON-RPC response must be an object")
	}
	result := findMember(resp, i, "result", idx)
	if !result.ok() {
		return absent, nil
	}
	if resp[result.start] != '{' {
		return absent, errors.New(`mcp: "result" must be an object`)
	}
	return findMember(resp, result.start, key, idx), nil
}

// Redact removes JSON pointers from the result of a JSON-RPC response object (a tools/call
// response) and returns the new response and how many values it removed. Each pointer is
// given as its unescaped reference tokens, relative to result, as the policy writes them
// ("/structuredContent/ssn" is {"structuredContent", "ssn"}). A pointer under
// structuredContent is also removed from every result.content[] item of type "text" whose
// text is a JSON object or array: MCP tools mirror structuredContent there as serialized
// JSON (MCP 2025-06-18 "Structured Content"), and leaving the mirror would leak the value.
// Such text is re-serialized with everything else kept byte for byte. A pointer of just
// "structuredContent" removes those text items altogether. Missing targets are not
// errors. In such text NaN, Infinity and -Infinity are read as numbers (the Python SDK
// writes them); text that looks like JSON but is not strictly valid otherwise (duplicate
// keys, lone surrogates) is an error: it cannot be redacted reliably.
func Redact(resp []byte, pointers [][]string) ([]byte, int, error) {
	for _, p := range pointers {
		if len(p) == 0 {
			return nil, 0, errors.New("mcp: Redact: the empty pointer (the whole result) cannot be redacted")
		}
	}
	if err := validate(resp, respMaxDepth); err != nil {
		return nil, 0, newError(CodeParseError, nil, "parse error: %v", err)
	}
	i := skipWS(resp, 0)
	if resp[i] != '{' {
		return nil, 0, errors.New("mcp: a JSON-RPC response must be an object")
	}
	res := findMember(resp, i, "result", nil)
	if !res.ok() || resp[res.start] != '{' {
		return resp, 0, nil // an error response, or not a tools/call result: nothing to redact
	}
	result := resp[res.start:res.end]
	removed := 0
	for _, p := range pointers {
		var ok bool
		if result, ok = removePointer(result, p); ok {
			removed++
		}
	}
	result, n, err := redactTextContent(result, pointers)
	if err != nil {
		return nil, 0, err
	}
	removed += n
	if removed == 0 {
		return resp, 0, nil
	}
	out := make([]byte, 0, len(resp))
	out = append(out, resp[:res.start]...)
	out = append(out, result...)
	return append(out, resp[res.end:]...), removed, nil
}

// redactTextContent applies the structuredContent pointers to the JSON text items of
// result.content.
func redactTextContent(result []byte, pointers [][]string) ([]byte, int, error) {
	var inner [][]string
	dropJSONText := false
	for _, p := range pointers {
		if p[0] == "structuredContent" {
			if len(p) == 1 {
				dropJSONText = true
			} else {
				inner = append(inner, p[1:])
			}
		}
	}
	if len(inner) == 0 && !dropJSONText {
		return result, 0, nil
	}
	content := findMember(result, 0, "content", nil)
	if !content.ok() || result[content.start] != '[' {
		return result, 0, nil
	}
	type edit struct {
		start, end int
		repl       []byte // nil: drop the array element
	}
	var edits []edit
	removed := 0
	var drop []int
	it := newElements(result, content.start, nil)
	for idx := 0; ; idx++ {
		start, _, ok := it.next()
		if !ok {
			break
		}
		if result[start] != '{' {
			continue
		}
		text, isText := absent, false
		var mb member
		for mi := newMembers(result, start, nil); mi.next(&mb); {
			switch {
			case mb.is("type"):
				isText = result[mb.start] == '"' && stringValue(result, mb.start, mb.end) == "text"
			case mb.is("text"):
				if result[mb.start] == '"' {
					text = span{mb.start, mb.end}
				}
			}
		}
		if !isText || !text.ok() {
			continue
		}
		doc := []byte(stringValue(result, text.start, text.end))
		j := skipWS(doc, 0)
		if j >= len(doc) || (doc[j] != '{' && doc[j] != '[') {
			continue // prose, or a JSON scalar: nothing a pointer can name
		}
		verr := validate(doc, respMaxDepth)
		nonFinite := 0
		if isSyntaxError(verr) {
			// The Python SDK (pydantic_core.to_json, like Python's json.dumps) writes the
			// mirror with bare NaN, Infinity and -Infinity, which a model reads like any
			// JSON: read them as values, or the mirror would pass unredacted as prose. (This
			// redacts exactly as for strict text, also for a pointer of just
			// structuredContent, where refusing text that names a redacted key could not
			// tell.) Placeholders keep the scan strict and the rest of the text byte for byte.
			var lenient []byte
			if lenient, nonFinite = placeNonFinite(doc); nonFinite > 0 {
				verr = validate(lenient, respMaxDepth)
			}
			if verr == nil && bytes.Contains(doc, []byte(`"\u0000`)) {
				verr = errors.New("a string starts with U+0000 where NaN or Infinity stand for numbers: it cannot be redacted reliably")
			}
			doc = lenient
		}
		if verr != nil {
			if isSyntaxError(verr) {
				continue // prose that happens to start with a bracket
			}
			return nil, 0, fmt.Errorf("mcp: Redact: content[%d].text: %w", idx, verr)
		}
		if dropJSONText {
			drop = append(drop, idx)
			removed++
			continue
		}
		changed := false
		for _, p := range inner {
			var ok bool
			if doc, ok = removePointer(doc, p); ok {
				changed = true
				removed++
			}
		}
		if changed {
			if nonFinite > 0 {
				doc = restoreNonFinite(doc)
			}
			edits = append(edits, edit{text.start, text.end, appendQuoted(nil, doc)})
		}
	}
	if len(edits) > 0 {
		out := make([]byte, 0, len(result))
		prev := 0
		for _, e := range edits {
			out = append(out, result[prev:e.start]...)
			out = append(out, e.repl...)
			prev = e.end
		}
		result = append(out, result[prev:]...)
	}
	// Drop whole items last, from the end, so earlier indexes stay valid.
	for k := len(drop) - 1; k >= 0; k-- {
		result, _ = removePointer(result, []string{"content", strconv.Itoa(drop[k])})
	}
	return result, removed, nil
}

func isSyntaxError(err error) bool {
	var se *scanError
	return errors.As(err, &se) && se.kind == errSyntax
}

// nonFiniteConsts are the constants Python's JSON encoders write for non-finite floats,
// each with the JSON string that stands in for it while a text is redacted. The
// placeholders start with U+0000, which no text holds in practice; one that does is
// refused (redactTextContent), so restoreNonFinite never turns a real string into a number.
var nonFiniteConsts = [...]struct{ lit, placeholder string }{
	{"-Infinity", `"\u0000-Infinity"`}, // before Infinity: the longer match first
	{"Infinity", `"\u0000Infinity"`},
	{"NaN", `"\u0000NaN"`},
}

// placeNonFinite returns doc with every NaN, Infinity and -Infinity outside a string
// replaced by its placeholder, and how many it replaced (0: doc itself is returned). doc
// need not be JSON: whether the result is must still be checked.
func placeNonFinite(doc []byte) ([]byte, int) {
	var out []byte
	n, prev := 0, 0
	inString := false
	for i := 0; i < len(doc); i++ {
		c := doc[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		if c == '"' {
			inString = true
			continue
		}
		for _, nf := range nonFiniteConsts {
			if bytes.HasPrefix(doc[i:], []byte(nf.lit)) {
				out = append(append(out, doc[prev:i]...), nf.placeholder...)
				i += len(nf.lit) - 1
				prev = i + 1
				n++
				break
			}
		}
	}
	if n == 0 {
		return doc, 0
	}
	return append(out, doc[prev:]...), n
}

// restoreNonFinite turns placeNonFinite's placeholders back into their constants.
func restoreNonFinite(doc []byte) []byte {
	for _, nf := range nonFiniteConsts {
		doc = bytes.ReplaceAll(doc, []byte(nf.placeholder), []byte(nf.lit))
	}
	return doc
}

// removePointer removes the value the reference tokens name from the validated JSON doc,
// with its key and one adjacent comma, and reports whether it was there. Everything else
// is kept byte for byte. doc must not be modified afterwards if nothing was removed (the
// same slice is returned).
func removePointer(doc []byte, toks []string) ([]byte, bool) {
	v := skipWS(doc, 0)
	for depth, tok := range toks {
		// Find the target member or element in the container at v: cut runs from its start
		// to the next entry's start, or from the previous entry's end to its end.
		var found bool
		var start, valStart, end, prevEnd = -1, -1, -1, -1
		switch doc[v] {
		case '{':
			var mb member
			for it := newMembers(doc, v, nil); it.next(&mb); {
				if mb.is(tok) {
					found, start, valStart, end = true, mb.keyStart, mb.start, mb.end
					break
				}
				prevEnd = mb.end
			}
		case '[':
			idx, err := arrayIndex(tok, math.MaxInt, false)
			if err != nil {
				return doc, false
			}
			it := newElements(doc, v, nil)
			for k := 0; k <= idx; k++ {
				s, e, ok := it.next()
				if !ok {
					break
				}
				if k == idx {
					found, start, valStart, end = true, s, s, e
				} else {
					prevEnd = e
				}
			}
		default:
			return doc, false
		}
		if !found {
			return doc, false
		}
		if depth < len(toks)-1 {
			v = valStart // descend
			continue
		}
		cutStart, cutEnd := start, end
		if next := skipWS(doc, end); doc[next] == ',' {
			cutEnd = skipWS(doc, next+1) // "target, next" -> "next"
		} else if prevEnd >= 0 {
			cutStart = prevEnd // "prev, target" -> "prev"
		}
		out := make([]byte, 0, len(doc)-(cutEnd-cutStart))
		out = append(out, doc[:cutStart]...)
		return append(out, doc[cutEnd:]...), true
	}
	return doc, false
}

// SetResultString sets result.<key> of a JSON-RPC response object to the string value,
// replacing the member if it is there and adding it first otherwise; a response without
// a result (an error) is returned as it is. Everything else is kept byte for byte.
func SetResultString(resp []byte, key, value string) ([]byte, error) {
	v, err := validateIndexed(resp, respMaxDepth, 2)
	defer v.release()
	if err != nil {
		return nil, newError(CodeParseError, nil, "parse error: %v", err)
	}
	idx := v.index()
	i := skipWS(resp, 0)
	if resp[i] != '{' {
		return nil, errors.New("mcp: a JSON-RPC response must be an object")
	}
	result := findMember(resp, i, "result", idx)
	if !result.ok() {
		return resp, nil
	}
	if resp[result.start] != '{' {
		return nil, errors.New(`mcp: "result" must be an object`)
	}
	val, _ := json.Marshal(value)
	if m := findMember(resp, result.start, key, idx); m.ok() {
		out := make([]byte, 0, len(resp)+len(val))
		out = append(out, resp[:m.start]...)
		out = append(out, val...)
		return append(out, resp[m.end:]...), nil
	}
	name, _ := json.Marshal(key)
	out := make([]byte, 0, len(resp)+len(name)+len(val)+2)
	out = append(out, resp[:result.start+1]...)
	out = append(out, name...)
	out = append(out, ':')
	out = append(out, val...)
	if resp[skipWS(resp, result.start+1)] != '}' {
		out = append(out, ',')
	}
	return append(out, resp[result.start+1:]...), nil
}
