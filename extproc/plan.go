package extproc

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy"
)

// Adapters over the parser, so the state machine reads as the protocol does.
type (
	parsedBody   = mcp.Body
	jsonrpcError = mcp.Error
)

const (
	kindRequest      = mcp.KindRequest
	kindNotification = mcp.KindNotification
	kindResponse     = mcp.KindResponse
)

var errTooLarge = mcp.ErrTooLarge

func mcpParse(body []byte, maxBytes int, allowBatch bool) (*mcp.Body, error) {
	return mcp.ParseBody(body, mcp.Limits{MaxBytes: maxBytes, AllowBatch: allowBatch})
}

func errorResponse(id []byte, code int, msg string) []byte {
	return mcp.ErrorResponse(id, code, msg)
}

// rawID decodes a raw JSON-RPC id for the Rego input (a string or a json.Number).
func rawID(id json.RawMessage) any {
	if len(id) == 0 {
		return nil
	}
	if id[0] == '"' {
		var s string
		if json.Unmarshal(id, &s) == nil {
			return s
		}
		return nil
	}
	return json.Number(id)
}

// responseStep is what must happen to the response to one request of the body.
type responseStep struct {
	id     json.RawMessage
	listOf string                                        // "tools", "prompts", "resources", "resourceTemplates": filter the list
	keep   func([]string) []bool                         // for listOf: decides every entry's name
	pin    func(names []string, entries [][]byte) []bool // tools/list: pinning (pinning.go)
	learn  func(names []string, entries [][]byte)        // tools/list: x-mcp-header annotations (params.go)
	// private: the list is filtered per caller, so its result is marked cacheScope
	// "private" (MCP 2026-07-28 Cacheable): no intermediary may serve it to another
	// caller. addScope: add the member if the server left it out (it means "public").
	private, addScope bool
	redact            [][]string // JSON pointer tokens to remove from a tool result
	// schema: tools/list, the redaction pointers each tool's results get (by name), which
	// its outputSchema loses (mcp.PruneOutputSchema).
	schema func(names []string) [][][]string
	// created: a task-augmented tools/call; remembers the task its answer creates.
	created func(resp []byte)
	// noResponses: a GET event stream of an app that filters responses; any JSON-RPC
	// response on it is an error (see Process on GET).
	noResponses bool
}

// filtersResponses reports whether an app's responses may need filtering or redaction.
func filtersResponses(m *policy.MCP) bool {
	return m.Responses.FilterToolsList || len(m.Responses.Redact) > 0 || m.Tools.Rego != nil ||
		m.Tools.Pinning.Mode != policy.PinOff
}

// errResponseOnGET ends a GET stream that carries a JSON-RPC response.
var errResponseOnGET = fmt.Errorf("a JSON-RPC response on a GET event stream cannot be filtered")

// listResults maps list methods to the result member FilterList rewrites.
var listResults = map[string]string{
	"tools/list":               "tools",
	"prompts/list":             "prompts",
	"resources/list":           "resources",
	"resources/templates/list": "resourceTemplates",
}

// planResponse decides, once the request is allowed, whether its response needs work.
// Most calls need none: the response body mode then stays NONE and costs nothing.
func (st *stream) planResponse(ctx context.Context, b *mcp.Body, ds []requestDecision) {
	m := st.app.MCP
	for _, rd := range ds {
		msg := b.Messages[rd.msgIndex]
		if msg.Kind != kindRequest {
			continue
		}
		st.answering = append(st.answering, msg.ID)
		step := responseStep{id: msg.ID}
		if msg.Method == "tools/list" {
			st.planToolsList(ctx, &step)
		} else if key, ok := listResults[msg.Method]; ok && m.Responses.FilterToolsList {
			step.listOf = key
			step.keep = st.listFilter(ctx, msg.Method)
			step.private, step.addScope = true, cacheScopeEra(st.req.ProtocolVersion)
		}
		if msg.Method == "tools/list" && !st.isGRPC && (step.listOf == "tools" || mirrorEra(st.req.ProtocolVersion)) {
			// The annotations the Mcp-Param-* headers are checked against. Free when the
			// list is read anyway; for 2026-07-28 clients it is read for this alone.
			step.listOf = "tools"
			step.learn = st.paramLearner()
		}
		if msg.Method == "tools/call" {
			rego := pointerTokens(rd.d.Redact)
			step.redact = append(toolRedactions(m, msg.Tool), rego...)
			if msg.Task {
				step.created = st.taskRecorder(&rd.r, msg.Tool, rego)
			}
		}
		if msg.Method == "tasks/result" && rd.task != nil {
			// The tool's results' redactions, the creating call's Rego ones, and this
			// request's.
			step.redact = append(append(toolRedactions(m, rd.task.tool), rd.task.redact...), pointerTokens(rd.d.Redact)...)
		}
		if msg.Method == "tasks/list" {
			step.listOf, step.keep = "tasks", st.taskListFilter(&rd.r)
			step.private, step.addScope = true, cacheScopeEra(st.req.ProtocolVersion)
		}
		if step.filtersList() || step.learn != nil || len(step.redact) > 0 || step.created != nil {
			st.plan = append(st.plan, step)
		}
	}
}

