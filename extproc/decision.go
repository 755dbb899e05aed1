// Package extproc is mcpgate's Envoy ext_proc server: it reads the JSON-RPC body of MCP
// requests and decides per tool, prompt and resource (DESIGN.md decision layers 4 and 5),
// and filters and redacts responses.
package extproc

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/metrics"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/topdown"

	"github.com/mcpgate/mcpgate/extproc/mcp"
	"github.com/mcpgate/mcpgate/policy"
)

// Request is everything a per-request decision reads: the caller as ext_authz established
// it (from dynamic metadata), the MCP message, and HTTP facts.
type Request struct {
	Caller   policy.Caller
	SpiffeID string
	Subject  string
	Scopes   []string
	// ClaimsJSON is the verified token payload; decoded only when Rego runs.
	ClaimsJSON string
	Target     string

	Method    string
	Tool      string         // tools/call
	Prompt    string         // prompts/get
	URI       string         // resources/read, subscribe, unsubscribe
	Arguments map[string]any // tools/call arguments (numbers as json.Number)
	ID        any
	// Listing is true when the call is hypothetical: deciding which entries of a
	// tools/list (prompts/list, resources/list) result the caller may see.
	Listing bool
	// ProtocolVersion and SessionID come from the MCP-Protocol-Version and Mcp-Session-Id
	// headers.
	ProtocolVersion string
	SessionID       string
	// Transport is "grpc" for gRPC MCP (GRPCMethod is the RPC, MessageIndex the message's
	// place on its stream), "" for Streamable HTTP.
	Transport    string
	GRPCMethod   string
	MessageIndex int

	HTTPMethod string
	Path       string
	// Headers are the request headers Rego may read; credentials are never included.
	Headers map[string]string

	// base caches the parts of the Rego input that are the same for every message of a
	// stream (and every entry of a filtered list): built once, not per evaluation.
	base *regoBase
}

// regoBase is the stream-constant part of the Rego input, as OPA values.
type regoBase struct {
	caller, subject, target, http *ast.Term
	// cancel stops an evaluation when the stream ends; nil: evaluations are not cancelled.
	cancel topdown.Cancel
}

// newRegoBase builds the per-request part of the Rego input, with c's cached identity
// and target terms (nil: nothing cached).
func newRegoBase(r *Request, c *regoCaches) *regoBase {
	id := c.identityTerms(r)
	items := make([][2]*ast.Term, 0, len(r.Headers))
	for k, v := range r.Headers {
		kt := regoHeaderKeys[k]
		if kt == nil {
			kt = ast.StringTerm(k)
		}
		items = append(items, [2]*ast.Term{kt, ast.StringTerm(v)})
	}
	return &regoBase{
		caller:  id.caller,
		subject: id.subject,
		target:  c.targetTerm(r.Target),
		http: ast.ObjectTerm(
			ast.Item(keyMethod, methodTerm(r.HTTPMethod)),
			ast.Item(keyPath, ast.StringTerm(r.Path)),
			ast.Item(keyHeaders, ast.ObjectTerm(items...)),
		),
	}
}

// Terms of the Rego input that do not change, built once and shared: OPA values are
// immutable once built (OPA shares its own interned terms the same way). Building them
// per stream and per evaluation was most of the input's allocations.
var (
	keyCaller, keySubject, keyTarget, keyMCP, keyHTTP = ast.StringTerm("caller"), ast.StringTerm("subject"), ast.StringTerm("target"), ast.StringTerm("mcp"), ast.StringTerm("http")
	keyMethod, keyPath, keyHeaders                    = ast.StringTerm("method"), ast.StringTerm("path"), ast.StringTerm("headers")
	keyTool, keyArguments, keyID                      = ast.StringTerm("tool"), ast.StringTerm("arguments"), ast.StringTerm("id")
	keyProtocolVersion, keySessionID                  = ast.StringTerm("protocol_version"), ast.StringTerm("session_id")
	keyPrompt, keyURI, keyListing, keyAppID           = ast.StringTerm("prompt"), ast.StringTerm("uri"), ast.StringTerm("listing"), ast.StringTerm("app_id")
	keyTransport, keyGRPCMethod                       = ast.StringTerm("transport"), ast.StringTerm("grpc_method")
	keyStream, keyMessageIndex                        = ast.StringTerm("stream"), ast.StringTerm("message_index")
	trueTerm                                          = ast.BooleanTerm(true)

	// regoHeaderKeys are the names of the headers Rego sees (regoHeaders), as terms.
	regoHeaderKeys = func() map[string]*ast.Term {
		m := make(map[string]*ast.Term, len(regoHeaders))
		for k := range regoHeaders {
			m[k] = ast.StringTerm(k)
		}
		return m
	}()
	httpMethods = map[string]*ast.Term{"POST": ast.StringTerm("POST"), "GET": ast.StringTerm("GET"), "DELETE": ast.StringTerm("DELETE")}
)

