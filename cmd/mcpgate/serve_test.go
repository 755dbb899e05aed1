package main

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/mcpgate/mcpgate/policy"
)

func TestCheckListenSecurity(t *testing.T) {
	tlsOn := transportSecurity{workloadAPI: "unix:///run/spire/agent.sock"}
	for _, tc := range []struct {
		name        string
		grpc, xds   string
		ts          transportSecurity
		insecure    bool
		wantRefused []string // flags named in the error; nil: serve starts
		wantExposed []string // flags returned as exposed (warned about)
	}{
		{name: "defaults", grpc: "127.0.0.1:9001", xds: "127.0.0.1:18000"},
		{name: "loopback v4, all of 127/8", grpc: "127.0.0.2:9001", xds: "127.255.0.1:18000"},
		{name: "loopback v6", grpc: "[::1]:9001", xds: "[::1]:0"},
		{name: "v4-mapped loopback", grpc: "[::ffff:127.0.0.1]:9001", xds: "127.0.0.1:0"},
		{name: "localhost", grpc: "localhost:9001", xds: "LOCALHOST:18000"},
		{name: "disabled", grpc: "", xds: ""},
		{name: "unspecified v4", grpc: "0.0.0.0:9001", xds: "127.0.0.1:18000", wantRefused: []string{"--grpc-addr"}, wantExposed: []string{"--grpc-addr"}},
		{name: "unspecified v6", grpc: "127.0.0.1:9001", xds: "[::]:18000", wantRefused: []string{"--xds-addr"}, wantExposed: []string{"--xds-addr"}},
		{name: "empty host: every interface", grpc: ":9001", xds: "", wantRefused: []string{"--grpc-addr"}, wantExposed: []string{"--grpc-addr"}},
		{name: "external IPs", grpc: "10.0.0.5:9001", xds: "[2001:db8::1]:18000", wantRefused: []string{"--grpc-addr", "--xds-addr"}, wantExposed: []string{"--grpc-addr", "--xds-addr"}},
		{name: "host names other than localhost", grpc: "mcpgate:9001", xds: "localhost.example.com:18000", wantRefused: []string{"--grpc-addr", "--xds-addr"}, wantExposed: []string{"--grpc-addr", "--xds-addr"}},
		{name: "--insecure-listen accepts, and reports for the warning", grpc: "0.0.0.0:9001", xds: "[::]:18000", insecure: true, wantExposed: []string{"--grpc-addr", "--xds-addr"}},
		{name: "--insecure-listen on loopback exposes nothing", grpc: "127.0.0.1:9001", xds: "127.0.0.1:18000", insecure: true},
		{name: "SPIFFE mTLS anywhere", grpc: "0.0.0.0:9001", xds: "[::]:18000", ts: tlsOn},
		{name: "SPIFFE mTLS on an external IP", grpc: "10.0.0.5:9001", xds: "mcpgate:18000", ts: tlsOn},
		{name: "not an address: left to net.Listen", grpc: "0.0.0.0", xds: "127.0.0.1:18000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &serveFlags{grpcAddr: tc.grpc, xdsAddr: tc.xds, insecureListen: tc.insecure}
			exposed, err := checkListenSecurity(f, tc.ts)
			var gotExposed []string
			for _, l := range exposed {
				gotExposed = append(gotExposed, l.flag)
			}
			if !slices.Equal(gotExposed, tc.wantExposed) {
				t.Errorf("exposed %v, want %v", gotExposed, tc.wantExposed)
			}
			if tc.wantRefused == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, errPlaintextBeyondLoopback) {
				t.Fatalf("got %v, want errPlaintextBeyondLoopback", err)
			}
			addrs := map[string]string{"--grpc-addr": tc.grpc, "--xds-addr": tc.xds}
			for _, flag := range []string{"--grpc-addr", "--xds-addr"} {
				named := strings.Contains(err.Error(), flag+" "+addrs[flag]+":")
				if want := slices.Contains(tc.wantRefused, flag); named != want {
					t.Errorf("error names %s %s: %v, want %v: %v", flag, addrs[flag], named, want, err)
				}
			}
			// The message says how to get out: TLS, loopback, or the flag.
			for _, want := range []string{"--insecure-listen", "--spiffe-socket", "loopback"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error lacks %q: %v", want, err)
				}
			}
		})
	}
}

