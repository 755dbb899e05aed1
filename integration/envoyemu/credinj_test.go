package envoyemu

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"slices"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	credinjv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	genericv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/generic/v3"
	oauth2v3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/oauth2/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/envoy"
)

// The filter and secret names mcpgate's xDS gives an HTTPEndpoint "api".
const (
	credFilter = "mcpgate.credentials.api"
	credSecret = "outbound-token|api"
)

// credPlane serves snapshots to node cluster "test" that a test replaces.
type credPlane struct {
	addr  string
	cache cachev3.SnapshotCache
}

func requireCredPlane(t *testing.T) *credPlane {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	cp := &credPlane{cache: cachev3.NewSnapshotCache(true, clusterHash{}, nil)}
	g := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, serverv3.NewServer(ctx, cp.cache, serverv3.CallbackFuncs{}))
	cp.addr = requireGRPC(t, g)
	return cp
}

// set serves res with every type at version v but the secrets at secretsV, so that a
// new secretsV alone is an SDS push and nothing else.
func (cp *credPlane) set(t *testing.T, v, secretsV string, res map[resource.Type][]types.Resource) {
	t.Helper()
	snap, err := cachev3.NewSnapshot(v, res)
	if err != nil {
		t.Fatal(err)
	}
	snap.Resources[types.Secret] = cachev3.NewResources(secretsV, res[resource.SecretType])
	if err := snap.Consistent(); err != nil {
		t.Fatal(err)
	}
	if err := cp.cache.SetSnapshot(context.Background(), "test", snap); err != nil {
		t.Fatal(err)
	}
}

// tokenSecret is the generic secret mcpgate serves for an HTTPEndpoint's token ("":
// no token right now).
func tokenSecret(name, token string) *tlsv3.Secret {
	return &tlsv3.Secret{Name: name, Type: &tlsv3.Secret_GenericSecret{GenericSecret: &tlsv3.GenericSecret{
		Secret: &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: token}},
	}}}
}

// generic is the generic injected credential of mcpgate's filter: the secret over ADS,
// as "Authorization: Bearer <token>".
func generic(t testing.TB) *corev3.TypedExtensionConfig {
	t.Helper()
	g := must(t, func() (*anypb.Any, error) {
		return envoy.Any(&genericv3.Generic{Credential: envoy.SecretRef(credSecret, envoy.ADSConfigSource()),
			Header: "Authorization", HeaderValuePrefix: "Bearer "})
	})
	return &corev3.TypedExtensionConfig{Name: "envoy.http.injected_credentials.generic", TypedConfig: g}
}

// credentialFilter is mcpgate's credential_injector filter of HTTPEndpoint "api":
// disabled unless a route enables it, overwrite, no request without a credential; edit
// changes it (unvalidated, so that tests can build what Envoy refuses).
func credentialFilter(t testing.TB, edit func(*credinjv3.CredentialInjector)) *hcmv3.HttpFilter {
	t.Helper()
	ci := &credinjv3.CredentialInjector{Overwrite: true, Credential: generic(t)}
	if edit != nil {
		edit(ci)
	}
	a := must(t, func() (*anypb.Any, error) { return anypb.New(ci) })
	return &hcmv3.HttpFilter{Name: credFilter, Disabled: true, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: a}}
}

type credOptions struct {
	token *string // the secret's inline_string; nil: the snapshot has no secret
	edit  func(*credinjv3.CredentialInjector)
	cors  bool // the CORS filter first, with mcpCORS on /api
}

// credRig is an app's outbound listener as mcpgate will build it for HTTPEndpoint
// "api": ext_authz, the credential injector, the router. /api enables the injector
// (FilterConfig) and disables ext_authz; /plain only disables ext_authz. The upstream
// records the Authorization values of every request.
type credRig struct {
	cp    *credPlane
	res   map[resource.Type][]types.Resource
	hits  chan []string
	authz *recordingAuthz
}