func methodTerm(m string) *ast.Term {
	if t := httpMethods[m]; t != nil {
		return t
	}
	return ast.StringTerm(m)
}

// regoCaches hold the parts of the Rego input that depend only on who calls what: one
// set per Server, bounded, their sizes in metrics (mcpgate.mcp.cache.entries).
type regoCaches struct {
	targets    boundedCache[*ast.Term] // input.target by App ID
	identities boundedCache[idTerms]   // by everything an identity's terms are built from
}

const (
	targetCacheSize   = 1000
	identityCacheSize = 10000
)

// boundedCache is a map of immutable values that is cleared when it reaches max entries:
// a cache miss only costs rebuilding a value.
type boundedCache[V any] struct {
	mu  sync.RWMutex
	m   map[string]V
	max int
}

func (c *boundedCache[V]) get(k string) (V, bool) {
	c.mu.RLock()
	v, ok := c.m[k]
	c.mu.RUnlock()
	return v, ok
}

func (c *boundedCache[V]) put(k string, v V) {
	c.mu.Lock()
	if c.m == nil || len(c.m) >= c.max {
		c.m = make(map[string]V, 64)
	}
	c.m[k] = v
	c.mu.Unlock()
}

func (c *boundedCache[V]) len() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return len(c.m)
}

func newRegoCaches() *regoCaches {
	return &regoCaches{targets: boundedCache[*ast.Term]{max: targetCacheSize}, identities: boundedCache[idTerms]{max: identityCacheSize}}
}

func (c *regoCaches) targetTerm(app string) *ast.Term {
	if c != nil {
		if t, ok := c.targets.get(app); ok {
			return t
		}
	}
	t := ast.ObjectTerm(ast.Item(keyAppID, ast.StringTerm(app)))
	if c != nil {
		c.targets.put(app, t)
	}
	return t
}

// idTerms are the caller and subject parts of the Rego input: the same for every request
// made with one token, and the costly part (decoding the claims into OPA values), so they
// are cached by everything they are built from. OPA values are immutable once built.
type idTerms struct {
	caller, subject *ast.Term
}

func (c *regoCaches) identityTerms(r *Request) idTerms {
	key := lengthPrefixed(r.Caller.AppID, r.Caller.Namespace, r.SpiffeID, r.Subject, strings.Join(r.Scopes, " "), r.ClaimsJSON)
	if c != nil {
		if t, ok := c.identities.get(key); ok {
			return t
		}
	}
	claims := map[string]any{}
	if r.ClaimsJSON != "" {
		// Verified by ext_authz; a decoding failure leaves claims empty rather than
		// failing open: policies that need a claim then see it missing.
		_ = json.Unmarshal([]byte(r.ClaimsJSON), &claims)
	}
	claimsVal, err := ast.InterfaceToValue(claims)
	if err != nil {
		claimsVal = ast.NewObject()
	}
	scopes := make([]*ast.Term, len(r.Scopes))
	for i, sc := range r.Scopes {
		scopes[i] = ast.StringTerm(sc)
	}
	t := idTerms{
		caller: ast.ObjectTerm(
			ast.Item(ast.StringTerm("app_id"), ast.StringTerm(r.Caller.AppID)),
			ast.Item(ast.StringTerm("namespace"), ast.StringTerm(r.Caller.Namespace)),
			ast.Item(ast.StringTerm("spiffe_id"), ast.StringTerm(r.SpiffeID)),
		),
		subject: ast.ObjectTerm(
			ast.Item(ast.StringTerm("sub"), ast.StringTerm(r.Subject)),
			ast.Item(ast.StringTerm("scopes"), ast.ArrayTerm(scopes...)),
			ast.Item(ast.StringTerm("claims"), ast.NewTerm(claimsVal)),
		),
	}
	if c != nil {
		c.identities.put(key, t)
	}
	return t
}

// lengthPrefixed joins fields so that no two different field lists give the same key.
func lengthPrefixed(fields ...string) string {
	var b strings.Builder
	n := 0
	for _, f := range fields {
		n += len(f) + 4
	}
	b.Grow(n)
	for _, f := range fields {
		b.WriteString(strconv.Itoa(len(f)))
		b.WriteByte(':')
		b.WriteString(f)
	}
	return b.String()
}

