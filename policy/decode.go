package policy

import (
	"fmt"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// walker checks a YAML node tree against the Go type it will be decoded into, before it
// is decoded. It does what yaml.v3 cannot do for nested nodes (Node.Decode drops
// KnownFields): unknown and duplicate keys, with line numbers. It also records the line of
// every path so that validation errors can name file:line.
type walker struct {
	file  string
	lines map[string]int
	probs *problems
}

func (w *walker) walk(n *yaml.Node, t reflect.Type, path string) {
	w.lines[path] = n.Line
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		// Aliases make one node appear in many places (and "billion laughs" bombs); a
		// security policy gains nothing from them, so they are refused outright.
		w.probs.add(w.file, n.Line, "%s: YAML anchors and aliases are not allowed in policy files", display(path))
		return
	}
	if isNull(n) {
		return
	}
	// Two types read a scalar as well as a mapping: a rate ("10/s" or {rate, burst}) and
	// TLS (true or {caFile}).
	switch {
	case t == rateSpecType && n.Kind == yaml.ScalarNode:
		return // a string
	case t == tlsSpecType && n.Kind == yaml.ScalarNode:
		if n.ShortTag() != "!!bool" {
			w.probs.add(w.file, n.Line, "%s: expected true, false or a mapping {caFile, serverName}, got %q", display(path), n.Value)
		}
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			w.probs.add(w.file, n.Line, "%s: expected a mapping, got %s", display(path), describe(n))
			return
		}
		fields := structFields(t)
		w.mapping(n, path, func(key string, k, v *yaml.Node) {
			ft, ok := fields[key]
			if !ok {
				w.probs.add(w.file, k.Line, "%s: unknown field %q%s", display(path), key, suggest(key, fields))
				return
			}
			w.walk(v, ft, join(path, key))
		})
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			w.probs.add(w.file, n.Line, "%s: expected a mapping, got %s", display(path), describe(n))
			return
		}
		w.mapping(n, path, func(key string, _, v *yaml.Node) {
			w.walk(v, t.Elem(), join(path, key))
		})
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			w.probs.add(w.file, n.Line, "%s: expected a list, got %s", display(path), describe(n))
			return
		}
		for i, el := range n.Content {
			w.walk(el, t.Elem(), path+"["+strconv.Itoa(i)+"]")
		}
	default:
		if n.Kind != yaml.ScalarNode {
			w.probs.add(w.file, n.Line, "%s: expected %s, got %s", display(path), kindName(t), describe(n))
			return
		}
		tag := n.ShortTag()
		switch t.Kind() {
		case reflect.Bool:
			if tag != "!!bool" {
				w.probs.add(w.file, n.Line, "%s: expected true or false, got %q", display(path), n.Value)
			}
		case reflect.Int, reflect.Int32, reflect.Int64:
			if tag != "!!int" {
				w.probs.add(w.file, n.Line, "%s: expected an integer, got %q", display(path), n.Value)
			}
		case reflect.String:
			// Any scalar reads as a string; quoting is the user's business.
		}
	}
}

// mapping visits the key/value pairs of a mapping node, reporting non-scalar and
// duplicate keys. Duplicate keys are a classic parser-differential: two readers of one file
// must never disagree about which value counts.
func (w *walker) mapping(n *yaml.Node, path string, visit func(key string, k, v *yaml.Node)) {
	seen := make(map[string]int, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || k.ShortTag() == "!!merge" {
			w.probs.add(w.file, k.Line, "%s: keys must be plain strings (merge keys and complex keys are not allowed)", display(path))
			continue
		}
		if first, dup := seen[k.Value]; dup {
			w.probs.add(w.file, k.Line, "%s: duplicate field %q (first at line %d)", display(path), k.Value, first)
			continue
		}
		seen[k.Value] = k.Line
		visit(k.Value, k, v)
	}
}

var (
	rateSpecType = reflect.TypeFor[RateSpec]()
	tlsSpecType  = reflect.TypeFor[TLSSpec]()
)

func structFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		out[name] = f.Type
	}
	return out
}

// suggest names the field the user probably meant, for the common case of a wrong case
// ("jwksURI" for "jwksUri").
func suggest(key string, fields map[string]reflect.Type) string {
	for name := range fields {
		if strings.EqualFold(name, key) {
			return fmt.Sprintf(" (did you mean %q?)", name)
		}
	}
	return ""
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	default:
		return "something else"
	}
}

func kindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int32, reflect.Int64:
		return "an integer"
	default:
		return "a string"
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func display(path string) string {
	if path == "" {
		return "document"
	}
	return path
}

var yamlLineRE = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxProblem turns a yaml.v3 parse error into file:line form.
func syntaxProblem(probs *problems, file string, err error) {
	msg := err.Error()
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		probs.add(file, line, "invalid YAML: %s", m[2])
		return
	}
	probs.add(file, 0, "invalid YAML: %s", strings.TrimPrefix(msg, "yaml: "))
}

// decodeProblem turns an error from Node.Decode into file:line problems. The walker has
// already caught what it can, so this is a backstop.
func decodeProblem(probs *problems, file string, err error) {
	var te *yaml.TypeError
	if ok := asTypeError(err, &te); ok {
		for _, e := range te.Errors {
			if m := regexp.MustCompile(`^line (\d+): (.*)$`).FindStringSubmatch(e); m != nil {
				line, _ := strconv.Atoi(m[1])
				probs.add(file, line, "%s", m[2])
				continue
			}
			probs.add(file, 0, "%s", e)
		}
		return
	}
	syntaxProblem(probs, file, err)
}

func asTypeError(err error, target **yaml.TypeError) bool {
	te, ok := err.(*yaml.TypeError)
	if ok {
		*target = te
	}
	return ok
}