func newCredRig(t *testing.T, o credOptions) *credRig {
	t.Helper()
	rg := &credRig{cp: requireCredPlane(t), hits: make(chan []string, 16), authz: &recordingAuthz{}}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rg.hits <- r.Header.Values("Authorization")
		_, _ = w.Write([]byte("hello"))
	}))
	t.Cleanup(up.Close)
	authzCluster, authzCLA := requireAuthzCluster(t, rg.authz)
	host, port := splitHostPort(t, up.Listener.Addr().String())
	upCluster, upCLA := mustCluster(t, envoy.ClusterOptions{Name: "upstream", Host: host, Port: port})
	authz := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("authz") })
	filters := []*hcmv3.HttpFilter{authz, credentialFilter(t, o.edit)}
	noAuthz := must(t, envoy.ExtAuthzDisabled)
	apiPF := map[string]*anypb.Any{
		envoy.FilterExtAuthz: noAuthz,
		credFilter:           must(t, func() (*anypb.Any, error) { return anypb.New(&routev3.FilterConfig{}) }),
	}
	if o.cors {
		filters = append([]*hcmv3.HttpFilter{must(t, envoy.CORSFilter)}, filters...)
		apiPF[envoy.FilterCORS] = must(t, func() (*anypb.Any, error) { return envoy.CORSPolicy(mcpCORS) })
	}
	lis := httpListener(t, "outbound", "127.0.0.1", 3500, nil, filters...)
	rc := envoy.RouteConfiguration("outbound", envoy.VirtualHost("outbound", []string{"*"}, []*routev3.Route{
		envoy.Forward("api", envoy.Prefix("/api"), envoy.ForwardOptions{Cluster: "upstream", Timeout: 10 * time.Second, PerFilter: apiPF}),
		envoy.Forward("plain", envoy.Prefix("/plain"), envoy.ForwardOptions{Cluster: "upstream", Timeout: 10 * time.Second,
			PerFilter: map[string]*anypb.Any{envoy.FilterExtAuthz: noAuthz}}),
	}))
	rg.res = map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {upCluster, authzCluster}, resource.EndpointType: {upCLA, authzCLA},
	}
	if o.token != nil {
		rg.res[resource.SecretType] = []types.Resource{tokenSecret(credSecret, *o.token)}
	}
	rg.cp.set(t, "v1", "s1", rg.res)
	return rg
}

// start starts the emulator, waits for it to be ready and returns it with the
// outbound listener's address.
func (rg *credRig) start(t *testing.T) (*Emulator, string) {
	t.Helper()
	e := requireEmulator(t, Options{XDSAddress: rg.cp.addr, NodeCluster: "test"})
	addr := e.Listener("outbound")
	if addr == "" {
		t.Fatal("listener outbound not bound")
	}
	return e, addr
}

// setToken pushes a new token over SDS alone (secrets version secretsV).
func (rg *credRig) setToken(t *testing.T, secretsV, token string) {
	t.Helper()
	rg.res[resource.SecretType] = []types.Resource{tokenSecret(credSecret, token)}
	rg.cp.set(t, "v1", secretsV, rg.res)
}

// requireAuth checks what reached the upstream for the request just made: its
// Authorization values.
func (rg *credRig) requireAuth(t *testing.T, what string, want ...string) {
	t.Helper()
	select {
	case got := <-rg.hits:
		if !slices.Equal(got, want) {
			t.Fatalf("%s: upstream got Authorization %q, want %q", what, got, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: the upstream was not reached", what)
	}
}

// requireNoHit checks that nothing reached the upstream (the response came first, so
// a forwarded request would have been recorded already).
func (rg *credRig) requireNoHit(t *testing.T, what string) {
	t.Helper()
	select {
	case got := <-rg.hits:
		t.Fatalf("%s: the upstream was reached (Authorization %q)", what, got)
	default:
	}
}

func ptr[T any](v T) *T { return &v }

// TestCredentialInjectorInjectsOnEnabledRoute: the route's FilterConfig enables the
// disabled filter, which sets Authorization to the prefix and the secret, replacing what
// the agent sent (overwrite); on a route without it the filter stays off. ext_authz,
// disabled on both routes, is never asked.
func TestCredentialInjectorInjectsOnEnabledRoute(t *testing.T) {
	rg := newCredRig(t, credOptions{token: ptr("tok-1")})
	_, addr := rg.start(t)

	resp, _ := do(t, "GET", "http://"+addr+"/api/items", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/api: %d", resp.StatusCode)
	}
	rg.requireAuth(t, "/api", "Bearer tok-1")

	do(t, "GET", "http://"+addr+"/api/items", "", "Authorization", "Bearer agent-token")
	rg.requireAuth(t, "/api with the agent's Authorization (overwrite)", "Bearer tok-1")

	do(t, "GET", "http://"+addr+"/plain/items", "")
	rg.requireAuth(t, "/plain (filter disabled)")

	do(t, "GET", "http://"+addr+"/plain/items", "", "Authorization", "Bearer agent-token")
	rg.requireAuth(t, "/plain with the agent's Authorization", "Bearer agent-token")

	if n := len(rg.authz.all()); n != 0 {
		t.Fatalf("ext_authz got %d Checks, want none (disabled on both routes)", n)
	}
}

// TestCredentialInjectorKeepsExistingWithoutOverwrite: without overwrite a header the
// agent sent stays (generic_impl.cc inject: AlreadyExists, the filter continues); a
// request without one gets the credential.
func TestCredentialInjectorKeepsExistingWithoutOverwrite(t *testing.T) {
	rg := newCredRig(t, credOptions{token: ptr("tok-1"), edit: func(c *credinjv3.CredentialInjector) { c.Overwrite = false }})
	_, addr := rg.start(t)

	resp, _ := do(t, "GET", "http://"+addr+"/api/items", "", "Authorization", "Bearer agent-token")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/api with Authorization: %d", resp.StatusCode)
	}
	rg.requireAuth(t, "/api with the agent's Authorization", "Bearer agent-token")

	do(t, "GET", "http://"+addr+"/api/items", "")
	rg.requireAuth(t, "/api without", "Bearer tok-1")
}

// TestCredentialInjectorSecretValues: trailing CR and LF are stripped from the secret;
// a secret that is empty then is a failed injection, answered 401 "Failed to inject
// credential." by the filter, and nothing reaches the upstream.
func TestCredentialInjectorSecretValues(t *testing.T) {
	for _, c := range []struct {
		name, token string
		want        string // "": the request is refused
	}{
		{"trailing newline", "tok-1\r\n", "Bearer tok-1"},
		{"empty", "", ""},
		{"only a newline", "\n", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			rg := newCredRig(t, credOptions{token: ptr(c.token)})
			_, addr := rg.start(t)
			resp, body := do(t, "GET", "http://"+addr+"/api/items", "", "Authorization", "Bearer agent-token")
			if c.want != "" {
				if resp.StatusCode != http.StatusOK {
					t.Fatalf("status %d, want 200", resp.StatusCode)
				}
				rg.requireAuth(t, c.name, c.want)
				return
			}
			if resp.StatusCode != http.StatusUnauthorized || body != "Failed to inject credential." {
				t.Fatalf("got %d %q, want 401 %q", resp.StatusCode, body, "Failed to inject credential.")
			}
			if ct := resp.Header.Get("content-type"); ct != "text/plain" {
				t.Fatalf("content-type %q, want text/plain (a local reply)", ct)
			}
			rg.requireNoHit(t, c.name)
		})
	}
}

