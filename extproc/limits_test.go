package extproc

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"github.com/redis/go-redis/v9"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	mcpgate "github.com/mcpgate/mcpgate"
	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/integration/redistest"
	"github.com/mcpgate/mcpgate/integration/testpki"
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

// storeCounts sums mcpgate.ratelimit.store.duration's counts over the replicas by
// "op/result".
func (rs *replicas) storeCounts(t *testing.T) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for _, r := range rs.readers {
		data, _ := collectMetric(t, r, "mcpgate.ratelimit.store.duration").(metricdata.Histogram[float64])
		for _, dp := range data.DataPoints {
			op, _ := dp.Attributes.Value("op")
			res, _ := dp.Attributes.Value("result")
			out[op.AsString()+"/"+res.AsString()] += dp.Count
			if m, ok := dp.Min.Value(); ok && m <= 0 {
				t.Errorf("a round trip of %v seconds", m)
			}
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
	// One round trip per call, refused ones included, timed.
	if got := rs.storeCounts(t); got["decide/ok"] != 5 || len(got) != 1 {
		t.Errorf("mcpgate.ratelimit.store.duration counts = %v, want decide/ok 5", got)
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

// On a Redis Cluster two replicas share the limits too: a call's buckets (per caller,
// per subject, per tool) hash to its app's slot ({inventory}), so one script decides
// them on one node; keys of several slots would be CROSSSLOT, and with failureMode deny
// every call refused.
func TestSharedLimitOnCluster(t *testing.T) {
	t.Parallel() // a cluster serves 2s after its start
	c := redistest.StartCluster(t, 3)
	g, err := policy.CompileGlob("get_*")
	if err != nil {
		t.Fatal(err)
	}
	rs := newReplicas(t, 2, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(c.Addr(), policy.FailDeny)
		s.Mesh.RateLimits.Cluster = true
		lim := &s.App("inventory").MCP.Limits
		lim.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
		lim.PerSubject, lim.SubjectClaim = &policy.RateLimit{N: 10, Per: time.Hour}, "sub"
		lim.PerTool = []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 10, Per: time.Hour}, Per: policy.PerSubject, Claim: "sub"}}
	})
	for i := range 3 {
		requireForwarded(t, runEnvoy(t, rs.servers[i%2], as("alice", "", "get_inventory"), envoyUpstream{}), "call "+string(rune('1'+i)))
	}
	requireLimited(t, runEnvoy(t, rs.servers[1], as("alice", "", "get_inventory"), envoyUpstream{}), "4th call", "perCaller", "q=3;w=3600")
	if got := rs.limitCounts(t); got["caller/allowed"] != 3 || got["subject/allowed"] != 3 || got["tool/allowed"] != 3 || got["caller/refused"] != 1 {
		t.Errorf("mcpgate.ratelimit.decisions = %v, want 3 allowed per bucket, then caller/refused 1", got)
	}
	node := c.NodeOf(t, "{inventory}")
	keys, err := redistest.Do(c.Nodes[node].Addr(), "KEYS", "mcpgate:rl:{inventory}:*")
	if err != nil {
		t.Fatal(err)
	}
	if n := len(strings.Fields(keys)); n != 3 {
		t.Errorf("node %d (the slot of {inventory}) holds %d buckets, want 3: %q", node, n, keys)
	}
}