// regoInputValue is RegoInput as an OPA value, built without the generic conversion of a
// Go map on every evaluation.
func regoInputValue(r *Request) (ast.Value, error) {
	base := r.base
	if base == nil {
		base = newRegoBase(r, nil)
	}
	args := ast.NewObject()
	if len(r.Arguments) > 0 {
		v, err := ast.InterfaceToValue(r.Arguments)
		if err != nil {
			return nil, err
		}
		args = v.(ast.Object)
	}
	id := ast.NullTerm()
	switch v := r.ID.(type) {
	case string:
		id = ast.StringTerm(v)
	case json.Number:
		id = ast.NumberTerm(v)
	}
	items := make([][2]*ast.Term, 6, 9)
	items[0] = ast.Item(keyMethod, ast.StringTerm(r.Method))
	items[1] = ast.Item(keyTool, ast.StringTerm(r.Tool))
	items[2] = ast.Item(keyArguments, ast.NewTerm(args))
	items[3] = ast.Item(keyID, id)
	items[4] = ast.Item(keyProtocolVersion, ast.StringTerm(r.ProtocolVersion))
	items[5] = ast.Item(keySessionID, ast.StringTerm(r.SessionID))
	if r.Prompt != "" {
		items = append(items, ast.Item(keyPrompt, ast.StringTerm(r.Prompt)))
	}
	if r.URI != "" {
		items = append(items, ast.Item(keyURI, ast.StringTerm(r.URI)))
	}
	if r.Listing {
		items = append(items, ast.Item(keyListing, trueTerm))
	}
	var stream [2]*ast.Term
	if r.Transport != "" {
		items = append(items, ast.Item(keyTransport, ast.StringTerm(r.Transport)), ast.Item(keyGRPCMethod, ast.StringTerm(r.GRPCMethod)))
		stream = ast.Item(keyStream, ast.ObjectTerm(ast.Item(keyMessageIndex, ast.IntNumberTerm(r.MessageIndex))))
	}
	top := [][2]*ast.Term{
		ast.Item(keyCaller, base.caller),
		ast.Item(keySubject, base.subject),
		ast.Item(keyTarget, base.target),
		ast.Item(keyMCP, ast.ObjectTerm(items...)),
		ast.Item(keyHTTP, base.http),
	}
	if stream[0] != nil {
		top = append(top, stream)
	}
	return ast.NewObject(top...), nil
}

// PatchOp is one RFC 6902 operation a Rego policy asks for on the call's arguments.
type PatchOp = mcp.PatchOp

// Decision is the outcome of layers 4 and 5 for one MCP message.
type Decision struct {
	Allow bool
	// Rule names what decided: a rule name, "defaultAction", "protocol" or "rego".
	Rule   string
	Reason string
	// Patch and Redact come from Rego: argument rewrites and result redactions.
	Patch  []PatchOp
	Redact []policy.Pointer
}

// protocolMethods keep an MCP session working whatever the tool rules say: without them
// a deny-by-default app could not even be initialized. Lists are allowed because their
// results are filtered to what the caller may use. A rule that names one of these methods
// still decides it.
var protocolMethods = map[string]bool{
	// server/discover (MCP 2026-07-28) is how current clients, the official Go SDK
	// included, open a session before initialize.
	"server/discover":          true,
	"initialize":               true,
	"ping":                     true,
	"tools/list":               true,
	"prompts/list":             true,
	"resources/list":           true,
	"resources/templates/list": true,
	"logging/setLevel":         true,
	// Requests about a task are then decided by who created it and for which tool
	// (tasks.go); tasks/list results are filtered to the caller's own tasks.
	"tasks/get":    true,
	"tasks/result": true,
	"tasks/cancel": true,
	"tasks/list":   true,
}

// IsProtocolMethod reports whether method is allowed when no rule names it.
func IsProtocolMethod(method string) bool {
	return protocolMethods[method] || strings.HasPrefix(method, "notifications/")
}

// Decide runs the tool rules (first match wins, then the protocol allowance, then
// defaultAction) and, if they allow, the app's Rego policy. Every layer must allow.
func Decide(ctx context.Context, m *policy.MCP, r *Request) Decision {
	d := decideRules(m, r)
	if !d.Allow || m.Tools.Rego == nil {
		return d
	}
	return evalRego(ctx, m.Tools.Rego, r, d)
}

