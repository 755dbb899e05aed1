package extauthz_test

// A SPIFFE ID of another namespace that names an App of the policy is not that App:
// every layer after access control keys on the App ID alone (tool rules, Rego's
// caller.app_id, the x-mcpgate-caller-app-id and dapr-caller-app-id headers the MCP
// server reads), so ext_authz refuses it even where accessControl would admit anyone.

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/policy"
)

const foreignNamespacePolicy = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  mtls: strict
  authz: {address: "mcpgate:9001"}
  sds: {certDir: /certs}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: my-agent, namespace: default}
spec:
  address: my-agent:8080
  sidecar: {address: my-agent-envoy, inboundPort: 15006, outboundPort: 3500}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: inventory, namespace: default}
spec:
  address: inventory:8000
  sidecar: {address: inventory-envoy, inboundPort: 15006, outboundPort: 3500}
  mcp:
    path: /mcp
    # Any workload of the mesh may connect; what it may do is decided per tool below.
    accessControl: {defaultAction: allow}
    tools:
      defaultAction: deny
      rules:
        - {name: agent-may-delete, callers: [my-agent], tools: [delete_product], action: allow}
`

func TestForeignNamespaceCallerIsNotTheApp(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(foreignNamespacePolicy), 0o644); err != nil {
		t.Fatal(err)
	}
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	if got := snap.App("my-agent").SpiffeID; got != "spiffe://example.org/ns/default/my-agent" {
		t.Fatalf("my-agent's SPIFFE ID = %q", got)
	}
	srv, err := extauthz.NewServer(extauthz.Options{Store: policy.NewStore(snap)})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	// A workload in namespace "evil" that picked the app id my-agent (Dapr's Sentry, for
	// one, issues spiffe://<td>/ns/<pod namespace>/<app-id annotation>): not the App
	// my-agent of the policy, which is in namespace default.
	const impostor = "spiffe://example.org/ns/evil/my-agent"
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: impostor},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Id: "r1", Method: "POST", Path: "/mcp",
			Headers: map[string]string{":method": "POST", ":path": "/mcp", "content-type": "application/json"},
		}},
		ContextExtensions: map[string]string{contract.ContextAppID: "inventory"},
	}}
	resp, err := srv.Check(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	// The metadata goes pre-encoded as unknown fields: read it as Envoy would.
	b, err := proto.Marshal(resp)
	if err != nil {
		t.Fatal(err)
	}
	resp = &authv3.CheckResponse{}
	if err := proto.Unmarshal(b, resp); err != nil {
		t.Fatal(err)
	}
	if resp.GetStatus().GetCode() == int32(codes.OK) {
		t.Fatalf("%s was admitted as the App my-agent (spiffe://example.org/ns/default/my-agent)", impostor)
	}
	if got := resp.GetDeniedResponse().GetStatus().GetCode(); got != 403 {
		t.Errorf("status %v, want 403", got)
	}
	if body := resp.GetDeniedResponse().GetBody(); !strings.Contains(body, `names App my-agent, which is in namespace \"default\"`) {
		t.Errorf("body %s, want the namespace named", body)
	}
}