// Through Redis Sentinel two replicas share the limits, and when the primary dies they
// follow the sentinel to the promoted replica by themselves: calls meanwhile get the
// failure mode (deny here), then the shared buckets again, as replicated.
func TestSharedLimitThroughSentinel(t *testing.T) {
	t.Parallel()
	primary := redistest.Start(t)
	replica := redistest.StartReplica(t, primary)
	sentinel := redistest.StartSentinel(t, "mcpgate", primary)
	sentinel.WaitReplicas(t, 1)
	rs := newReplicas(t, 2, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore("", policy.FailDeny)
		s.Mesh.RateLimits.Sentinel = &policy.SentinelStore{MasterName: "mcpgate", Addrs: []string{sentinel.Addr()}}
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 4, Per: time.Hour}
	})
	for i := range 2 {
		requireForwarded(t, runEnvoy(t, rs.servers[i], as("alice", "", "get_inventory"), envoyUpstream{}), "call "+string(rune('1'+i)))
	}
	if st := rs.servers[0].RateLimitStatus(context.Background()); !st.Reachable || st.Address != "mcpgate (sentinel "+sentinel.Addr()+")" {
		t.Errorf("status: %+v", st)
	}
	key, err := redistest.Do(primary.Addr(), "KEYS", "*")
	if err != nil || strings.Contains(key, "\n") {
		t.Fatalf("keys on the primary: %q, %v (want one bucket)", key, err)
	}
	redistest.WaitReplicated(t, primary, replica, key)

	primary.Kill()
	deadline := time.Now().Add(15 * time.Second)
	var refused int
	for {
		res := runEnvoy(t, rs.servers[refused%2], as("alice", "", "get_inventory"), envoyUpstream{})
		if res.immediate == nil {
			break // decided in the new primary
		}
		requireJSONRPCError(t, res.immediate, 503, 1, -32001, "rate limits unavailable")
		refused++
		if time.Now().After(deadline) {
			t.Fatalf("limits still unavailable 15s after the primary died (%d calls refused)", refused)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d calls refused (failureMode deny) during the failover", refused)
	if got := sentinel.Primary(t); got != replica.Addr() {
		t.Fatalf("the sentinel announces %s, want %s", got, replica.Addr())
	}
	// 3 of 4 spent (2 before, 1 after): one more through either replica, then refused.
	requireForwarded(t, waitShared(t, rs, rs.servers[1], as("alice", "", "get_inventory")), "4th call")
	// Each replica finds the new primary on its own: server 0 may still be failing over.
	requireLimited(t, waitShared(t, rs, rs.servers[0], as("alice", "", "get_inventory")), "5th call", "perCaller", "q=4;w=3600")
}

// Two meshes sharing one Redis with their own keyPrefix keep their limits apart; the
// keys start with it.
func TestKeyPrefixSeparatesMeshes(t *testing.T) {
	srv := redistest.Start(t)
	mesh := func(prefix string) *replicas {
		return newReplicas(t, 1, func(s *policy.Snapshot) {
			s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
			s.Mesh.RateLimits.KeyPrefix = prefix
			s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 1, Per: time.Hour}
		})
	}
	prod, staging := mesh("prod:rl:"), mesh("staging:rl:")
	requireForwarded(t, runEnvoy(t, prod.servers[0], as("alice", "", "get_inventory"), envoyUpstream{}), "prod call")
	requireForwarded(t, runEnvoy(t, staging.servers[0], as("alice", "", "get_inventory"), envoyUpstream{}), "staging call (its own bucket)")
	requireLimited(t, runEnvoy(t, prod.servers[0], as("alice", "", "get_inventory"), envoyUpstream{}), "2nd prod call", "perCaller", "q=1;w=3600")
	for _, p := range []string{"prod:rl:{inventory}:caller:*", "staging:rl:{inventory}:caller:*"} {
		if keys, err := redistest.Do(srv.Addr(), "KEYS", p); err != nil || keys == "" || strings.Contains(keys, "\n") {
			t.Errorf("KEYS %s = %q, %v: want one bucket", p, keys, err)
		}
	}
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

// With limits.responseHeaders, the answer of every admitted call carries the IETF
// RateLimit fields of the limits it passed, what they have left and the seconds until
// they are full again, from Redis (decided on the body or on the headers) or from the
// replica's own buckets; a call the policy denies after its limits spent says so too,
// and a limit's 429 still names only that limit.
func TestRateLimitResponseFields(t *testing.T) {
	srv := redistest.Start(t)
	g, err := policy.CompileGlob("get_*")
	if err != nil {
		t.Fatal(err)
	}
	for _, shared := range []bool{true, false} {
		t.Run(map[bool]string{true: "redis", false: "local"}[shared], func(t *testing.T) {
			rs := newReplicas(t, 1, func(s *policy.Snapshot) {
				if shared {
					s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
				}
				lim := &s.App("inventory").MCP.Limits
				lim.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
				lim.PerTool = []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 5, Per: time.Minute}, Per: policy.PerSubject, Claim: "sub"}}
				lim.ResponseHeaders = true
			})
			s := rs.servers[0]
			who := "alice-" + strconv.FormatBool(shared) // Redis is shared by the subtests
			const pol = `"perCaller";q=3;w=3600, "perTool.get_*";q=5;w=60`
			fields := func(res envoyResult, what, left string) {
				t.Helper()
				requireForwarded(t, res, what)
				if got := res.responseSet["ratelimit-policy"]; got != pol {
					t.Errorf("%s: RateLimit-Policy = %q, want %q", what, got, pol)
				}
				if got := res.responseSet["ratelimit"]; got != left {
					t.Errorf("%s: RateLimit = %q, want %q", what, got, left)
				}
				if !slices.Contains(res.responseAppended, "ratelimit") || !slices.Contains(res.responseAppended, "ratelimit-policy") {
					t.Errorf("%s: the fields must be added to the server's own, not replace them (appended: %v)", what, res.responseAppended)
				}
			}
			// One request of 3/h leaves 2, full again in 1200s; one of 5/m leaves 4, in 12s.
			fields(runEnvoy(t, s, as(who, "", "get_inventory"), envoyUpstream{}), "first call", `"perCaller";r=2;t=1200, "perTool.get_*";r=4;t=12`)
			// Decided on its 2026-07-28 headers (early, with Redis).
			req := as(who, "", "get_inventory")
			req.headers = era2026
			fields(runEnvoy(t, s, req, envoyUpstream{}), "second call", `"perCaller";r=1;t=2400, "perTool.get_*";r=3;t=24`)

			// The rules deny delete_product after perCaller spent its last request.
			res := runEnvoy(t, s, as(who, "", "delete_product"), envoyUpstream{})
			requireJSONRPCError(t, res.immediate, 200, 1, -32001, "no-deletes")
			h := immediateHeaders(res.immediate)
			if h["ratelimit-policy"] != `"perCaller";q=3;w=3600` || h["ratelimit"] != `"perCaller";r=0;t=3600` {
				t.Errorf("denied call: RateLimit-Policy %q, RateLimit %q", h["ratelimit-policy"], h["ratelimit"])
			}
			requireLimited(t, runEnvoy(t, s, as(who, "", "get_inventory"), envoyUpstream{}), "4th call", "perCaller", "q=3;w=3600")
		})
	}

	// A 2025-03-26 batch spends twice from each bucket: one item per limit, with what
	// the last message left.
	rs := newReplicas(t, 1, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(redistest.Start(t).Addr(), policy.FailDeny)
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
		s.App("inventory").MCP.Limits.ResponseHeaders = true
	})
	req := as("bob", "", "get_inventory")
	req.body = "[" + call(1, "get_inventory", `{"product_id":"SKU-1"}`) + "," + call(2, "get_inventory", `{"product_id":"SKU-2"}`) + "]"
	res := runEnvoy(t, rs.servers[0], req, envoyUpstream{})
	requireForwarded(t, res, "batch")
	if got := res.responseSet["ratelimit"]; got != `"perCaller";r=1;t=2400` {
		t.Errorf("batch: RateLimit = %q, want one item, 1 left", got)
	}

	// Without responseHeaders only refusals carry them.
	rs = newReplicas(t, 1, func(s *policy.Snapshot) {
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 3, Per: time.Hour}
	})
	res = runEnvoy(t, rs.servers[0], as("carol", "", "get_inventory"), envoyUpstream{})
	requireForwarded(t, res, "call without responseHeaders")
	if v, ok := res.responseSet["ratelimit"]; ok {
		t.Errorf("RateLimit %q without limits.responseHeaders", v)
	}
}

