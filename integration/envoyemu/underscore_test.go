package envoyemu

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/mcpgate/mcpgate/envoy"
	"github.com/mcpgate/mcpgate/envoy/contract"
)

// underscoreNode is an emulator whose one listener "main" (built with mcpgate's HCM
// builder, then given action) forwards everything to an upstream that records the
// headers it receives.
func underscoreNode(t *testing.T, action *corev3.HttpProtocolOptions_HeadersWithUnderscoresAction) (addr string, hits chan http.Header) {
	t.Helper()
	return hcmNode(t, envoy.HCMOptions{}, func(hcm *hcmv3.HttpConnectionManager) {
		if action != nil {
			hcm.CommonHttpProtocolOptions.HeadersWithUnderscoresAction = *action
		}
	})
}

// hcmNode is an emulator whose one listener "main" has the HCM mcpgate builds from o
// (its stat prefix, route configuration and filters set here: the router only), then
// given edit's changes if any, and forwards everything with a 10s timeout to an
// upstream that records the headers it receives and answers "hello".
func hcmNode(t *testing.T, o envoy.HCMOptions, edit func(*hcmv3.HttpConnectionManager)) (addr string, hits chan http.Header) {
	t.Helper()
	hits = make(chan http.Header, 4)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits <- r.Header.Clone()
		_, _ = io.WriteString(w, "hello")
	}))
	t.Cleanup(up.Close)
	o.StatPrefix, o.RouteConfig, o.Filters = "main", "main", []*hcmv3.HttpFilter{must(t, envoy.RouterFilter)}
	hcm := envoy.HTTPConnectionManager(o)
	if edit != nil {
		edit(hcm)
	}
	chain := must(t, func() (*listenerv3.FilterChain, error) { return envoy.HTTPFilterChain("main", hcm, nil) })
	lis := envoy.Listener(envoy.ListenerOptions{Name: "main", Address: "127.0.0.1", Port: 10000, Chains: []*listenerv3.FilterChain{chain}})
	host, port := splitHostPort(t, up.Listener.Addr().String())
	cl, cla := mustCluster(t, envoy.ClusterOptions{Name: "upstream", Host: host, Port: port})
	rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, []*routev3.Route{
		envoy.Forward("all", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "upstream", Timeout: 10 * time.Second}),
	}))
	xdsAddr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {cl}, resource.EndpointType: {cla},
	})
	e := requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "test"})
	if addr = e.Listener("main"); addr == "" {
		t.Fatal("listener main not bound")
	}
	return addr, hits
}

