package extproc

import (
	"math"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/mcpgate/mcpgate/policy"
)

// limiters holds the token buckets of limits.perCaller and limits.perTool. Limits are per
// mcpgate replica: replicas share no state, so N replicas admit up to N times the rate.
// Buckets are keyed by app, limit and rate: an edited rate takes effect at once with a
// fresh bucket, while an unrelated policy edit leaves every caller's spent allowance as it
// was. The map is bounded and simply reset when full (a reset only refills buckets).
type limiters struct {
	mu sync.Mutex
	m  map[string]*rate.Limiter
}

const maxLimiters = 100000

// allow takes one token from the bucket named key, created with rl on first use. It
// returns false and how long until a token is available when the bucket is empty.
func (l *limiters) allow(key string, rl policy.RateLimit, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	if l.m == nil || len(l.m) >= maxLimiters {
		l.m = make(map[string]*rate.Limiter, 256)
	}
	lim := l.m[key]
	if lim == nil {
		// N per period, with a burst of N: a caller may spend its whole allowance at once,
		// as "100/m" reads, but not more.
		lim = rate.NewLimiter(rate.Limit(float64(rl.N)/rl.Per.Seconds()), rl.N)
		l.m[key] = lim
	}
	l.mu.Unlock()
	r := lim.ReserveN(now, 1)
	if !r.OK() {
		return false, rl.Per
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

// rateLimit checks the app's limits for one message. It returns a reason and a retry
// delay when a limit is exceeded.
func (st *stream) rateLimit(r *Request, now time.Time) (string, time.Duration) {
	lim := st.app.MCP.Limits
	if pc := lim.PerCaller; pc != nil {
		who := r.Caller.AppID
		if who == "" {
			who = "sub:" + r.Subject // JWT-only callers without an App ID: per subject
		}
		if ok, wait := st.s.limits.allow(lengthPrefixed(st.app.ID, "caller", rateString(*pc), who), *pc, now); !ok {
			return "rate limit exceeded: limits.perCaller " + rateString(*pc) + " for this caller", wait
		}
	}
	if r.Method == "tools/call" {
		for _, tr := range lim.PerTool {
			if tr.Tool.Match(r.Tool) {
				if ok, wait := st.s.limits.allow(lengthPrefixed(st.app.ID, "tool", rateString(tr.Rate), tr.Tool.String()), tr.Rate, now); !ok {
					return "rate limit exceeded: limits.perTool " + tr.Tool.String() + " " + rateString(tr.Rate), wait
				}
				break // the first matching limit applies
			}
		}
	}
	return "", 0
}

func rateString(rl policy.RateLimit) string {
	unit := rl.Per.String() // policy accepts only s, m and h
	switch rl.Per {
	case time.Second:
		unit = "s"
	case time.Minute:
		unit = "m"
	case time.Hour:
		unit = "h"
	}
	return strconv.Itoa(rl.N) + "/" + unit
}

// retryAfter renders a delay for the Retry-After header (whole seconds, at least 1).
func retryAfter(d time.Duration) string {
	return strconv.Itoa(int(math.Max(1, math.Ceil(d.Seconds()))))
}
