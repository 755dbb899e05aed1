package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Tool-definition pinning: a tool's definition as a server lists it (tools/list) is
// reduced to SHA-256 digests of the canonical JSON of the fields a client acts on, so
// that a server changing a tool after it was approved ("rug pull", tool poisoning) is
// seen, and one re-serialising the same definition (key order, whitespace, 1.0 for 1)
// is not.

// PinnedFields are the members of a tool definition a pin covers, in the order drift
// reasons name them. name is the pin's key; _meta and icons are not covered (servers
// put volatile data there).
var PinnedFields = []string{"title", "description", "inputSchema", "outputSchema", "annotations"}

// ToolPin is the fingerprint of one tool definition.
type ToolPin struct {
	// SHA256 digests the canonical JSON of the pinned fields together.
	SHA256 string `yaml:"sha256" json:"sha256"`
	// Fields digests each pinned field present, so that a drift names what changed.
	Fields map[string]string `yaml:"fields,omitempty" json:"fields,omitempty"`
	// InputProperties are the names of inputSchema.properties, so that a drift names
	// the arguments a server added or removed.
	InputProperties []string `yaml:"inputProperties,omitempty" json:"inputProperties,omitempty"`
}

// FingerprintTool pins a tool definition (one entry of a tools/list result): it returns
// the tool's name and its pin. A definition that is not a JSON object with a string name
// is an error.
func FingerprintTool(def []byte) (string, ToolPin, error) {
	name, pin, _, err := FingerprintToolCanonical(def)
	return name, pin, err
}

// FingerprintToolCanonical is FingerprintTool that also returns the canonical JSON of
// the pinned fields: what the pin's sha256 digests, for an operator to review.
func FingerprintToolCanonical(def []byte) (string, ToolPin, []byte, error) {
	v, err := decodeCanonical(def)
	if err != nil {
		return "", ToolPin{}, nil, fmt.Errorf("tool definition: %w", err)
	}
	members, ok := v.(map[string]any)
	if !ok {
		return "", ToolPin{}, nil, errors.New("tool definition: not a JSON object")
	}
	name, _ := members["name"].(string)
	if name == "" {
		return "", ToolPin{}, nil, errors.New("tool definition: no string name")
	}
	pin := ToolPin{Fields: map[string]string{}}
	whole := map[string]any{}
	for _, f := range PinnedFields {
		v, ok := members[f]
		if !ok || v == nil {
			continue // "outputSchema": null is no outputSchema
		}
		whole[f] = v
		pin.Fields[f] = digest(canonicalJSON(v))
	}
	canonical := canonicalJSON(whole)
	pin.SHA256 = digest(canonical)
	if schema, ok := whole["inputSchema"].(map[string]any); ok {
		if props, ok := schema["properties"].(map[string]any); ok {
			for p := range props {
				pin.InputProperties = append(pin.InputProperties, p)
			}
			sort.Strings(pin.InputProperties)
		}
	}
	return name, pin, canonical, nil
}

// Drift lists how current differs from the pin, in words an operator can act on
// ("description changed", "inputSchema added property force"); none if it matches.
func (p ToolPin) Drift(current ToolPin) []string {
	if p.SHA256 == current.SHA256 {
		return nil
	}
	if len(p.Fields) == 0 {
		return []string{"definition changed"} // a pin of the whole digest only cannot say more
	}
	var out []string
	for _, f := range PinnedFields {
		was, had := p.Fields[f]
		now, has := current.Fields[f]
		switch {
		case had && !has:
			out = append(out, f+" removed")
		case !had && has:
			out = append(out, f+" added")
		case had && was != now:
			if f != "inputSchema" {
				out = append(out, f+" changed")
				continue
			}
			var props []string
			for _, a := range current.InputProperties {
				if !slices.Contains(p.InputProperties, a) {
					props = append(props, "added property "+a)
				}
			}
			for _, r := range p.InputProperties {
				if !slices.Contains(current.InputProperties, r) {
					props = append(props, "removed property "+r)
				}
			}
			if len(props) == 0 {
				out = append(out, "inputSchema changed")
			} else {
				out = append(out, "inputSchema "+strings.Join(props, ", "))
			}
		}
	}
	if len(out) == 0 {
		out = append(out, "definition changed") // digests edited by hand
	}
	return out
}

