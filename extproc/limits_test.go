package extproc

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/protobuf/types/known/structpb"

	mcpgate "github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/integration/redistest"
	"github.com/mcpgate/mcpgate/policy"
)

// replicas are mcpgate ext_proc servers over one policy, as N replicas behind one
// Service load the same files.
type replicas struct {
	store   *policy.Store
	servers []*Server
	readers []*sdkmetric.ManualReader
}

// newReplicas serves the demo policy from n servers, with limits and the rate-limit
// store (nil: per replica) set by edit.
func newReplicas(t *testing.T, n int, edit func(*policy.Snapshot)) *replicas {
	t.Helper()
	snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	lim := &snap.App("inventory").MCP.Limits
	lim.PerCaller, lim.PerSubject, lim.PerTenant, lim.PerTool = nil, nil, nil, nil
	edit(snap)
	rs := &replicas{store: policy.NewStore(snap)}
	for range n {
		reader := sdkmetric.NewManualReader()
		s, err := NewServer(Options{Store: rs.store, Meter: sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader)).Meter("t")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		rs.servers, rs.readers = append(rs.servers, s), append(rs.readers, reader)
	}
	return rs
}

func redisStore(addr string, mode policy.FailureMode) *policy.RateLimitStore {
	// A generous timeout: the race detector on a loaded machine must not turn a slow
	// answer into the failure mode. The failure tests kill Redis, which fails at once.
	return &policy.RateLimitStore{Address: addr, FailureMode: mode, Timeout: time.Second}
}

// as is a tools/call from my-agent with the given subject and token claims.
func as(sub, claimsJSON, tool string) envoyRequest {
	md := metadata("inventory", "my-agent", "mcp:tools", "inventory:read")
	f := md.FilterMetadata[contract.MetadataNamespace].Fields
	f[contract.MetaSubject] = structpb.NewStringValue(sub)
	if claimsJSON != "" {
		f[contract.MetaClaimsJSON] = structpb.NewStringValue(claimsJSON)
	}
	return envoyRequest{md: md, body: call(1, tool, `{"product_id":"SKU-42"}`)}
}

func requireForwarded(t *testing.T, res envoyResult, what string) {
	t.Helper()
	if res.immediate != nil {
		t.Fatalf("%s: answered by mcpgate with %d: %s", what, res.immediate.GetStatus().GetCode(), res.immediate.GetBody())
	}
}

// requireLimited checks a 429 with Retry-After and the IETF RateLimit fields naming policy.
func requireLimited(t *testing.T, res envoyResult, what, policyName, quota string) {
	t.Helper()
	requireJSONRPCError(t, res.immediate, 429, 1, -32001, "rate limit exceeded: limits.")
	h := immediateHeaders(res.immediate)
	if ra := h["retry-after"]; ra == "" || ra == "0" {
		t.Errorf("%s: Retry-After = %q", what, ra)
	}
	if got, want := h["ratelimit-policy"], `"`+policyName+`";`+quota; got != want {
		t.Errorf("%s: RateLimit-Policy = %q, want %q", what, got, want)
	}
	if got, want := h["ratelimit"], `"`+policyName+`";r=0;t=`+h["retry-after"]; got != want {
		t.Errorf("%s: RateLimit = %q, want %q", what, got, want)
	}
}

func immediateHeaders(ir *extprocv3.ImmediateResponse) map[string]string {
	out := map[string]string{}
	for _, h := range ir.GetHeaders().GetSetHeaders() {
		out[h.GetHeader().GetKey()] = string(h.GetHeader().GetRawValue())
	}
	return out
}

// limitCounts sums mcpgate.ratelimit.decisions over the replicas by "key/decision".
func (rs *replicas) limitCounts(t *testing.T) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	for _, r := range rs.readers {
		data, _ := collectMetric(t, r, "mcpgate.ratelimit.decisions").(metricdata.Sum[int64])
		for _, dp := range data.DataPoints {
			target, _ := dp.Attributes.Value("target")
			key, _ := dp.Attributes.Value("key")
			dec, _ := dp.Attributes.Value("decision")
			if target.AsString() != "inventory" {
				t.Errorf("target label %q", target.AsString())
			}
			out[key.AsString()+"/"+dec.AsString()] += dp.Value
		}
	}
	return out
}

