package envoyemu

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	corsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/cors/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/envoy"
)

// bearerAuthz allows requests with an Authorization header and answers the others 401
// with a challenge, as mcpgate does; it counts the Checks.
type bearerAuthz struct {
	authv3.UnimplementedAuthorizationServer
	checks atomic.Int32
}

func (a *bearerAuthz) Check(_ context.Context, r *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	a.checks.Add(1)
	if r.GetAttributes().GetRequest().GetHttp().GetHeaders()["authorization"] != "" {
		return &authv3.CheckResponse{Status: &status.Status{}}, nil
	}
	return &authv3.CheckResponse{
		Status: &status.Status{Code: int32(codes.Unauthenticated)},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode_Unauthorized},
			Headers: []*corev3.HeaderValueOption{{Header: &corev3.HeaderValue{Key: "www-authenticate", Value: `Bearer resource_metadata="x"`}}},
		}},
	}, nil
}

type corsRig struct {
	addr  string
	authz *bearerAuthz
	hits  atomic.Int32
}

// requireCORSRig is a listener cors, ext_authz, router (mcpgate's filter chain without
// ext_proc) in front of an app that answers with mcp-session-id. /cors has policy (as
// envoy.CORSPolicy builds it from o), /plain has none.
func requireCORSRig(t *testing.T, o envoy.CORSOptions) *corsRig {
	t.Helper()
	rg := &corsRig{authz: &bearerAuthz{}}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rg.hits.Add(1)
		w.Header().Set("mcp-session-id", "s1")
		_, _ = w.Write([]byte("hello"))
	}))
	t.Cleanup(app.Close)
	g := grpc.NewServer()
	authv3.RegisterAuthorizationServer(g, rg.authz)
	ah, ap := splitHostPort(t, requireGRPC(t, g))
	authzCluster, authzCLA := mustCluster(t, envoy.ClusterOptions{Name: "authz", Host: ah, Port: ap, Protocol: envoy.HTTP2})
	apph, appp := splitHostPort(t, app.Listener.Addr().String())
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: apph, Port: appp})
	cors := must(t, envoy.CORSFilter)
	authz := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("authz") })
	lis := httpListener(t, "main", "0.0.0.0", 10000, nil, cors, authz)
	policy := must(t, func() (*anypb.Any, error) { return envoy.CORSPolicy(o) })
	rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, []*routev3.Route{
		envoy.Forward("cors", envoy.ExactPath("/cors"), envoy.ForwardOptions{Cluster: "app", Timeout: 10 * time.Second,
			PerFilter: map[string]*anypb.Any{envoy.FilterCORS: policy}}),
		envoy.Forward("plain", envoy.ExactPath("/plain"), envoy.ForwardOptions{Cluster: "app", Timeout: 10 * time.Second}),
		envoy.DirectResponse("doc", envoy.ExactPath("/doc"), 200, "text/plain", "doc", map[string]*anypb.Any{envoy.FilterCORS: policy}),
	}))
	addr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {appCluster, authzCluster}, resource.EndpointType: {appCLA, authzCLA},
	})
	rg.addr = requireEmulator(t, Options{XDSAddress: addr, NodeCluster: "test"}).Listener("main")
	return rg
}

// mcpCORS is what policy makes of {allowOrigins: [https://app.example.com],
// allowCredentials: true}.
var mcpCORS = envoy.CORSOptions{
	Origins: []string{"https://app.example.com"}, Methods: []string{"GET", "POST", "DELETE", "OPTIONS"},
	Headers:       []string{"content-type", "accept", "authorization", "mcp-protocol-version", "mcp-session-id", "last-event-id"},
	ExposeHeaders: []string{"mcp-session-id", "www-authenticate"}, MaxAge: 10 * time.Minute, AllowCredentials: true,
}

