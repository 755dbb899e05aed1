package contract

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

var update = flag.Bool("update", false, "rewrite testdata/contract.golden")

func render(spec []Entry) string {
	var b strings.Builder
	b.WriteString("# The wire contract between Envoy, extauthz, extproc and xds (envoy/contract.Spec).\n")
	b.WriteString("# kind | name | type | written by | read by\n")
	for _, e := range spec {
		fmt.Fprintf(&b, "%s | %s | %s | %s | %s\n", e.Kind, e.Name, e.Type, e.Writer, e.Reader)
	}
	return b.String()
}

// TestGolden pins the contract: renaming a key, changing its type or who writes or reads it
// changes testdata/contract.golden, a diff every reviewer sees (go test -update rewrites it).
func TestGolden(t *testing.T) {
	got := render(Spec)
	path := filepath.Join("testdata", "contract.golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test ./envoy/contract -update writes it)", err)
	}
	if got != string(want) {
		t.Errorf("the contract differs from %s (go test ./envoy/contract -update, then review the diff):\n%s", path, got)
	}
}

// TestSpecCoversConstants keeps Spec and the package's constants in step: every exported
// string constant of the contract is in Spec under its own name and value, and its doc
// comment says who writes and who reads it.
func TestSpecCoversConstants(t *testing.T) {
	consts := map[string]string{} // name → value
	docs := map[string]string{}
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") || name == "spec.go" {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, id := range vs.Names {
					if !id.IsExported() || i >= len(vs.Values) {
						continue
					}
					lit, ok := vs.Values[i].(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue
					}
					v, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					consts[id.Name], docs[id.Name] = v, vs.Doc.Text()+gd.Doc.Text()
				}
			}
		}
	}
	if len(consts) < 10 {
		t.Fatalf("found only %d constants: is the parser reading the package?", len(consts))
	}
	inSpec := map[string]bool{}
	for _, e := range Spec {
		if inSpec[e.Const] {
			t.Errorf("Spec lists %s twice", e.Const)
		}
		inSpec[e.Const] = true
		if e.Kind == KindFormat {
			continue
		}
		v, ok := consts[e.Const]
		if !ok {
			t.Errorf("Spec entry %s names no constant of the package", e.Const)
		} else if v != e.Name {
			t.Errorf("Spec entry %s is %q, the constant %q", e.Const, e.Name, v)
		}
	}
	seen := map[string]string{}
	for name, v := range consts {
		if !inSpec[name] {
			t.Errorf("constant %s = %q is missing from Spec", name, v)
		}
		if d := strings.ToLower(strings.Join(strings.Fields(docs[name]), " ")); !strings.Contains(d, "written by") || !strings.Contains(d, "read by") {
			t.Errorf("the doc comment of %s does not say who writes and who reads it", name)
		}
		if other, dup := seen[kindOf(name)+v]; dup {
			t.Errorf("%s and %s are both %q", name, other, v)
		}
		seen[kindOf(name)+v] = name
	}
}

func kindOf(constName string) string {
	for _, e := range Spec {
		if e.Const == constName {
			return string(e.Kind)
		}
	}
	return ""
}

func TestInternalHeaders(t *testing.T) {
	for _, e := range Spec {
		internal := e.Kind == KindHeader && strings.Contains(e.Writer, "ext") || e.Kind == KindHeaderPrefix
		if !internal {
			continue
		}
		// Every spelling a server may read as the same header: '_' for '-' (all or some,
		// as CGI-style environment variables and frameworks that fold '_' into '-' do),
		// in any case.
		name := e.Name
		if e.Kind == KindHeaderPrefix {
			name += "role"
		}
		for _, name := range spellings(name) {
			if !IsInternalHeader(name) {
				t.Errorf("%s (%s) is written by %s but a caller's copy %q would not be stripped", e.Const, e.Name, e.Writer, name)
			}
		}
	}
	for _, h := range []string{
		HeaderDaprAppID, HeaderMCPMethod, "authorization", "x-mcpgate", "dapr-caller-app-i",
		"dapr_app_id", "mcp_method", "x_mcpgate", "x.mcpgate-subject", "dapr-caller-app-id-x", "xx-mcpgate-subject", "",
	} {
		if IsInternalHeader(h) {
			t.Errorf("IsInternalHeader(%q) = true", h)
		}
	}
}

