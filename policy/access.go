package policy

import (
	"fmt"
	"strings"
)

// Caller identifies who is calling, as established by mTLS or a verified token.
type Caller struct {
	AppID       string
	Namespace   string
	TrustDomain string
}

// AccessControl is the compiled accessControl block of an app, with Dapr's semantics: if a
// policy names the caller (App ID, namespace and trust domain), its operations and then
// its defaultAction decide; otherwise the top-level defaultAction does.
type AccessControl struct {
	DefaultAction Action
	TrustDomain   string
	policies      map[string]*accessPolicy
}

type accessPolicy struct {
	appID         string
	defaultAction Action
	ops           []operation
	// defaultReason is formatted once at load time: Decide runs on every request.
	defaultReason string
}

type operation struct {
	name     string
	segs     []string
	verbs    map[string]bool // nil: every verb ("*")
	action   Action
	literals int    // how specific the operation is; the most specific match wins
	reason   string // formatted at load time
}

func policyKey(td, ns, appID string) string { return td + "/" + ns + "/" + appID }

// Decide says whether caller may call verb on path. The reason names what decided, for
// logs; it holds only policy names, never request data beyond the path.
func (a *AccessControl) Decide(c Caller, verb, path string) (Action, string) {
	p := a.policies[policyKey(c.TrustDomain, c.Namespace, c.AppID)]
	if p == nil {
		if c.AppID == "" {
			return a.DefaultAction, fmt.Sprintf("anonymous caller: accessControl defaultAction %s", a.DefaultAction)
		}
		return a.DefaultAction, fmt.Sprintf("no access policy for caller %q: accessControl defaultAction %s", c.AppID, a.DefaultAction)
	}
	if len(p.ops) == 0 {
		return p.defaultAction, p.defaultReason
	}
	segs, ok := pathSegments(path)
	if !ok {
		// A path with dot segments or encoded separators could match one operation here
		// and reach another upstream; refuse rather than guess how the app resolves it.
		return Deny, "request path is not normalized (dot segments or encoded separators)"
	}
	var best *operation
	for i := range p.ops {
		op := &p.ops[i]
		if op.match(segs) && (best == nil || op.literals > best.literals) {
			best = op
		}
	}
	if best == nil {
		return p.defaultAction, fmt.Sprintf("access policy for %q: no operation matches %s, defaultAction %s", c.AppID, path, p.defaultAction)
	}
	if best.verbs != nil && !best.verbs[strings.ToUpper(verb)] {
		return p.defaultAction, fmt.Sprintf("access policy for %q: operation %s does not list %s, defaultAction %s", c.AppID, best.name, verb, p.defaultAction)
	}
	return best.action, best.reason
}

// pathSegments splits a request path (query removed) into segments, merging slashes.
func pathSegments(path string) ([]string, bool) {
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	lower := strings.ToLower(path)
	if strings.Contains(lower, "%2f") || strings.Contains(lower, "%5c") || strings.Contains(lower, "%2e") || strings.Contains(path, `\`) {
		return nil, false
	}
	segs := make([]string, 0, 4)
	for s := range strings.SplitSeq(path, "/") {
		switch s {
		case "":
			continue
		case ".", "..":
			return nil, false
		}
		segs = append(segs, s)
	}
	return segs, true
}

// compileOperation parses an operation name: "/" separated segments where "*" matches
// exactly one segment and a final "**" matches the rest (one or more segments), as in
// Dapr's allow lists.
func compileOperation(name string) (operation, error) {
	if !strings.HasPrefix(name, "/") {
		return operation{}, fmt.Errorf("must start with \"/\"")
	}
	segs, ok := pathSegments(name)
	if !ok {
		return operation{}, fmt.Errorf("must not contain dot segments or encoded separators")
	}
	op := operation{name: name, segs: segs}
	for i, s := range segs {
		switch {
		case s == "**":
			if i != len(segs)-1 {
				return operation{}, fmt.Errorf("\"**\" may only be the last segment")
			}
		case s == "*":
		case strings.Contains(s, "*"):
			return operation{}, fmt.Errorf("\"*\" must be a whole segment")
		default:
			op.literals++
		}
	}
	return op, nil
}

func (op *operation) match(segs []string) bool {
	for i, p := range op.segs {
		if p == "**" {
			return len(segs) > i
		}
		if i >= len(segs) || (p != "*" && p != segs[i]) {
			return false
		}
	}
	return len(segs) == len(op.segs)
}
