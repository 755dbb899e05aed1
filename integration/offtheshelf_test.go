//go:build integration

package integration

import (
	"testing"

	"github.com/mcpgate/mcpgate/cmd/mcpgate-demo/mcpapp"
)

// TestTypeScriptClientValidatesRedactedResults: the official TypeScript SDK client checks
// structuredContent against the outputSchema tools/list gave it. The demo's get_customer
// (Go SDK server, a schema requiring every field, no others allowed) is redacted by policy
// (ssn) and by Rego (email, below the gold tier): the list the client gets must describe
// the redacted results, or it refuses every one of them with -32602.
func TestTypeScriptClientValidatesRedactedResults(t *testing.T) {
	m := startMesh(t)
	want := mcpapp.CustomerFor("c1")
	for _, tc := range []struct {
		who       string
		claims    map[string]any
		wantEmail bool
	}{
		{who: "no tier", claims: nil},
		{who: "gold", claims: map[string]any{"tier": "gold"}, wantEmail: true},
	} {
		t.Run(tc.who, func(t *testing.T) {
			steps := runTSClient(t, m.invokeURL, map[string]string{"Authorization": m.token(t, tc.claims)},
				`[{"op":"list"},{"op":"call","name":"get_customer","arguments":{"id":"c1"}}]`)
			if len(steps) != 3 || !steps[0].OK || !steps[1].OK {
				t.Fatalf("steps = %+v", steps)
			}
			call := steps[2]
			if !call.OK {
				t.Fatalf("get_customer refused by the client: %+v", call.Error)
			}
			sc := call.Result.StructuredContent
			if sc["name"] != want.Name || sc["ssn"] != nil || (sc["email"] != nil) != tc.wantEmail {
				t.Fatalf("structuredContent = %v", sc)
			}
		})
	}
}
