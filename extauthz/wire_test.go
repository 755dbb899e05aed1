package extauthz

import (
	"context"
	"testing"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/policy"
)

// onWire is resp as Envoy receives it: marshalled and parsed, so that metadata sent in
// wire form is read like any other field.
func onWire(t testing.TB, resp *authv3.CheckResponse) *authv3.CheckResponse {
	t.Helper()
	b, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	var out authv3.CheckResponse
	if err := proto.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	if len(out.ProtoReflect().GetUnknown()) != 0 {
		t.Fatalf("the response has fields Envoy does not know: %x", out.ProtoReflect().GetUnknown())
	}
	return &out
}

// TestWireMetadataEqualsStruct: for allowed decisions of every shape (with and without a
// token, a SPIFFE ID, a gateway, claims for Rego), the pre-encoded metadata Envoy parses
// is exactly the Struct the reflective path builds, and nothing else in the response
// changes.
func TestWireMetadataEqualsStruct(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, nil)
	cases := map[string]struct {
		mode policy.MTLSMode
		r    req
	}{
		"token and SVID":           {policy.MTLSStrict, req{target: "inventory", principal: agentID, headers: bearerHeader(tok)}},
		"claims for a Rego app":    {policy.MTLSStrict, req{target: "open", principal: agentID, headers: bearerHeader(f.token(t, map[string]any{"aud": openResource}))}},
		"gateway, JWT-only caller": {policy.MTLSStrict, req{target: "inventory", gateway: "edge", headers: bearerHeader(tok)}},
		"mtls disabled, azp":       {policy.MTLSDisabled, req{target: "inventory", headers: bearerHeader(tok)}},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			d := f.server.decide(context.Background(), f.snaps[c.mode], c.r.build())
			if !d.Allowed {
				t.Fatalf("not allowed: %s", d.Detail)
			}
			got := onWire(t, d.Response())
			rv := newRouteValues(d.routeKey())
			var pv *principalValues
			if d.Principal != nil {
				pv = newPrincipalValues(d.Principal)
			}
			want := &structpb.Struct{Fields: d.metadataFields(structpb.NewStringValue(d.ID), rv, pv)}
			if !proto.Equal(got.GetDynamicMetadata(), want) {
				t.Fatalf("metadata on the wire:\n%v\nwant:\n%v", got.GetDynamicMetadata(), want)
			}
			if len(want.GetFields()) < 5 {
				t.Fatalf("only %d metadata fields", len(want.GetFields()))
			}
			// The rest of the response is what it always was.
			plain := d.Response()
			plain.ProtoReflect().SetUnknown(nil)
			got.DynamicMetadata = nil
			if !proto.Equal(got, plain) {
				t.Fatalf("response without metadata:\n%v\nwant:\n%v", got, plain)
			}
		})
	}
}

// TestWireMetadataFallsBackOnBadUTF8: claims that are not valid UTF-8 cannot be encoded
// as a proto string; the response then carries the Struct, and marshalling it fails as it
// always did (Envoy gets a gRPC error and applies its failure mode), instead of sending
// an invalid string.
func TestWireMetadataFallsBackOnBadUTF8(t *testing.T) {
	p := &bearer.Principal{Subject: "alice", Issuer: &policy.Issuer{Name: "corp"}, RawClaims: []byte("{\"x\":\"\xff\"}")}
	if utf8.Valid(p.RawClaims) {
		t.Fatal("test claims are valid UTF-8")
	}
	pv := newPrincipalValues(p)
	if pv.claimsWire != nil || pv.wire == nil {
		t.Fatalf("claimsWire %x, wire %x", pv.claimsWire, pv.wire)
	}
	d := &Decision{Allowed: true, ID: "0123", Target: "open", Principal: p, pv: pv, wantClaims: true}
	resp := d.Response()
	if resp.GetDynamicMetadata() == nil || len(resp.ProtoReflect().GetUnknown()) != 0 {
		t.Fatal("the response did not fall back to the Struct")
	}
	if _, err := proto.Marshal(resp); err == nil {
		t.Fatal("invalid UTF-8 was marshalled")
	}
}