// A limit beyond what Redis counts (the policy refuses those, so only a snapshot built
// in code has one) is not an outage: its calls are counted in the replica, whatever the
// failure mode, and every other call stays shared. It once marked the store down for a
// second per call, and with failureMode allow, every limit of every caller was off.
func TestInvalidLimitIsNotAnOutage(t *testing.T) {
	srv := redistest.Start(t)
	g, err := policy.CompileGlob("slow_*")
	if err != nil {
		t.Fatal(err)
	}
	rs := newReplicas(t, 1, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailAllow)
		lim := &s.App("inventory").MCP.Limits
		lim.PerCaller = &policy.RateLimit{N: 2, Per: time.Minute}
		lim.PerTool = []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 1, Per: time.Hour, Burst: 400000}}} // 45 years to refill
	})
	s := rs.servers[0]
	requireForwarded(t, runEnvoy(t, s, as("alice", "", "slow_report"), envoyUpstream{}), "first slow_report")
	requireForwarded(t, runEnvoy(t, s, as("alice", "", "slow_report"), envoyUpstream{}), "second slow_report")
	requireLimited(t, runEnvoy(t, s, as("alice", "", "slow_report"), envoyUpstream{}), "third slow_report", "perCaller", "q=2;w=60")
	if st := s.RateLimitStatus(context.Background()); !st.Reachable {
		t.Errorf("the store was marked down for a limit it cannot count: %+v", st)
	}
	// The other calls are still decided in Redis (where perCaller has spent nothing).
	requireForwarded(t, runEnvoy(t, s, as("alice", "", "get_inventory"), envoyUpstream{}), "get_inventory")
	if got := rs.limitCounts(t); got["caller/allowed"] != 1 || got["caller/local_allowed"] != 2 || got["caller/local_refused"] != 1 {
		t.Errorf("mcpgate.ratelimit.decisions = %v, want 2 local allowed, 1 local refused, then 1 shared allowed", got)
	}
}