// TestServeRefusesPlaintextBeyondLoopback runs the real command. The rule is checked
// before the policy is loaded, and the policy directory does not exist: a refused start
// fails naming the flag, an accepted one fails loading the policy, and nothing is ever
// bound either way.
func TestServeRefusesPlaintextBeyondLoopback(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-policy")
	const refused, loaded = "--insecure-listen", "initial policy load"
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"0.0.0.0 plaintext", []string{"--grpc-addr", "0.0.0.0:0", "--xds-addr", ""}, refused},
		{":: plaintext", []string{"--grpc-addr", "", "--xds-addr", "[::]:0"}, refused},
		{"the default xDS address with an exposed gRPC one", []string{"--grpc-addr", ":0"}, refused},
		{"loopback plaintext", []string{"--grpc-addr", "127.0.0.1:0", "--xds-addr", "[::1]:0"}, loaded},
		{"--insecure-listen", []string{"--grpc-addr", "0.0.0.0:0", "--xds-addr", "[::]:0", "--insecure-listen"}, loaded},
		{"SPIFFE mTLS", []string{"--grpc-addr", "0.0.0.0:0", "--xds-addr", "[::]:0",
			"--spiffe-socket", "unix:///nonexistent/agent.sock", "--allowed-client-ids", inventoryID}, loaded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"serve", "--config", missing, "--admin-addr", ""}, tc.args...)
			_, errOut, code := run(t, args...)
			if code != 1 || !strings.Contains(errOut, tc.want) {
				t.Fatalf("code %d, stderr %q: want exit 1 with %q", code, errOut, tc.want)
			}
			if tc.want == loaded && strings.Contains(errOut, refused) {
				t.Fatalf("refused: %q", errOut)
			}
		})
	}
}

func TestAuthzTLSMismatch(t *testing.T) {
	tlsOn := transportSecurity{workloadAPI: "unix:///run/spire/agent.sock"}
	named := &policy.Snapshot{Mesh: &policy.Mesh{AuthzSpiffeID: mcpgateID}}
	unnamed := &policy.Snapshot{Mesh: &policy.Mesh{}}
	for _, tc := range []struct {
		name string
		snap *policy.Snapshot
		ts   transportSecurity
		grpc string
		want string // substring; empty: no warning
	}{
		{"both mTLS", named, tlsOn, "0.0.0.0:9001", ""},
		{"both plaintext", unnamed, transportSecurity{}, "127.0.0.1:9001", ""},
		{"mTLS listener, plaintext Envoys", unnamed, tlsOn, "0.0.0.0:9001", "names no authz.spiffeId"},
		{"plaintext listener, mTLS Envoys", named, transportSecurity{}, "127.0.0.1:9001", "--spiffe-socket"},
		{"no ext_authz listener here", unnamed, tlsOn, "", ""},
	} {
		got := authzTLSMismatch(tc.snap, tc.ts, tc.grpc)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}

// The admin server is not held to the loopback rule (Kubernetes probes reach it on the
// pod IP) because it serves no secret: an HTTPEndpoint's header values, which xDS sends
// to Envoys, never appear on it.
func TestAdminShowsNoSecrets(t *testing.T) {
	const secret = "s3cr3t-admin-test-token"
	snap := demoWith(t, "github.yaml", func(b string) string {
		return strings.Replace(b, "  baseUrl: ", "  headers: {X-Api-Key: "+secret+"}\n  baseUrl: ", 1)
	})
	var inPolicy bool
	for _, e := range snap.Endpoints {
		inPolicy = inPolicy || e.Headers["X-Api-Key"] == secret
	}
	if !inPolicy {
		t.Fatal("the test policy's HTTPEndpoint does not carry the header")
	}
	store, tel := adminState(t, snap)
	h := adminHandler(store, tel, nil, nil)
	for _, p := range []string{"/debug/snapshot", "/readyz", "/metrics", "/healthz"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, p, nil))
		if rec.Code != http.StatusOK {
			t.Errorf("GET %s: %d", p, rec.Code)
		}
		if strings.Contains(rec.Body.String(), secret) {
			t.Errorf("GET %s shows the HTTPEndpoint's header value", p)
		}
		if p == "/debug/snapshot" && !strings.Contains(rec.Body.String(), "github-mcp") {
			t.Errorf("GET %s does not list the endpoint: %s", p, rec.Body.String())
		}
	}
}

