package policy

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"testing/fstest"
)

// FuzzLoad feeds arbitrary bytes as a policy file beside a valid Mesh. The loader must
// never panic, must answer with either a snapshot or a LoadError of file:line problems,
// and a snapshot it returns must hold the invariants the servers rely on.
func FuzzLoad(f *testing.F) {
	for _, seed := range []string{appYAML, meshYAML, "", "---\n---\n", "kind: App\n", "a: &x [*x]\n", "apiVersion: mcpgate.dev/v1alpha1\nkind: App\nmetadata: {name: a}\nspec: {mcp: {}}\n",
		strings.Replace(appYAML, "  mcp:\n", "  mcp:\n    transport: grpc\n", 1)} {
		f.Add([]byte(seed))
	}
	if b, err := os.ReadFile("../testdata/demo/inventory.yaml"); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		fsys := fstest.MapFS{
			"mesh.yaml":   {Data: []byte(meshYAML)},
			"fuzz.yaml":   {Data: data},
			"rego/p.rego": {Data: []byte("package mcpgate\n\ndecision := {\"allow\": true}\n")},
		}
		snap, err := Load(context.Background(), fsys, "")
		if err != nil {
			var le *LoadError
			if !errors.As(err, &le) || len(le.Problems) == 0 {
				t.Fatalf("error is not a LoadError with problems: %v", err)
			}
			for _, p := range le.Problems {
				if p.File == "" || p.Msg == "" {
					t.Fatalf("problem without file or message: %#v", p)
				}
			}
			return
		}
		if snap.Version == "" || snap.Mesh == nil {
			t.Fatal("snapshot without version or mesh")
		}
		for id, app := range snap.Apps {
			if !IsDNSLabel(id) || app.ID != id {
				t.Fatalf("app id %q", id)
			}
			if m := app.MCP; m != nil {
				if !strings.HasPrefix(m.Path, "/") {
					t.Fatalf("mcp path %q", m.Path)
				}
				if m.Transport != TransportStreamableHTTP && m.Transport != TransportGRPC {
					t.Fatalf("mcp transport %q", m.Transport)
				}
				if m.Tools.DefaultAction != Allow && m.Tools.DefaultAction != Deny {
					t.Fatalf("tools default %q", m.Tools.DefaultAction)
				}
				if m.AccessControl.DefaultAction != Allow && m.AccessControl.DefaultAction != Deny {
					t.Fatalf("access default %q", m.AccessControl.DefaultAction)
				}
				if m.Authentication.Required && len(m.Authentication.Issuers) == 0 {
					t.Fatal("authentication required without issuers")
				}
				for _, sc := range m.Authentication.Scopes {
					if !isScopeToken(sc) {
						t.Fatalf("scope %q", sc)
					}
				}
			}
		}
	})
}
