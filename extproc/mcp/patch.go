package mcp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/mcpgate/mcpgate/policy"
)

// ErrPatch is wrapped by every PatchArguments error about the operations themselves (bad
// op, bad pointer, missing target, failed test), as opposed to misuse of the API.
var ErrPatch = errors.New("mcp: invalid argument patch")

// PatchOp is one RFC 6902 JSON Patch operation on tools/call arguments. Path is a JSON
// pointer relative to the arguments object ("/limit"; "" is the whole object).
type PatchOp struct {
	Op    string `json:"op"`    // "add", "remove", "replace" or "test"
	Path  string `json:"path"`  // RFC 6901 JSON pointer
	Value any    `json:"value"` // for add, replace and test; anything encoding/json marshals
}

// PatchArguments applies ops, in order and all or nothing (RFC 6902 section 5), to the
// arguments of message i of b, which was parsed from raw, and returns the new body. Only the
// arguments of message i change; the rest of raw is copied byte for byte. The patched
// arguments are re-serialized (keys sorted, numbers exactly as sent). b itself is not
// changed: parse the result again if it must be inspected.
func PatchArguments(b *Body, raw []byte, i int, ops []PatchOp) ([]byte, error) {
	return PatchBody(b, raw, []Patch{{Message: i, Ops: ops}})
}

// PatchError is a PatchBody error about the operations of one message.
type PatchError struct {
	Message int // the index of the message in the body
	Err     error
}

func (e *PatchError) Error() string { return e.Err.Error() }
func (e *PatchError) Unwrap() error { return e.Err }

// Patch is the argument patch of one message of a body.
type Patch struct {
	Message int
	Ops     []PatchOp
}

// PatchBody applies every patch as PatchArguments does, in one pass over raw: the work is
// linear in the body and the operations, however many messages of a batch are patched.
// Patches name distinct messages in ascending order. Any failing patch fails the whole.
func PatchBody(b *Body, raw []byte, patches []Patch) ([]byte, error) {
	if len(raw) != b.size {
		return nil, errors.New("mcp: PatchArguments: raw is not the body b was parsed from")
	}
	type edit struct {
		start, end int // raw[start:end] is replaced by repl
		repl       []byte
	}
	edits := make([]edit, 0, len(patches))
	grow := 0
	for k, p := range patches {
		i := p.Message
		if i < 0 || i >= len(b.Messages) {
			return nil, fmt.Errorf("mcp: PatchArguments: no message %d", i)
		}
		if k > 0 && i <= patches[k-1].Message {
			return nil, fmt.Errorf("mcp: PatchBody: patches must name distinct messages in ascending order")
		}
		m := b.Messages[i]
		if m.Method != "tools/call" || !m.params.ok() {
			return nil, fmt.Errorf("mcp: PatchArguments: message %d is not a tools/call", i)
		}
		// Work on a fresh decoding so that m.Arguments, which a policy may still hold, is
		// never mutated.
		var doc any = map[string]any{}
		if m.args.ok() {
			doc, _ = decodeValue(raw, m.args.start)
		}
		for n, op := range p.Ops {
			var err error
			if doc, err = applyOp(doc, op); err != nil {
				return nil, &PatchError{Message: i, Err: fmt.Errorf("%w: operation %d (%s %q): %v", ErrPatch, n, op.Op, op.Path, err)}
			}
		}
		args, err := marshalCompact(doc)
		if err != nil {
			return nil, &PatchError{Message: i, Err: fmt.Errorf("%w: %v", ErrPatch, err)}
		}
		e := edit{start: m.args.start, end: m.args.end, repl: args}
		if !m.args.ok() {
			// No arguments yet: add the member just before the closing brace of params.
			closing := m.params.end - 1
			member := []byte(`"arguments":`)
			if skipWS(raw, m.params.start+1) != closing {
				member = []byte(`,"arguments":`)
			}
			e = edit{start: closing, end: closing, repl: append(member, args...)}
		}
		edits = append(edits, e)
		grow += len(e.repl) - (e.end - e.start)
	}
	out := make([]byte, 0, len(raw)+max(grow, 0))
	prev := 0
	for _, e := range edits {
		out = append(append(out, raw[prev:e.start]...), e.repl...)
		prev = e.end
	}
	return append(out, raw[prev:]...), nil
}

