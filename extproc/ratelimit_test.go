package extproc

import (
	"strconv"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/structpb"

	"github.com/mcpgate/mcpgate/envoy/contract"
	"github.com/mcpgate/mcpgate/policy"
)

// A flood of distinct callers must neither refill an exhausted caller's allowance nor
// grow memory without bound.
func TestRateLimitFloodKeepsExhaustedCallerLimited(t *testing.T) {
	var l limiters
	perHour := policy.RateLimit{N: 2, Per: time.Hour}
	now := time.Unix(1_700_000_000, 0)
	for i := range 2 {
		if ok, _ := l.allow("victim", perHour, now); !ok {
			t.Fatalf("call %d of 2 limited", i)
		}
	}
	const flood = maxLimiters + maxLimiters/2
	for i := range flood {
		if i%1000 == 0 {
			if ok, _ := l.allow("victim", perHour, now); ok {
				t.Fatalf("after %d other callers, the exhausted caller was allowed again", i)
			}
		}
		l.allow("flood-"+strconv.Itoa(i), perHour, now)
		if i%10000 == 0 && l.len() > maxLimiters {
			t.Fatalf("%d buckets after %d keys, want at most %d", l.len(), i, maxLimiters)
		}
	}
	if n := l.len(); n > maxLimiters {
		t.Fatalf("%d buckets, want at most %d", n, maxLimiters)
	}
	// Buckets that have refilled are dropped before any in use: an hour later every
	// flood bucket is full again, and the victim's too.
	later := now.Add(time.Hour)
	if ok, _ := l.allow("victim", perHour, later); !ok {
		t.Fatal("an hour later the caller is still limited")
	}
}

// limits.perSubject limits each user, whichever App they call through.
func TestPerSubjectLimit(t *testing.T) {
	s := newDemoServer(t)
	lim := &s.store.Current().App("inventory").MCP.Limits
	lim.PerCaller, lim.PerTool, lim.PerSubject = nil, nil, &policy.RateLimit{N: 2, Per: time.Hour}
	as := func(sub string) envoyRequest {
		md := metadata("inventory", "my-agent", "mcp:tools", "inventory:read")
		md.FilterMetadata[contract.MetadataNamespace].Fields[contract.MetaSubject] = structpb.NewStringValue(sub)
		return envoyRequest{md: md, body: call(1, "get_inventory", `{"product_id":"SKU-42"}`)}
	}
	for i := range 2 {
		if res := runEnvoy(t, s, as("alice"), envoyUpstream{}); res.immediate != nil {
			t.Fatalf("alice's call %d limited: %s", i, res.immediate.GetBody())
		}
	}
	requireJSONRPCError(t, runEnvoy(t, s, as("alice"), envoyUpstream{}).immediate, 429, 1, -32001, "limits.perSubject 2/h")
	if res := runEnvoy(t, s, as("bob"), envoyUpstream{}); res.immediate != nil {
		t.Fatalf("bob limited by alice's use: %s", res.immediate.GetBody())
	}
}
