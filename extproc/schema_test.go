package extproc

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
)

// customerList is a tools/list answer as the official Go SDK writes it for the demo's
// get_customer: the schema inferred from the result type requires every field and
// forbids others.
const customerList = `{"jsonrpc":"2.0","id":2,"result":{"tools":[` +
	`{"name":"get_customer","inputSchema":{"type":"object"},"outputSchema":{"type":"object","properties":{"name":{"type":"string"},"email":{"type":"string"},"ssn":{"type":"string"}},"required":["name","email","ssn"],"additionalProperties":false}},` +
	`{"name":"get_inventory","inputSchema":{"type":"object"},"outputSchema":{"type":"object","properties":{"ssn":{"type":"string"}},"required":["ssn"]}}]}}`

// outputSchemas returns each listed tool's outputSchema from a tools/list answer.
func outputSchemas(t *testing.T, body string) map[string]struct {
	Properties map[string]any `json:"properties"`
	Required   []string       `json:"required"`
} {
	t.Helper()
	var resp struct {
		Result struct {
			Tools []struct {
				Name         string `json:"name"`
				OutputSchema struct {
					Properties map[string]any `json:"properties"`
					Required   []string       `json:"required"`
				} `json:"outputSchema"`
			} `json:"tools"`
			CacheScope string `json:"cacheScope"`
		} `json:"result"`
	}
	if err := json.Unmarshal([]byte(body), &resp); err != nil {
		t.Fatalf("%q: %v", body, err)
	}
	out := map[string]struct {
		Properties map[string]any `json:"properties"`
		Required   []string       `json:"required"`
	}{}
	for _, tl := range resp.Result.Tools {
		out[tl.Name] = tl.OutputSchema
	}
	return out
}

// TestOutputSchemaFollowsRedaction: on the demo policy, get_customer's outputSchema loses
// what its results lose: ssn for everyone (responses.redact), email too for callers the
// Rego decision redacts it for; other tools' schemas are untouched.
func TestOutputSchemaFollowsRedaction(t *testing.T) {
	s := newDemoServer(t)
	silver := metadata("inventory", "my-agent", "mcp:tools", "inventory:read")
	silver.FilterMetadata[contract.MetadataNamespace].Fields[contract.MetaClaimsJSON] = structpb.NewStringValue(`{"sub":"bob","azp":"my-agent","tier":"silver"}`)
	silver.FilterMetadata[contract.MetadataNamespace].Fields[contract.MetaSubject] = structpb.NewStringValue("bob")
	for _, tc := range []struct {
		who     string
		gone    []string
		md      any
		sse     bool
		sseBody string
	}{
		{who: "gold", gone: []string{"ssn"}},
		{who: "silver", gone: []string{"ssn", "email"}},
		{who: "gold over SSE", gone: []string{"ssn"}, sse: true},
	} {
		md := agentMD
		if tc.who == "silver" {
			md = silver
		}
		up := envoyUpstream{contentType: "application/json", chunks: []string{customerList}}
		if tc.sse {
			up = envoyUpstream{contentType: "text/event-stream", chunks: []string{"event: message\ndata: " + customerList + "\n\n"}}
		}
		res := runEnvoy(t, s, envoyRequest{md: md, body: `{"jsonrpc":"2.0","id":2,"method":"tools/list"}`}, up)
		if res.immediate != nil {
			t.Fatalf("%s: %s", tc.who, res.immediate.GetBody())
		}
		body := res.clientBody
		if tc.sse {
			_, body, _ = strings.Cut(body, "data: ")
		}
		schemas := outputSchemas(t, body)
		cust := schemas["get_customer"]
		for _, f := range []string{"name", "email", "ssn"} {
			want := !slices.Contains(tc.gone, f)
			if _, ok := cust.Properties[f]; ok != want {
				t.Errorf("%s: property %s present %v, want %v (%s)", tc.who, f, ok, want, body)
			}
			if slices.Contains(cust.Required, f) != want {
				t.Errorf("%s: %s required %v, want %v (%s)", tc.who, f, !want, want, body)
			}
		}
		if inv := schemas["get_inventory"]; !slices.Equal(inv.Required, []string{"ssn"}) {
			t.Errorf("%s: get_inventory's schema changed: %+v", tc.who, inv)
		}
	}
}