// planToolsList plans a tools/list response: entries filtered to what the caller may
// call (filterToolsList), pinned, and the outputSchema of tools whose results are
// redacted pruned to match (responses.redact, or the Rego decision's redact at list
// time, input.mcp.listing). One list-time decision per tool serves both the filter and
// the schema.
func (st *stream) planToolsList(ctx context.Context, step *responseStep) {
	m := st.app.MCP
	var verdicts func([]string) []listVerdict
	if m.Responses.FilterToolsList || m.Tools.Rego != nil {
		verdicts = onceVerdicts(st.listVerdicts(ctx, "tools/list"))
	}
	if m.Responses.FilterToolsList {
		step.listOf = "tools"
		step.keep = allowedOf(verdicts)
		step.private, step.addScope = true, cacheScopeEra(st.req.ProtocolVersion)
	}
	if m.Tools.Pinning.Mode != policy.PinOff {
		step.listOf = "tools"
		step.pin = st.pinFilter()
	}
	if m.Tools.Rego == nil && !redactsStructured(m) {
		return
	}
	step.listOf = "tools"
	if m.Tools.Rego != nil {
		// Rego's redactions may differ per caller: so may the schemas.
		step.private, step.addScope = true, cacheScopeEra(st.req.ProtocolVersion)
	}
	step.schema = func(names []string) [][][]string {
		var vs []listVerdict
		if verdicts != nil {
			vs = verdicts(names)
		}
		out := make([][][]string, len(names))
		for i, name := range names {
			out[i] = toolRedactions(m, name)
			if vs != nil {
				out[i] = append(out[i], vs[i].redact...)
			}
		}
		return out
	}
}

// toolRedactions are the pointers responses.redact removes from tool's results.
func toolRedactions(m *policy.MCP, tool string) [][]string {
	var out [][]string
	for _, red := range m.Responses.Redact {
		if policy.MatchAny(red.Tools, tool) {
			out = append(out, pointerTokens(red.Pointers)...)
		}
	}
	return out
}

// pointerTokens are the reference tokens of pointers (as the response rewriters take them).
func pointerTokens(ps []policy.Pointer) [][]string {
	var out [][]string
	for _, p := range ps {
		out = append(out, p.Tokens)
	}
	return out
}

// redactsStructured reports whether responses.redact removes anything from
// structuredContent (and so from some outputSchema).
func redactsStructured(m *policy.MCP) bool {
	for _, red := range m.Responses.Redact {
		for _, p := range red.Pointers {
			if len(p.Tokens) > 0 && p.Tokens[0] == "structuredContent" {
				return true
			}
		}
	}
	return false
}

// listVerdict is a list-time decision: whether the caller may use the entry, and what
// the decision redacts from its results.
type listVerdict struct {
	allow  bool
	redact [][]string
}

// onceVerdicts makes the decisions for a list once, however many steps ask for them
// with the same names.
func onceVerdicts(f func([]string) []listVerdict) func([]string) []listVerdict {
	var last []string
	var vs []listVerdict
	return func(names []string) []listVerdict {
		if vs == nil || len(names) != len(last) || (len(names) > 0 && &names[0] != &last[0]) {
			last, vs = names, f(names)
		}
		return vs
	}
}

func allowedOf(f func([]string) []listVerdict) func([]string) []bool {
	return func(names []string) []bool {
		vs := f(names)
		keep := make([]bool, len(vs))
		for i, v := range vs {
			keep[i] = v.allow
		}
		return keep
	}
}

// listFilter is the list-time decision: an entry is kept if the caller could use it.
func (st *stream) listFilter(ctx context.Context, listMethod string) func([]string) []bool {
	return allowedOf(st.listVerdicts(ctx, listMethod))
}

