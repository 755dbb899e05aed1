package policy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// MaxFileBytes bounds every policy and Rego file, so a stray large file in the directory
// fails the load instead of exhausting memory.
const MaxFileBytes = 4 << 20

// LoadDir loads every *.yaml and *.yml file directly in dir. Problems are reported with
// paths under dir, as the user typed it.
func LoadDir(ctx context.Context, dir string) (*Snapshot, error) {
	info, err := os.Stat(dir)
	if err != nil {
		return nil, fmt.Errorf("policy directory: %w", err)
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("policy directory %s: not a directory", dir)
	}
	return Load(ctx, os.DirFS(dir), dir)
}

// Load loads a policy from the top level of fsys. prefix is prepended to file names in
// problems (the directory the user named; empty for an embedded policy).
//
// Files whose names start with "." are skipped: Kubernetes ConfigMap volumes keep the real
// files under "..data" and timestamped "..<date>" directories beside symlinks to them.
func Load(ctx context.Context, fsys fs.FS, prefix string) (*Snapshot, error) {
	names, err := policyFiles(fsys)
	if err != nil {
		return nil, err
	}
	l := &loader{
		ctx:    ctx,
		fsys:   fsys,
		prefix: prefix,
		hash:   sha256.New(),
		probs:  &problems{},
	}
	for _, name := range names {
		if err := l.loadFile(name); err != nil {
			return nil, err
		}
	}
	if len(names) == 0 {
		l.probs.add(displayDir(prefix), 0, "no policy files (*.yaml, *.yml)")
	}
	snap := l.compile()
	if err := l.probs.err(); err != nil {
		return nil, err
	}
	snap.Version = hex.EncodeToString(l.hash.Sum(nil))[:16]
	snap.Files = names
	return snap, nil
}

func displayDir(prefix string) string {
	if prefix == "" {
		return "."
	}
	return prefix
}

func policyFiles(fsys fs.FS) ([]string, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, fmt.Errorf("read policy directory: %w", err)
	}
	var names []string
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") {
			continue
		}
		if ext := path.Ext(name); ext != ".yaml" && ext != ".yml" {
			continue
		}
		// Stat follows symlinks (ConfigMap files are symlinks into ..data).
		info, err := fs.Stat(fsys, name)
		if err != nil {
			return nil, fmt.Errorf("policy file %s: %w", name, err)
		}
		if info.Mode().IsRegular() {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names, nil
}

// loader carries one load: the documents read so far, their problems, and the hash.
type loader struct {
	ctx    context.Context
	fsys   fs.FS
	prefix string
	hash   hashWriter
	probs  *problems
	docs   []*document
}

type hashWriter interface {
	io.Writer
	Sum([]byte) []byte
}

// document is one YAML document after strict decoding.
type document struct {
	file  string // display path
	name  string // path inside fsys
	line  int
	kind  string
	meta  Metadata
	spec  any // *MeshSpec, *AppSpec, ...
	lines map[string]int
}

// at returns the line of path in the document, or of its nearest parent that has one.
func (d *document) at(p string) int {
	for {
		if l, ok := d.lines[p]; ok {
			return l
		}
		i := strings.LastIndexAny(p, ".[")
		if i < 0 {
			return d.line
		}
		p = p[:i]
	}
}

func (l *loader) display(name string) string {
	if l.prefix == "" {
		return name
	}
	return filepath.Join(l.prefix, filepath.FromSlash(name))
}

// readFile reads a file of the policy (a YAML file or a Rego module) into the hash.
func (l *loader) readFile(name string) ([]byte, error) {
	f, err := l.fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxFileBytes {
		return nil, fmt.Errorf("larger than %d bytes", MaxFileBytes)
	}
	// Name and length delimit files in the hash, so moving text between files changes it.
	fmt.Fprintf(l.hash, "%s\x00%d\x00", name, len(data))
	l.hash.Write(data)
	return data, nil
}