func decideRules(m *policy.MCP, r *Request) Decision {
	for _, rule := range m.Tools.Rules {
		if matchRule(rule, r) {
			d := Decision{Allow: rule.Action == policy.Allow, Rule: rule.Name}
			if !d.Allow && !r.Listing { // a list entry's reason is never shown
				d.Reason = fmt.Sprintf("denied by rule %q", rule.Name)
			}
			return d
		}
	}
	if IsProtocolMethod(r.Method) {
		return Decision{Allow: true, Rule: "protocol"}
	}
	if m.Tools.DefaultAction == policy.Allow {
		return Decision{Allow: true, Rule: "defaultAction"}
	}
	if r.Listing {
		return Decision{Rule: "defaultAction"}
	}
	return Decision{Rule: "defaultAction", Reason: "no rule allows " + describe(r)}
}

// describe names what a request asks for, for denial messages.
func describe(r *Request) string {
	switch {
	case r.Tool != "":
		return fmt.Sprintf("tool %q", r.Tool)
	case r.Prompt != "":
		return fmt.Sprintf("prompt %q", r.Prompt)
	case r.URI != "":
		return fmt.Sprintf("resource %q", r.URI)
	default:
		return fmt.Sprintf("method %q", r.Method)
	}
}

// matchRule: callers, subjects, scopes and methods must each match if set. Tools,
// prompts and resources name what the request targets: if any is set, the request must
// be a call of a kind the rule lists, with a matching name.
func matchRule(rule *policy.Rule, r *Request) bool {
	if !rule.AnyCaller && !slices.Contains(rule.Callers, r.Caller.AppID) {
		return false
	}
	if len(rule.Subjects) > 0 && !policy.MatchAny(rule.Subjects, r.Subject) {
		return false
	}
	for _, need := range rule.Scopes {
		if !slices.Contains(r.Scopes, need) {
			return false
		}
	}
	if len(rule.Methods) > 0 && !policy.MatchAny(rule.Methods, r.Method) {
		return false
	}
	if len(rule.Tools)+len(rule.Prompts)+len(rule.Resources) == 0 {
		return true
	}
	switch r.Method {
	case "tools/call":
		return policy.MatchAny(rule.Tools, r.Tool)
	case "prompts/get":
		return policy.MatchAny(rule.Prompts, r.Prompt)
	case "resources/read", "resources/subscribe", "resources/unsubscribe":
		return policy.MatchAny(rule.Resources, r.URI)
	}
	return false
}

// RegoInput builds the documented input document (DESIGN.md, README "Rego input").
func RegoInput(r *Request) map[string]any {
	claims := map[string]any{}
	if r.ClaimsJSON != "" {
		// Verified by ext_authz; a decoding failure leaves claims empty rather than
		// failing open: policies that need a claim then see it missing.
		_ = json.Unmarshal([]byte(r.ClaimsJSON), &claims)
	}
	scopes := make([]any, len(r.Scopes))
	for i, s := range r.Scopes {
		scopes[i] = s
	}
	args := map[string]any{}
	for k, v := range r.Arguments {
		args[k] = v
	}
	mcp := map[string]any{
		"method":           r.Method,
		"tool":             r.Tool,
		"arguments":        args,
		"id":               r.ID,
		"protocol_version": r.ProtocolVersion,
		"session_id":       r.SessionID,
	}
	if r.Prompt != "" {
		mcp["prompt"] = r.Prompt
	}
	if r.URI != "" {
		mcp["uri"] = r.URI
	}
	if r.Listing {
		mcp["listing"] = true
	}
	headers := make(map[string]any, len(r.Headers))
	for k, v := range r.Headers {
		headers[k] = v
	}
	in := map[string]any{
		"caller":  map[string]any{"app_id": r.Caller.AppID, "namespace": r.Caller.Namespace, "spiffe_id": r.SpiffeID},
		"subject": map[string]any{"sub": r.Subject, "scopes": scopes, "claims": claims},
		"target":  map[string]any{"app_id": r.Target},
		"mcp":     mcp,
		"http":    map[string]any{"method": r.HTTPMethod, "path": r.Path, "headers": headers},
	}
	if r.Transport != "" {
		mcp["transport"], mcp["grpc_method"] = r.Transport, r.GRPCMethod
		in["stream"] = map[string]any{"message_index": json.Number(strconv.Itoa(r.MessageIndex))}
	}
	return in
}

