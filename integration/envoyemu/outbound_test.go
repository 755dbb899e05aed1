package envoyemu

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/extauthz"
	"github.com/mcpgate/mcpgate/extauthz/bearer"
	"github.com/mcpgate/mcpgate/extauthz/credentials"
	"github.com/mcpgate/mcpgate/integration/idp"
	"github.com/mcpgate/mcpgate/policy"
	"github.com/mcpgate/mcpgate/xds"
)

// outboundEnv is an agent's sidecar (emulated) programmed by mcpgate in process (xDS
// and ext_authz), two HTTPEndpoints on one upstream — "plain" without auth, "tokened"
// with client credentials from a real OAuth 2.0 server — and the upstream recording
// the Authorization header of every request.
type outboundEnv struct {
	as       *idp.Server
	outbound string // the sidecar's outbound listener
	checks   atomic.Int64

	mu     sync.Mutex
	auths  []string
	forged []string // the mcpgate headers the upstream got (call forges each)
}

// How the sidecar gets the token: injected from SDS while mcpgate has it (what mcpgate
// serve does), or from a Check on every call (the path while it has none).
const (
	viaSDS      = true
	viaExtAuthz = false
)

const outboundEnvPolicy = `apiVersion: mcpgate.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  mtls: disabled
  authz: {address: "mcpgate:9001"}
---
apiVersion: mcpgate.dev/v1alpha1
kind: App
metadata: {name: my-agent}
spec:
  sidecar: {address: 127.0.0.1, inboundPort: 15006, outboundPort: 3500}
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: plain}
spec:
  baseUrl: http://UPSTREAM/api/
---
apiVersion: mcpgate.dev/v1alpha1
kind: HTTPEndpoint
metadata: {name: tokened}
spec:
  baseUrl: http://UPSTREAM/api/
  headers: {x-tenant: acme}
  callers: [my-agent]
  auth:
    clientCredentials: {tokenUrl: TOKEN_URL, clientId: agent-sidecar, clientSecretFile: SECRET_FILE, audience: "https://upstream.example.com"}
`

func requireOutboundEnv(t testing.TB, injected bool) *outboundEnv {
	t.Helper()
	env := &outboundEnv{}
	env.as = idp.Start(t, idp.Client{ID: "agent-sidecar", Secret: "sidecar-secret", Audiences: []string{"https://upstream.example.com"}})
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		env.mu.Lock()
		env.auths = append(env.auths, r.Header.Get("Authorization")+"|"+r.Header.Get("X-Tenant"))
		for _, h := range contract.SetHeaders() {
			if v := r.Header.Values(h); len(v) > 0 {
				env.forged = append(env.forged, h+": "+strings.Join(v, ","))
			}
		}
		env.mu.Unlock()
		_, _ = io.WriteString(w, "ok "+r.URL.Path)
	})}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = up.Serve(lis) }()
	t.Cleanup(func() { _ = up.Close() })

	dir := t.TempDir()
	secret := filepath.Join(dir, "secret")
	if err := os.WriteFile(secret, []byte("sidecar-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	pol := strings.NewReplacer("UPSTREAM", lis.Addr().String(), "TOKEN_URL", env.as.TokenURL(), "SECRET_FILE", secret).Replace(outboundEnvPolicy)
	if err := os.WriteFile(filepath.Join(dir, "policy.yaml"), []byte(pol), 0o644); err != nil {
		t.Fatal(err)
	}
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	store := policy.NewStore(snap)
	ctx, cancel := context.WithCancel(context.Background())
	sources := credentials.NewSources() // shared, as mcpgate serve does
	xo := xds.Options{Store: store}
	if injected {
		xo.Tokens = sources
	}
	x, err := xds.NewServer(ctx, xo)
	if err != nil {
		t.Fatal(err)
	}
	authz, err := extauthz.NewServer(extauthz.Options{Store: store, Verifier: bearer.NewVerifier(bearer.Options{}), Credentials: sources})
	if err != nil {
		t.Fatal(err)
	}
	countChecks := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if strings.HasSuffix(info.FullMethod, "/Check") {
			env.checks.Add(1)
		}
		return h(ctx, req)
	}
	g := grpc.NewServer(append(extauthz.ServerOptions(), grpc.ChainUnaryInterceptor(countChecks))...)
	x.Register(g)
	authv3.RegisterAuthorizationServer(g, authz)
	grpcAddr := requireGRPC(t, g)
	done := make(chan struct{})
	go func() { _ = x.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); g.Stop(); <-done; authz.Close() })

	emu := requireEmulator(t, Options{XDSAddress: grpcAddr, NodeCluster: "my-agent", NodeID: "my-agent-1",
		Resolve: func(host string, port uint32) string {
			if host == "mcpgate" {
				return grpcAddr
			}
			return net.JoinHostPort(host, strconv.Itoa(int(port)))
		}})
	env.outbound = emu.Listener("outbound")
	if env.outbound == "" {
		t.Fatal("outbound listener not bound")
	}
	return env
}

