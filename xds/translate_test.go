package xds

import (
	"context"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	extauthzv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/xds/golden")

const goldenRoot = "../testdata/xds/golden"

// goldenCases maps a case name to its policy directory. Each case's golden directory
// holds one file per node (every App with a sidecar and every Gateway), except where
// goldenNodes names a few.
var goldenCases = map[string]string{
	"demo":           "../testdata/demo",
	"strict-certdir": "../testdata/xds/strict-certdir",
	"permissive":     "../testdata/xds/permissive",
	"disabled":       "../testdata/xds/disabled",
	"endpoint":       "../testdata/xds/endpoint",
	"gateway":        "../testdata/xds/gateway",
	"resiliency":     "../testdata/xds/resiliency",
	"many-apps":      "../testdata/xds/many-apps",
	"authz-mtls":     "../testdata/xds/authz-mtls",
	"grpc":           "../testdata/xds/grpc",
	"cors":           "../testdata/xds/cors",
}

// goldenNodes limits the nodes pinned for large cases (every node is still translated
// and validated).
var goldenNodes = map[string][]string{"many-apps": {"app01", "app20"}}

func TestTranslateGolden(t *testing.T) {
	for name, dir := range goldenCases {
		t.Run(name, func(t *testing.T) {
			snap := requireLoad(t, dir)
			gdir := filepath.Join(goldenRoot, name)
			written := map[string]bool{}
			for _, node := range nodesOf(snap) {
				got, err := Translate(snap, node)
				if err != nil {
					t.Fatalf("Translate(%s): %v", node, err)
				}
				requireDeepValid(t, got)
				if only := goldenNodes[name]; only != nil && !slices.Contains(only, node) {
					continue
				}
				file := filepath.Join(gdir, node+".yaml")
				written[node+".yaml"] = true
				if *update {
					y, err := got.YAML()
					if err != nil {
						t.Fatal(err)
					}
					if err := os.MkdirAll(gdir, 0o755); err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(file, y, 0o644); err != nil {
						t.Fatal(err)
					}
					continue
				}
				b, err := os.ReadFile(file)
				if err != nil {
					t.Fatalf("%v (run go test ./xds -update)", err)
				}
				want, err := ParseYAML(b)
				if err != nil {
					t.Fatalf("%s: %v", file, err)
				}
				if diff := cmp.Diff(want, got, protocmp.Transform()); diff != "" {
					t.Errorf("%s: resources differ from the golden file (-want +got; go test ./xds -update rewrites):\n%s", file, diff)
				}
			}
			entries, _ := os.ReadDir(gdir)
			for _, e := range entries {
				if written[e.Name()] {
					continue
				}
				if *update {
					_ = os.Remove(filepath.Join(gdir, e.Name()))
				} else {
					t.Errorf("stale golden file %s (go test ./xds -update removes it)", filepath.Join(gdir, e.Name()))
				}
			}
		})
	}
	entries, _ := os.ReadDir(goldenRoot)
	for _, e := range entries {
		if _, ok := goldenCases[e.Name()]; ok {
			continue
		}
		if *update {
			_ = os.RemoveAll(filepath.Join(goldenRoot, e.Name()))
		} else {
			t.Errorf("stale golden directory %s", e.Name())
		}
	}
}

// TestYAMLRoundTrip checks that the rendering parses back to the same resources, which
// the golden comparison relies on.
func TestYAMLRoundTrip(t *testing.T) {
	snap := requireLoad(t, "../testdata/xds/strict-certdir")
	got, err := Translate(snap, "server")
	if err != nil {
		t.Fatal(err)
	}
	y, err := got.YAML()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParseYAML(y)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, back, protocmp.Transform()); diff != "" {
		t.Fatal(diff)
	}
}

func TestTranslateUnknownNode(t *testing.T) {
	snap := requireLoad(t, "../testdata/demo")
	if _, err := Translate(snap, "nobody"); !errors.Is(err, ErrUnknownNode) {
		t.Fatalf("want ErrUnknownNode, got %v", err)
	}
	if _, err := Translate(nil, "inventory"); err == nil {
		t.Fatal("want an error for a nil snapshot")
	}
}

