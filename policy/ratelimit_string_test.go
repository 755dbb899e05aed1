package policy

import (
	"testing"
	"time"
)

// RateLimit.String names the rate in the keys of the buckets (extproc, in memory and in
// Redis): a changed rendering would start every caller's allowance afresh on upgrade.
func TestRateLimitString(t *testing.T) {
	for _, tc := range []struct {
		r    RateLimit
		want string
	}{
		{RateLimit{N: 100, Per: time.Minute}, "100/m"},
		{RateLimit{N: 10, Per: time.Second}, "10/s"},
		{RateLimit{N: 1000, Per: time.Hour}, "1000/h"},
		{RateLimit{N: 600, Per: time.Minute, Burst: 50}, "600/m burst 50"},
		{RateLimit{N: 5, Per: time.Second, Burst: 5}, "5/s"}, // a burst of N is the default
		{RateLimit{N: 3, Per: 90 * time.Second}, "3/1m30s"},  // not from a policy file
	} {
		if got := tc.r.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.r, got, tc.want)
		}
	}
}
