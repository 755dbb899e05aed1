package extauthz

import (
	"context"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

// FuzzCheck drives the decision function with arbitrary request fields and arbitrary
// CheckRequest bytes. It must never panic, never return a gRPC error, and never allow a
// request to the inventory app (authentication required) without a verified token.
func FuzzCheck(f *testing.F) {
	fx := newFixture(f)
	valid := fx.token(f, nil)
	f.Add("inventory", agentID, "POST", "/mcp", "Bearer "+valid, []byte(nil))
	f.Add("inventory", agentID, "POST", "/mcp?access_token=x", "", []byte(nil))
	f.Add("inventory", "spiffe://example.org/ns/default/../my-agent", "GET", "//mcp", "bearer a.b.c", []byte(nil))
	f.Add("open", "", "", "", "Bearer "+valid+","+valid, []byte{0x0a, 0x02, 0x0a, 0x00})
	if b, err := proto.Marshal(req{target: "inventory", principal: agentID, headers: bearerHeader(valid)}.build()); err == nil {
		f.Add("", "", "", "", "", b)
	}
	f.Fuzz(func(t *testing.T, target, principal, method, path, authz string, raw []byte) {
		var cr *authv3.CheckRequest
		if len(raw) > 0 {
			cr = &authv3.CheckRequest{}
			if proto.Unmarshal(raw, cr) != nil {
				return
			}
		} else {
			r := req{target: target, principal: principal, method: method, path: path}
			if authz != "" {
				r.headers = map[string]string{"authorization": authz}
			}
			cr = r.build()
		}
		for _, mode := range []policy.MTLSMode{policy.MTLSStrict, policy.MTLSDisabled} {
			d := fx.server.decide(context.Background(), fx.snaps[mode], cr)
			if d.Allowed && d.Target == "inventory" && d.Principal == nil {
				t.Fatalf("allowed without a verified token: %+v", d)
			}
			if d.Allowed && mode == policy.MTLSStrict && d.SpiffeID == "" && cr.GetAttributes().GetContextExtensions()[contract.ContextGateway] == "" {
				t.Fatalf("strict mode allowed without a SPIFFE identity: %+v", d)
			}
			resp := d.Response()
			if resp.GetStatus() == nil {
				t.Fatal("response without status")
			}
			// What Envoy receives parses completely (pre-encoded metadata included).
			if b, err := proto.Marshal(resp); err == nil {
				var got authv3.CheckResponse
				if err := proto.Unmarshal(b, &got); err != nil || len(got.ProtoReflect().GetUnknown()) != 0 {
					t.Fatalf("response does not parse as a CheckResponse: %v", err)
				}
				if d.Allowed && got.GetDynamicMetadata().GetFields()[contract.MetaDecisionID].GetStringValue() != d.ID {
					t.Fatal("allowed response without its decision id in the metadata")
				}
			}
		}
	})
}