// TestInboundContract pins the Envoy side of the ext_authz and ext_proc contracts on the
// demo's MCP server, independently of the golden files.
func TestInboundContract(t *testing.T) {
	snap := requireLoad(t, "../testdata/demo")
	res, err := Translate(snap, "inventory")
	if err != nil {
		t.Fatal(err)
	}
	var hcm hcmv3.HttpConnectionManager
	requireUnpack(t, res.Listeners[0].FilterChains[0].Filters[0].GetTypedConfig(), &hcm)
	var names []string
	for _, f := range hcm.HttpFilters {
		names = append(names, f.Name)
	}
	if want := []string{envoy.FilterCORS, envoy.FilterExtAuthz, envoy.FilterExtProc, envoy.FilterRouter}; !cmp.Equal(names, want) {
		t.Fatalf("filter order %v, want %v", names, want)
	}
	var authz extauthzv3.ExtAuthz
	requireUnpack(t, hcm.HttpFilters[1].GetTypedConfig(), &authz)
	if authz.FailureModeAllow || authz.GetGrpcService().GetEnvoyGrpc().GetClusterName() != ClusterAuthz {
		t.Errorf("ext_authz must fail closed and call %s: %v", ClusterAuthz, &authz)
	}
	var proc extprocv3.ExternalProcessor
	requireUnpack(t, hcm.HttpFilters[2].GetTypedConfig(), &proc)
	pm := proc.GetProcessingMode()
	if proc.FailureModeAllow || !proc.AllowModeOverride || pm.GetRequestBodyMode() != extprocv3.ProcessingMode_BUFFERED ||
		pm.GetResponseBodyMode() != extprocv3.ProcessingMode_NONE || proc.GetMessageTimeout().AsDuration() < envoy.ExtProcMessageTimeout ||
		!cmp.Equal(proc.GetMetadataOptions().GetForwardingNamespaces().GetUntyped(), []string{"envoy.filters.http.ext_authz"}) {
		t.Errorf("ext_proc config does not match the contract: %v", &proc)
	}
	app := snap.Apps["inventory"]
	var mcpRoutes int
	for _, r := range res.Routes[0].VirtualHosts[0].Routes {
		if r.GetMatch().GetPath() != app.MCP.Path {
			continue
		}
		mcpRoutes++
		if r.TypedPerFilterConfig[envoy.FilterCORS] != nil {
			t.Errorf("route %s: a CorsPolicy on an app without spec.mcp.cors", r.Name)
		}
		var per extauthzv3.ExtAuthzPerRoute
		requireUnpack(t, r.TypedPerFilterConfig[envoy.FilterExtAuthz], &per)
		if got := per.GetCheckSettings().GetContextExtensions()["app_id"]; got != "inventory" {
			t.Errorf("route %s: context_extensions app_id %q", r.Name, got)
		}
		if r.GetRoute().GetCluster() != ClusterApp("inventory") {
			t.Errorf("route %s goes to %s", r.Name, r.GetRoute().GetCluster())
		}
		if len(r.GetMatch().GetHeaders()) == 0 { // the POST route
			if r.GetRequestBodyBufferLimit().GetValue() != uint64(app.MCP.Limits.MaxRequestBytes) {
				t.Errorf("body limit %v", r.GetRequestBodyBufferLimit())
			}
			if r.GetRoute().GetRetryPolicy().GetRetryOn() != envoy.RetryOnUnsent {
				t.Errorf("POST retries on %q", r.GetRoute().GetRetryPolicy().GetRetryOn())
			}
		} else if r.GetRoute().GetTimeout().AsDuration() != 0 {
			t.Errorf("the GET event stream must have no response timeout")
		}
	}
	if mcpRoutes != 2 {
		t.Fatalf("want 2 routes for %s, got %d", app.MCP.Path, mcpRoutes)
	}
	last := res.Routes[0].VirtualHosts[0].Routes[len(res.Routes[0].VirtualHosts[0].Routes)-1]
	if last.GetDirectResponse().GetStatus() != 404 {
		t.Errorf("the last route must answer 404, got %v", last)
	}
}