// Buckets tell callers apart as identity does: an App ID in another namespace is
// another caller, and a sub or claim value from another issuer the app trusts is another
// user or tenant (that issuer may mint any value). Each case's two requests differ only
// so: the second has an allowance of its own, and the first's is spent.
func TestLimitKeysSeparateNamespacesAndIssuers(t *testing.T) {
	body := `{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"run","arguments":{}}}`
	up := envoyUpstream{contentType: "application/json", chunks: []string{`{"jsonrpc":"2.0","id":1,"result":{}}`}}
	caller := func(ns, issuer, sub, claims string) *corev3.Metadata {
		md := proto.Clone(appMD).(*corev3.Metadata)
		f := md.FilterMetadata[contract.MetadataNamespace].Fields
		if ns == "" {
			delete(f, contract.MetaCallerAppID) // JWT-only: no App ID
			delete(f, contract.MetaCallerNamespace)
		} else {
			f[contract.MetaCallerNamespace] = structpb.NewStringValue(ns)
		}
		f[contract.MetaSubject], f[contract.MetaIssuer] = structpb.NewStringValue(sub), structpb.NewStringValue(issuer)
		f[contract.MetaClaimsJSON] = structpb.NewStringValue(claims)
		return md
	}
	const t1 = `{"sub":"alice","tid":"t1"}`
	for _, tc := range []struct {
		limits string
		a, b   *corev3.Metadata
	}{
		{"perCaller: 1/h", caller("default", "corp", "alice", t1), caller("team-b", "corp", "alice", t1)},
		{"perCaller: 1/h", caller("", "corp", "alice", t1), caller("", "partner", "alice", t1)},
		{"perSubject: 1/h", caller("default", "corp", "alice", t1), caller("default", "partner", "alice", t1)},
		{"perTenant: 1/h", caller("default", "corp", "alice", t1), caller("default", "partner", "bob", `{"sub":"bob","tid":"t1"}`)},
		{"perTool: {run: {rate: 1/h, per: caller}}", caller("default", "corp", "alice", t1), caller("team-b", "corp", "alice", t1)},
		{"perTool: {run: {rate: 1/h, per: subject}}", caller("default", "corp", "alice", t1), caller("default", "partner", "alice", t1)},
		{"perTool: {run: {rate: 1/h, per: tenant}}", caller("default", "corp", "alice", t1), caller("default", "partner", "alice", t1)},
	} {
		t.Run(tc.limits, func(t *testing.T) {
			app := "apiVersion: mcpgate.dev/v1alpha1\nkind: App\nmetadata: {name: app}\nspec:\n  address: app:1\n  sidecar: {address: s, inboundPort: 1, outboundPort: 2}\n" +
				"  mcp: {tools: {defaultAction: allow}, limits: {" + tc.limits + "}}\n"
			s, err := NewServer(Options{Store: policy.NewStore(loadFiles(t, map[string]string{"app.yaml": app}))})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(s.Close)
			requireForwarded(t, runEnvoy(t, s, envoyRequest{md: tc.a, body: body}, up), "the first caller")
			requireForwarded(t, runEnvoy(t, s, envoyRequest{md: tc.b, body: body}, up), "the second caller, in a bucket of its own")
			if res := runEnvoy(t, s, envoyRequest{md: tc.a, body: body}, up); res.immediate.GetStatus().GetCode() != 429 {
				t.Errorf("the first caller again was not refused: %v", res.immediate)
			}
		})
	}
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
	// Decided on the body (protocol 2025-03-26: a body may be a batch) or on the MCP
	// 2026-07-28 headers, while the body is on its way: the same outcomes.
	for _, tc := range []struct {
		mode    policy.FailureMode
		decided string
		headers []string
	}{
		{policy.FailLocal, "body", nil}, {policy.FailDeny, "body", nil}, {policy.FailAllow, "body", nil},
		{policy.FailLocal, "headers", era2026}, {policy.FailDeny, "headers", era2026}, {policy.FailAllow, "headers", era2026},
	} {
		mode := tc.mode
		alice := func() envoyRequest {
			r := as("alice", "", "get_inventory")
			r.headers = tc.headers
			return r
		}
		t.Run(string(mode)+"/on "+tc.decided, func(t *testing.T) {
			srv := redistest.Start(t)
			rs := newReplicas(t, 2, func(s *policy.Snapshot) {
				s.Mesh.RateLimits = redisStore(srv.Addr(), mode)
				s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 2, Per: time.Hour}
			})
			a, b := rs.servers[0], rs.servers[1]
			requireForwarded(t, runEnvoy(t, a, alice(), envoyUpstream{}), "shared call 1")
			if st := a.RateLimitStatus(context.Background()); !st.Reachable || st.Store != "redis" {
				t.Errorf("status with Redis up: %+v", st)
			}

			srv.Kill()
			switch mode {
			case policy.FailLocal:
				// Each replica counts on its own: 2 each, then refused.
				for _, s := range []*Server{a, a, b, b} {
					requireForwarded(t, runEnvoy(t, s, alice(), envoyUpstream{}), "local call")
				}
				requireLimited(t, runEnvoy(t, a, alice(), envoyUpstream{}), "3rd local call", "perCaller", "q=2;w=3600")
				if got := rs.limitCounts(t); got["caller/local_allowed"] != 4 || got["caller/local_refused"] != 1 {
					t.Errorf("decisions = %v, want 4 local_allowed and 1 local_refused", got)
				}
			case policy.FailDeny:
				res := runEnvoy(t, a, alice(), envoyUpstream{})
				requireJSONRPCError(t, res.immediate, 503, 1, -32001, "rate limits unavailable: the shared store did not answer")
				if body := string(res.immediate.GetBody()); strings.Contains(body, srv.Addr()) {
					t.Errorf("the refusal tells the caller Redis's address: %s", body)
				}
				if h := immediateHeaders(res.immediate); h["retry-after"] != "1" {
					t.Errorf("Retry-After = %q, want 1", h["retry-after"])
				}
				if got := rs.limitCounts(t); got["caller/unavailable_refused"] != 1 {
					t.Errorf("decisions = %v, want 1 unavailable_refused", got)
				}
			case policy.FailAllow:
				for range 5 {
					requireForwarded(t, runEnvoy(t, b, alice(), envoyUpstream{}), "failure mode allow")
				}
				if got := rs.limitCounts(t); got["caller/unavailable_allowed"] != 5 {
					t.Errorf("decisions = %v, want 5 unavailable_allowed", got)
				}
			}
			if got := rs.storeCounts(t); got["decide/error"] == 0 {
				t.Errorf("mcpgate.ratelimit.store.duration counts = %v, want the failed round trip", got)
			}
			st := a.RateLimitStatus(context.Background())
			if st.Reachable || !strings.Contains(st.Error, srv.Addr()) || st.DownSince.IsZero() || !strings.Contains(st.Effect, "failureMode "+string(mode)) {
				t.Errorf("status with Redis down: %+v", st)
			}
			if j, _ := json.Marshal(st); !strings.Contains(string(j), `"reachable":false`) {
				t.Errorf("status JSON %s", j)
			}

			// A restarted Redis has lost the buckets (no persistence): the shared limit
			// starts again, 2 between both replicas. Each replica tries Redis again at
			// most a second after its last failure.
			srv.Restart(t)
			requireForwarded(t, waitShared(t, rs, b, alice()), "1st shared call after the restart")
			requireForwarded(t, waitShared(t, rs, a, alice()), "2nd shared call after the restart")
			requireLimited(t, runEnvoy(t, b, alice(), envoyUpstream{}), "3rd shared call", "perCaller", "q=2;w=3600")
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

// TLS to Redis, as managed Redis requires: the CA file and server name of the policy
// verify the server (by the address's host when serverName is unset), and a server that
// does not verify, or plaintext to a TLS port, is refused, never used.
func TestRedisTLS(t *testing.T) {
	ca := testpki.NewCA(t, "example.org")
	named, namedKey := ca.IssuePEM(t, "", testpki.WithDNS("redis.internal"))
	byIP, byIPKey := ca.IssuePEM(t, "", testpki.WithIP("127.0.0.1"))
	dir := t.TempDir()
	caFile, otherCA := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "other.pem")
	if err := os.WriteFile(caFile, ca.PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(otherCA, testpki.NewCA(t, "other.org").PEM, 0o600); err != nil {
		t.Fatal(err)
	}
	namedSrv, ipSrv := redistest.StartTLS(t, named, namedKey, ca.PEM), redistest.StartTLS(t, byIP, byIPKey, ca.PEM)
	for _, tc := range []struct {
		name               string
		addr               string
		tls                bool
		caFile, serverName string
		ok                 bool
		statusErr          string
	}{
		{"ca and server name", namedSrv.TLSAddr(), true, caFile, "redis.internal", true, ""},
		{"ca, name from the address", ipSrv.TLSAddr(), true, caFile, "", true, ""},
		{"another ca", namedSrv.TLSAddr(), true, otherCA, "redis.internal", false, "certificate"},
		{"wrong server name", namedSrv.TLSAddr(), true, caFile, "other.internal", false, "certificate"},
		{"name from the address, cert without it", namedSrv.TLSAddr(), true, caFile, "", false, "certificate"},
		{"plaintext to the TLS port", namedSrv.TLSAddr(), false, "", "", false, namedSrv.TLSAddr()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rs := newReplicas(t, 2, func(s *policy.Snapshot) {
				s.Mesh.RateLimits = redisStore(tc.addr, policy.FailDeny)
				s.Mesh.RateLimits.TLS, s.Mesh.RateLimits.CAFile, s.Mesh.RateLimits.ServerName = tc.tls, tc.caFile, tc.serverName
				s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 2, Per: time.Hour}
			})
			sub := "tls-" + tc.name
			if !tc.ok {
				res := runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{})
				if res.immediate == nil {
					t.Fatal("a call was admitted under failureMode deny with a Redis that cannot be used")
				}
				requireJSONRPCError(t, res.immediate, 503, 1, -32001, "rate limits unavailable")
				if st := rs.servers[0].RateLimitStatus(context.Background()); st.Reachable || !strings.Contains(st.Error, tc.statusErr) {
					t.Errorf("status: %+v, want an error naming %q", st, tc.statusErr)
				}
				return
			}
			requireForwarded(t, runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{}), "1st call")
			requireForwarded(t, runEnvoy(t, rs.servers[1], as(sub, "", "get_inventory"), envoyUpstream{}), "2nd call")
			requireLimited(t, runEnvoy(t, rs.servers[0], as(sub, "", "get_inventory"), envoyUpstream{}), "3rd call", "perCaller", "q=2;w=3600")
		})
	}
}