// h2cClient speaks HTTP/2 with prior knowledge on plaintext, as the HCM's codec_type AUTO
// accepts it.
func h2cClient(t *testing.T) *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	tr := &http.Transport{Protocols: p}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// headers_with_underscores_action as Envoy's codecs apply it to downstream requests
// (api/envoy/config/core/v3/protocol.proto HttpProtocolOptions).
func TestHeadersWithUnderscoresAction(t *testing.T) {
	hdr := []string{"x_mcpgate_caller_app_id", "admin", "x-plain", "kept"}

	t.Run("ALLOW", func(t *testing.T) {
		addr, hits := underscoreNode(t, corev3.HttpProtocolOptions_ALLOW.Enum())
		resp, body := do(t, "GET", "http://"+addr+"/x", "", hdr...)
		if resp.StatusCode != 200 || body != "hello" {
			t.Fatalf("got %d %q", resp.StatusCode, body)
		}
		if got := (<-hits).Get("x_mcpgate_caller_app_id"); got != "admin" {
			t.Fatalf("the upstream got x_mcpgate_caller_app_id %q, want it passed through", got)
		}
	})

	t.Run("DROP_HEADER", func(t *testing.T) {
		addr, hits := underscoreNode(t, corev3.HttpProtocolOptions_DROP_HEADER.Enum())
		for _, c := range []*http.Client{http.DefaultClient, h2cClient(t)} {
			req, _ := http.NewRequest("GET", "http://"+addr+"/x", nil)
			req.Header.Set("x_mcpgate_caller_app_id", "admin")
			req.Header.Set("x-plain", "kept")
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 {
				t.Fatalf("%s: got %d", resp.Proto, resp.StatusCode)
			}
			got := <-hits
			if v, ok := got["X_mcpgate_caller_app_id"]; ok || got.Get("x_mcpgate_caller_app_id") != "" {
				t.Fatalf("%s: the upstream got the underscore header %q", resp.Proto, v)
			}
			if got.Get("x-plain") != "kept" {
				t.Fatalf("%s: the upstream lost x-plain: %v", resp.Proto, got)
			}
		}
	})

	t.Run("REJECT_REQUEST", func(t *testing.T) {
		addr, hits := underscoreNode(t, corev3.HttpProtocolOptions_REJECT_REQUEST.Enum())
		// HTTP/1: 400 and the connection closes.
		resp, body := do(t, "GET", "http://"+addr+"/x", "", hdr...)
		if resp.StatusCode != http.StatusBadRequest || body != "Bad Request" || !resp.Close {
			t.Fatalf("got %d %q (close %v), want 400 Bad Request and connection: close", resp.StatusCode, body, resp.Close)
		}
		// HTTP/2: the stream is reset.
		req, _ := http.NewRequest("GET", "http://"+addr+"/x", nil)
		req.Header.Set("x_mcpgate_caller_app_id", "admin")
		if resp, err := h2cClient(t).Do(req); err == nil {
			resp.Body.Close()
			t.Fatalf("HTTP/2: got %d, want the stream reset", resp.StatusCode)
		}
		// A mixed spelling is rejected too; a request without underscores passes.
		resp, _ = do(t, "GET", "http://"+addr+"/x", "", "x-mcpgate_subject", "alice")
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("x-mcpgate_subject: got %d, want 400", resp.StatusCode)
		}
		select {
		case h := <-hits:
			t.Fatalf("a rejected request reached the upstream: %v", h)
		default:
		}
		if resp, body := do(t, "GET", "http://"+addr+"/x", "", "x-plain", "kept"); resp.StatusCode != 200 || body != "hello" {
			t.Fatalf("a request without underscores: %d %q", resp.StatusCode, body)
		}
	})

	t.Run("undefined is NACKed", func(t *testing.T) {
		hcm := envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "main", RouteConfig: "main",
			Filters: []*hcmv3.HttpFilter{must(t, envoy.RouterFilter)}})
		hcm.CommonHttpProtocolOptions.HeadersWithUnderscoresAction = 7
		chain := must(t, func() (*listenerv3.FilterChain, error) { return envoy.HTTPFilterChain("main", hcm, nil) })
		lis := envoy.Listener(envoy.ListenerOptions{Name: "main", Address: "127.0.0.1", Port: 10000, Chains: []*listenerv3.FilterChain{chain}})
		rc := envoy.RouteConfiguration("main", envoy.VirtualHost("main", []string{"*"}, nil))
		addr := requireADS(t, map[resource.Type][]types.Resource{resource.ListenerType: {lis}, resource.RouteType: {rc}})
		if _, n := startUntilNACK(t, Options{XDSAddress: addr, NodeCluster: "test"}, 5*time.Second); !strings.Contains(n, "headers_with_underscores_action") {
			t.Fatalf("NACK %q", n)
		}
	})

	t.Run("default is mcpgate's REJECT_REQUEST", func(t *testing.T) {
		addr, _ := underscoreNode(t, nil)
		if resp, _ := do(t, "GET", "http://"+addr+"/x", "", hdr...); resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("got %d, want 400 from the HCM mcpgate builds", resp.StatusCode)
		}
	})
}

// The rejection happens in the codec, before any filter: the raw request line carries
// the header exactly as a caller would type it.
func TestHeadersWithUnderscoresRawHTTP1(t *testing.T) {
	addr, hits := underscoreNode(t, nil)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET /x HTTP/1.1\r\nHost: a\r\nX_MCPGATE_CALLER_APP_ID: admin\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(conn)
	resp, err := http.ReadResponse(rd, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Read the body out: with connection: close, Close would leave it unread, and it may
	// come in a segment of its own after the headers.
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("got %d, want 400", resp.StatusCode)
	}
	// Envoy closes the connection after a codec error.
	if _, err := rd.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("connection still open after the 400: %v", err)
	}
	select {
	case h := <-hits:
		t.Fatalf("a rejected request reached the upstream: %v", h)
	default:
	}
}

