package policy

import (
	"errors"
	"fmt"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
)

// RegoQuery is the query every policy module answers.
const RegoQuery = "data.mcpgate.decision"

// deniedBuiltins are Rego built-ins a per-request decision must not call: they reach the
// network or mcpgate's files, so a decision on the hot path could stall on them, probe
// the inside of the mesh (SSRF), send the caller's claims out in a URL, or put a file's
// content into a reason the caller reads. The JSON Schema built-ins resolve "$ref": over
// http(s) (allow_net also says no host, below) and from file:// (which allow_net does
// not govern), so they go too.
var deniedBuiltins = map[string]bool{
	"http.send":          true,
	"net.lookup_ip_addr": true,
	"opa.runtime":        true,
	"json.match_schema":  true,
	"json.verify_schema": true,
}

// regoCapabilities is the OPA capability set minus the denied built-ins, with no network
// host allowed (nil allow_net means every host); computed once.
var regoCapabilities = func() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	caps.AllowNet = []string{}
	kept := caps.Builtins[:0:0]
	for _, b := range caps.Builtins {
		if !deniedBuiltins[b.Name] {
			kept = append(kept, b)
		}
	}
	caps.Builtins = kept
	return caps
}()

// compileRego reads and compiles a Rego module into a prepared query. Compilation happens
// here, once per snapshot, so a syntax or type error is a load error with file:line and
// evaluation on the request path does no compilation.
func (l *loader) compileRego(d *document, fieldPath, rel string) *Rego {
	name, ok := regoPath(d.name, rel)
	if !ok {
		l.errf(d, fieldPath, "%q must be a relative path inside the policy directory", rel)
		return nil
	}
	file := l.display(name)
	src, err := l.readFile(name)
	if err != nil {
		l.errf(d, fieldPath, "cannot read %s: %v", file, err)
		return nil
	}
	mod, err := ast.ParseModuleWithOpts(file, string(src), ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		l.regoProblems(file, err)
		return nil
	}
	if got := mod.Package.Path.String(); got != "data.mcpgate" {
		l.probs.add(file, mod.Package.Location.Row, "package must be mcpgate (the query is %s), got %s", RegoQuery, mod.Package.Path)
		return nil
	}
	hasDecision := false
	for _, r := range mod.Rules {
		if r.Head.Ref().String() == "decision" {
			hasDecision = true
		}
	}
	if !hasDecision {
		l.probs.add(file, mod.Package.Location.Row, "the module defines no rule \"decision\" (%s)", RegoQuery)
		return nil
	}
	pq, err := rego.New(
		rego.Query(RegoQuery),
		rego.ParsedModule(mod),
		rego.Capabilities(regoCapabilities),
		rego.StrictBuiltinErrors(true),
	).PrepareForEval(l.ctx)
	if err != nil {
		l.regoProblems(file, err)
		return nil
	}
	return &Rego{File: file, Query: pq}
}

// regoProblems reports OPA parse and compile errors at their own file:line.
func (l *loader) regoProblems(file string, err error) {
	var errs ast.Errors
	if errors.As(err, &errs) {
		for _, e := range errs {
			line, f := 0, file
			if e.Location != nil {
				line = e.Location.Row
				if e.Location.File != "" {
					f = e.Location.File
				}
			}
			l.probs.add(f, line, "rego: %s", e.Message)
		}
		return
	}
	l.probs.add(file, 0, "rego: %v", fmt.Sprint(err))
}