// A store the replica cannot use (a CA file that is not there) is a failure-mode
// decision, never an admitted call under deny; /readyz names the problem, the caller
// does not learn the file.
func TestRedisUnusableConfig(t *testing.T) {
	srv := redistest.Start(t)
	rs := newReplicas(t, 1, func(s *policy.Snapshot) {
		s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
		s.Mesh.RateLimits.TLS, s.Mesh.RateLimits.CAFile = true, "/nonexistent/redis-ca.pem"
		s.App("inventory").MCP.Limits.PerCaller = &policy.RateLimit{N: 100, Per: time.Hour}
	})
	res := runEnvoy(t, rs.servers[0], as("alice", "", "get_inventory"), envoyUpstream{})
	requireJSONRPCError(t, res.immediate, 503, 1, -32001, "rate limits unavailable")
	if body := string(res.immediate.GetBody()); strings.Contains(body, "redis-ca.pem") {
		t.Errorf("the refusal tells the caller mcpgate's configuration: %s", body)
	}
	if st := rs.servers[0].RateLimitStatus(context.Background()); st.Reachable || !strings.Contains(st.Error, "/nonexistent/redis-ca.pem") {
		t.Errorf("status: %+v", st)
	}
}

// headersOnly sends a POST's request headers down a new stream of s, as Envoy does
// before the body, and returns the stream, with the body still to send.
func headersOnly(t *testing.T, s *Server, md *corev3.Metadata, body string, extra ...string) (*fakeStream, context.CancelFunc) {
	t.Helper()
	f, cancel := openStream(t, s)
	hdrs := append([]string{":method", "POST", ":path", "/mcp", ":authority", "inventory", "content-type", "application/json",
		"accept", "application/json, text/event-stream", "content-length", strconv.Itoa(len(body))}, extra...)
	resp := f.exchange(t, &extprocv3.ProcessingRequest{MetadataContext: md, Request: &extprocv3.ProcessingRequest_RequestHeaders{
		RequestHeaders: &extprocv3.HttpHeaders{Headers: headerMap(hdrs...)}}})
	if ir := resp.GetImmediateResponse(); ir != nil {
		t.Fatalf("headers answered with %d: %s", ir.GetStatus().GetCode(), ir.GetBody())
	}
	return f, cancel
}

