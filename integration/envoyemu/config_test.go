package envoyemu

import (
	"strings"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/mcpgate/mcpgate/envoy"
)

func TestNormalizePath(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"/mcp", "/mcp"},
		{"//mcp", "/mcp"},
		{"/a/../mcp", "/mcp"},
		{"/a/./b/", "/a/b/"},
		{"/../../mcp?x=/../y", "/mcp?x=/../y"},
		{"/a/b/..", "/a/"},
	} {
		if got := normalizePath(c.in, true, true); got != c.want {
			t.Errorf("normalizePath(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestRouteMatching(t *testing.T) {
	h := &headerMap{}
	h.add(":method", "GET")
	h.add("dapr-app-id", "inventory")
	get := envoy.WithHeader(envoy.ExactPath("/mcp"), ":method", "GET")
	for _, c := range []struct {
		m    *routev3.RouteMatch
		path string
		want bool
	}{
		{get, "/mcp", true},
		{get, "/mcp/", false},
		{envoy.Prefix("/v1.0/invoke/inventory/method/"), "/v1.0/invoke/inventory/method/mcp", true},
		{envoy.PathSeparatedPrefix("/mcp"), "/mcp/x", true},
		{envoy.PathSeparatedPrefix("/mcp"), "/mcpx", false},
		{envoy.WithHeader(envoy.Prefix("/"), "dapr-app-id", "inventory"), "/anything", true},
		{envoy.WithHeader(envoy.Prefix("/"), "dapr-app-id", "github-mcp"), "/anything", false},
	} {
		if got := routeMatches(c.m, c.path, h); got != c.want {
			t.Errorf("%v on %s: %v, want %v", c.m, c.path, got, c.want)
		}
	}
}

// What the emulator cannot apply is NACKed with the reason in error_detail.
func TestNACKUnsupported(t *testing.T) {
	r := envoy.Forward("re", &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: ".*"}}},
		envoy.ForwardOptions{Cluster: "c"})
	rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, []*routev3.Route{r}))
	lis := httpListener(t, "main", "0.0.0.0", 10000, nil)
	addr := requireADS(t, map[resource.Type][]types.Resource{resource.ListenerType: {lis}, resource.RouteType: {rc}})
	e, n := startUntilNACK(t, Options{XDSAddress: addr, NodeCluster: "test"}, 5*time.Second)
	if !strings.Contains(n, "SafeRegex") || !strings.Contains(n, `route "re"`) {
		t.Fatalf("NACK %q", n)
	}
	if e.Version(resource.RouteType) != "" {
		t.Fatalf("a NACKed route configuration was ACKed: %q", e.Version(resource.RouteType))
	}
}