// Through mcpgate's generated configuration (demo policy, inbound sidecar with
// ext_authz and ext_proc): a valid token with a forged underscore identity header is
// answered 400 by the sidecar, and the MCP app never sees it.
func TestMCPGateUnderscoreIdentityHeaderRejected(t *testing.T) {
	env := requireGate(t)
	for _, name := range []string{"x_mcpgate_caller_app_id", "dapr_caller_app_id", "x-mcpgate_subject"} {
		resp, body := do(t, "POST", "http://"+env.inbound+"/mcp", toolCall(6, "get_inventory", `{"product_id":"SKU-1"}`),
			"content-type", "application/json", "accept", "application/json, text/event-stream",
			"mcp-protocol-version", "2025-06-18", "authorization", env.token(t), name, "admin")
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("%s: got %d %q, want 400", name, resp.StatusCode, body)
		}
	}
	if got := env.receivedBodies(); len(got) != 0 {
		t.Fatalf("a request with a forged identity header reached the app: %q", got)
	}
	// The same call without it goes through.
	resp, body := env.post(t, env.token(t), toolCall(7, "get_inventory", `{"product_id":"SKU-1"}`))
	if resp.StatusCode != 200 || !strings.Contains(body, "42 in stock") {
		t.Fatalf("clean call: %d %q", resp.StatusCode, body)
	}
}

// Defense in depth: on a listener that lets underscores through (ALLOW), mcpgate's
// ext_authz still strips every spelling of its identity headers, so the app sees only
// the identity mcpgate verified.
func TestMCPGateExtAuthzStripsUnderscoreSpellings(t *testing.T) {
	env := requireGate(t)
	hits := make(chan http.Header, 1)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits <- r.Header.Clone()
		_, _ = io.WriteString(w, "hello")
	}))
	t.Cleanup(app.Close)

	authzFilter := must(t, func() (*hcmv3.HttpFilter, error) { return envoy.ExtAuthzFilter("authz") })
	hcm := envoy.HTTPConnectionManager(envoy.HCMOptions{StatPrefix: "inbound", RouteConfig: "inbound",
		Filters: []*hcmv3.HttpFilter{authzFilter, must(t, envoy.RouterFilter)}})
	hcm.CommonHttpProtocolOptions.HeadersWithUnderscoresAction = corev3.HttpProtocolOptions_ALLOW
	chain := must(t, func() (*listenerv3.FilterChain, error) { return envoy.HTTPFilterChain("inbound", hcm, nil) })
	lis := envoy.Listener(envoy.ListenerOptions{Name: "inbound", Address: "127.0.0.1", Port: 15006, Chains: []*listenerv3.FilterChain{chain}})
	ctx := must(t, func() (*anypb.Any, error) {
		return envoy.ExtAuthzContext(map[string]string{contract.ContextAppID: "inventory"})
	})
	rc := envoy.RouteConfiguration("inbound", envoy.VirtualHost("inbound", []string{"*"}, []*routev3.Route{
		envoy.Forward("mcp", envoy.Prefix("/"), envoy.ForwardOptions{Cluster: "app", Timeout: 10 * time.Second,
			PerFilter: map[string]*anypb.Any{envoy.FilterExtAuthz: ctx}}),
	}))
	appHost, appPort := splitHostPort(t, app.Listener.Addr().String())
	appCluster, appCLA := mustCluster(t, envoy.ClusterOptions{Name: "app", Host: appHost, Port: appPort})
	authzHost, authzPort := splitHostPort(t, env.xds)
	authzCluster, authzCLA := mustCluster(t, envoy.ClusterOptions{Name: "authz", Host: authzHost, Port: authzPort, Protocol: envoy.HTTP2})
	xdsAddr := requireADS(t, map[resource.Type][]types.Resource{
		resource.ListenerType: {lis}, resource.RouteType: {rc},
		resource.ClusterType: {appCluster, authzCluster}, resource.EndpointType: {appCLA, authzCLA},
	})
	e := requireEmulator(t, Options{XDSAddress: xdsAddr, NodeCluster: "test"})

	resp, body := do(t, "POST", "http://"+e.Listener("inbound")+"/mcp", toolCall(8, "get_inventory", `{"product_id":"SKU-1"}`),
		"content-type", "application/json", "authorization", env.token(t),
		"x_mcpgate_caller_app_id", "admin", "dapr_caller_app_id", "admin", "x-mcpgate_subject", "root")
	if resp.StatusCode != 200 || body != "hello" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
	got := <-hits
	for k := range got {
		if strings.Contains(k, "_") {
			t.Errorf("the app received %s: %q", k, got[k])
		}
	}
	if id := got.Get(contract.HeaderCallerAppID); id != "my-agent" {
		t.Errorf("the app received %s %q, want my-agent", contract.HeaderCallerAppID, id)
	}
}