func TestOutboundDaprRouting(t *testing.T) {
	snap := requireLoad(t, "../testdata/demo")
	res, err := Translate(snap, "my-agent")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Listeners) != 1 || res.Listeners[0].Name != ListenerOutbound {
		t.Fatalf("an agent has only the outbound listener, got %d", len(res.Listeners))
	}
	if a := res.Listeners[0].Address.GetSocketAddress(); a.Address != "127.0.0.1" || a.GetPortValue() != 3500 {
		t.Fatalf("outbound listener on %v", a)
	}
	byName := map[string]*routev3.Route{}
	for _, r := range res.Routes[0].VirtualHosts[0].Routes {
		byName[r.Name] = r
	}
	inv := byName["invoke/inventory"]
	if inv.GetMatch().GetPrefix() != "/v1.0/invoke/inventory/method/" || inv.GetRoute().GetPrefixRewrite() != "/" || inv.GetRoute().GetCluster() != ClusterSidecar("inventory") {
		t.Errorf("invoke route: %v", inv)
	}
	hdr := byName["header/inventory"]
	if h := hdr.GetMatch().GetHeaders(); len(h) != 1 || h[0].Name != "dapr-app-id" || h[0].GetStringMatch().GetExact() != "inventory" {
		t.Errorf("header route: %v", hdr)
	}
	for _, c := range res.Clusters {
		if c.Name != ClusterSidecar("inventory") {
			continue
		}
		requireDeepValid(t, c)
		if !strings.Contains(c.TransportSocket.String(), "spiffe://example.org/ns/default/inventory") {
			t.Errorf("the cluster to inventory must verify its SPIFFE ID: %v", c.TransportSocket)
		}
	}
}

func requireLoad(t testing.TB, dir string) *policy.Snapshot {
	t.Helper()
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatalf("load %s: %v", dir, err)
	}
	return snap
}

// nodesOf lists every node a snapshot programs: apps with a sidecar and gateways.
func nodesOf(snap *policy.Snapshot) []string {
	var nodes []string
	for id, a := range snap.Apps {
		if a.Sidecar != nil {
			nodes = append(nodes, id)
		}
	}
	for name := range snap.Gateways {
		nodes = append(nodes, name)
	}
	sort.Strings(nodes)
	return nodes
}

func requireUnpack(t testing.TB, a *anypb.Any, m proto.Message) {
	t.Helper()
	if a == nil {
		t.Fatalf("no typed config for %T", m)
	}
	if err := a.UnmarshalTo(m); err != nil {
		t.Fatal(err)
	}
}

// requireDeepValid runs ValidateAll on every resource and, recursively, on every message
// packed in an Any inside it (typed_config of filters, transport sockets, protocol
// options, per-route configs), which protoc-gen-validate does not look into.
func requireDeepValid(t testing.TB, v any) {
	t.Helper()
	var msgs []proto.Message
	switch x := v.(type) {
	case Resources:
		msgs = x.all()
	case proto.Message:
		msgs = []proto.Message{x}
	}
	for _, m := range msgs {
		if err := deepValidate(m.ProtoReflect()); err != nil {
			t.Errorf("%s: %v", m.ProtoReflect().Descriptor().FullName(), err)
		}
	}
}

func deepValidate(m protoreflect.Message) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return err
		}
		if err := envoy.Validate(inner); err != nil {
			return err
		}
		return deepValidate(inner.ProtoReflect())
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Message() != nil:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = deepValidate(l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Message() != nil:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				err = deepValidate(mv.Message())
				return err == nil
			})
		case fd.Message() != nil && !fd.IsList() && !fd.IsMap():
			err = deepValidate(v.Message())
		}
		return err == nil
	})
	return err
}

