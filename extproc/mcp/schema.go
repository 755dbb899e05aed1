package mcp

import (
	"errors"
	"fmt"
)

// PruneOutputSchema rewrites one tools/list entry (a tool definition) so that its
// outputSchema describes the tool's results after the redaction pointers were removed
// from them (see Redact): the properties the pointers name are removed from "properties"
// and "required", at any depth. Without it, a client that validates structuredContent
// against outputSchema (the official TypeScript SDK does, MCP 2025-06-18 "Output
// Schema") refuses every redacted result: the schema often requires the removed property
// and forbids others (additionalProperties: false).
//
// Only pointers under structuredContent matter; the pointer "/structuredContent" itself
// removes structuredContent from results, so the outputSchema is removed too (a tool
// that declares one must return structured content). Along a pointer the schema is
// loosened wherever it could still demand the removed value: allOf/anyOf branches,
// then/else, dependentSchemas and additionalProperties are pruned too; oneOf becomes
// anyOf (pruning may make several branches match); the removed name leaves
// dependentRequired; minProperties, minItems and minContains on the pruned object or
// array are dropped; a $ref or $dynamicRef on the way is removed rather than followed
// (the referenced schema may be shared with places that keep the property), leaving
// that part undescribed. Loosening never makes a result the server sends invalid.
//
// The entry is returned unchanged (same slice, changed false) when nothing applies; the
// rewritten outputSchema is re-serialized (member order is then sorted; JSON Schema
// gives it no meaning) and everything else in the entry is kept byte for byte.
func PruneOutputSchema(entry []byte, pointers [][]string) ([]byte, bool, error) {
	var paths [][]string
	for _, p := range pointers {
		if len(p) > 0 && p[0] == "structuredContent" {
			paths = append(paths, p[1:])
		}
	}
	if len(paths) == 0 {
		return entry, false, nil
	}
	if err := validate(entry, respMaxDepth); err != nil {
		return nil, false, newError(CodeParseError, nil, "parse error: %v", err)
	}
	i := skipWS(entry, 0)
	if entry[i] != '{' {
		return nil, false, errors.New("mcp: a tool definition must be an object")
	}
	s := findMember(entry, i, "outputSchema", nil)
	if !s.ok() {
		return entry, false, nil
	}
	for _, p := range paths {
		if len(p) == 0 {
			out, _ := removePointer(entry, []string{"outputSchema"})
			return out, true, nil
		}
	}
	schema, _ := decodeValue(entry, s.start)
	changed := false
	for _, p := range paths {
		var c bool
		schema, c = pruneSchema(schema, p, 0)
		changed = changed || c
	}
	if !changed {
		return entry, false, nil
	}
	repl, err := marshalCompact(schema)
	if err != nil {
		return nil, false, fmt.Errorf("mcp: outputSchema: %v", err)
	}
	out := make([]byte, 0, len(entry)+len(repl)-(s.end-s.start))
	out = append(out, entry[:s.start]...)
	out = append(out, repl...)
	return append(out, entry[s.end:]...), true, nil
}

// maxSchemaNesting bounds pruneSchema's recursion through combinators (the document's
// depth is already bounded by validate; this bounds the work on hostile schemas).
const maxSchemaNesting = 64

// pruneSchema removes the property path toks (non-empty) from the schema node and
// reports whether it changed anything.
func pruneSchema(node any, toks []string, nesting int) (any, bool) {
	m, ok := node.(map[string]any)
	if !ok || nesting > maxSchemaNesting {
		return node, false // a boolean schema: true accepts the pruned value, false nothing
	}
	tok, last := toks[0], len(toks) == 1
	changed := false
	mark := func(c bool) { changed = changed || c }
	del := func(k string) {
		if _, ok := m[k]; ok {
			delete(m, k)
			changed = true
		}
	}
	del("$ref")
	del("$dynamicRef")
	// Branches that apply to this same instance.
	for _, k := range []string{"allOf", "anyOf", "oneOf"} {
		if arr, ok := m[k].([]any); ok {
			for j := range arr {
				var c bool
				arr[j], c = pruneSchema(arr[j], toks, nesting+1)
				mark(c)
			}
		}
	}
	if one, ok := m["oneOf"]; ok && changed {
		delete(m, "oneOf")
		if _, taken := m["anyOf"]; taken {
			all, _ := m["allOf"].([]any)
			m["allOf"] = append(all, map[string]any{"anyOf": one})
		} else {
			m["anyOf"] = one
		}
	}
	for _, k := range []string{"then", "else"} {
		if _, ok := m[k]; ok {
			var c bool
			m[k], c = pruneSchema(m[k], toks, nesting+1)
			mark(c)
		}
	}
	if ds, ok := m["dependentSchemas"].(map[string]any); ok {
		for k := range ds {
			var c bool
			ds[k], c = pruneSchema(ds[k], toks, nesting+1)
			mark(c)
		}
	}
	// The member itself.
	found := false
	if props, ok := m["properties"].(map[string]any); ok {
		if sub, ok := props[tok]; ok {
			found = true
			if last {
				delete(props, tok)
				changed = true
			} else {
				var c bool
				props[tok], c = pruneSchema(sub, toks[1:], nesting+1)
				mark(c)
			}
		}
	}
	if !found && !last {
		if ap, ok := m["additionalProperties"].(map[string]any); ok {
			var c bool
			m["additionalProperties"], c = pruneSchema(ap, toks[1:], nesting+1)
			mark(c)
		}
	}
	// Array elements (a numeric token).
	if idx, err := arrayIndex(tok, 1<<30, false); err == nil {
		if pre, ok := m["prefixItems"].([]any); ok && idx < len(pre) && !last {
			var c bool
			pre[idx], c = pruneSchema(pre[idx], toks[1:], nesting+1)
			mark(c)
		}
		if items, ok := m["items"].(map[string]any); ok && !last {
			var c bool
			m["items"], c = pruneSchema(items, toks[1:], nesting+1)
			mark(c)
		}
		if last {
			del("minItems")
			del("minContains")
		}
	}
	if last {
		if req, ok := m["required"].([]any); ok {
			kept := req[:0:0]
			for _, r := range req {
				if r != tok {
					kept = append(kept, r)
				}
			}
			if len(kept) != len(req) {
				changed = true
				if len(kept) == 0 {
					delete(m, "required")
				} else {
					m["required"] = kept
				}
			}
		}
		if dr, ok := m["dependentRequired"].(map[string]any); ok {
			if _, ok := dr[tok]; ok {
				delete(dr, tok)
				changed = true
			}
			for k, v := range dr {
				if arr, ok := v.([]any); ok {
					kept := arr[:0:0]
					for _, r := range arr {
						if r != tok {
							kept = append(kept, r)
						}
					}
					if len(kept) != len(arr) {
						dr[k] = kept
						changed = true
					}
				}
			}
		}
		del("minProperties")
	}
	return m, changed
}