// listVerdicts decides list entries as if each were called with no arguments (rules and
// Rego, input.mcp.listing true). Decisions are cached per identity; those not cached are
// made concurrently when there are many Rego evaluations (listWorkers), since Envoy holds
// the response until it is filtered. Rego evaluations stop when ctx (the stream's) ends;
// their entries are then dropped.
func (st *stream) listVerdicts(ctx context.Context, listMethod string) func([]string) []listVerdict {
	base := st.req
	base.Arguments, base.ID, base.Listing = nil, nil, true
	var callMethod string
	switch listMethod {
	case "tools/list":
		callMethod = "tools/call"
	case "prompts/list":
		callMethod = "prompts/get"
	default:
		callMethod = "resources/read"
	}
	m, cache := st.app.MCP, &st.s.listCache
	prefix := listKeyPrefix(st.snap.Version, &base, callMethod)
	return func(names []string) []listVerdict {
		keep := make([]listVerdict, len(names))
		keys := make([]string, len(names))
		var todo []int
		for i, name := range names {
			keys[i] = prefix + name
			if v, ok := cache.get(keys[i]); ok {
				keep[i] = v
			} else {
				todo = append(todo, i)
			}
		}
		decideOne := func(i int) {
			r := base
			r.Method, r.Tool, r.Prompt, r.URI = callMethod, "", "", ""
			setTarget(&r, callMethod, names[i])
			d := Decide(ctx, m, &r)
			keep[i].allow, keep[i].redact = d.Allow, pointerTokens(d.Redact)
			if ctx.Err() == nil {
				cache.put(keys[i], keep[i]) // a decision cut short is not the policy's answer
			}
		}
		workers := 1
		if m.Tools.Rego != nil {
			workers = listWorkers(len(todo))
		}
		if workers == 1 {
			for _, i := range todo {
				decideOne(i)
			}
			return keep
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for k := int(next.Add(1)) - 1; k < len(todo); k = int(next.Add(1)) - 1 {
					decideOne(todo[k])
				}
			})
		}
		wg.Wait()
		return keep
	}
}

// listWorkers is how many goroutines decide n uncached list entries that need Rego: one
// for short lists (a goroutine costs more than a few evaluations), else up to the CPUs
// available, at most maxListWorkers, with at least listWorkChunk entries each.
func listWorkers(n int) int {
	return max(1, min(runtime.GOMAXPROCS(0), maxListWorkers, n/listWorkChunk))
}

const (
	maxListWorkers = 4
	listWorkChunk  = 16
)

// listKeyPrefix identifies everything a list-time decision depends on besides the name:
// the policy version, the app, and the caller's whole identity (App ID, namespace,
// subject, scopes, claims). Fields are length-prefixed so no two identities collide, and
// the whole is hashed (SHA-256, so no two collide in practice either): with the claims
// in it, the prefix alone is often hundreds of bytes, copied into every entry's key.
func listKeyPrefix(version string, r *Request, method string) string {
	sum := sha256.Sum256([]byte(lengthPrefixed(version, r.Target, method, r.Caller.AppID, r.Caller.Namespace, r.SpiffeID, r.Subject, strings.Join(r.Scopes, " "), r.ClaimsJSON)))
	return string(sum[:])
}

// decisionCache remembers list-time decisions: agents list tools at every session start,
// and each entry costs a Rego evaluation. Keys carry the policy version, so a reload
// never serves an old answer; the cache is bounded and simply cleared when full.
type decisionCache struct {
	mu  sync.RWMutex
	m   map[string]listVerdict
	max int
}

const listCacheSize = 50000

func (c *decisionCache) get(k string) (v listVerdict, ok bool) {
	if c.max <= 0 {
		return v, false
	}
	c.mu.RLock()
	v, ok = c.m[k]
	c.mu.RUnlock()
	return v, ok
}

func (c *decisionCache) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.m)
}