// TestTranslateCORS pins where CORS policies go: on the MCP routes of apps with
// spec.mcp.cors, in the sidecar and at the gateway, and nowhere else; and the CORS
// filter before ext_authz on every policy listener.
func TestTranslateCORS(t *testing.T) {
	snap := requireLoad(t, "../testdata/xds/cors")
	want := map[string]*corsv3.CorsPolicy{
		"inventory": {
			AllowOriginStringMatch: []*matcherv3.StringMatcher{
				{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "https://app.example.com"}},
				{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "http://localhost:5173"}},
			},
			AllowMethods:     "GET,POST,DELETE,OPTIONS",
			AllowHeaders:     "content-type,accept,authorization,mcp-protocol-version,mcp-session-id,last-event-id,mcp-method,mcp-name",
			ExposeHeaders:    "mcp-session-id,mcp-protocol-version,www-authenticate",
			MaxAge:           "600",
			AllowCredentials: wrapperspb.Bool(true), ForwardNotMatchingPreflights: wrapperspb.Bool(true),
		},
		"catalog": {
			AllowOriginStringMatch: []*matcherv3.StringMatcher{{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: ".*"}}}},
			AllowMethods:           "POST,OPTIONS", AllowHeaders: "content-type,accept,mcp-protocol-version,mcp-session-id",
			ExposeHeaders: "mcp-session-id", MaxAge: "3600",
			AllowCredentials: wrapperspb.Bool(false), ForwardNotMatchingPreflights: wrapperspb.Bool(true),
		},
	}
	for _, node := range []string{"inventory", "catalog", "billing", "edge"} {
		res, err := Translate(snap, node)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range res.Listeners {
			if l.Name == ListenerOutbound || l.Name == ListenerGatewayInbound {
				continue // no policy here: the gateway answered CORS on its own listener
			}
			var hcm hcmv3.HttpConnectionManager
			requireUnpack(t, l.FilterChains[0].Filters[0].GetTypedConfig(), &hcm)
			if len(hcm.HttpFilters) < 2 || hcm.HttpFilters[0].Name != envoy.FilterCORS || hcm.HttpFilters[1].Name != envoy.FilterExtAuthz {
				t.Errorf("%s listener %s: the CORS filter must come first, before ext_authz", node, l.Name)
			}
		}
		policies := 0
		for _, rc := range res.Routes {
			for _, vh := range rc.VirtualHosts {
				if vh.TypedPerFilterConfig[envoy.FilterCORS] != nil {
					t.Errorf("%s: virtual host %s has a CorsPolicy: it belongs on the MCP routes", node, vh.Name)
				}
				for _, r := range vh.Routes {
					a := r.TypedPerFilterConfig[envoy.FilterCORS]
					var ctx extauthzv3.ExtAuthzPerRoute
					if r.TypedPerFilterConfig[envoy.FilterExtAuthz] != nil {
						requireUnpack(t, r.TypedPerFilterConfig[envoy.FilterExtAuthz], &ctx)
					}
					app := ctx.GetCheckSettings().GetContextExtensions()["app_id"]
					w := want[app]
					switch {
					case w == nil && a != nil:
						t.Errorf("%s: route %s (app %q) has a CorsPolicy", node, r.Name, app)
					case w != nil && a == nil:
						t.Errorf("%s: route %s of app %s has no CorsPolicy", node, r.Name, app)
					case w != nil:
						policies++
						var got corsv3.CorsPolicy
						requireUnpack(t, a, &got)
						if diff := cmp.Diff(w, &got, protocmp.Transform()); diff != "" {
							t.Errorf("%s: route %s CorsPolicy (-want +got):\n%s", node, r.Name, diff)
						}
					}
				}
			}
		}
		// The GET stream and POST routes of the sidecar, and of the gateway's inventory route.
		if wantN := map[string]int{"inventory": 2, "catalog": 2, "billing": 0, "edge": 2}[node]; policies != wantN {
			t.Errorf("%s: %d routes with a CorsPolicy, want %d", node, policies, wantN)
		}
	}
}

type fixedTokens map[string]string

