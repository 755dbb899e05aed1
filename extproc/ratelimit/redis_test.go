package ratelimit

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/mcpgate/mcpgate/integration/redistest"
)

// testTimeout is the decision timeout of the tests that are not about timeouts: generous,
// so that a loaded CI machine running the race detector does not turn into flakes. The
// failure tests use the default (50ms) and measure it.
const testTimeout = 2 * time.Second

func newStore(t testing.TB, o Options) *Redis {
	t.Helper()
	if o.Timeout == 0 {
		o.Timeout = testTimeout
	}
	r, err := NewRedis(o)
	if err != nil {
		t.Fatalf("NewRedis: %v", err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// rawClient is a plain go-redis client, to look at the keys the store writes.
func rawClient(t testing.TB, addr string) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr, Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func requireAllow(t testing.TB, r *Redis, key string, l Limit) Result {
	t.Helper()
	res, err := r.Allow(context.Background(), key, l)
	if err != nil {
		t.Fatalf("Allow(%q): %v", key, err)
	}
	return res
}

func requireAllowN(t testing.TB, r *Redis, reqs ...Request) []Result {
	t.Helper()
	res, err := r.AllowN(context.Background(), reqs)
	if err != nil {
		t.Fatalf("AllowN: %v", err)
	}
	if len(res) != len(reqs) {
		t.Fatalf("AllowN answered %d results for %d requests", len(res), len(reqs))
	}
	return res
}

// requireNear fails unless got is in [want-below, want].
func requireNear(t testing.TB, what string, got, want, below time.Duration) {
	t.Helper()
	if got > want || got < want-below {
		t.Fatalf("%s = %s: want within %s below %s", what, got, below, want)
	}
}

func TestAllowThenRefuse(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	l := Limit{N: 5, Per: 10 * time.Second} // one per 2s, 5 at once

	start := time.Now()
	for i := range l.N {
		res := requireAllow(t, r, "caller", l)
		if !res.Allowed {
			t.Fatalf("request %d of %d refused: %+v", i+1, l.N, res)
		}
		if res.Remaining != l.N-1-i {
			t.Fatalf("request %d: Remaining = %d, want %d", i+1, res.Remaining, l.N-1-i)
		}
		if res.RetryAfter != 0 {
			t.Fatalf("request %d allowed with RetryAfter %s", i+1, res.RetryAfter)
		}
		requireNear(t, "ResetAfter", res.ResetAfter, time.Duration(i+1)*2*time.Second, time.Since(start)+time.Millisecond)
	}
	res := requireAllow(t, r, "caller", l)
	elapsed := time.Since(start)
	if res.Allowed {
		t.Fatalf("request %d allowed: %+v", l.N+1, res)
	}
	if res.Remaining != 0 {
		t.Fatalf("refused with Remaining %d", res.Remaining)
	}
	// Per/N after the first request; the requests took elapsed of it.
	requireNear(t, "RetryAfter", res.RetryAfter, 2*time.Second, elapsed+time.Millisecond)
	requireNear(t, "ResetAfter", res.ResetAfter, 10*time.Second, elapsed+time.Millisecond)

	// Another key is another bucket.
	if res := requireAllow(t, r, "other caller", l); !res.Allowed || res.Remaining != l.N-1 {
		t.Fatalf("a fresh bucket answered %+v", res)
	}
}

// TestReplicasShareLimit is the point of the package: two replicas (two clients, two
// pools) spend one allowance.
func TestReplicasShareLimit(t *testing.T) {
	srv := redistest.Start(t)
	a := newStore(t, Options{Address: srv.Addr()})
	b := newStore(t, Options{Address: srv.Addr()})
	l := Limit{N: 10, Per: time.Minute}

	allowed := 0
	for range 6 {
		if requireAllow(t, a, "shared", l).Allowed {
			allowed++
		}
	}
	for range 5 {
		if requireAllow(t, b, "shared", l).Allowed {
			allowed++
		}
	}
	if allowed != 10 {
		t.Fatalf("6 calls through one replica and 5 through another: %d allowed, want exactly 10", allowed)
	}
	if res := requireAllow(t, a, "shared", l); res.Allowed {
		t.Fatalf("the 12th call was allowed: %+v", res)
	}
}

func TestConcurrentNeverExceeds(t *testing.T) {
	srv := redistest.Start(t)
	stores := []*Redis{newStore(t, Options{Address: srv.Addr()}), newStore(t, Options{Address: srv.Addr()})}
	// One per 36s: nothing refills while the test runs.
	l := Limit{N: 100, Per: time.Hour}
	const goroutines, calls = 8, 40 // 320 calls for 100 requests

	var allowed, refused atomic.Int64
	errs := make(chan error, goroutines*calls)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := stores[g%len(stores)]
			for range calls {
				res, err := r.AllowN(context.Background(), []Request{
					{Key: "concurrent", Limit: l},
					{Key: fmt.Sprintf("goroutine %d", g), Limit: Limit{N: 1000, Per: time.Hour}},
				})
				switch {
				case err != nil:
					errs <- err
				case res[0].Allowed && res[1].Allowed:
					allowed.Add(1)
				default:
					refused.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if allowed.Load() != int64(l.N) || refused.Load() != goroutines*calls-int64(l.N) {
		t.Fatalf("%d concurrent calls over 2 replicas: %d allowed, %d refused; want exactly %d allowed",
			goroutines*calls, allowed.Load(), refused.Load(), l.N)
	}
}

func TestBurst(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	for _, burst := range []int{1, 3} {
		t.Run(fmt.Sprint("burst ", burst), func(t *testing.T) {
			key := t.Name()
			l := Limit{N: 10, Per: 10 * time.Second, Burst: burst} // one per second
			start := time.Now()
			for i := range burst {
				res := requireAllow(t, r, key, l)
				if !res.Allowed || res.Remaining != burst-1-i {
					t.Fatalf("request %d of a burst of %d: %+v", i+1, burst, res)
				}
			}
			res := requireAllow(t, r, key, l)
			if res.Allowed {
				t.Fatalf("request %d allowed with burst %d", burst+1, burst)
			}
			requireNear(t, "RetryAfter", res.RetryAfter, time.Second, time.Since(start)+time.Millisecond)
			requireNear(t, "ResetAfter", res.ResetAfter, time.Duration(burst)*time.Second, time.Since(start)+time.Millisecond)
		})
	}
}

// TestAllowNAllOrNothing checks that a call refused by one limit spends none of the
// others, and that a call is one decision over all its limits.
func TestAllowNAllOrNothing(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	raw := rawClient(t, srv.Addr())
	caller := Request{Key: "caller", Limit: Limit{N: 5, Per: time.Hour}}
	tool := Request{Key: "tool", Limit: Limit{N: 2, Per: time.Hour}}
	subject := Request{Key: "subject", Limit: Limit{N: 5, Per: time.Hour}}

	for i := range 2 {
		res := requireAllowN(t, r, caller, tool, subject)
		for j, x := range res {
			if !x.Allowed {
				t.Fatalf("call %d: limit %d refused: %+v", i+1, j, x)
			}
		}
		if res[0].Remaining != 4-i || res[1].Remaining != 1-i || res[2].Remaining != 4-i {
			t.Fatalf("call %d: Remaining %d, %d, %d", i+1, res[0].Remaining, res[1].Remaining, res[2].Remaining)
		}
	}
	before := rawValues(t, raw, "mcpgate:rl:caller", "mcpgate:rl:subject")

	// The tool's limit is spent: the call is refused, and the caller's and the
	// subject's buckets stay as they were; a bucket seen first in a refused call is not
	// even created.
	fresh := Request{Key: "fresh", Limit: Limit{N: 5, Per: time.Hour}}
	for range 3 {
		res := requireAllowN(t, r, caller, tool, subject, fresh)
		if !res[0].Allowed || res[1].Allowed || !res[2].Allowed || !res[3].Allowed {
			t.Fatalf("verdicts %v %v %v %v: want only the tool's limit to refuse", res[0].Allowed, res[1].Allowed, res[2].Allowed, res[3].Allowed)
		}
		if res[0].Remaining != 3 || res[2].Remaining != 3 || res[3].Remaining != 5 {
			t.Fatalf("refused call reported Remaining %d, %d, %d: want the unspent 3, 3, 5", res[0].Remaining, res[2].Remaining, res[3].Remaining)
		}
		if res[1].RetryAfter <= 0 || res[0].RetryAfter != 0 || res[2].RetryAfter != 0 {
			t.Fatalf("RetryAfter %s, %s, %s: want only the tool's set", res[0].RetryAfter, res[1].RetryAfter, res[2].RetryAfter)
		}
	}
	if after := rawValues(t, raw, "mcpgate:rl:caller", "mcpgate:rl:subject"); !slices.Equal(before, after) {
		t.Fatalf("a refused call changed the other buckets: %v, then %v", before, after)
	}
	if n := raw.Exists(context.Background(), "mcpgate:rl:fresh").Val(); n != 0 {
		t.Fatal("a refused call created the bucket of a limit that allowed it")
	}
	// The caller's bucket still has its 3.
	if res := requireAllow(t, r, caller.Key, caller.Limit); !res.Allowed || res.Remaining != 2 {
		t.Fatalf("caller's bucket after refused calls: %+v, want allowed with 2 left", res)
	}
}

// TestAllowNSameKeyTwice checks that a key twice in one call is two requests from one
// bucket, all or nothing as well.
func TestAllowNSameKeyTwice(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	q := Request{Key: "twice", Limit: Limit{N: 3, Per: time.Hour}}
	if res := requireAllowN(t, r, q, q); !res[0].Allowed || !res[1].Allowed || res[1].Remaining != 1 {
		t.Fatalf("first call: %+v", res)
	}
	// One left, the call needs two: refused, and the one stays.
	if res := requireAllowN(t, r, q, q); res[0].Allowed && res[1].Allowed {
		t.Fatalf("second call allowed with one request left: %+v", res)
	}
	if res := requireAllow(t, r, q.Key, q.Limit); !res.Allowed || res.Remaining != 0 {
		t.Fatalf("the last request: %+v", res)
	}
}

// TestRefund checks that a refund gives back exactly the requests a call took, in every
// bucket of the call, and that a bucket full again loses its key rather than going below
// full.
func TestRefund(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	raw := rawClient(t, srv.Addr())
	ctx := context.Background()
	caller := Request{Key: "caller", Limit: Limit{N: 3, Per: time.Hour}}
	tool := Request{Key: "tool", Limit: Limit{N: 2, Per: time.Hour}}

	requireAllowN(t, r, caller, tool)
	before := rawValues(t, raw, "mcpgate:rl:caller", "mcpgate:rl:tool")
	requireAllowN(t, r, caller, tool)
	if err := r.Refund(ctx, []Request{caller, tool}); err != nil {
		t.Fatalf("Refund: %v", err)
	}
	if after := rawValues(t, raw, "mcpgate:rl:caller", "mcpgate:rl:tool"); !slices.Equal(before, after) {
		t.Fatalf("after a call and its refund the buckets hold %v, want %v as before the call", after, before)
	}
	// The tool's second request is back: one more call passes, then none.
	if res := requireAllowN(t, r, caller, tool); !res[0].Allowed || !res[1].Allowed || res[1].Remaining != 0 {
		t.Fatalf("call after the refund: %+v", res)
	}
	if res := requireAllowN(t, r, caller, tool); res[1].Allowed {
		t.Fatalf("third call on a limit of 2: %+v", res)
	}

	// Refunding every request leaves the buckets full: no keys, the same as never used.
	for range 2 {
		if err := r.Refund(ctx, []Request{caller, tool}); err != nil {
			t.Fatalf("Refund: %v", err)
		}
	}
	if n := raw.Exists(ctx, "mcpgate:rl:caller", "mcpgate:rl:tool").Val(); n != 0 {
		t.Fatalf("%d keys left after every request was given back", n)
	}
	// A refund of a bucket that holds nothing changes nothing and creates no key.
	if err := r.Refund(ctx, []Request{caller}); err != nil {
		t.Fatalf("Refund: %v", err)
	}
	if n := raw.Exists(ctx, "mcpgate:rl:caller").Val(); n != 0 {
		t.Fatal("a refund created a bucket")
	}
	if res := requireAllowN(t, r, tool, tool); !res[0].Allowed || !res[1].Allowed || res[1].Remaining != 0 {
		t.Fatalf("a full bucket after refunds: %+v, want 2 requests and none left", res)
	}
	// A key twice in the refund gives back two requests.
	if err := r.Refund(ctx, []Request{tool, tool}); err != nil {
		t.Fatalf("Refund: %v", err)
	}
	if n := raw.Exists(ctx, "mcpgate:rl:tool").Val(); n != 0 {
		t.Fatal("two requests given back to a bucket of 2 that held 2: want it full")
	}
	if err := r.Refund(ctx, []Request{{Key: "x", Limit: Limit{N: 0, Per: time.Second}}}); !errors.Is(err, ErrInvalidLimit) {
		t.Fatalf("Refund of an invalid limit: %v, want ErrInvalidLimit", err)
	}
}

func rawValues(t *testing.T, c *redis.Client, keys ...string) []any {
	t.Helper()
	v, err := c.MGet(context.Background(), keys...).Result()
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestRefill checks that a spent bucket allows again after Per/N, on Redis's clock.
func TestRefill(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	l := Limit{N: 20, Per: time.Second} // one per 50ms

	// Spend the bucket: N at once, and more if the machine is so slow that some refill
	// meanwhile (bounded: a 20/s bucket refills 20 more in a second).
	allowed := 0
	var refused Result
	var sent time.Time // just before the refused call reached Redis
	for {
		sent = time.Now()
		res := requireAllow(t, r, "refill", l)
		if !res.Allowed {
			refused = res
			break
		}
		if allowed++; allowed > 10*l.N {
			t.Fatalf("%d requests allowed by a 20/s bucket and none refused", allowed)
		}
	}
	if allowed < l.N {
		t.Fatalf("a full 20/s bucket refused request %d", allowed+1)
	}
	if refused.RetryAfter <= 0 || refused.RetryAfter > 50*time.Millisecond {
		t.Fatalf("refused with RetryAfter %s: want in (0, 50ms]", refused.RetryAfter)
	}

	// Poll until allowed: not before RetryAfter (on Redis's clock the refused call ran
	// after sent, the allowed one before its reply), and well within a second.
	deadline := sent.Add(2 * time.Second)
	for {
		res := requireAllow(t, r, "refill", l)
		if res.Allowed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still refused 2s after spending a 20/s bucket: %+v", res)
		}
		time.Sleep(5 * time.Millisecond)
	}
	waited := time.Since(sent)
	if waited < refused.RetryAfter-time.Millisecond {
		t.Fatalf("allowed again after %s, but RetryAfter said %s", waited, refused.RetryAfter)
	}
	if waited > time.Second {
		t.Fatalf("allowed again only after %s; one request refills every 50ms", waited)
	}
	t.Logf("%d allowed, then refused with RetryAfter %s; allowed again after %s", allowed, refused.RetryAfter, waited)
}

// TestKeysExpire checks that every bucket key has a TTL, ending when the bucket is full
// again, and then goes away, so memory is bounded by the active keys.
func TestKeysExpire(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	raw := rawClient(t, srv.Addr())
	ctx := context.Background()

	res := requireAllowN(t, r,
		Request{Key: "long", Limit: Limit{N: 10, Per: time.Hour}},
		Request{Key: "short", Limit: Limit{N: 20, Per: time.Second}})
	for key, reset := range map[string]time.Duration{"long": res[0].ResetAfter, "short": res[1].ResetAfter} {
		ttl, err := raw.PTTL(ctx, "mcpgate:rl:"+key).Result()
		if err != nil {
			t.Fatal(err)
		}
		// PTTL is -1 without a TTL, -2 without the key.
		if ttl <= 0 || ttl > reset.Round(time.Millisecond)+time.Millisecond {
			t.Fatalf("key %q: PTTL %s, want positive and at most its ResetAfter %s", key, ttl, reset)
		}
	}

	// The 20/s bucket is full again 50ms later: its key goes.
	deadline := time.Now().Add(2 * time.Second)
	for raw.Exists(ctx, "mcpgate:rl:short").Val() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the key of a 20/s bucket still exists 2s after its only request")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if raw.Exists(ctx, "mcpgate:rl:long").Val() != 1 {
		t.Fatal("the key of a 10/h bucket went away")
	}
}

// TestArbitraryKeys checks that keys of any bytes are buckets of their own, stored under
// the prefix as given.
func TestArbitraryKeys(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr()})
	raw := rawClient(t, srv.Addr())
	keys := []string{
		"", " ", "a b", "nul\x00byte", "line\r\nFLUSHALL\r\n", "{hashtag}", "*", "?", "[a-z]",
		"'); redis.call('FLUSHALL') --", "\xff\xfe invalid utf-8", "ünïcödé", strings.Repeat("k", 64<<10),
		"mcpgate:rl:nested",
	}
	l := Limit{N: 1, Per: time.Hour}
	for _, k := range keys {
		if res := requireAllow(t, r, k, l); !res.Allowed {
			t.Fatalf("first request for key %.40q refused: keys collide", k)
		}
	}
	for _, k := range keys {
		if res := requireAllow(t, r, k, l); res.Allowed {
			t.Fatalf("second request for key %.40q allowed", k)
		}
		if raw.Exists(context.Background(), "mcpgate:rl:"+k).Val() != 1 {
			t.Fatalf("key %.40q is not stored as the prefix and the key", k)
		}
	}
	if n := raw.DBSize(context.Background()).Val(); n != int64(len(keys)) {
		t.Fatalf("%d keys in Redis for %d buckets", n, len(keys))
	}
}

func TestKeyPrefix(t *testing.T) {
	srv := redistest.Start(t)
	a := newStore(t, Options{Address: srv.Addr(), KeyPrefix: "a:"})
	b := newStore(t, Options{Address: srv.Addr(), KeyPrefix: "b:"})
	l := Limit{N: 1, Per: time.Hour}
	if !requireAllow(t, a, "k", l).Allowed || !requireAllow(t, b, "k", l).Allowed {
		t.Fatal("two prefixes share a bucket")
	}
	if n := rawClient(t, srv.Addr()).Exists(context.Background(), "a:k", "b:k").Val(); n != 2 {
		t.Fatalf("%d of the keys a:k and b:k exist", n)
	}
}

func TestInvalidLimit(t *testing.T) {
	// No Redis at all: an invalid limit must be refused before any round trip.
	r := newStore(t, Options{Address: closedPort(t)})
	for _, l := range []Limit{
		{N: 0, Per: time.Second},
		{N: -1, Per: time.Second},
		{N: 1, Per: 0},
		{N: 1, Per: -time.Second},
		{N: 1, Per: time.Second, Burst: -1},
		{N: 1, Per: 24 * time.Hour, Burst: 1 << 20}, // a bucket of 2900 years
	} {
		if _, err := r.Allow(context.Background(), "k", l); !errors.Is(err, ErrInvalidLimit) {
			t.Errorf("Allow with %+v: %v, want ErrInvalidLimit", l, err)
		}
	}
	// A valid limit in the same call does not save it.
	_, err := r.AllowN(context.Background(), []Request{{Key: "ok", Limit: Limit{N: 1, Per: time.Second}}, {Key: "bad"}})
	if !errors.Is(err, ErrInvalidLimit) {
		t.Fatalf("AllowN with one invalid limit: %v", err)
	}
	if res, err := r.AllowN(context.Background(), nil); res != nil || err != nil {
		t.Fatalf("AllowN of nothing: %v, %v", res, err)
	}
}

func TestGCRAInterval(t *testing.T) {
	for _, c := range []struct {
		l                   Limit
		interval, tolerance int64
	}{
		{Limit{N: 10, Per: time.Minute}, 6_000_000, 60_000_000},
		{Limit{N: 20, Per: time.Second, Burst: 5}, 50_000, 250_000},
		{Limit{N: 3, Per: time.Second}, 333_334, 1_000_002}, // rounded up: never more than 3/s
		{Limit{N: 5_000_000, Per: time.Second}, 1, 5_000_000},
	} {
		i, tol, err := c.l.gcra()
		if err != nil || i != c.interval || tol != c.tolerance {
			t.Errorf("%+v: interval %d, tolerance %d, %v; want %d, %d", c.l, i, tol, err, c.interval, c.tolerance)
		}
	}
}

func TestNewRedisOptions(t *testing.T) {
	for _, o := range []Options{{}, {Address: "unix://"}, {Address: "127.0.0.1:1", DB: -1}, {Address: "127.0.0.1:1", Timeout: -time.Second},
		{Address: "unix:///run/redis.sock", Cluster: true}, {Address: "127.0.0.1:1", DB: 1, Cluster: true},
		{Address: "127.0.0.1:1", Sentinel: &Sentinel{MasterName: "m", Addrs: []string{"127.0.0.1:2"}}},
		{Sentinel: &Sentinel{Addrs: []string{"127.0.0.1:2"}}}, {Sentinel: &Sentinel{MasterName: "m"}},
		{Cluster: true, Sentinel: &Sentinel{MasterName: "m", Addrs: []string{"127.0.0.1:2"}}},
		{Password: "x", PasswordFile: "/p", Sentinel: &Sentinel{MasterName: "m", Addrs: []string{"127.0.0.1:2"}}}} {
		if _, err := NewRedis(o); err == nil {
			t.Errorf("NewRedis(%+v) accepted", o)
		}
	}
	r, err := NewRedis(Options{Address: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The sentinels' password file is read when the store is made: a missing one is an
	// error naming the file, not a store that cannot authenticate.
	missing := filepath.Join(t.TempDir(), "sentinel-password")
	_, err = NewRedis(Options{Sentinel: &Sentinel{MasterName: "m", Addrs: []string{"127.0.0.1:2"}, PasswordFile: missing}})
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing sentinel password file: %v", err)
	}
	if r.timeout != DefaultTimeout || r.prefix != DefaultKeyPrefix {
		t.Fatalf("defaults: timeout %s, prefix %q", r.timeout, r.prefix)
	}
}

// TestUnixAddress checks that unix:// addresses dial a Unix socket.
func TestUnixAddress(t *testing.T) {
	r := newStore(t, Options{Address: "unix:///nonexistent/redis.sock", Timeout: DefaultTimeout})
	err := r.Ping(context.Background())
	if err == nil || !strings.Contains(err.Error(), "dial unix /nonexistent/redis.sock") {
		t.Fatalf("Ping over a missing socket: %v", err)
	}
	if !strings.HasPrefix(err.Error(), "redis unix:///nonexistent/redis.sock: ") {
		t.Fatalf("error does not name the address: %v", err)
	}
}

// TestPassword checks that the password reaches Redis, and that a failed handshake names
// the server and not the password.
func TestPassword(t *testing.T) {
	srv := redistest.Start(t)
	const password, wrong = "right-password", "hunter2-not-in-errors"
	if err := rawClient(t, srv.Addr()).ConfigSet(context.Background(), "requirepass", password).Err(); err != nil {
		t.Fatal(err)
	}
	l := Limit{N: 1, Per: time.Second}

	if _, err := newStore(t, Options{Address: srv.Addr()}).Allow(context.Background(), "k", l); err == nil {
		t.Fatal("a store without the password was served")
	}
	r := newStore(t, Options{Address: srv.Addr(), Password: wrong})
	_, err := r.Allow(context.Background(), "k", l)
	if err == nil {
		t.Fatal("a store with a wrong password was served")
	}
	if strings.Contains(err.Error(), wrong) {
		t.Fatalf("the error shows the password: %v", err)
	}
	if !strings.HasPrefix(err.Error(), "redis "+srv.Addr()+": ") {
		t.Fatalf("the error does not name the server: %v", err)
	}
	t.Logf("wrong password: %v", err)

	if res := requireAllow(t, newStore(t, Options{Address: srv.Addr(), Password: password}), "k", l); !res.Allowed {
		t.Fatalf("with the password: %+v", res)
	}
}

// The password file is read at every dial: a rotation on both sides takes effect
// without a new store, and a missing file is an error naming the file, not the secret.
func TestPasswordFileRotation(t *testing.T) {
	srv := redistest.Start(t)
	raw := rawClient(t, srv.Addr())
	ctx := context.Background()
	if err := raw.ConfigSet(ctx, "requirepass", "first-secret").Err(); err != nil {
		t.Fatal(err)
	}
	raw = redis.NewClient(&redis.Options{Addr: srv.Addr(), Password: "first-secret", Protocol: 2, DisableIdentity: true})
	t.Cleanup(func() { _ = raw.Close() })
	file := t.TempDir() + "/redis-password"
	if err := os.WriteFile(file, []byte("first-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r := newStore(t, Options{Address: srv.Addr(), PasswordFile: file})
	l := Limit{N: 100, Per: time.Second}
	if res := requireAllow(t, r, "k", l); !res.Allowed {
		t.Fatalf("with the password file: %+v", res)
	}

	// Rotate: the server's password, then the file; drop the connections so the store
	// dials again (as a Redis failover or restart would).
	if err := raw.ConfigSet(ctx, "requirepass", "second-secret").Err(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, []byte("second-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := raw.Do(ctx, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		res, err := r.Allow(ctx, "k", l)
		if err == nil && res.Allowed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after rotation the store never authenticated again: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if err := raw.Do(ctx, "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes").Err(); err != nil {
		t.Fatal(err)
	}
	var err error
	// A call may first find a pooled connection being closed (an EOF): wait for the dial.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if _, err = r.Allow(ctx, "k", l); err != nil && strings.Contains(err.Error(), file) {
			break
		}
	}
	if err == nil || !strings.Contains(err.Error(), file) || strings.Contains(err.Error(), "second-secret") {
		t.Fatalf("a missing password file: %v, want an error naming %s and not the password", err, file)
	}
	if _, err := NewRedis(Options{Address: srv.Addr(), Password: "x", PasswordFile: file}); err == nil {
		t.Fatal("Password and PasswordFile together were accepted")
	}
}

// TestRedisDownAndBack checks the failure path: a dead Redis is an error within about
// the timeout (the caller's failure mode decides), and the same *Redis works again once
// Redis is back, with no restart of the replica.
func TestRedisDownAndBack(t *testing.T) {
	srv := redistest.Start(t)
	r := newStore(t, Options{Address: srv.Addr(), Timeout: DefaultTimeout})
	l := Limit{N: 100, Per: time.Hour}
	// Several connections in the pool, so that the dead ones must all be noticed.
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() { defer wg.Done(); requireAllow(t, r, "down", l) }()
	}
	wg.Wait()

	srv.Kill()
	// More failed calls than the pool's size (20 on 2 CPUs): go-redis then stops dialing
	// and fails at once, until a background probe, once a second, reaches Redis again.
	for i := range 30 {
		start := time.Now()
		_, err := r.Allow(context.Background(), "down", l)
		took := time.Since(start)
		if err == nil {
			t.Fatalf("call %d: Allow succeeded with Redis killed", i+1)
		}
		if took > time.Second {
			t.Fatalf("call %d: Allow took %s to fail; the timeout is %s", i+1, took, DefaultTimeout)
		}
		if !strings.HasPrefix(err.Error(), "redis "+srv.Addr()+": ") {
			t.Fatalf("error does not name the server: %v", err)
		}
		if i == 0 || i == 29 {
			t.Logf("call %d with Redis down: %v after %s", i+1, err, took)
		}
	}
	if err := r.Ping(context.Background()); err == nil {
		t.Fatal("Ping succeeded with Redis killed")
	}

	srv.Restart(t)
	// go-redis drops dead pooled connections when it takes them (a read check) and
	// dials anew; after a run of failed dials it fails fast for up to a second, until its
	// background probe reaches Redis. The restarted Redis has no scripts: the store
	// answers NOSCRIPT with EVAL.
	back := time.Now()
	deadline := back.Add(5 * time.Second)
	var err error
	for {
		var res Result
		if res, err = r.Allow(context.Background(), "down", l); err == nil {
			if !res.Allowed || res.Remaining != l.N-1 {
				t.Fatalf("first decision after the restart (empty data): %+v", res)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Allow still fails 5s after Redis came back: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("Allow works again %s after the restart", time.Since(back))
	if err := r.Ping(context.Background()); err != nil {
		t.Fatalf("Ping after the restart: %v", err)
	}
}

// TestRedisHangs checks that a Redis that accepts connections and never answers (a
// stalled server, a black-holed network) costs a decision about the timeout, not
// go-redis's default of seconds.
func TestRedisHangs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})

	r := newStore(t, Options{Address: ln.Addr().String(), Timeout: DefaultTimeout})
	for i := range 3 {
		start := time.Now()
		_, err := r.Allow(context.Background(), "k", Limit{N: 1, Per: time.Second})
		took := time.Since(start)
		if err == nil {
			t.Fatal("Allow succeeded against a server that never answers")
		}
		// About the timeout; the slack is for a loaded CI machine (go-redis's own
		// default would be 5s).
		if took > time.Second {
			t.Fatalf("call %d took %s to time out; the timeout is %s", i+1, took, DefaultTimeout)
		}
		t.Logf("call %d against a hung server: %v after %s", i+1, err, took)
	}

	// A caller's earlier deadline wins over the timeout.
	r2 := newStore(t, Options{Address: ln.Addr().String(), Timeout: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := r2.Allow(ctx, "k", Limit{N: 1, Per: time.Second}); err == nil {
		t.Fatal("Allow succeeded against a server that never answers")
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("a 50ms context deadline took %s; the store's timeout (5s) won", took)
	}
}

// closedPort is a loopback address that refuses connections.
func closedPort(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// BenchmarkAllow is one decision on one bucket, on loopback.
func BenchmarkAllow(b *testing.B) {
	srv := redistest.Start(b)
	r := newStore(b, Options{Address: srv.Addr()})
	l := Limit{N: 1 << 30, Per: time.Hour}
	benchDecisions(b, func() error {
		_, err := r.Allow(context.Background(), "bench", l)
		return err
	})
}

// BenchmarkAllowN3 is one decision over three buckets (caller, tool, subject): still
// one round trip.
func BenchmarkAllowN3(b *testing.B) {
	l := Limit{N: 1 << 30, Per: time.Hour}
	// One {tag}, as mcpgate's keys have: a cluster needs it, a standalone Redis ignores it.
	reqs := []Request{{Key: "{app}:caller:my-agent", Limit: l}, {Key: "{app}:tool:my-agent:search", Limit: l}, {Key: "{app}:subject:alice", Limit: l}}
	for _, topo := range []string{"standalone", "cluster"} {
		b.Run(topo, func(b *testing.B) {
			var r *Redis
			if topo == "cluster" {
				r = newStore(b, Options{Address: redistest.StartCluster(b, 3).Addr(), Cluster: true})
			} else {
				r = newStore(b, Options{Address: redistest.Start(b).Addr()})
			}
			benchDecisions(b, func() error {
				res, err := r.AllowN(context.Background(), reqs)
				if err == nil && !res[0].Allowed {
					err = errors.New("refused")
				}
				return err
			})
		})
	}
}

// benchDecisions runs decide b.N times and reports the median and 99th percentile of one
// decision, in microseconds.
func benchDecisions(b *testing.B, decide func() error) {
	if err := decide(); err != nil { // dial and load the script outside the timing
		b.Fatal(err)
	}
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if err := decide(); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
	}
}