func sendBody(t *testing.T, f *fakeStream, body string) *extprocv3.ProcessingResponse {
	t.Helper()
	return f.exchange(t, &extprocv3.ProcessingRequest{Request: &extprocv3.ProcessingRequest_RequestBody{
		RequestBody: &extprocv3.HttpBody{Body: []byte(body), EndOfStream: true}}})
}

// waitKeys polls Redis until it holds n keys (the buckets spent and not given back).
func waitKeys(t *testing.T, c *redis.Client, n int64) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, err := c.DBSize(context.Background()).Result()
		if err == nil && got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis holds %d keys (err %v), want %d", got, err, n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// With Redis, a request whose headers say which buckets its message spends from is
// decided on its headers, while the body is on its way; the body then uses that
// decision, and a body that is not the message decided on gives back what it took.
func TestEarlyLimitDecision(t *testing.T) {
	srv := redistest.Start(t)
	raw := redis.NewClient(&redis.Options{Addr: srv.Addr(), Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { _ = raw.Close() })
	md := metadata("inventory", "my-agent", "mcp:tools", "inventory:read")
	getInv := call(1, "get_inventory", `{"product_id":"SKU-42"}`)
	era2025 := []string{"mcp-protocol-version", "2025-06-18"}
	fresh := func(t *testing.T, perTool bool) *replicas {
		t.Helper()
		if err := raw.FlushDB(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
		return newReplicas(t, 2, func(s *policy.Snapshot) {
			s.Mesh.RateLimits = redisStore(srv.Addr(), policy.FailDeny)
			lim := &s.App("inventory").MCP.Limits
			lim.PerCaller = &policy.RateLimit{N: 1, Per: time.Hour}
			if perTool {
				g, err := policy.CompileGlob("get_*")
				if err != nil {
					t.Fatal(err)
				}
				lim.PerTool = []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 1, Per: time.Hour}, Per: policy.PerCaller}}
			}
		})
	}
	full := func(s *Server, headers []string) envoyResult {
		return runEnvoy(t, s, envoyRequest{md: md, body: getInv, headers: headers}, envoyUpstream{})
	}

	t.Run("mcp-method headers", func(t *testing.T) {
		rs := fresh(t, true)
		f, _ := headersOnly(t, rs.servers[0], md, getInv, era2026...)
		// Both buckets (perCaller, perTool) are spent before the body is sent: the other
		// replica already refuses the same call.
		waitKeys(t, raw, 2)
		requireLimited(t, full(rs.servers[1], era2026), "a call while the first is buffered", "perCaller", "q=1;w=3600")
		// The body uses the decision taken on its headers: no second request is taken
		// (the limit is 1: a second would be refused).
		if ir := sendBody(t, f, getInv).GetImmediateResponse(); ir != nil {
			t.Fatalf("body refused: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
		}
		requireLimited(t, full(rs.servers[0], era2026), "the next call", "perCaller", "q=1;w=3600")
		if got := rs.limitCounts(t); got["caller/allowed"] != 1 || got["tool/allowed"] != 1 || got["caller/refused"] != 2 {
			t.Errorf("mcpgate.ratelimit.decisions = %v, want each bucket allowed once and 2 refusals", got)
		}
	})

	t.Run("refused on the headers", func(t *testing.T) {
		rs := fresh(t, true)
		requireForwarded(t, full(rs.servers[0], era2026), "first call")
		f, _ := headersOnly(t, rs.servers[1], md, getInv, era2026...)
		res := envoyResult{immediate: sendBody(t, f, getInv).GetImmediateResponse()}
		requireLimited(t, res, "second call", "perCaller", "q=1;w=3600")
	})

	t.Run("body not the message of the headers", func(t *testing.T) {
		rs := fresh(t, true)
		other := call(1, "list_products", `{}`)
		f, _ := headersOnly(t, rs.servers[0], md, other, era2026...)
		waitKeys(t, raw, 2) // spent on the headers
		requireJSONRPCError(t, sendBody(t, f, other).GetImmediateResponse(), 400, 1, CodeHeaderMismatch, "do not match the body")
		waitKeys(t, raw, 0) // given back
		// The give-back is a timed round trip of its own (recorded just after it returns).
		for deadline := time.Now().Add(2 * time.Second); rs.storeCounts(t)["refund/ok"] != 1; time.Sleep(2 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("mcpgate.ratelimit.store.duration counts = %v, want refund/ok 1", rs.storeCounts(t))
			}
		}
		requireForwarded(t, full(rs.servers[1], era2026), "the call after the refused one")
	})

	t.Run("without mcp-method, no perTool limit", func(t *testing.T) {
		rs := fresh(t, false)
		f, _ := headersOnly(t, rs.servers[0], md, getInv, era2025...)
		waitKeys(t, raw, 1)
		if ir := sendBody(t, f, getInv).GetImmediateResponse(); ir != nil {
			t.Fatalf("body refused: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
		}
		requireLimited(t, full(rs.servers[1], era2025), "the next call", "perCaller", "q=1;w=3600")
	})

	t.Run("a response spends nothing", func(t *testing.T) {
		rs := fresh(t, false)
		answer := `{"jsonrpc":"2.0","id":"srv-1","result":{}}`
		f, _ := headersOnly(t, rs.servers[0], md, answer, era2025...)
		waitKeys(t, raw, 1)
		if ir := sendBody(t, f, answer).GetImmediateResponse(); ir != nil {
			t.Fatalf("the client's answer refused: %d %s", ir.GetStatus().GetCode(), ir.GetBody())
		}
		waitKeys(t, raw, 0)
		requireForwarded(t, full(rs.servers[1], era2025), "a call after the answer")
	})

	t.Run("unparsable body", func(t *testing.T) {
		rs := fresh(t, false)
		f, _ := headersOnly(t, rs.servers[0], md, "{", era2025...)
		waitKeys(t, raw, 1)
		if ir := sendBody(t, f, "{").GetImmediateResponse(); ir.GetStatus().GetCode() != 400 {
			t.Fatalf("unparsable body answered %v", ir)
		}
		waitKeys(t, raw, 0)
		requireForwarded(t, full(rs.servers[1], era2025), "a call after the refused body")
	})

	t.Run("body never sent", func(t *testing.T) {
		rs := fresh(t, false)
		_, cancel := headersOnly(t, rs.servers[0], md, getInv, era2025...)
		waitKeys(t, raw, 1)
		cancel() // Envoy gave up on the request
		waitKeys(t, raw, 0)
		requireForwarded(t, full(rs.servers[1], era2025), "a call after the abandoned one")
	})
}

