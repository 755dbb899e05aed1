package policy

import (
	"errors"
	"fmt"
	"sort"
	"strings"
)

// Problem is one thing wrong with the policy, at a place in a file.
type Problem struct {
	File string // path of the file as given to the loader
	Line int    // 1-based; 0 when the problem is about the file or the whole policy
	Msg  string
}

// Error renders the problem as "file:line: message", the form editors and CI understand.
func (p *Problem) Error() string {
	switch {
	case p.File == "":
		return p.Msg
	case p.Line > 0:
		return fmt.Sprintf("%s:%d: %s", p.File, p.Line, p.Msg)
	default:
		return fmt.Sprintf("%s: %s", p.File, p.Msg)
	}
}

// ErrInvalid is wrapped by every error that says the policy is wrong (as opposed to a
// failure to read it), so callers can tell "fix your files" from "check the disk".
var ErrInvalid = errors.New("invalid policy")

// LoadError holds every problem found in one load, sorted by file and line. The loader
// collects them all so that one run of `mcpgate validate` shows everything to fix.
type LoadError struct {
	Problems []*Problem
}

// Error lists every problem, one per line.
func (e *LoadError) Error() string {
	lines := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		lines[i] = p.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap exposes the problems and ErrInvalid to errors.Is and errors.As.
func (e *LoadError) Unwrap() []error {
	out := make([]error, 0, len(e.Problems)+1)
	out = append(out, ErrInvalid)
	for _, p := range e.Problems {
		out = append(out, p)
	}
	return out
}

type problems struct {
	list []*Problem
}

func (ps *problems) add(file string, line int, format string, args ...any) {
	ps.list = append(ps.list, &Problem{File: file, Line: line, Msg: fmt.Sprintf(format, args...)})
}

func (ps *problems) err() error {
	if len(ps.list) == 0 {
		return nil
	}
	sort.SliceStable(ps.list, func(i, j int) bool {
		a, b := ps.list[i], ps.list[j]
		if a.File != b.File {
			return a.File < b.File
		}
		return a.Line < b.Line
	})
	return &LoadError{Problems: ps.list}
}