// Two replicas on one Redis admit N calls between them, not N each: the N+1th is
// refused whichever replica it reaches.
func TestSharedLimitAcrossReplicas(t *testing.T) {
	srv := redistest.Start(t)
	rs := newReplicas(t, 2, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailLocal)
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
	})
	for i := range 3 {
		requireForwarded(t, runEnvoy(t, rs.servers[i%2], as("alice", "", "get_inventory"), envoyUpstream{}), "call "+string(rune('1'+i)))
	}
	for i := range 2 {
		requireLimited(t, runEnvoy(t, rs.servers[i], as("alice", "", "get_inventory"), envoyUpstream{}), "4th call", "perCaller", "q=3;w=3600")
	}
	if got := rs.limitCounts(t); got["caller/allowed"] != 3 || got["caller/refused"] != 2 || len(got) != 2 {
		t.Errorf("mcpgate.ratelimit.decisions = %v, want caller/allowed 3, caller/refused 2", got)
	}

	// Without the store the same limit is per replica: each admits 3.
	local := newReplicas(t, 2, func(s *policy.Snapshot) {
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
	})
	for i := range 6 {
		requireForwarded(t, runEnvoy(t, local.servers[i%2], as("alice", "", "get_inventory"), envoyUpstream{}), "per-replica call")
	}
	requireLimited(t, runEnvoy(t, local.servers[0], as("alice", "", "get_inventory"), envoyUpstream{}), "7th call", "perCaller", "q=3;w=3600")
}

// perSubject keys on the token's subject (or a claim), perTenant on a claim: users and
// tenants do not spend each other's allowance, in Redis as in memory.
func TestPerSubjectAndTenantKeys(t *testing.T) {
	srv := redistest.Start(t)
	for _, shared := range []bool{true, false} {
		name := map[bool]string{true: "redis", false: "local"}[shared]
		t.Run(name, func(t *testing.T) {
			rs := newReplicas(t, 2, func(s *policy.Snapshot) {
				if shared {
					s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
				}
				lim := &s.App("inventory").MCP.Limits
				lim.PerSubject = &policy.RateLimit{N: 2, Per: time.Hour}
				lim.SubjectClaim = "oid"
				lim.PerTenant = &policy.RateLimit{N: 3, Per: time.Hour}
				lim.TenantClaim = "tid"
			})
			// Subjects by oid: alice's two tokens (different sub, same oid) share one allowance.
			alice1 := as("alice-"+name, `{"sub":"a1","oid":"alice-`+name+`","tid":"t1-`+name+`"}`, "get_inventory")
			alice2 := as("alice2-"+name, `{"sub":"a2","oid":"alice-`+name+`","tid":"t1-`+name+`"}`, "get_inventory")
			bob := as("bob-"+name, `{"sub":"b","oid":"bob-`+name+`","tid":"t1-`+name+`"}`, "get_inventory")
			carol := as("carol-"+name, `{"sub":"c","oid":"carol-`+name+`","tid":"t2-`+name+`"}`, "get_inventory")
			nr := func(i int) *Server {
				if shared {
					return rs.servers[i%2]
				}
				return rs.servers[0]
			}
			requireForwarded(t, runEnvoy(t, nr(0), alice1, envoyUpstream{}), "alice 1")
			requireForwarded(t, runEnvoy(t, nr(1), alice2, envoyUpstream{}), "alice 2")
			requireLimited(t, runEnvoy(t, nr(0), alice1, envoyUpstream{}), "alice 3", "perSubject", "q=2;w=3600")
			// Tenant t1 has spent 2 of 3: bob gets the last one, then the tenant is done,
			// though bob has his own subject allowance left.
			requireForwarded(t, runEnvoy(t, nr(1), bob, envoyUpstream{}), "bob 1")
			requireLimited(t, runEnvoy(t, nr(0), bob, envoyUpstream{}), "bob 2", "perTenant", "q=3;w=3600")
			// Carol is in tenant t2.
			requireForwarded(t, runEnvoy(t, nr(1), carol, envoyUpstream{}), "carol 1")
			requireForwarded(t, runEnvoy(t, nr(0), carol, envoyUpstream{}), "carol 2")
		})
	}
}