func (env *outboundEnv) call(t testing.TB, c *http.Client, endpoint, auth string) (int, string) {
	req, err := http.NewRequest(http.MethodGet, "http://"+env.outbound+"/v1.0/invoke/"+endpoint+"/method/tools", nil)
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	for _, h := range contract.SetHeaders() {
		req.Header.Set(h, "forged-by-the-agent")
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (env *outboundEnv) lastAuth() string {
	env.mu.Lock()
	defer env.mu.Unlock()
	if len(env.auths) == 0 {
		return "(none)"
	}
	return env.auths[len(env.auths)-1]
}

// TestOutboundCredentialInjection: the upstream gets mcpgate's token, never the agent's,
// with the route's spec.headers, and on the route without auth the router removes the
// agent's header (request_headers_to_remove). Both ways the sidecar gets the token:
// mcpgate's OK answer applied as Envoy's ext_authz filter does (the header overwritten
// before the router forwards), and, once mcpgate has the token, Envoy's credential
// injector from the SDS secret, with no Check at all.
func TestOutboundCredentialInjection(t *testing.T) {
	for _, tc := range []struct {
		name     string
		injected bool
	}{{"sds", viaSDS}, {"ext_authz", viaExtAuthz}} {
		t.Run(tc.name, func(t *testing.T) {
			env := requireOutboundEnv(t, tc.injected)
			c := &http.Client{Timeout: 10 * time.Second}
			if tc.injected {
				// The sidecar connected, mcpgate fetched the token and pushed it: calls
				// stop reaching ext_authz (the first may still have).
				deadline := time.Now().Add(10 * time.Second)
				for before := env.checks.Load(); ; before = env.checks.Load() {
					if code, body := env.call(t, c, "tokened", ""); code != 200 {
						t.Fatalf("tokened: %d %s", code, body)
					}
					if env.checks.Load() == before {
						break
					}
					if time.Now().After(deadline) {
						t.Fatal("calls still ask ext_authz for the token")
					}
				}
			}
			checks := env.checks.Load()
			for range 20 {
				code, body := env.call(t, c, "tokened", "Bearer agent-token")
				if code != 200 || body != "ok /api/tools" {
					t.Fatalf("tokened: %d %q", code, body)
				}
				got := env.lastAuth()
				if !strings.HasPrefix(got, "Bearer ey") || strings.Contains(got, "agent-token") || !strings.HasSuffix(got, "|acme") {
					t.Fatalf("upstream got %q, want the acquired token and x-tenant", got)
				}
			}
			switch n := env.checks.Load() - checks; {
			case tc.injected && n != 0:
				t.Errorf("%d Checks for 20 calls with an injected token, want none", n)
			case !tc.injected && n != 20:
				t.Errorf("%d Checks for 20 calls, want 20", n)
			}
			if code, _ := env.call(t, c, "plain", "Bearer agent-token"); code != 200 || env.lastAuth() != "|" {
				t.Fatalf("plain: %d, upstream got %q, want no Authorization", code, env.lastAuth())
			}
			if n := env.as.Count("client_credentials"); n != 1 {
				t.Errorf("%d tokens issued, want 1", n)
			}
			env.mu.Lock()
			defer env.mu.Unlock()
			if len(env.forged) > 0 {
				t.Errorf("the upstreams got the agent's copies of mcpgate's headers, %d times: %q", len(env.forged), env.forged[:min(4, len(env.forged))])
			}
		})
	}
}

// TestOutboundEscapedSlashes: an agent cannot leave an HTTPEndpoint's baseUrl path with
// encoded slashes. Envoy would forward "..%2F..%2Fadmin" as it is after prefix_rewrite,
// as "/api/..%2F..%2Fadmin" with mcpgate's token, to an upstream that may decode it
// before routing (Go's server does: r.URL.Path "/api/../../admin"); the sidecar refuses
// it with a 400 before ext_authz, and the upstream sees nothing. Encoded slashes in the
// query, and plain calls, still go through.
func TestOutboundEscapedSlashes(t *testing.T) {
	env := requireOutboundEnv(t, viaExtAuthz)
	c := &http.Client{Timeout: 10 * time.Second}
	send := func(method, path string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(method, "http://"+env.outbound+path, strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer agent-token")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := env.call(t, c, "tokened", ""); code != 200 || body != "ok /api/tools" {
		t.Fatalf("tokened: %d %q", code, body)
	}
	env.mu.Lock()
	seen := len(env.auths)
	env.mu.Unlock()
	checks := env.checks.Load()
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		for _, p := range []string{
			"/v1.0/invoke/tokened/method/..%2F..%2Fadmin%2Fusers",
			"/v1.0/invoke/tokened/method/..%2f..%2fadmin",
			"/v1.0/invoke/tokened/method/..%5C..%5Cadmin",
			"/v1.0/invoke/plain/method/..%2F..%2Fadmin%2Fusers",
		} {
			if code, body := send(method, p); code != http.StatusBadRequest {
				t.Errorf("%s %s: %d %q, want 400", method, p, code, body)
			}
		}
	}
	env.mu.Lock()
	reached := env.auths[seen:]
	env.mu.Unlock()
	if len(reached) > 0 {
		t.Fatalf("refused requests reached the upstream %d times: %q", len(reached), reached)
	}
	if n := env.checks.Load() - checks; n != 0 {
		t.Errorf("refused requests reached ext_authz %d times, want none (the HCM answers before any filter)", n)
	}
	if code, body := send(http.MethodPost, "/v1.0/invoke/tokened/method/tools?next=%2Fadmin"); code != 200 || body != "ok /api/tools" {
		t.Fatalf("escaped slash in the query: %d %q", code, body)
	}
	if code, body := env.call(t, c, "tokened", ""); code != 200 || body != "ok /api/tools" || !strings.HasPrefix(env.lastAuth(), "Bearer ey") {
		t.Fatalf("tokened after the refusals: %d %q, upstream got %q", code, body, env.lastAuth())
	}
}

// BenchmarkOutboundCredentials is the cost of credentials on the outbound path: the
// same request through the emulated sidecar to one upstream, on a route without auth
// and on one with client credentials, alternating so both see the same machine noise.
// added-p50-µs is the difference of the p50s (issue 13: ≤ 50 µs). sds is what mcpgate
// serve does once it has the token (Envoy injects it); ext_authz is a Check per call,
// the path while there is none.
func BenchmarkOutboundCredentials(b *testing.B) {
	b.Run("sds", func(b *testing.B) { benchOutbound(b, viaSDS) })
	b.Run("ext_authz", func(b *testing.B) { benchOutbound(b, viaExtAuthz) })
}

func benchOutbound(b *testing.B, injected bool) {
	env := requireOutboundEnv(b, injected)
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	for _, ep := range []string{"plain", "tokened"} {
		if code, body := env.call(b, c, ep, ""); code != 200 { // warm connections and the token cache
			b.Fatalf("%s: %d %s", ep, code, body)
		}
	}
	if injected {
		deadline := time.Now().Add(10 * time.Second)
		for before := int64(-1); before != env.checks.Load(); {
			if time.Now().After(deadline) {
				b.Fatal("calls still ask ext_authz for the token")
			}
			before = env.checks.Load()
			env.call(b, c, "tokened", "")
		}
	}
	checks := env.checks.Load()
	timed := func(ep string) time.Duration {
		t0 := time.Now()
		if code, _ := env.call(b, c, ep, ""); code != 200 {
			b.Fatalf("%s: %d", ep, code)
		}
		return time.Since(t0)
	}
	var plain, tokened []time.Duration
	i := 0
	for b.Loop() {
		if i%2 == 0 {
			plain, tokened = append(plain, timed("plain")), append(tokened, timed("tokened"))
		} else {
			tokened, plain = append(tokened, timed("tokened")), append(plain, timed("plain"))
		}
		i++
	}
	p50 := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	pp, pt := p50(plain), p50(tokened)
	b.ReportMetric(float64(pp.Nanoseconds())/1e3, "no-auth-p50-µs")
	b.ReportMetric(float64(pt.Nanoseconds())/1e3, "auth-p50-µs")
	b.ReportMetric(float64((pt-pp).Nanoseconds())/1e3, "added-p50-µs")
	if n := env.as.Count("client_credentials"); n != 1 {
		b.Errorf("%d tokens issued during the benchmark, want 1", n)
	}
	if n := env.checks.Load() - checks; injected && n != 0 {
		b.Errorf("%d Checks with the token injected, want none", n)
	}
}