// /debug/snapshot shows each app's limits and CORS policy as compiled, defaults applied:
// what an operator needs to see to know why a call got 429 or a browser was refused.
func TestDebugSnapshotLimitsAndCORS(t *testing.T) {
	snap := demoWith(t, "inventory.yaml", func(b string) string {
		edited := strings.Replace(b, "      perCaller: 100/m\n", `      perCaller: {rate: 600/m, burst: 50}
      perSubject: 100/m
      perTenant: {rate: 1000/h, claim: org}
`, 1)
		edited = strings.Replace(edited, "        get_inventory: 10/s\n", `        get_inventory: {rate: 10/s, per: subject}
        "delete_*": 5/m
`, 1)
		edited = strings.Replace(edited, "    limits:\n", `    cors:
      allowOrigins: [https://app.example.com]
      allowCredentials: true
    limits:
`, 1)
		if edited == b || strings.Count(edited, "perSubject") != 1 || !strings.Contains(edited, "delete_*") {
			t.Fatal("the demo's inventory.yaml no longer has the limits this test edits")
		}
		return edited
	})
	store, tel := adminState(t, snap)
	rec := httptest.NewRecorder()
	adminHandler(store, tel, nil, nil).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/snapshot", nil))
	var got struct {
		Apps []appView `json:"apps"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatalf("%v: %s", err, rec.Body.String())
	}
	var inv, agent *appView
	for i := range got.Apps {
		switch got.Apps[i].ID {
		case "inventory":
			inv = &got.Apps[i]
		case "my-agent":
			agent = &got.Apps[i]
		}
	}
	if inv == nil || agent == nil {
		t.Fatalf("apps %+v", got.Apps)
	}
	wantLimits := &limitsView{MaxRequestBytes: 1048576, PerCaller: "600/m burst 50", PerSubject: "100/m", SubjectClaim: "sub",
		PerTenant: "1000/h", TenantClaim: "org", PerTool: []toolRateView{
			// In the order they are tried (the first match applies): the globs sorted.
			{Tool: "delete_*", Rate: "5/m", Per: "all"},
			{Tool: "get_inventory", Rate: "10/s", Per: "subject", Claim: "sub"},
		}}
	if !reflect.DeepEqual(inv.Limits, wantLimits) {
		t.Errorf("inventory limits\n got %+v\nwant %+v", inv.Limits, wantLimits)
	}
	wantCORS := &corsView{AllowOrigins: []string{"https://app.example.com"}, AllowCredentials: true, MaxAge: "10m0s",
		AllowMethods: policy.DefaultCORSMethods, AllowHeaders: policy.DefaultCORSHeaders, ExposeHeaders: policy.DefaultCORSExposeHeaders}
	if !reflect.DeepEqual(inv.CORS, wantCORS) {
		t.Errorf("inventory cors\n got %+v\nwant %+v", inv.CORS, wantCORS)
	}
	if agent.Limits != nil || agent.CORS != nil {
		t.Errorf("my-agent (no mcp policy) shows limits %+v, cors %+v", agent.Limits, agent.CORS)
	}
}

// TestDebugSnapshotRateLimitStore checks that the snapshot says where limits are
// counted and how Redis is reached, a cluster included, naming the password file but
// never holding its contents.
func TestDebugSnapshotRateLimitStore(t *testing.T) {
	for _, tc := range []struct {
		mesh string
		want map[string]any
	}{
		{"", map[string]any{"store": "local"}},
		{`  rateLimits:
    redis: {address: "clustercfg.example:6379", cluster: true, passwordFile: /secrets/redis-password, keyPrefix: "staging:rl:"}
    failureMode: deny
`, map[string]any{"store": "redis", "address": "clustercfg.example:6379", "cluster": true, "key_prefix": "staging:rl:", "db": 0.0, "tls": false,
			"password_file": "/secrets/redis-password", "failure_mode": "deny", "timeout": "50ms"}},
		{`  rateLimits:
    redis: {sentinel: {masterName: mymaster, addresses: ["sentinel:26379"], passwordFile: /secrets/sentinel}}
`, map[string]any{"store": "redis", "address": "", "cluster": false, "key_prefix": "mcpgate:rl:", "db": 0.0, "tls": false, "password_file": "",
			"failure_mode": "local", "timeout": "50ms", "sentinel": map[string]any{
				"master_name": "mymaster", "addresses": []any{"sentinel:26379"}, "password_file": "/secrets/sentinel"}}},
	} {
		snap := demoWith(t, "mesh.yaml", func(b string) string { return b + tc.mesh })
		store, tel := adminState(t, snap)
		rec := httptest.NewRecorder()
		adminHandler(store, tel, nil, nil).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/snapshot", nil))
		var got struct {
			RateLimits map[string]any `json:"rate_limits"`
		}
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("%v: %s", err, rec.Body.String())
		}
		if !reflect.DeepEqual(got.RateLimits, tc.want) {
			t.Errorf("rate_limits\n got %v\nwant %v", got.RateLimits, tc.want)
		}
	}
}

// demoWith loads testdata/demo with one of its files changed by edit.
func demoWith(t *testing.T, file string, edit func(string) string) *policy.Snapshot {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS("../../testdata/demo")); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, file)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(edit(string(b))), 0o644); err != nil {
		t.Fatal(err)
	}
	snap, err := policy.LoadDir(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	return snap
}

// adminState is what adminHandler serves from: a store holding snap, and telemetry.
func adminState(t *testing.T, snap *policy.Snapshot) (*policy.Store, *telemetry) {
	t.Helper()
	tel, err := newTelemetry()
	if err != nil {
		t.Fatal(err)
	}
	store := policy.NewStore(nil)
	store.Set(snap)
	return store, tel
}