func (f fixedTokens) Token(ep *policy.HTTPEndpoint) string { return f[ep.Name] }

// TestTranslateInjectedToken pins how a client-credentials token reaches the upstream:
// while mcpgate has it, the endpoint's routes enable the credential injector and turn
// ext_authz off, and the SDS secret carries it; without it the routes ask ext_authz. The
// listener and clusters are the same either way (a token's arrival or expiry must not
// make Envoy drain the listener), and only callers' sidecars get the secret.
func TestTranslateInjectedToken(t *testing.T) {
	snap := requireLoad(t, "../testdata/xds/endpoint")
	without, err := TranslateWith(snap, "agent", fixedTokens{})
	if err != nil {
		t.Fatal(err)
	}
	with, err := TranslateWith(snap, "agent", fixedTokens{"with-token": "tok-123"})
	if err != nil {
		t.Fatal(err)
	}
	requireDeepValid(t, with)
	if len(with.Listeners) != len(without.Listeners) || !proto.Equal(with.Listeners[0], without.Listeners[0]) {
		t.Error("the outbound listener changes with the token's state")
	}
	for i := range with.Clusters {
		if !proto.Equal(with.Clusters[i], without.Clusters[i]) {
			t.Errorf("cluster %s changes with the token's state", with.Clusters[i].Name)
		}
	}
	secret := func(r Resources) string {
		for _, s := range r.Secrets {
			if s.Name == SecretToken("with-token") {
				return s.GetGenericSecret().GetSecret().GetInlineString()
			}
		}
		t.Fatalf("no secret %s", SecretToken("with-token"))
		return ""
	}
	if got := secret(with); got != "tok-123" {
		t.Errorf("secret holds %q", got)
	}
	if got := secret(without); got != "" {
		t.Errorf("secret without a token holds %q", got)
	}
	var injector *hcmv3.HttpFilter
	hcm := &hcmv3.HttpConnectionManager{}
	requireUnpack(t, with.Listeners[0].FilterChains[0].Filters[0].GetTypedConfig(), hcm)
	for _, f := range hcm.HttpFilters {
		if f.Name == FilterCredentials("with-token") {
			injector = f
		}
	}
	if injector == nil || !injector.Disabled {
		t.Fatalf("want the injector on the listener, disabled by default: %v", injector)
	}
	if last := hcm.HttpFilters[len(hcm.HttpFilters)-1].Name; last != envoy.FilterRouter {
		t.Errorf("last filter %s", last)
	}
	routes := func(r Resources) map[string]*routev3.Route {
		m := map[string]*routev3.Route{}
		for _, rt := range r.Routes[0].VirtualHosts[0].Routes {
			m[rt.Name] = rt
		}
		return m
	}
	for _, name := range []string{"invoke/with-token", "header/with-token"} {
		on := routes(with)[name].TypedPerFilterConfig
		if on[FilterCredentials("with-token")] == nil {
			t.Errorf("%s: the injector is not enabled with a token", name)
		}
		az := &extauthzv3.ExtAuthzPerRoute{}
		requireUnpack(t, on[envoy.FilterExtAuthz], az)
		if !az.GetDisabled() {
			t.Errorf("%s: ext_authz still runs with a token: %v", name, az)
		}
		off := routes(without)[name].TypedPerFilterConfig
		if off[FilterCredentials("with-token")] != nil {
			t.Errorf("%s: the injector is enabled without a token", name)
		}
		requireUnpack(t, off[envoy.FilterExtAuthz], az)
		if az.GetDisabled() || az.GetCheckSettings().GetContextExtensions()[contract.ContextEndpoint] != "with-token" {
			t.Errorf("%s: without a token ext_authz must supply it: %v", name, az)
		}
	}
	for _, node := range nodesOf(snap) {
		if node == "agent" {
			continue
		}
		res, err := TranslateWith(snap, node, fixedTokens{"with-token": "tok-123"})
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range res.Secrets {
			if strings.Contains(s.String(), "tok-123") {
				t.Errorf("node %s, not among the callers, gets the token", node)
			}
		}
	}
}
