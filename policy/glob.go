package policy

import (
	"fmt"
	"strings"
)

// Glob matches names with "*" standing for any run of characters (none included). Tool,
// prompt and method names and resource URIs in rules are globs; a glob without "*" is an
// exact name. It is compiled once at load time; Match does no allocation.
type Glob struct {
	pattern string
	parts   []string // the literal pieces between stars
	star    bool
}

// CompileGlob checks and compiles a glob. Empty patterns and whitespace are refused: both
// are almost always a mistake that would silently match nothing.
func CompileGlob(pattern string) (Glob, error) {
	if pattern == "" {
		return Glob{}, fmt.Errorf("empty name")
	}
	if strings.ContainsAny(pattern, " \t\r\n") {
		return Glob{}, fmt.Errorf("%q contains whitespace", pattern)
	}
	if !strings.Contains(pattern, "*") {
		return Glob{pattern: pattern}, nil
	}
	return Glob{pattern: pattern, parts: strings.Split(pattern, "*"), star: true}, nil
}

// MustGlob is CompileGlob for patterns known to be good; it panics otherwise.
func MustGlob(pattern string) Glob {
	g, err := CompileGlob(pattern)
	if err != nil {
		panic(err)
	}
	return g
}

// String returns the pattern as written.
func (g Glob) String() string { return g.pattern }

// Match reports whether s matches the glob.
func (g Glob) Match(s string) bool {
	if !g.star {
		return s == g.pattern
	}
	first, last := g.parts[0], g.parts[len(g.parts)-1]
	if len(s) < len(first)+len(last) || !strings.HasPrefix(s, first) || !strings.HasSuffix(s, last) {
		return false
	}
	rest := s[len(first) : len(s)-len(last)]
	for _, p := range g.parts[1 : len(g.parts)-1] {
		i := strings.Index(rest, p)
		if i < 0 {
			return false
		}
		rest = rest[i+len(p):]
	}
	return true
}

// MatchAny reports whether s matches any of the globs.
func MatchAny(globs []Glob, s string) bool {
	for _, g := range globs {
		if g.Match(s) {
			return true
		}
	}
	return false
}