// spellings are name, name with every '-' as '_', with each single '-' as '_', and the
// upper-case forms of those.
func spellings(name string) []string {
	out := []string{name, strings.ReplaceAll(name, "-", "_")}
	for i := range len(name) {
		if name[i] == '-' {
			out = append(out, name[:i]+"_"+name[i+1:])
		}
	}
	for _, s := range out {
		out = append(out, strings.ToUpper(s))
	}
	return out
}

func TestIsInternalHeaderAllocatesNothing(t *testing.T) {
	if n := testing.AllocsPerRun(100, func() { _ = IsInternalHeader("x_mcpgate_caller_app_id") }); n != 0 {
		t.Fatalf("IsInternalHeader allocates %v times per call", n)
	}
}

func TestDecisionID(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := NewDecisionID()
		if !IsDecisionID(id) {
			t.Fatalf("NewDecisionID() = %q, not %s", id, TypeDecisionID)
		}
		if seen[id] {
			t.Fatalf("NewDecisionID repeated %q", id)
		}
		seen[id] = true
	}
	for _, bad := range []string{"", "0123456789abcdef0123456789abcde", "0123456789ABCDEF0123456789abcdef", "0123456789abcdef0123456789abcdeg"} {
		if IsDecisionID(bad) {
			t.Errorf("IsDecisionID(%q) = true", bad)
		}
	}
}

func TestFromMetadata(t *testing.T) {
	full, err := structpb.NewStruct(map[string]any{
		MetaDecisionID: "00112233445566778899aabbccddeeff", MetaTarget: "inventory",
		MetaCallerAppID: "agent", MetaCallerNamespace: "default", MetaSpiffeID: "spiffe://example.org/ns/default/sa/agent",
		MetaGateway: "public", MetaSubject: "alice", MetaIssuer: "demo",
		MetaScopes: []any{"mcp:tools", 7, "inventory:read"}, MetaTokenExpiry: 1.7e9, MetaClaimsJSON: `{"sub":"alice"}`,
	})
	if err != nil {
		t.Fatal(err)
	}
	md := func(ns map[string]*structpb.Struct) *corev3.Metadata { return &corev3.Metadata{FilterMetadata: ns} }
	got, err := FromMetadata(md(map[string]*structpb.Struct{MetadataNamespace: full}))
	if err != nil {
		t.Fatal(err)
	}
	want := Identity{
		DecisionID: "00112233445566778899aabbccddeeff", Target: "inventory", CallerAppID: "agent", CallerNamespace: "default",
		SpiffeID: "spiffe://example.org/ns/default/sa/agent", Gateway: "public", Subject: "alice", Issuer: "demo",
		Scopes: []string{"mcp:tools", "inventory:read"}, TokenExpiry: 1.7e9, ClaimsJSON: `{"sub":"alice"}`,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("FromMetadata = %+v, want %+v", got, want)
	}

	noTarget, _ := structpb.NewStruct(map[string]any{MetaCallerAppID: "agent"})
	wrongType, _ := structpb.NewStruct(map[string]any{MetaTarget: 1})
	for name, m := range map[string]*corev3.Metadata{
		"nil":         nil,
		"other ns":    md(map[string]*structpb.Struct{"envoy.filters.http.jwt_authn": full}),
		"no target":   md(map[string]*structpb.Struct{MetadataNamespace: noTarget}),
		"wrong type":  md(map[string]*structpb.Struct{MetadataNamespace: wrongType}),
		"empty names": md(map[string]*structpb.Struct{MetadataNamespace: {}}),
	} {
		if id, err := FromMetadata(m); err == nil {
			t.Errorf("%s: FromMetadata = %+v, want an error", name, id)
		}
	}
}

func TestHeaderValue(t *testing.T) {
	for _, c := range []struct {
		h    *corev3.HeaderValue
		want string
	}{
		{&corev3.HeaderValue{Key: "a", RawValue: []byte("raw"), Value: "old"}, "raw"},
		{&corev3.HeaderValue{Key: "a", Value: "old"}, "old"},
		{nil, ""},
	} {
		if got := HeaderValue(c.h); got != c.want {
			t.Errorf("HeaderValue(%v) = %q, want %q", c.h, got, c.want)
		}
	}
}
