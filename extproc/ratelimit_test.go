package extproc

import (
	"strconv"
	"testing"
	"time"

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