func (l *loader) loadFile(name string) error {
	file := l.display(name)
	data, err := l.readFile(name)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) {
			return fmt.Errorf("policy file %s: %w", file, err)
		}
		l.probs.add(file, 0, "%v", err)
		return nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			syntaxProblem(l.probs, file, err)
			return nil // the parser cannot resync after a syntax error
		}
		l.document(file, name, &n)
	}
}

// specTypes maps each kind to the Go type of its spec.
var specTypes = map[string]reflect.Type{
	KindMesh:         reflect.TypeFor[MeshSpec](),
	KindApp:          reflect.TypeFor[AppSpec](),
	KindHTTPEndpoint: reflect.TypeFor[HTTPEndpointSpec](),
	KindGateway:      reflect.TypeFor[GatewaySpec](),
}

// envelope is the part every document shares; the spec is decoded by kind.
type envelope struct {
	APIVersion string    `yaml:"apiVersion"`
	Kind       string    `yaml:"kind"`
	Metadata   Metadata  `yaml:"metadata"`
	Spec       yaml.Node `yaml:"spec"`
}

func (l *loader) document(file, name string, n *yaml.Node) {
	root := n
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return
		}
		root = root.Content[0]
	}
	if isNull(root) {
		return // an empty document, e.g. after a trailing "---"
	}
	d := &document{file: file, name: name, line: root.Line, lines: map[string]int{}}
	before := len(l.probs.list)
	w := &walker{file: file, lines: d.lines, probs: l.probs}

	if root.Kind != yaml.MappingNode {
		l.probs.add(file, root.Line, "a policy document must be a mapping with apiVersion, kind, metadata and spec")
		return
	}
	// Walk the envelope with spec typed by kind, so unknown spec fields are found too.
	kind := scalarField(root, "kind")
	specType, known := specTypes[kind]
	if !known {
		specType = reflect.TypeFor[yaml.Node]()
	}
	envType := reflect.StructOf([]reflect.StructField{
		{Name: "APIVersion", Type: reflect.TypeFor[string](), Tag: `yaml:"apiVersion"`},
		{Name: "Kind", Type: reflect.TypeFor[string](), Tag: `yaml:"kind"`},
		{Name: "Metadata", Type: reflect.TypeFor[Metadata](), Tag: `yaml:"metadata"`},
		{Name: "Spec", Type: specType, Tag: `yaml:"spec"`},
	})
	if known {
		w.walk(root, envType, "")
	} else {
		w.lines[""] = root.Line
		for i := 0; i+1 < len(root.Content); i += 2 {
			w.lines[root.Content[i].Value] = root.Content[i].Line
		}
	}

	// Decode even when the walker found problems (unknown fields are simply dropped
	// by Decode): a document that still decodes takes part in cross-checks, so one typo
	// does not cascade into "no Mesh" or "issuer not defined" reports.
	walked := len(l.probs.list)
	var env envelope
	if err := root.Decode(&env); err != nil {
		if walked == before {
			decodeProblem(l.probs, file, err)
		}
		return
	}
	switch {
	case kind == "":
		l.probs.add(file, root.Line, "kind is required (one of Mesh, App, HTTPEndpoint, Gateway)")
	case !known:
		l.probs.add(file, d.at("kind"), "kind: unknown kind %q (one of Mesh, App, HTTPEndpoint, Gateway)", kind)
	}
	if v := scalarField(root, "apiVersion"); v != APIVersion {
		l.probs.add(file, d.at("apiVersion"), "apiVersion: must be %q, got %q", APIVersion, v)
	}
	if !known || len(l.probs.list) != walked {
		return
	}
	spec := reflect.New(specType)
	if !env.Spec.IsZero() {
		if err := env.Spec.Decode(spec.Interface()); err != nil {
			if walked == before {
				decodeProblem(l.probs, file, err)
			}
			return
		}
	}
	d.kind = kind
	d.meta = env.Metadata
	d.spec = spec.Interface()
	l.docs = append(l.docs, d)
}

// scalarField returns the value of a top-level scalar key of a mapping node.
func scalarField(m *yaml.Node, key string) string {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key && m.Content[i+1].Kind == yaml.ScalarNode {
			return m.Content[i+1].Value
		}
	}
	return ""
}