// marshalCompact marshals v without HTML escaping (which would change the bytes a server
// sees for no reason) and without encoding/json's trailing newline.
func marshalCompact(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// normalize turns any marshalable value into the shapes decodeValue produces, deep-copied,
// so a patch value is never shared with the caller's data or with another patch.
func normalize(v any) (any, error) {
	b, err := marshalCompact(v)
	if err != nil {
		return nil, fmt.Errorf("value: %v", err)
	}
	if err := validate(b, MaxDepthCeiling); err != nil {
		return nil, fmt.Errorf("value: %v", err)
	}
	out, _ := decodeValue(b, skipWS(b, 0))
	return out, nil
}

// parsePointer splits an RFC 6901 pointer into unescaped reference tokens, with the
// policy's parser (one parser for patches and redaction); "" is the whole document.
func parsePointer(p string) ([]string, error) {
	if p == "" {
		return nil, nil
	}
	ptr, err := policy.ParsePointer(p)
	if err != nil {
		return nil, err
	}
	return ptr.Tokens, nil
}

// arrayIndex parses an RFC 6901 array index: "0" or digits without a leading zero. With
// allowEnd, "-" (one past the end) is allowed and returned as n.
func arrayIndex(tok string, n int, allowEnd bool) (int, error) {
	if tok == "-" && allowEnd {
		return n, nil
	}
	if tok == "" || (len(tok) > 1 && tok[0] == '0') {
		return 0, fmt.Errorf("%q is not an array index", tok)
	}
	for i := 0; i < len(tok); i++ {
		if !isDigit(tok[i]) {
			return 0, fmt.Errorf("%q is not an array index", tok)
		}
	}
	idx, err := strconv.Atoi(tok)
	limit := n - 1
	if allowEnd {
		limit = n
	}
	if err != nil || idx > limit {
		return 0, fmt.Errorf("array index %s out of range (length %d)", tok, n)
	}
	return idx, nil
}

func applyOp(doc any, op PatchOp) (any, error) {
	toks, err := parsePointer(op.Path)
	if err != nil {
		return nil, err
	}
	switch op.Op {
	case "add", "replace":
		val, err := normalize(op.Value)
		if err != nil {
			return nil, err
		}
		if len(toks) == 0 {
			// Replacing the whole arguments: MCP needs them to stay an object.
			if _, ok := val.(map[string]any); !ok {
				return nil, errors.New("the arguments must stay an object")
			}
			return val, nil
		}
		add := op.Op == "add"
		return modify(doc, toks, func(parent any, tok string) (any, error) {
			switch p := parent.(type) {
			case map[string]any:
				if _, ok := p[tok]; !ok && !add {
					return nil, fmt.Errorf("no member %q to replace", tok)
				}
				p[tok] = val
				return p, nil
			case []any:
				idx, err := arrayIndex(tok, len(p), add)
				if err != nil {
					return nil, err
				}
				if !add {
					p[idx] = val
					return p, nil
				}
				p = append(p, nil)
				copy(p[idx+1:], p[idx:])
				p[idx] = val
				return p, nil
			}
			return nil, errors.New("the target's parent is not an object or array")
		})
	case "remove":
		if len(toks) == 0 {
			return nil, errors.New("cannot remove the arguments themselves")
		}
		return modify(doc, toks, func(parent any, tok string) (any, error) {
			switch p := parent.(type) {
			case map[string]any:
				if _, ok := p[tok]; !ok {
					return nil, fmt.Errorf("no member %q to remove", tok)
				}
				delete(p, tok)
				return p, nil
			case []any:
				idx, err := arrayIndex(tok, len(p), false)
				if err != nil {
					return nil, err
				}
				return append(p[:idx], p[idx+1:]...), nil
			}
			return nil, errors.New("the target's parent is not an object or array")
		})
	case "test":
		want, err := normalize(op.Value)
		if err != nil {
			return nil, err
		}
		got, err := lookup(doc, toks)
		if err != nil {
			return nil, err
		}
		if !jsonEqual(got, want) {
			return nil, errors.New("test failed: values differ")
		}
		return doc, nil
	case "move", "copy":
		return nil, fmt.Errorf("operation %q is not supported", op.Op)
	default:
		return nil, fmt.Errorf("unknown operation %q", op.Op)
	}
}

// modify walks to the parent of the pointer's target and lets leaf change it; containers
// are returned because inserting into or removing from a slice makes a new slice header.
func modify(node any, toks []string, leaf func(parent any, tok string) (any, error)) (any, error) {
	if len(toks) == 1 {
		return leaf(node, toks[0])
	}
	switch n := node.(type) {
	case map[string]any:
		child, ok := n[toks[0]]
		if !ok {
			return nil, fmt.Errorf("no member %q", toks[0])
		}
		c, err := modify(child, toks[1:], leaf)
		if err != nil {
			return nil, err
		}
		n[toks[0]] = c
		return n, nil
	case []any:
		idx, err := arrayIndex(toks[0], len(n), false)
		if err != nil {
			return nil, err
		}
		c, err := modify(n[idx], toks[1:], leaf)
		if err != nil {
			return nil, err
		}
		n[idx] = c
		return n, nil
	}
	return nil, fmt.Errorf("cannot descend into a scalar at %q", toks[0])
}

func lookup(node any, toks []string) (any, error) {
	for _, tok := range toks {
		switch n := node.(type) {
		case map[string]any:
			c, ok := n[tok]
			if !ok {
				return nil, fmt.Errorf("no member %q", tok)
			}
			node = c
		case []any:
			idx, err := arrayIndex(tok, len(n), false)
			if err != nil {
				return nil, err
			}
			node = n[idx]
		default:
			return nil, fmt.Errorf("cannot descend into a scalar at %q", tok)
		}
	}
	return node, nil
}

// jsonEqual is RFC 6902 section 4.6 equality: numbers compare by value (1 equals 1.0),
// objects ignore member order.
func jsonEqual(a, b any) bool {
	switch x := a.(type) {
	case map[string]any:
		y, ok := b.(map[string]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for k, xv := range x {
			yv, ok := y[k]
			if !ok || !jsonEqual(xv, yv) {
				return false
			}
		}
		return true
	case []any:
		y, ok := b.([]any)
		if !ok || len(x) != len(y) {
			return false
		}
		for i := range x {
			if !jsonEqual(x[i], y[i]) {
				return false
			}
		}
		return true
	case json.Number:
		y, ok := b.(json.Number)
		if !ok {
			return false
		}
		return sameNumber(string(x), string(y))
	default:
		return a == b // string, bool, nil
	}
}

// sameNumber reports whether two JSON number literals have the same value, exactly
// (1 == 1.0 == 10e-1). It normalizes the decimal digits and exponent instead of using
// math/big, which would materialize 10^999999999 for a hostile "1e999999999".
func sameNumber(a, b string) bool {
	if a == b {
		return true
	}
	na, da, ea, oka := decimal(a)
	nb, db, eb, okb := decimal(b)
	if !oka || !okb {
		return false
	}
	if da == "" || db == "" { // zero, whatever the sign and exponent
		return da == db
	}
	return na == nb && da == db && ea == eb
}

// decimal splits a JSON number literal into sign, significant digits without leading or
// trailing zeros, and the exponent of the last digit: value = ±digits × 10^exp.
func decimal(s string) (neg bool, digits string, exp int, ok bool) {
	if s != "" && s[0] == '-' {
		neg, s = true, s[1:]
	}
	mant, e := s, 0
	if i := strings.IndexAny(s, "eE"); i >= 0 {
		mant = s[:i]
		v, err := strconv.Atoi(strings.TrimPrefix(s[i+1:], "+"))
		if err != nil || v > 1<<40 || v < -(1<<40) {
			return false, "", 0, false
		}
		e = v
	}
	if i := strings.IndexByte(mant, '.'); i >= 0 {
		e -= len(mant) - i - 1
		mant = mant[:i] + mant[i+1:]
	}
	mant = strings.TrimLeft(mant, "0")
	trimmed := strings.TrimRight(mant, "0")
	e += len(mant) - len(trimmed)
	return neg, trimmed, e, true
}
