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

// limiters holds the in-process token buckets of the limits: the only ones without a
// shared store (Mesh.spec.rateLimits.redis), and the fallback of failureMode local when
// the store is down. They are per mcpgate replica: replicas share no state, so N
// replicas admit up to N times the rate.
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

// reserve takes one token from the bucket named key, created with rl on first use. It
// returns the reservation (to give the token back when another limit refuses the call),
// or false and how long until a token is available when the bucket is empty. When it
// took one and left is not nil, left is set to what the bucket holds after it.
func (l *limiters) reserve(key string, rl policy.RateLimit, now time.Time, left *quotaLeft) (*rate.Reservation, bool, time.Duration) {
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
		// N per period, with a burst of N unless the policy says otherwise: a caller may
		// spend its whole allowance at once, as "100/m" reads, but not more.
		n := rl.Capacity()
		lim = rate.NewLimiter(rate.Limit(float64(rl.N)/rl.Per.Seconds()), n)
		l.m[key] = l.lru.PushFront(&bucket{key: key, lim: lim, n: n})
	}
	l.mu.Unlock()
	r := lim.ReserveN(now, 1)
	if !r.OK() {
		return nil, false, rl.Per
	}
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return nil, false, d
	}
	if left != nil {
		tokens := lim.TokensAt(now)
		left.remaining = int(math.Floor(tokens))
		left.reset = time.Duration((float64(lim.Burst()) - tokens) / float64(lim.Limit()) * float64(time.Second))
	}
	return r, true, 0
}

// allow is reserve without the reservation.
func (l *limiters) allow(key string, rl policy.RateLimit, now time.Time) (bool, time.Duration) {
	_, ok, wait := l.reserve(key, rl, now, nil)
	return ok, wait
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

// retryAfter renders a delay for the Retry-After header (whole seconds, at least 1).
func retryAfter(d time.Duration) string {
	return strconv.Itoa(int(math.Max(1, math.Ceil(d.Seconds()))))
}