// preflight is an OPTIONS request as a browser sends it: no credentials.
func preflight(t *testing.T, url, origin string) *http.Response {
	t.Helper()
	resp, _ := do(t, http.MethodOptions, url, "", "Origin", origin, "Access-Control-Request-Method", "POST",
		"Access-Control-Request-Headers", "content-type, accept, mcp-protocol-version, mcp-session-id, authorization, last-event-id")
	return resp
}

func requireHeaders(t *testing.T, what string, h http.Header, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got := h.Get(k); got != v {
			t.Errorf("%s: %s = %q, want %q", what, k, got, v)
		}
	}
}

// TestCORSPreflightAnsweredByTheFilter: a preflight from an allowed origin gets 200 and
// the policy's Access-Control-* headers from the CORS filter; ext_authz and the app
// never see it (cors_filter.cc decodeHeaders, StopIteration).
func TestCORSPreflightAnsweredByTheFilter(t *testing.T) {
	rg := requireCORSRig(t, mcpCORS)
	resp := preflight(t, "http://"+rg.addr+"/cors", "https://app.example.com")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("preflight: %d, want 200", resp.StatusCode)
	}
	requireHeaders(t, "preflight", resp.Header, map[string]string{
		"Access-Control-Allow-Origin":      "https://app.example.com",
		"Access-Control-Allow-Methods":     "GET,POST,DELETE,OPTIONS",
		"Access-Control-Allow-Headers":     "content-type,accept,authorization,mcp-protocol-version,mcp-session-id,last-event-id",
		"Access-Control-Max-Age":           "600",
		"Access-Control-Allow-Credentials": "true",
	})
	if n, h := rg.authz.checks.Load(), rg.hits.Load(); n != 0 || h != 0 {
		t.Errorf("ext_authz saw %d Checks and the app %d requests, want none", n, h)
	}
}

// TestCORSPreflightNotMatchingContinues: a preflight from another origin, or on a route
// without policy, goes on to ext_authz (forward_not_matching_preflights true), which
// refuses it for want of credentials; nothing says the origin is allowed.
func TestCORSPreflightNotMatchingContinues(t *testing.T) {
	rg := requireCORSRig(t, mcpCORS)
	for i, tc := range []struct{ path, origin string }{{"/cors", "https://evil.example.com"}, {"/plain", "https://app.example.com"}} {
		resp := preflight(t, "http://"+rg.addr+tc.path, tc.origin)
		if resp.StatusCode != http.StatusUnauthorized {
			t.Errorf("%s from %s: %d, want ext_authz's 401", tc.path, tc.origin, resp.StatusCode)
		}
		for _, k := range []string{"Access-Control-Allow-Origin", "Access-Control-Allow-Methods", "Access-Control-Allow-Credentials"} {
			if v := resp.Header.Get(k); v != "" {
				t.Errorf("%s from %s: %s = %q, want none", tc.path, tc.origin, k, v)
			}
		}
		if n := rg.authz.checks.Load(); n != int32(i+1) {
			t.Errorf("ext_authz saw %d Checks, want %d", n, i+1)
		}
	}
	if h := rg.hits.Load(); h != 0 {
		t.Errorf("the app saw %d requests", h)
	}
}

