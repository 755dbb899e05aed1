package xds

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

const grpcPolicy = "../testdata/xds/grpc"

// routesOf maps the routes of a node's route configuration by name (first virtual host).
func routesOf(t *testing.T, res Resources, config string) map[string]*routev3.Route {
	t.Helper()
	for _, rc := range res.Routes {
		if rc.Name != config {
			continue
		}
		out := map[string]*routev3.Route{}
		for _, r := range rc.VirtualHosts[0].Routes {
			out[r.Name] = r
		}
		return out
	}
	t.Fatalf("no route configuration %q", config)
	return nil
}

func clusterOf(t *testing.T, res Resources, name string) *clusterv3.Cluster {
	t.Helper()
	for _, c := range res.Clusters {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no cluster %q", name)
	return nil
}

// requireHCM unpacks the HTTP connection manager of a node's listener.
func requireHCM(t *testing.T, res Resources, listener string) *hcmv3.HttpConnectionManager {
	t.Helper()
	for _, l := range res.Listeners {
		if l.Name == listener {
			var hcm hcmv3.HttpConnectionManager
			requireUnpack(t, l.FilterChains[0].Filters[0].GetTypedConfig(), &hcm)
			return &hcm
		}
	}
	t.Fatalf("no listener %q", listener)
	return nil
}

// requireHTTP2 checks that a cluster speaks HTTP/2 upstream, whatever ALPN says.
func requireHTTP2(t *testing.T, c *clusterv3.Cluster) {
	t.Helper()
	var po httpv3.HttpProtocolOptions
	requireUnpack(t, c.TypedExtensionProtocolOptions[envoy.ProtocolOpts], &po)
	if po.GetExplicitHttpConfig().GetHttp2ProtocolOptions() == nil {
		t.Errorf("cluster %s must speak HTTP/2 (gRPC), got %v", c.Name, &po)
	}
	if ts := c.GetTransportSocket(); ts != nil {
		var up tlsv3.UpstreamTlsContext
		requireUnpack(t, ts.GetTypedConfig(), &up)
		if got := up.GetCommonTlsContext().GetAlpnProtocols(); !cmp.Equal(got, []string{"h2"}) {
			t.Errorf("cluster %s offers ALPN %v, want only h2", c.Name, got)
		}
	}
}

// TestGRPCInboundRoute pins the sidecar of an app serving gRPC MCP: one route for the
// service's methods (gRPC content types only) to the app, with the app's ext_authz
// context, ext_proc streaming the request body, no response timeout and only retries
// for calls that never reached the app.
func TestGRPCInboundRoute(t *testing.T) {
	snap := requireLoad(t, grpcPolicy)
	res, err := Translate(snap, "inventory")
	if err != nil {
		t.Fatal(err)
	}
	requireDeepValid(t, res)
	routes := routesOf(t, res, RouteInbound)
	for name := range routes {
		if strings.HasPrefix(name, "inventory/mcp") {
			t.Errorf("a gRPC app has no Streamable HTTP route, got %s", name)
		}
	}
	if routes["inventory/prm"] == nil || routes["inventory/prm"].GetMatch().GetPath() != "/.well-known/oauth-protected-resource/mcp" {
		t.Errorf("the RFC 9728 document must stay at the path derived from resource: %v", routes["inventory/prm"])
	}
	r := routes["inventory/grpc"]
	if r == nil {
		t.Fatalf("no gRPC route in %v", routes)
	}
	if got := r.GetMatch().GetPrefix(); got != "/mcpgate.mcp.v1.McpService/" {
		t.Errorf("route prefix %q, want /mcpgate.mcp.v1.McpService/ (contract.GRPCServicePrefix)", got)
	}
	h := r.GetMatch().GetHeaders()
	if len(h) != 1 || h[0].Name != "content-type" || h[0].GetStringMatch().GetPrefix() != "application/grpc" || !h[0].GetStringMatch().GetIgnoreCase() {
		t.Errorf("the route must match gRPC content types only: %v", h)
	}
	a := r.GetRoute()
	if a.GetCluster() != ClusterApp("inventory") {
		t.Errorf("route goes to %s", a.GetCluster())
	}
	if a.GetTimeout() == nil || a.GetTimeout().AsDuration() != 0 {
		t.Errorf("Session and CallToolStream are long-lived: the route timeout must be disabled (0s), got %v", a.GetTimeout())
	}
	if a.GetIdleTimeout().AsDuration() != 30*time.Second {
		t.Errorf("idle timeout %v, want resiliency.timeout 30s", a.GetIdleTimeout())
	}
	if rp := a.GetRetryPolicy(); rp.GetRetryOn() != envoy.RetryOnUnsent || rp.GetNumRetries().GetValue() != 2 {
		t.Errorf("retries must be only for calls that never reached the app: %v", rp)
	}
	if r.GetRequestBodyBufferLimit() != nil {
		t.Errorf("a STREAMED body is not buffered whole: no request_body_buffer_limit, got %v", r.GetRequestBodyBufferLimit())
	}

	var authz extauthzv3.ExtAuthzPerRoute
	requireUnpack(t, r.TypedPerFilterConfig[envoy.FilterExtAuthz], &authz)
	if got := authz.GetCheckSettings().GetContextExtensions(); !cmp.Equal(got, map[string]string{contract.ContextAppID: "inventory"}) {
		t.Errorf("context_extensions %v", got)
	}
	var proc extprocv3.ExtProcPerRoute
	requireUnpack(t, r.TypedPerFilterConfig[envoy.FilterExtProc], &proc)
	want := &extprocv3.ProcessingMode{
		RequestHeaderMode:   extprocv3.ProcessingMode_SEND,
		ResponseHeaderMode:  extprocv3.ProcessingMode_SEND,
		RequestBodyMode:     extprocv3.ProcessingMode_STREAMED,
		ResponseBodyMode:    extprocv3.ProcessingMode_NONE,
		RequestTrailerMode:  extprocv3.ProcessingMode_SKIP,
		ResponseTrailerMode: extprocv3.ProcessingMode_SKIP,
	}
	if diff := cmp.Diff(want, proc.GetOverrides().GetProcessingMode(), protocmp.Transform()); diff != "" {
		t.Errorf("per-route processing mode (-want +got):\n%s", diff)
	}
	if proc.GetDisabled() || proc.GetOverrides().GetGrpcService() != nil {
		t.Errorf("the override must change the processing mode only: %v", &proc)
	}

	// mcpgate asks for response bodies with a STREAMED mode_override: the listener's
	// filter must allow it.
	var hcmProc extprocv3.ExternalProcessor
	for _, f := range requireHCM(t, res, ListenerInbound).HttpFilters {
		if f.Name == envoy.FilterExtProc {
			requireUnpack(t, f.GetTypedConfig(), &hcmProc)
		}
	}
	if !hcmProc.GetAllowModeOverride() || len(hcmProc.GetAllowedOverrideModes()) != 0 {
		t.Errorf("ext_proc must allow any mode_override (STREAMED included): %v", &hcmProc)
	}

	requireHTTP2(t, clusterOf(t, res, ClusterApp("inventory")))
	if last := res.Routes[0].VirtualHosts[0].Routes[len(res.Routes[0].VirtualHosts[0].Routes)-1]; last.GetDirectResponse().GetStatus() != 404 {
		t.Errorf("the last route must answer 404, got %v", last)
	}
}

// TestGRPCOutbound pins the caller's side: the dapr-app-id route keeps the gRPC path and
// goes over HTTP/2 to the target's sidecar; no /v1.0/invoke/ route for a gRPC target.
// The Streamable HTTP target next to it is unchanged.
func TestGRPCOutbound(t *testing.T) {
	snap := requireLoad(t, grpcPolicy)
	res, err := Translate(snap, "agent")
	if err != nil {
		t.Fatal(err)
	}
	requireDeepValid(t, res)
	routes := routesOf(t, res, RouteOutbound)
	if r := routes["invoke/inventory"]; r != nil {
		t.Errorf("/v1.0/invoke/ does not apply to a gRPC target: %v", r)
	}
	r := routes["header/inventory"]
	if r == nil {
		t.Fatalf("no dapr-app-id route for the gRPC app in %v", routes)
	}
	if r.GetMatch().GetPrefix() != contract.GRPCServicePrefix || r.GetRoute().GetPrefixRewrite() != "" {
		t.Errorf("the gRPC path must go on unchanged: %v", r)
	}
	if h := r.GetMatch().GetHeaders(); len(h) != 1 || h[0].Name != contract.HeaderDaprAppID || h[0].GetStringMatch().GetExact() != "inventory" {
		t.Errorf("header match %v", h)
	}
	if r.GetRoute().GetCluster() != ClusterSidecar("inventory") || r.GetRoute().GetTimeout().AsDuration() != 0 {
		t.Errorf("route action %v", r.GetRoute())
	}
	c := clusterOf(t, res, ClusterSidecar("inventory"))
	requireHTTP2(t, c)
	if !strings.Contains(c.GetTransportSocket().String(), "spiffe://example.org/ns/default/inventory") {
		t.Errorf("the cluster to inventory must verify its SPIFFE ID: %v", c.GetTransportSocket())
	}

	// The Streamable HTTP app: both route forms and ALPN-negotiated HTTP.
	if routes["invoke/notes"] == nil || routes["header/notes"].GetMatch().GetPrefix() != "/" {
		t.Errorf("Streamable HTTP routes changed: %v %v", routes["invoke/notes"], routes["header/notes"])
	}
	var po httpv3.HttpProtocolOptions
	requireUnpack(t, clusterOf(t, res, ClusterSidecar("notes")).TypedExtensionProtocolOptions[envoy.ProtocolOpts], &po)
	if po.GetAutoConfig() == nil {
		t.Errorf("the cluster to a Streamable HTTP app negotiates by ALPN: %v", &po)
	}
}

// TestGRPCWithoutMTLS: with mtls disabled the clusters speak HTTP/2 in cleartext (h2c).
func TestGRPCWithoutMTLS(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"mesh.yaml", "policy.yaml"} {
		b, err := os.ReadFile(filepath.Join(grpcPolicy, name))
		if err != nil {
			t.Fatal(err)
		}
		s := strings.NewReplacer("mtls: strict", "mtls: disabled", "  sds: {spireAgentSocket: /run/spire/agent.sock}\n", "").Replace(string(b))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	snap := requireLoad(t, dir)
	res, err := Translate(snap, "agent")
	if err != nil {
		t.Fatal(err)
	}
	requireDeepValid(t, res)
	c := clusterOf(t, res, ClusterSidecar("inventory"))
	if c.GetTransportSocket() != nil {
		t.Fatalf("mtls disabled: no TLS, got %v", c.GetTransportSocket())
	}
	requireHTTP2(t, c)
}

// TestGRPCGateway: a Gateway route to a gRPC app is the service path on its host, to the
// app over HTTP/2, with the gateway in the ext_authz context.
func TestGRPCGateway(t *testing.T) {
	snap := requireLoad(t, grpcPolicy)
	res, err := Translate(snap, "edge")
	if err != nil {
		t.Fatal(err)
	}
	requireDeepValid(t, res)
	var vh *routev3.VirtualHost
	for _, v := range res.Routes[0].VirtualHosts {
		if v.Name == "inventory.example.com" {
			vh = v
		}
	}
	if vh == nil {
		t.Fatalf("no virtual host for inventory.example.com")
	}
	var grpc *routev3.Route
	for _, r := range vh.Routes {
		if r.Name == "inventory/grpc" {
			grpc = r
		}
	}
	if grpc == nil || grpc.GetMatch().GetPrefix() != contract.GRPCServicePrefix || grpc.GetRoute().GetCluster() != ClusterSidecarGateway("inventory") {
		t.Fatalf("gateway gRPC route %v", grpc)
	}
	var authz extauthzv3.ExtAuthzPerRoute
	requireUnpack(t, grpc.TypedPerFilterConfig[envoy.FilterExtAuthz], &authz)
	if got := authz.GetCheckSettings().GetContextExtensions(); !cmp.Equal(got, map[string]string{contract.ContextAppID: "inventory", contract.ContextGateway: "edge"}) {
		t.Errorf("context_extensions %v", got)
	}
	var proc extprocv3.ExtProcPerRoute
	requireUnpack(t, grpc.TypedPerFilterConfig[envoy.FilterExtProc], &proc)
	if proc.GetOverrides().GetProcessingMode().GetRequestBodyMode() != extprocv3.ProcessingMode_STREAMED {
		t.Errorf("ext_proc override %v", &proc)
	}
	// To inventory's sidecar over mTLS, HTTP/2 end to end.
	requireHTTP2(t, clusterOf(t, res, ClusterSidecarGateway("inventory")))
}

// TestHTTPAppsUnchangedByGRPC: an app without transport (or streamable-http) gets the
// same resources whatever else the policy holds; the golden cases pin that for every
// existing policy, this pins the Streamable HTTP app beside a gRPC one.
func TestHTTPAppsUnchangedByGRPC(t *testing.T) {
	snap := requireLoad(t, grpcPolicy)
	res, err := Translate(snap, "notes")
	if err != nil {
		t.Fatal(err)
	}
	routes := routesOf(t, res, RouteInbound)
	if routes["notes/mcp"] == nil || routes["notes/mcp-stream"] == nil || routes["notes/grpc"] != nil {
		t.Fatalf("Streamable HTTP routes expected, got %v", routes)
	}
	if routes["notes/mcp"].GetTypedPerFilterConfig()[envoy.FilterExtProc] != nil {
		t.Errorf("Streamable HTTP routes keep the filter's BUFFERED mode: %v", routes["notes/mcp"])
	}
	var po httpv3.HttpProtocolOptions
	requireUnpack(t, clusterOf(t, res, ClusterApp("notes")).TypedExtensionProtocolOptions[envoy.ProtocolOpts], &po)
	if po.GetExplicitHttpConfig().GetHttpProtocolOptions() == nil {
		t.Errorf("a Streamable HTTP app is reached over HTTP/1.1: %v", &po)
	}

	// The same app in a policy without the gRPC app translates to the same inbound side.
	dir := t.TempDir()
	mesh, err := os.ReadFile(filepath.Join(grpcPolicy, "mesh.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(grpcPolicy, "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var keep []string
	for _, doc := range strings.Split(string(b), "\n---\n") {
		if strings.Contains(doc, "name: notes}") {
			keep = append(keep, strings.Replace(doc, "    transport: streamable-http\n", "", 1))
		}
	}
	if len(keep) != 1 {
		t.Fatalf("fixture changed: %d notes documents", len(keep))
	}
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), mesh, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(keep[0]), 0o644); err != nil {
		t.Fatal(err)
	}
	alone, err := Translate(requireLoad(t, dir), "notes")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(alone.Listeners[0], res.Listeners[0], protocmp.Transform()); diff != "" {
		t.Errorf("inbound listener differs:\n%s", diff)
	}
	if diff := cmp.Diff(alone.Routes[0], res.Routes[0], protocmp.Transform()); diff != "" {
		t.Errorf("inbound routes differ:\n%s", diff)
	}
}

// TestGRPCPathRefusedNamesTheContract ties policy's message to the wire constant, which
// policy may not import.
func TestGRPCPathRefusedNamesTheContract(t *testing.T) {
	dir := t.TempDir()
	mesh, err := os.ReadFile(filepath.Join(grpcPolicy, "mesh.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(grpcPolicy, "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	app := strings.Replace(string(b), "    transport: grpc\n", "    transport: grpc\n    path: /mcp\n", 1)
	if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), mesh, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(app), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = policy.LoadDir(context.Background(), dir)
	if !errors.Is(err, policy.ErrInvalid) || !strings.Contains(err.Error(), "spec.mcp.path: must not be set with transport grpc: the service path "+contract.GRPCServicePrefix+" is fixed") {
		t.Fatalf("err = %v", err)
	}
}