func digest(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// decodeCanonical decodes JSON keeping numbers exact (json.Number) and refusing
// duplicate object keys (which definition would a client read?) and trailing data.
func decodeCanonical(raw []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec, 0)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data")
	}
	return v, nil
}

// maxPinDepth bounds the nesting of a pinned definition.
const maxPinDepth = 64

func decodeValue(dec *json.Decoder, depth int) (any, error) {
	if depth > maxPinDepth {
		return nil, fmt.Errorf("nested deeper than %d", maxPinDepth)
	}
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			m := map[string]any{}
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				k := kt.(string)
				if _, dup := m[k]; dup {
					return nil, fmt.Errorf("duplicate key %q", k)
				}
				if m[k], err = decodeValue(dec, depth+1); err != nil {
					return nil, err
				}
			}
			_, err := dec.Token() // }
			return m, err
		case '[':
			l := []any{}
			for dec.More() {
				v, err := decodeValue(dec, depth+1)
				if err != nil {
					return nil, err
				}
				l = append(l, v)
			}
			_, err := dec.Token() // ]
			return l, err
		}
		return nil, fmt.Errorf("unexpected %v", t)
	default:
		return t, nil // string, json.Number, bool, nil
	}
}

// canonicalJSON writes v with object keys sorted, no insignificant whitespace, strings
// escaped the one way encoding/json does (HTML characters left as they are), and numbers
// in their shortest form (1.0, 1e0 and 1 are one number), after RFC 8785's intent.
func canonicalJSON(v any) []byte {
	var b bytes.Buffer
	writeCanonical(&b, v)
	return b.Bytes()
}

func writeCanonical(b *bytes.Buffer, v any) {
	switch t := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(t))
		for k := range t {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				b.WriteByte(',')
			}
			writeString(b, k)
			b.WriteByte(':')
			writeCanonical(b, t[k])
		}
		b.WriteByte('}')
	case []any:
		b.WriteByte('[')
		for i, x := range t {
			if i > 0 {
				b.WriteByte(',')
			}
			writeCanonical(b, x)
		}
		b.WriteByte(']')
	case string:
		writeString(b, t)
	case json.Number:
		if n, err := strconv.ParseInt(string(t), 10, 64); err == nil {
			b.WriteString(strconv.FormatInt(n, 10)) // integers exactly, however large
		} else if f, err := strconv.ParseFloat(string(t), 64); err == nil {
			b.WriteString(strconv.FormatFloat(f, 'g', -1, 64))
		} else {
			b.WriteString(string(t)) // beyond float64: kept as written
		}
	case bool:
		b.WriteString(strconv.FormatBool(t))
	case nil:
		b.WriteString("null")
	}
}

func writeString(b *bytes.Buffer, s string) {
	enc := json.NewEncoder(b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s)
	b.Truncate(b.Len() - 1) // Encode's newline
}

// pinFileSpec is a pin file (pins/<app>.yaml): what `mcpgate pins export` writes.
type pinFileSpec struct {
	Tools map[string]ToolPin `yaml:"tools"`
}

var sha256Hex = regexp.MustCompile(`^[0-9a-f]{64}$`)