// A per-tool limit scoped per subject gives each user their own allowance of the tool;
// unscoped, all callers share it. A call refused by one limit spends none of the others.
func TestPerToolPerSubject(t *testing.T) {
	srv := redistest.Start(t)
	g, err := policy.CompileGlob("get_*")
	if err != nil {
		t.Fatal(err)
	}
	rs := newReplicas(t, 2, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
		lim := &s.App("inventory").MCP.Limits
		lim.PerTool = []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 1, Per: time.Hour}, Per: policy.PerSubject, Claim: "sub"}}
		lim.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
	})
	requireForwarded(t, runEnvoy(t, rs.servers[0], as("alice", "", "get_inventory"), envoyUpstream{}), "alice's get")
	requireLimited(t, runEnvoy(t, rs.servers[1], as("alice", "", "get_inventory"), envoyUpstream{}), "alice's 2nd get", "perTool.get_*", "q=1;w=3600")
	requireLimited(t, runEnvoy(t, rs.servers[0], as("alice", "", "get_customer"), envoyUpstream{}), "alice's get_customer", "perTool.get_*", "q=1;w=3600")
	requireForwarded(t, runEnvoy(t, rs.servers[1], as("bob", "", "get_inventory"), envoyUpstream{}), "bob's get")
	// perCaller (my-agent, 3/h) spent 2: the refused calls took nothing from it.
	requireForwarded(t, runEnvoy(t, rs.servers[0], as("carol", "", "get_inventory"), envoyUpstream{}), "carol's get")
	requireLimited(t, runEnvoy(t, rs.servers[1], as("dave", "", "get_inventory"), envoyUpstream{}), "dave's get", "perCaller", "q=3;w=3600")
}

