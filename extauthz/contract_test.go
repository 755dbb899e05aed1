package extauthz

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

// TestContractRoundTrip: what ext_authz answers an allowed Check with, as Envoy receives
// it and hands it on under contract.MetadataNamespace, reads back through
// contract.FromMetadata (ext_proc's only way in) as the identity ext_authz established;
// and every key on the wire is a contract entry of the kind and type the contract says.
func TestContractRoundTrip(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, nil)
	cases := map[string]struct {
		mode policy.MTLSMode
		r    req
	}{
		"token and SVID, Rego app": {policy.MTLSStrict, req{target: "open", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": openResource}))}},
		"gateway, JWT-only caller": {policy.MTLSStrict, req{target: "inventory", gateway: "edge", headers: bearerHeader(tok)}},
		"token and SVID":           {policy.MTLSStrict, req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}},
	}
	spec := map[string]contract.Entry{}
	for _, e := range contract.Spec {
		if e.Kind == contract.KindMetadata {
			spec[e.Name] = e
		}
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			d := f.server.decide(context.Background(), f.snaps[c.mode], c.r.build())
			if !d.Allowed {
				t.Fatalf("not allowed: %s", d.Detail)
			}
			md := onWire(t, d.Response()).GetDynamicMetadata()
			if md == nil {
				t.Fatal("an allowed Check carries no dynamic metadata")
			}
			for k, v := range md.GetFields() {
				e, ok := spec[k]
				if !ok {
					t.Errorf("metadata key %q is not in the contract", k)
					continue
				}
				if err := checkType(e.Type, v); err != nil {
					t.Errorf("metadata %s (%s): %v", k, e.Const, err)
				}
			}

			id, err := contract.FromMetadata(&corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{contract.MetadataNamespace: md}})
			if err != nil {
				t.Fatal(err)
			}
			p := d.Principal
			if p == nil {
				t.Fatal("no principal: the cases all carry a token")
			}
			want := contract.Identity{
				DecisionID: d.ID, Target: d.Target, CallerAppID: d.Caller.AppID, CallerNamespace: d.Caller.Namespace,
				SpiffeID: d.SpiffeID, Gateway: d.Gateway, Subject: p.Subject, Issuer: p.Issuer.Name,
				Scopes: p.Scopes, TokenExpiry: p.ExpiresAt.Unix(),
			}
			if d.wantClaims {
				want.ClaimsJSON = string(p.RawClaims)
			}
			if !reflect.DeepEqual(id, want) {
				t.Errorf("identity read back:\n%+v\nwant:\n%+v", id, want)
			}
			if want.Target == "" || want.CallerAppID == "" || want.Subject == "" || len(want.Scopes) == 0 {
				t.Errorf("the case established too little to test: %+v", want)
			}
		})
	}
}

// checkType reports whether v has the wire type the contract gives its key.
func checkType(typ contract.Type, v *structpb.Value) error {
	switch typ {
	case contract.TypeString:
		if _, ok := v.GetKind().(*structpb.Value_StringValue); !ok {
			return fmt.Errorf("want a string, got %T", v.GetKind())
		}
	case contract.TypeDecisionID:
		if !contract.IsDecisionID(v.GetStringValue()) {
			return fmt.Errorf("want a decision id, got %v", v)
		}
	case contract.TypeNumber:
		if _, ok := v.GetKind().(*structpb.Value_NumberValue); !ok {
			return fmt.Errorf("want a number, got %T", v.GetKind())
		}
	case contract.TypeStringList:
		l, ok := v.GetKind().(*structpb.Value_ListValue)
		if !ok {
			return fmt.Errorf("want a list, got %T", v.GetKind())
		}
		for _, e := range l.ListValue.GetValues() {
			if _, ok := e.GetKind().(*structpb.Value_StringValue); !ok {
				return fmt.Errorf("want a list of strings, got an element %T", e.GetKind())
			}
		}
	case contract.TypeJSONObject:
		var m map[string]any
		if err := json.Unmarshal([]byte(v.GetStringValue()), &m); err != nil {
			return fmt.Errorf("want a JSON object in a string: %v", err)
		}
	default:
		return fmt.Errorf("the test does not know type %q", typ)
	}
	return nil
}