func (c *decisionCache) put(k string, v listVerdict) {
	if c.max <= 0 {
		return
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= c.max {
		c.m = make(map[string]listVerdict, 1024)
	}
	c.m[k] = v
	c.mu.Unlock()
}

// observeOnly reports whether the step only reads the response (to learn annotations):
// a response it cannot read then passes unchanged, nothing being decided on it.
func (s responseStep) observeOnly() bool {
	return s.keep == nil && s.pin == nil && s.schema == nil && !s.private && len(s.redact) == 0 && !s.noResponses
}

// filtersList reports whether the step keeps only some entries of a list, or rewrites
// some.
func (s responseStep) filtersList() bool { return s.keep != nil || s.pin != nil || s.schema != nil }

// decideList decides which list entries to keep: the caller's list-time decisions and
// tool pinning must both keep an entry. entries (each entry's JSON) is only made when
// pinning needs it.
func (s responseStep) decideList(names []string, entries func() [][]byte) ([]bool, [][]byte, error) {
	var keep []bool
	if s.keep != nil {
		keep = s.keep(names)
	} else {
		keep = make([]bool, len(names))
		for i := range keep {
			keep[i] = true
		}
	}
	if s.learn != nil || s.pin != nil || s.schema != nil {
		all := entries()
		entries = func() [][]byte { return all }
	}
	if s.learn != nil {
		s.learn(names, entries())
	}
	if s.pin != nil {
		for i, ok := range s.pin(names, entries()) {
			keep[i] = keep[i] && ok
		}
	}
	if s.schema == nil {
		return keep, nil, nil
	}
	var replace [][]byte
	for i, ptrs := range s.schema(names) {
		if !keep[i] || len(ptrs) == 0 {
			continue
		}
		e, changed, err := mcp.PruneOutputSchema(entries()[i], ptrs)
		if err != nil {
			return nil, nil, fmt.Errorf("tool %s: %w", clip(names[i], 64), err)
		}
		if changed {
			if replace == nil {
				replace = make([][]byte, len(names))
			}
			replace[i] = e
		}
	}
	return keep, replace, nil
}

// apply rewrites one JSON-RPC response object as the step says.
func (s responseStep) apply(resp []byte) ([]byte, error) {
	out := resp
	var err error
	if s.created != nil {
		s.created(resp)
	}
	if s.filtersList() || s.learn != nil {
		if out, _, err = mcp.EditListEntries(out, s.listOf, func(names []string, entries [][]byte) ([]bool, [][]byte, error) {
			return s.decideList(names, func() [][]byte { return entries })
		}); err != nil {
			return nil, fmt.Errorf("filter %s: %w", s.listOf, err)
		}
	}
	if s.private && (s.addScope || hasCacheScope(out)) {
		if out, err = mcp.SetResultString(out, "cacheScope", "private"); err != nil {
			return nil, fmt.Errorf("cacheScope: %w", err)
		}
	}
	if len(s.redact) > 0 {
		if out, _, err = mcp.Redact(out, s.redact); err != nil {
			return nil, fmt.Errorf("redact: %w", err)
		}
	}
	return out, nil
}

// cacheScopeEra reports whether a protocol version has cacheable results, where an
// absent cacheScope means "public" (MCP 2026-07-28 and later; versions are dates).
func cacheScopeEra(version string) bool { return version >= "2026-07-28" }

// hasCacheScope reports whether a response's result may carry cacheScope (cheap check;
// SetResultString finds the member exactly).
func hasCacheScope(resp []byte) bool { return bytes.Contains(resp, []byte(`"cacheScope"`)) }

func (st *stream) limits() mcp.Limits {
	return mcp.Limits{MaxBytes: int(policy.MaxMaxRequestBytes)}
}

// rewriteJSON applies every step to a buffered application/json response body. Every
// response in it must answer a request of this exchange (see mcp.Rewriter.OnlyAnswering).
func (st *stream) rewriteJSON(body []byte) ([]byte, error) {
	rb, err := mcp.ParseResponseBody(body, st.limits())
	if err != nil {
		return nil, err
	}
	for i, r := range rb.Responses {
		if !slices.ContainsFunc(st.answering, func(id json.RawMessage) bool { return mcp.SameID(r.ID, id) }) {
			if len(st.answering) == 0 {
				return nil, errResponseOnGET
			}
			return nil, fmt.Errorf("a response with id %s answers no request of this exchange", clip(string(r.ID), 24))
		}
		// A request is answered once: RewriteResponse rewrites the first response with an
		// id, and a second would pass as the server wrote it.
		if slices.ContainsFunc(rb.Responses[:i], func(o mcp.Response) bool { return mcp.SameID(o.ID, r.ID) }) {
			return nil, fmt.Errorf("two responses with id %s", clip(string(r.ID), 24))
		}
	}
	out := body
	for _, step := range st.plan {
		if step.noResponses {
			continue
		}
		if out, _, err = mcp.RewriteResponse(out, step.id, st.limits(), step.apply); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// rewriter is one streaming transform of an event stream.
type rewriter interface {
	Feed(chunk []byte, endOfStream bool) ([]byte, error)
}

// newRewriters chains one SSE rewriter per step: each passes every event through as soon
// as it is complete and rewrites only the response to its request. The first also fails
// the stream on any response that answers no request of this exchange; on a GET stream
// (noResponses) that is every response.
func (st *stream) newRewriters() []rewriter {
	out := make([]rewriter, 0, len(st.plan))
	for i, step := range st.plan {
		var rw *mcp.Rewriter
		if step.noResponses {
			rw = mcp.NewRewriter(nil, st.limits(), nil) // matches nothing: only the guard acts
		} else {
			rw = mcp.NewRewriter(step.id, st.limits(), step.apply)
		}
		if i == 0 {
			rw.OnlyAnswering(st.answering)
		}
		out = append(out, rw)
	}
	return out
}