// waitShared polls until a call is decided by Redis again (the metric says so).
func waitShared(t *testing.T, rs *replicas, s *Server, req envoyRequest) envoyResult {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := rs.limitCounts(t)
		res := runEnvoy(t, s, req, envoyUpstream{})
		after := rs.limitCounts(t)
		if after["caller/allowed"]+after["caller/refused"] > before["caller/allowed"]+before["caller/refused"] {
			return res
		}
		if time.Now().After(deadline) {
			t.Fatalf("Redis is back but calls are still not decided in it: %v", after)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Redis killed mid-test: each failure mode decides, readyz says so, and once Redis is
// back the limits are shared again, with no restart.
func TestRedisDownFailureModes(t *testing.T) {
	for _, mode := range []policy.FailureMode{policy.FailLocal, policy.FailDeny, policy.FailAllow} {
		t.Run(string(mode), func(t *testing.T) {
			srv := redistest.Start(t)
			rs := newReplicas(t, 2, func(s *policy.Snapshot) {
				s.Mesh.RateLimits = redisStore(srv.Addr(), mode)
				s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 2, Per: time.Hour}
			})
			a, b := rs.servers[0], rs.servers[1]
			requireForwarded(t, runEnvoy(t, a, as("alice", "", "get_inventory"), envoyUpstream{}), "shared call 1")
			if st := a.RateLimitStatus(context.Background()); !st.Reachable || st.Store != "redis" {
				t.Errorf("status with Redis up: %+v", st)
			}

			srv.Kill()
			switch mode {
			case policy.FailLocal:
				// Each replica counts on its own: 2 each, then refused.
				for _, s := range []*Server{a, a, b, b} {
					requireForwarded(t, runEnvoy(t, s, as("alice", "", "get_inventory"), envoyUpstream{}), "local call")
				}
				requireLimited(t, runEnvoy(t, a, as("alice", "", "get_inventory"), envoyUpstream{}), "3rd local call", "perCaller", "q=2;w=3600")
				if got := rs.limitCounts(t); got["caller/local_allowed"] != 4 || got["caller/local_refused"] != 1 {
					t.Errorf("decisions = %v, want 4 local_allowed and 1 local_refused", got)
				}
			case policy.FailDeny:
				res := runEnvoy(t, a, as("alice", "", "get_inventory"), envoyUpstream{})
				requireJSONRPCError(t, res.immediate, 503, 1, -32001, "rate limits unavailable: redis "+srv.Addr())
				if h := immediateHeaders(res.immediate); h["retry-after"] != "1" {
					t.Errorf("Retry-After = %q, want 1", h["retry-after"])
				}
				if got := rs.limitCounts(t); got["caller/unavailable_refused"] != 1 {
					t.Errorf("decisions = %v, want 1 unavailable_refused", got)
				}
			case policy.FailAllow:
				for range 5 {
					requireForwarded(t, runEnvoy(t, b, as("alice", "", "get_inventory"), envoyUpstream{}), "failure mode allow")
				}
				if got := rs.limitCounts(t); got["caller/unavailable_allowed"] != 5 {
					t.Errorf("decisions = %v, want 5 unavailable_allowed", got)
				}
			}
			st := a.RateLimitStatus(context.Background())
			if st.Reachable || st.Error == "" || st.DownSince.IsZero() || !strings.Contains(st.Effect, "failureMode "+string(mode)) {
				t.Errorf("status with Redis down: %+v", st)
			}
			if j, _ := json.Marshal(st); !strings.Contains(string(j), `"reachable":false`) {
				t.Errorf("status JSON %s", j)
			}

			// A restarted Redis has lost the buckets (no persistence): the shared limit
			// starts again, 2 between both replicas. Each replica tries Redis again at
			// most a second after its last failure.
			srv.Restart(t)
			requireForwarded(t, waitShared(t, rs, b, as("alice", "", "get_inventory")), "1st shared call after the restart")
			requireForwarded(t, waitShared(t, rs, a, as("alice", "", "get_inventory")), "2nd shared call after the restart")
			requireLimited(t, runEnvoy(t, b, as("alice", "", "get_inventory"), envoyUpstream{}), "3rd shared call", "perCaller", "q=2;w=3600")
			if st := b.RateLimitStatus(context.Background()); !st.Reachable {
				t.Errorf("status with Redis back: %+v", st)
			}
		})
	}
}

// A policy reload keeps what callers have spent, in Redis and in memory, as long as
// their limit is unchanged.
func TestReloadKeepsCounters(t *testing.T) {
	srv := redistest.Start(t)
	for _, shared := range []bool{true, false} {
		t.Run(map[bool]string{true: "redis", false: "local"}[shared], func(t *testing.T) {
			edit := func(s *policy.Snapshot) {
				if shared {
					s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
				}
				s.App("inventory").MCP.Limits.PerSubject = &policy.RateLimit{N: 2, Per: time.Hour}
				s.App("inventory").MCP.Limits.SubjectClaim = "sub"
			}
			rs := newReplicas(t, 1, edit)
			sub := "reload-" + t.Name()
			requireForwarded(t, runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{}), "before reload 1")
			requireForwarded(t, runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{}), "before reload 2")

			// A new snapshot (as a reload of edited files makes): same limits, another
			// version, and a fresh copy of the store's settings.
			snap, err := policy.Load(context.Background(), mcpgate.DemoPolicy(), "demo")
			if err != nil {
				t.Fatal(err)
			}
			lim := &snap.App("inventory").MCP.Limits
			lim.PerCaller, lim.PerTool = nil, nil
			edit(snap)
			snap.Version = "reloaded"
			rs.store.Set(snap)
			requireLimited(t, runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{}), "after reload", "perSubject", "q=2;w=3600")
		})
	}
}

// A store the replica cannot use (a CA file that is not there) is a failure-mode
// decision naming the problem, never an admitted call under deny.
func TestRedisUnusableConfig(t *testing.T) {
	srv := redistest.Start(t)
	rs := newReplicas(t, 1, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
		s.Mesh.RateLimits.TLS, s.Mesh.RateLimits.CAFile = true, "/nonexistent/redis-ca.pem"
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 100, Per: time.Hour}
	})
	res := runEnvoy(t, rs.servers[0], as("alice", "", "get_inventory"), envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 503, 1, -32001, "tls.caFile")
	if st := rs.servers[0].RateLimitStatus(context.Background()); st.Reachable || !strings.Contains(st.Error, "/nonexistent/redis-ca.pem") {
		t.Errorf("status: %+v", st)
	}
}