// TestCORSResponseHeaders: a request from an allowed origin gets Allow-Origin,
// Allow-Credentials and Expose-Headers on the app's response and on ext_authz's 401
// (a local reply is encoded through the CORS filter too), so a browser can read the
// challenge; a request from another origin, or without Origin, gets none.
func TestCORSResponseHeaders(t *testing.T) {
	rg := requireCORSRig(t, mcpCORS)
	url := "http://" + rg.addr + "/cors"
	cors := map[string]string{
		"Access-Control-Allow-Origin":      "https://app.example.com",
		"Access-Control-Allow-Credentials": "true",
		"Access-Control-Expose-Headers":    "mcp-session-id,www-authenticate",
	}
	resp, body := do(t, http.MethodPost, url, "{}", "Origin", "https://app.example.com", "Authorization", "Bearer t")
	if resp.StatusCode != http.StatusOK || body != "hello" || resp.Header.Get("Mcp-Session-Id") != "s1" {
		t.Fatalf("POST: %d %q", resp.StatusCode, body)
	}
	requireHeaders(t, "POST", resp.Header, cors)
	resp, _ = do(t, http.MethodPost, url, "{}", "Origin", "https://app.example.com")
	if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("Www-Authenticate") == "" {
		t.Fatalf("POST without token: %d, want 401 with a challenge", resp.StatusCode)
	}
	requireHeaders(t, "401", resp.Header, cors)
	for _, hdr := range [][]string{{"Origin", "https://evil.example.com", "Authorization", "Bearer t"}, {"Authorization", "Bearer t"}} {
		resp, _ := do(t, http.MethodPost, url, "{}", hdr...)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("POST %v: %d", hdr, resp.StatusCode)
		}
		for k := range cors {
			if v := resp.Header.Get(k); v != "" {
				t.Errorf("POST %v: %s = %q, want none", hdr, k, v)
			}
		}
	}
	// A direct response has no route entry: the filter does nothing there
	// (cors_filter.cc decodeHeaders returns at routeEntry() == nullptr).
	resp, _ = do(t, http.MethodGet, "http://"+rg.addr+"/doc", "", "Origin", "https://app.example.com", "Authorization", "Bearer t")
	if v := resp.Header.Get("Access-Control-Allow-Origin"); resp.StatusCode != http.StatusOK || v != "" {
		t.Errorf("direct response: %d, Access-Control-Allow-Origin %q", resp.StatusCode, v)
	}
}

// TestCORSAnyOrigin: "*" (a regex matching everything) echoes whatever origin asks.
func TestCORSAnyOrigin(t *testing.T) {
	rg := requireCORSRig(t, envoy.CORSOptions{AnyOrigin: true, Methods: []string{"POST"}})
	for _, origin := range []string{"https://a.example.com", "http://localhost:5173"} {
		resp := preflight(t, "http://"+rg.addr+"/cors", origin)
		if resp.StatusCode != http.StatusOK || resp.Header.Get("Access-Control-Allow-Origin") != origin {
			t.Errorf("preflight from %s: %d, Access-Control-Allow-Origin %q", origin, resp.StatusCode, resp.Header.Get("Access-Control-Allow-Origin"))
		}
		if v := resp.Header.Get("Access-Control-Allow-Credentials"); v != "" {
			t.Errorf("credentials %q without allow_credentials", v)
		}
	}
}

// TestCORSNotEmulated: what the emulator does not implement is refused, never ignored.
func TestCORSNotEmulated(t *testing.T) {
	cors := must(t, envoy.CORSFilter)
	authz := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("authz") })
	enabled := must(t, func() (*anypb.Any, error) {
		return envoy.Any(&corsv3.CorsPolicy{AllowMethods: "POST", ShadowEnabled: &corev3.RuntimeFractionalPercent{DefaultValue: &typev3.FractionalPercent{Numerator: 1}}})
	})
	route := envoy.Forward("r", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "app", PerFilter: map[string]*anypb.Any{envoy.FilterCORS: enabled}})
	for name, tc := range map[string]struct {
		res  map[resource.Type][]types.Resource
		want string
	}{
		"cors after ext_authz": {map[resource.Type][]types.Resource{resource.ListenerType: {httpListener(t, "main", "0.0.0.0", 10000, nil, authz, cors)},
			resource.RouteType: {envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, nil))}},
			"emulated only as the first filter"},
		"shadow_enabled": {map[resource.Type][]types.Resource{resource.RouteType: {envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, []*routev3.Route{route}))},
			resource.ListenerType: {httpListener(t, "main", "0.0.0.0", 10000, nil, cors)}}, "shadow_enabled"},
	} {
		t.Run(name, func(t *testing.T) {
			_, n := startUntilNACK(t, Options{XDSAddress: requireADS(t, tc.res), NodeCluster: "test"}, 5*time.Second)
			if !strings.Contains(n, tc.want) {
				t.Fatalf("NACK %q, want %q", n, tc.want)
			}
		})
	}
}
