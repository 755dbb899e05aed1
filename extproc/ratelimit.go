package extproc

import (
	"container/list"
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
// was.
//
// Memory is bounded (maxLimiters buckets) without handing out allowances: when full, the
// buckets that have refilled completely go first (dropping one loses nothing: a new
// bucket is full too), then the least recently used. A caller who has spent its allowance
// and keeps calling stays in use and so stays limited, however many other keys arrive.
type limiters struct {
	mu  sync.Mutex
	m   map[string]*list.Element // of *bucket
	lru list.List                // front: most recently used
	max int                      // 0: maxLimiters
}

type bucket struct {
	key string
	lim *rate.Limiter
	n   int // the burst: a bucket holding n tokens is as good as a new one
}

const maxLimiters = 100000

// allow takes one token from the bucket named key, created with rl on first use. It
// returns false and how long until a token is available when the bucket is empty.
func (l *limiters) allow(key string, rl policy.RateLimit, now time.Time) (bool, time.Duration) {
	l.mu.Lock()
	if l.m == nil {
		l.m = make(map[string]*list.Element, 256)
	}
	var lim *rate.Limiter
	if e := l.m[key]; e != nil {
		l.lru.MoveToFront(e)
		lim = e.Value.(*bucket).lim
	} else {
		l.makeRoom(now)
		// N per period, with a burst of N: a caller may spend its whole allowance at once,
		// as "100/m" reads, but not more.
		lim = rate.NewLimiter(rate.Limit(float64(rl.N)/rl.Per.Seconds()), rl.N)
		l.m[key] = l.lru.PushFront(&bucket{key: key, lim: lim, n: rl.N})
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

// makeRoom frees places when the map is full: every bucket that has refilled, then least
// recently used ones until a tenth of the map is free, so that one sweep of the map pays
// for many inserts. l.mu is held.
func (l *limiters) makeRoom(now time.Time) {
	limit := l.max
	if limit <= 0 {
		limit = maxLimiters
	}
	if len(l.m) < limit {
		return
	}
	for e := l.lru.Back(); e != nil; {
		prev := e.Prev()
		if b := e.Value.(*bucket); b.lim.TokensAt(now) >= float64(b.n) {
			l.remove(e)
		}
		e = prev
	}
	for len(l.m) > limit-max(1, limit/10) && l.lru.Len() > 0 {
		l.remove(l.lru.Back())
	}
}

func (l *limiters) remove(e *list.Element) {
	delete(l.m, e.Value.(*bucket).key)
	l.lru.Remove(e)
}

// len is the number of buckets held.
func (l *limiters) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
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
	if ps := lim.PerSubject; ps != nil {
		if ok, wait := st.s.limits.allow(lengthPrefixed(st.app.ID, "subject", rateString(*ps), r.Subject), *ps, now); !ok {
			return "rate limit exceeded: limits.perSubject " + rateString(*ps) + " for this user", wait
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