// TestCredentialInjectorAllowWithoutCredential: with allow_request_without_credential
// a failed injection forwards the request as it came.
func TestCredentialInjectorAllowWithoutCredential(t *testing.T) {
	rg := newCredRig(t, credOptions{token: ptr(""), edit: func(c *credinjv3.CredentialInjector) { c.AllowRequestWithoutCredential = true }})
	_, addr := rg.start(t)
	resp, _ := do(t, "GET", "http://"+addr+"/api/items", "")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d, want 200", resp.StatusCode)
	}
	rg.requireAuth(t, "empty secret, allowed without")
}

// TestCredentialInjectorLocalReplyThroughCORS: the filter's 401 is a local reply
// encoded through the filters before it, so the CORS filter adds its headers as it
// does to ext_authz's replies.
func TestCredentialInjectorLocalReplyThroughCORS(t *testing.T) {
	rg := newCredRig(t, credOptions{token: ptr(""), cors: true})
	_, addr := rg.start(t)
	resp, body := do(t, "GET", "http://"+addr+"/api/items", "", "Origin", "https://app.example.com")
	if resp.StatusCode != http.StatusUnauthorized || body != "Failed to inject credential." {
		t.Fatalf("got %d %q, want the filter's 401", resp.StatusCode, body)
	}
	requireHeaders(t, "401", resp.Header, map[string]string{
		"access-control-allow-origin": "https://app.example.com", "access-control-allow-credentials": "true",
	})
	rg.requireNoHit(t, "401")
}

// TestCredentialInjectorSDSUpdate: a new token pushed over SDS alone is injected from
// the next request on; the listener is neither updated nor re-bound, and a connection
// opened before the push carries on.
func TestCredentialInjectorSDSUpdate(t *testing.T) {
	rg := newCredRig(t, credOptions{token: ptr("tok-1")})
	e, addr := rg.start(t)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	t.Cleanup(client.CloseIdleConnections)
	get := func() (reused bool) {
		t.Helper()
		req, err := http.NewRequest("GET", "http://"+addr+"/api/items", nil)
		if err != nil {
			t.Fatal(err)
		}
		req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
			GotConn: func(i httptrace.GotConnInfo) { reused = i.Reused },
		}))
		resp, _ := getBodyReq(t, client, req)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		return reused
	}
	get()
	rg.requireAuth(t, "before the push", "Bearer tok-1")

	rg.setToken(t, "s2", "tok-2")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.Wait(ctx, func(e *Emulator) bool { return e.Version(resource.SecretType) == "s2" }); err != nil {
		t.Fatalf("secret s2 not applied: %v (NACKs: %v)", err, e.NACKs())
	}
	if !get() {
		t.Fatal("the connection opened before the push was not reused")
	}
	rg.requireAuth(t, "after the push", "Bearer tok-2")
	if got := e.Listener("outbound"); got != addr {
		t.Fatalf("listener re-bound: %s, was %s", got, addr)
	}
	if v := e.Version(resource.ListenerType); v != "v1" {
		t.Fatalf("listener version %q, want v1 (the push was SDS only)", v)
	}
}