// compilePinning validates tools.pinning and reads the pin file.
func (l *loader) compilePinning(d *document, p string, spec PinningSpec) Pinning {
	pin := Pinning{Mode: PinMode(spec.Mode)}
	switch pin.Mode {
	case "", PinOff:
		if spec.File != "" {
			l.errf(d, p+".file", "is set but mode is off")
		}
		return Pinning{Mode: PinOff}
	case PinRecord, PinEnforce:
	default:
		l.errf(d, p+".mode", "must be off, record or enforce, got %q", spec.Mode)
		return Pinning{Mode: PinOff}
	}
	rel := spec.File
	if rel == "" {
		rel = "pins/" + d.meta.Name + ".yaml"
	}
	name, ok := regoPath(d.name, rel)
	if !ok {
		l.errf(d, p+".file", "%q must be a relative path inside the policy directory", rel)
		return pin
	}
	pin.File = l.display(name)
	data, err := l.readFile(name)
	if errors.Is(err, fs.ErrNotExist) && pin.Mode == PinRecord {
		return pin // record mode learns the pins; the file comes from `mcpgate pins export`
	}
	if err != nil {
		l.errf(d, p+".file", "cannot read %s: %v (enforce needs the pins: run record mode and `mcpgate pins export --app %s`)", pin.File, err, d.meta.Name)
		return pin
	}
	var f pinFileSpec
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && !errors.Is(err, io.EOF) {
		l.probs.add(pin.File, yamlErrorLine(err), "%v", err)
		return pin
	}
	pin.Pins = make(map[string]ToolPin, len(f.Tools))
	for tool, tp := range f.Tools {
		where := "tools." + tool
		if tool == "" {
			l.probs.add(pin.File, 0, "a pin without a tool name")
			continue
		}
		if !sha256Hex.MatchString(tp.SHA256) {
			l.probs.add(pin.File, 0, "%s.sha256: %q is not a lower-case hex SHA-256", where, tp.SHA256)
		}
		for field, h := range tp.Fields {
			if !slices.Contains(PinnedFields, field) {
				l.probs.add(pin.File, 0, "%s.fields: unknown field %q (pinned fields: %s)", where, field, strings.Join(PinnedFields, ", "))
			} else if !sha256Hex.MatchString(h) {
				l.probs.add(pin.File, 0, "%s.fields.%s: %q is not a lower-case hex SHA-256", where, field, h)
			}
		}
		pin.Pins[tool] = tp
	}
	return pin
}

// yamlErrorLine is the line a yaml.v3 error names ("yaml: line 3: ..."), or 0.
func yamlErrorLine(err error) int {
	var te *yaml.TypeError
	msg := err.Error()
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	if i := strings.Index(msg, "line "); i >= 0 {
		n := 0
		for _, c := range msg[i+5:] {
			if c < '0' || c > '9' {
				break
			}
			n = n*10 + int(c-'0')
		}
		return n
	}
	return 0
}

// FormatPinFile writes pins as a pin file (what compilePinning reads), tools sorted, each
// preceded by a comment holding the definition it pins (defs, canonical JSON) for review.
func FormatPinFile(app string, pins map[string]ToolPin, defs map[string]string) []byte {
	names := make([]string, 0, len(pins))
	for n := range pins {
		names = append(names, n)
	}
	sort.Strings(names)
	tools := &yaml.Node{Kind: yaml.MappingNode}
	for _, n := range names {
		var v yaml.Node
		if err := v.Encode(pins[n]); err != nil {
			panic(err) // a ToolPin always encodes
		}
		key := &yaml.Node{Kind: yaml.ScalarNode, Value: n}
		if d := defs[n]; d != "" {
			key.HeadComment = strings.ReplaceAll(d, "\n", " ")
		}
		tools.Content = append(tools.Content, key, &v)
	}
	doc := &yaml.Node{Kind: yaml.MappingNode, Content: []*yaml.Node{{Kind: yaml.ScalarNode, Value: "tools"}, tools}}
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Tool pins of App %s: the definitions its server listed through mcpgate (mcpgate pins export).\n", app)
	b.WriteString("# Review every definition (the comment above each pin is what its sha256 digests), commit\n")
	b.WriteString("# this file as the app's pin file (default pins/<app>.yaml), then set tools.pinning.mode: enforce.\n")
	enc := yaml.NewEncoder(&b)
	enc.SetIndent(2)
	_ = enc.Encode(doc)
	_ = enc.Close()
	return b.Bytes()
}
