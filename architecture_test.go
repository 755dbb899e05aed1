package mcpgate_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/mcpgate/mcpgate"

// layerRules are the import rules of the README's ARCHITECTURE section: the model knows no
// server, the servers know none of each other, and they meet only in envoy/contract. A
// package under a prefix must not depend, directly or not, on any package under the
// forbidden prefixes.
var layerRules = []struct {
	pkg       string
	forbidden []string
}{
	{"policy", []string{"extauthz", "extproc", "xds", "envoy", "cmd"}},
	{"envoy", []string{"extauthz", "extproc", "xds", "policy", "cmd"}},
	{"extauthz", []string{"extproc", "xds", "cmd"}},
	{"extproc", []string{"extauthz", "xds", "cmd"}},
	{"xds", []string{"extauthz", "extproc", "cmd"}},
}

// shipped are the binaries that are released: none of the module's packages they link may
// import package testing (a test helper in what ships). Third-party packages are not
// ours to police (go-control-plane's pkg/log imports testing).
var shipped = []string{"cmd/mcpgate", "cmd/mcpgate-demo"}

type listedPackage struct {
	ImportPath string
	Imports    []string
	Deps       []string
}

// TestArchitecture checks the module's import graph as `go list` reports it, for the
// default build and for the integration build tag (tests excluded: test code may import
// what it needs).
func TestArchitecture(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Fatal("the go command is needed to list the import graph:", err)
	}
	for _, tags := range []string{"", "integration"} {
		pkgs, err := goList(tags)
		if err != nil {
			t.Fatalf("go list (tags %q): %v", tags, err)
		}
		if len(pkgs) < 10 {
			t.Fatalf("go list (tags %q) listed %d packages: the module is larger than that", tags, len(pkgs))
		}
		for _, v := range violations(pkgs) {
			t.Errorf("tags %q: %s", tags, v)
		}
	}
}

// TestArchitectureRulesBite feeds violations a graph breaking each rule, so that the rules
// cannot silently stop matching (a renamed module or prefix would make them vacuous).
func TestArchitectureRulesBite(t *testing.T) {
	p := func(rel string) string { return module + "/" + rel }
	bad := []listedPackage{
		{ImportPath: p("policy"), Deps: []string{p("extauthz/bearer")}},
		{ImportPath: p("envoy/contract"), Deps: []string{p("policy")}},
		{ImportPath: p("extproc"), Deps: []string{p("extauthz")}},
		{ImportPath: p("xds"), Deps: []string{"fmt", p("extproc/mcp")}},
		{ImportPath: p("extauthz"), Deps: []string{p("xds")}},
		{ImportPath: p("cmd/mcpgate-demo"), Deps: []string{p("integration/envoyemu")}},
		{ImportPath: p("cmd/mcpgate"), Deps: []string{"testing", p("extauthz/bearer/bearertest")}},
		{ImportPath: p("extauthz/bearer/bearertest"), Imports: []string{"testing"}},
	}
	got := violations(bad)
	if len(got) != len(bad)-1 { // bearertest itself breaks no rule; cmd/mcpgate linking it does

		t.Errorf("got %d violations for %d broken packages:\n%s", len(got), len(bad), strings.Join(got, "\n"))
	}
	good := []listedPackage{
		{ImportPath: p("extproc"), Deps: []string{p("envoy/contract"), p("policy"), p("policy/decisionlog"), p("extproc/mcp")}},
		{ImportPath: p("integration/envoyemu"), Deps: []string{p("envoy"), "testing"}},
		{ImportPath: p("policyx"), Deps: []string{p("extauthz")}}, // not under policy/
		{ImportPath: p("cmd/mcpgate"), Deps: []string{"testing", "github.com/envoyproxy/go-control-plane/pkg/log"}},
	}
	if got := violations(good); len(got) != 0 {
		t.Errorf("violations in an allowed graph:\n%s", strings.Join(got, "\n"))
	}
}

func violations(pkgs []listedPackage) []string {
	importsTesting := map[string]bool{}
	for _, p := range pkgs {
		importsTesting[p.ImportPath] = slices.Contains(p.Imports, "testing")
	}
	var out []string
	for _, p := range pkgs {
		rel, ok := strings.CutPrefix(p.ImportPath, module+"/")
		if !ok {
			continue
		}
		for _, r := range layerRules {
			if !under(rel, r.pkg) {
				continue
			}
			for _, d := range p.Deps {
				drel, ok := strings.CutPrefix(d, module+"/")
				if ok && slices.ContainsFunc(r.forbidden, func(f string) bool { return under(drel, f) }) {
					out = append(out, p.ImportPath+" depends on "+d)
				}
			}
		}
		if !under(rel, "integration") {
			for _, d := range p.Deps {
				if drel, ok := strings.CutPrefix(d, module+"/"); ok && under(drel, "integration") {
					out = append(out, p.ImportPath+" depends on the test tree: "+d)
				}
			}
		}
		if slices.Contains(shipped, rel) {
			for _, d := range p.Deps {
				if importsTesting[d] {
					out = append(out, p.ImportPath+" is shipped but links "+d+", which imports testing")
				}
			}
		}
	}
	return out
}

// under reports whether rel is the package prefix or one below it.
func under(rel, prefix string) bool {
	return rel == prefix || strings.HasPrefix(rel, prefix+"/")
}

func goList(tags string) ([]listedPackage, error) {
	cmd := exec.Command("go", "list", "-tags", tags, "-json=ImportPath,Imports,Deps", "./...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, errors.New(err.Error() + ": " + stderr.String())
	}
	var pkgs []listedPackage
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p listedPackage
		if err := dec.Decode(&p); errors.Is(err, io.EOF) {
			return pkgs, nil
		} else if err != nil {
			return nil, err
		}
		pkgs = append(pkgs, p)
	}
}

// TestMakeFuzzRunsEveryTarget: every fuzz target of the module is in `make fuzz`.
func TestMakeFuzzRunsEveryTarget(t *testing.T) {
	makefile, err := os.ReadFile("Makefile")
	if err != nil {
		t.Fatal(err)
	}
	targets := 0
	err = filepath.WalkDir(".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || d.Name() == ".git" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range regexp.MustCompile(`(?m)^func (Fuzz\w+)\(`).FindAllSubmatch(src, -1) {
			targets++
			want := "-fuzz '^" + string(m[1]) + "$$'"
			if !strings.Contains(string(makefile), want) {
				t.Errorf("%s: %s is not run by make fuzz (want %s in the Makefile)", p, m[1], want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if targets < 5 {
		t.Fatalf("found %d fuzz targets: the walk no longer sees the tests", targets)
	}
}