// TestCredentialInjectorListenerWaitsForSecret: the injector's SDS subscription is an
// init target of the listener, so the listener does not serve until the secret's first
// response, and does once it comes.
func TestCredentialInjectorListenerWaitsForSecret(t *testing.T) {
	rg := newCredRig(t, credOptions{})
	e, err := Start(context.Background(), Options{XDSAddress: rg.cp.addr, NodeCluster: "test", Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// RDS is subscribed after the LDS response was applied (listeners bound or not),
	// so once it is ACKed the listener would be serving if it did not wait.
	if err := e.Wait(ctx, func(e *Emulator) bool { return e.Version(resource.RouteType) == "v1" }); err != nil {
		t.Fatalf("%v (NACKs: %v)", err, e.NACKs())
	}
	if a := e.Listener("outbound"); a != "" {
		t.Fatalf("listener bound on %s before its secret arrived", a)
	}
	if err := e.cfg.Load().warm(); err == nil || !strings.Contains(err.Error(), credSecret) {
		t.Fatalf("warm: %v, want the listener waiting for %s", err, credSecret)
	}

	rg.setToken(t, "s2", "tok-1")
	if err := e.Wait(ctx, func(e *Emulator) bool { return e.Listener("outbound") != "" }); err != nil {
		t.Fatalf("listener not bound after the secret arrived: %v", err)
	}
	do(t, "GET", "http://"+e.Listener("outbound")+"/api/items", "")
	rg.requireAuth(t, "once warm", "Bearer tok-1")
}

// TestCredentialInjectorNotEmulated: what the emulator does not implement is NACKed,
// naming the filter and the reason.
func TestCredentialInjectorNotEmulated(t *testing.T) {
	oauth2 := must(t, func() (*anypb.Any, error) {
		return anypb.New(&oauth2v3.OAuth2{TokenEndpoint: &corev3.HttpUri{Uri: "https://idp.example.com/token"}})
	})
	withSecret := func(ref *tlsv3.SdsSecretConfig) func(*credinjv3.CredentialInjector) {
		return func(c *credinjv3.CredentialInjector) {
			c.Credential.TypedConfig = must(t, func() (*anypb.Any, error) {
				return anypb.New(&genericv3.Generic{Credential: ref, HeaderValuePrefix: "Bearer "})
			})
		}
	}
	for _, c := range []struct {
		name string
		edit func(*credinjv3.CredentialInjector)
		want string
	}{
		{"oauth2", func(c *credinjv3.CredentialInjector) {
			c.Credential = &corev3.TypedExtensionConfig{Name: "envoy.http.injected_credentials.oauth2", TypedConfig: oauth2}
		}, "injected_credentials.oauth2.v3.OAuth2) is not emulated"},
		{"unregistered", func(c *credinjv3.CredentialInjector) {
			c.Credential = &corev3.TypedExtensionConfig{Name: "x", TypedConfig: must(t, func() (*anypb.Any, error) {
				return anypb.New(&routev3.FilterConfig{})
			})}
		}, "didn't find a registered implementation for 'x'"},
		{"spire sds_config", withSecret(envoy.SecretRef(credSecret, envoy.SpireSDS())), "only sds_config.ads is emulated"},
		{"static secret", withSecret(&tlsv3.SdsSecretConfig{Name: credSecret}), "without sds_config (a static bootstrap secret) is not emulated"},
		{"no credential", func(c *credinjv3.CredentialInjector) { c.Credential = nil }, "Credential: value is required"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rg := newCredRig(t, credOptions{token: ptr("tok-1"), edit: c.edit})
			e, n := startUntilNACK(t, Options{XDSAddress: rg.cp.addr, NodeCluster: "test"}, 5*time.Second)
			if !strings.Contains(n, `http filter "`+credFilter+`"`) || !strings.Contains(n, c.want) {
				t.Fatalf("NACK %q, want the filter named and %q", n, c.want)
			}
			if v := e.Version(resource.ListenerType); v != "" {
				t.Fatalf("a NACKed listener was ACKed: %q", v)
			}
		})
	}
}

// getBodyReq does req with c and returns the response with its body (read and closed).
func getBodyReq(t testing.TB, c *http.Client, req *http.Request) (*http.Response, string) {
	t.Helper()
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}