// The headers say which buckets a body spends from only in the cases earlyChecks lists.
func TestEarlyChecks(t *testing.T) {
	g, err := policy.CompileGlob("get_*")
	if err != nil {
		t.Fatal(err)
	}
	perTool := []policy.ToolRate{{Tool: g, Rate: policy.RateLimit{N: 1, Per: time.Hour}, Per: policy.PerCaller}}
	for _, tc := range []struct {
		name            string
		version, method string
		tool            string
		perTool         bool
		want            []string // the kinds of the buckets, nil: no early decision
	}{
		{"2025-03-26 may be a batch", "2025-03-26", "", "", false, nil},
		{"no version may be a batch", "", "", "", false, nil},
		{"2025-06-18 without perTool", "2025-06-18", "", "", false, []string{"caller", "subject"}},
		{"2025-06-18 with perTool", "2025-06-18", "", "", true, nil},
		{"2026-07-28 tools/call", "2026-07-28", "tools/call", "get_inventory", true, []string{"caller", "subject", "tool"}},
		{"2026-07-28 tools/call of an unlimited tool", "2026-07-28", "tools/call", "list_products", true, []string{"caller", "subject"}},
		{"2026-07-28 tools/list", "2026-07-28", "tools/list", "", true, []string{"caller", "subject"}},
		{"2026-07-28 without Mcp-Method", "2026-07-28", "", "", true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			app := &policy.App{ID: "inventory", MCP: &policy.MCP{}}
			app.MCP.Limits.PerCaller = &policy.RateLimit{N: 1, Per: time.Hour}
			app.MCP.Limits.PerSubject, app.MCP.Limits.SubjectClaim = &policy.RateLimit{N: 1, Per: time.Hour}, "sub"
			if tc.perTool {
				app.MCP.Limits.PerTool = perTool
			}
			st := &stream{app: app, mcpMethodHeader: tc.method, mcpNameHeader: tc.tool,
				req: Request{ProtocolVersion: tc.version, Caller: policy.Caller{AppID: "my-agent"}, Subject: "alice"}}
			var got []string
			for _, c := range st.earlyChecks() {
				got = append(got, c.kind)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("buckets %v, want %v", got, tc.want)
			}
		})
	}
}