// evalRego evaluates data.mcpgate.decision. Anything but an object with allow: true is a
// denial: an undefined decision, an evaluation error (a built-in given bad input), or a
// malformed result. Fail closed.
func evalRego(ctx context.Context, rg *policy.Rego, r *Request, rules Decision) Decision {
	deny := func(reason string) Decision { return Decision{Rule: "rego", Reason: reason} }
	input, err := regoInputValue(r)
	if err != nil {
		return deny("rego input: " + err.Error())
	}
	cancel := neverCancelled
	if r.base != nil && r.base.cancel != nil {
		cancel = r.base.cancel
	}
	rs, err := rg.Query.Eval(ctx, rego.EvalParsedInput(input), regoNoMetrics, regoKeepTerms, rego.EvalExternalCancel(cancel))
	if err != nil {
		return deny("rego evaluation failed: " + firstLine(err.Error()))
	}
	obj, why := decisionObject(rs)
	if obj == nil {
		return deny(why)
	}
	var reason string
	if r, ok := objGet(obj, "reason").(ast.String); ok {
		reason = string(r)
	}
	if allow, _ := objGet(obj, "allow").(ast.Boolean); !allow {
		if reason == "" {
			reason = "denied by rego"
		}
		return deny(reason)
	}
	d := Decision{Allow: true, Rule: rules.Rule, Reason: reason}
	if p := objGet(obj, "patch"); p != nil {
		ops, err := parsePatch(termJSON(p))
		if err != nil {
			return deny("rego: bad patch: " + err.Error())
		}
		d.Patch = ops
	}
	if red := objGet(obj, "redact"); red != nil {
		ptrs, err := parseRedact(termJSON(red))
		if err != nil {
			return deny("rego: bad redact: " + err.Error())
		}
		d.Redact = ptrs
	}
	return d
}

// decisionObject is the object data.mcpgate.decision evaluated to, or nil and why not.
func decisionObject(rs rego.ResultSet) (ast.Object, string) {
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return nil, "rego: data.mcpgate.decision is undefined"
	}
	term, _ := rs[0].Expressions[0].Value.(*ast.Term)
	if term == nil {
		return nil, "rego: data.mcpgate.decision is not an object"
	}
	obj, ok := term.Value.(ast.Object)
	if !ok {
		return nil, "rego: data.mcpgate.decision is not an object"
	}
	return obj, ""
}

// Evaluation options for every decision: no per-evaluation metrics (nobody reads them),
// and the result as the OPA term itself, read directly instead of converted into Go
// maps first (the rare patch and redact members are converted on their own).
var (
	regoNoMetrics = rego.EvalMetrics(metrics.NoOp())
	// An external canceller spares OPA starting a goroutine per evaluation to watch ctx:
	// a stream's (regoBase.cancel) fires when the stream ends. Evaluations outside a
	// stream use neverCancelled; they run to completion, which a policy bounds (Rego
	// cannot loop).
	neverCancelled = topdown.NewCancel()
	regoKeepTerms  = rego.EvalGenerateJSON(func(t *ast.Term, _ *rego.EvalContext) (any, error) { return t, nil })
)

// Terms of the decision object's members, built once.
var decisionKeys = map[string]*ast.Term{
	"allow": ast.StringTerm("allow"), "reason": ast.StringTerm("reason"),
	"patch": ast.StringTerm("patch"), "redact": ast.StringTerm("redact"),
}

// objGet returns the value of a decision member, or nil.
func objGet(obj ast.Object, key string) ast.Value {
	if t := obj.Get(decisionKeys[key]); t != nil {
		return t.Value
	}
	return nil
}

// termJSON converts a value into Go (map[string]any, []any, string, json.Number, bool or
// nil) as OPA's own result conversion would; nil if it cannot be.
func termJSON(v ast.Value) any {
	x, err := ast.JSON(v)
	if err != nil {
		return nil
	}
	return x
}

func parsePatch(v any) ([]PatchOp, error) {
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("patch must be a list of operations")
	}
	ops := make([]PatchOp, 0, len(list))
	for _, item := range list {
		m, ok := item.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("patch operations must be objects")
		}
		op, _ := m["op"].(string)
		path, _ := m["path"].(string)
		switch op {
		case "add", "replace", "remove", "test":
		default:
			return nil, fmt.Errorf("unsupported op %q (add, replace, remove, test)", op)
		}
		if _, err := policy.ParsePointer(path); err != nil {
			return nil, err
		}
		ops = append(ops, PatchOp{Op: op, Path: path, Value: m["value"]})
	}
	return ops, nil
}

func parseRedact(v any) ([]policy.Pointer, error) {
	list, ok := v.([]any)
	if !ok {
		return nil, fmt.Errorf("redact must be a list of JSON pointers")
	}
	out := make([]policy.Pointer, 0, len(list))
	for _, item := range list {
		s, _ := item.(string)
		p, err := policy.ParsePointer(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
