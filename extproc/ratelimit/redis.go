// Package ratelimit is the shared store of mcpgate's rate limits: buckets in Redis, so
// that N replicas behind one Service admit N requests per period between them, not N
// times as many.
//
// The algorithm is GCRA, the generic cell rate algorithm (ITU-T I.371's virtual
// scheduling; the token bucket seen from its arrival times): each key holds one number,
// the theoretical arrival time (TAT) at which the bucket is full again. A decision is one
// Lua script, run atomically by Redis: no read-modify-write race between replicas, and
// one round trip however many limits a call must pass. Time is Redis's own clock (TIME),
// never a replica's, so replicas with skewed clocks agree.
//
// The same Redis holds small records that belong to one owner, shared by the replicas
// too (claim.go: mcpgate's MCP task table).
package ratelimit

import (
	"context"
	"crypto/tls"
	_ "embed"
	"errors"
	"fmt"
	"math"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Defaults of Options.
const (
	// DefaultTimeout bounds one decision. A rate-limit check sits on the path of every
	// MCP call: a Redis that is slow or gone must cost little before the caller's
	// failure mode decides, and loopback or same-zone Redis answers in well under 1ms.
	DefaultTimeout = 50 * time.Millisecond
	// DefaultKeyPrefix starts every key, so the buckets can share a Redis with other data.
	DefaultKeyPrefix = "mcpgate:rl:"
)

// maxTolerance bounds a bucket's burst tolerance (Per/N × Burst, in microseconds) so that
// TAT = now + tolerance, about 1.8e15 µs + 1.1e15 µs today, stays a whole number that
// Lua's doubles hold exactly (under 2^53 ≈ 9e15). 2^50 µs is about 35 years.
const maxTolerance = 1 << 50

// ErrInvalidLimit is returned for a Limit that is not a rate (N or Per not positive, a
// negative Burst, a tolerance beyond 35 years); no request is sent to Redis.
var ErrInvalidLimit = errors.New("ratelimit: invalid limit")

// Limit is N requests per Per, with Burst requests allowed at once (Burst 0 means N).
//
// The emission interval Per/N is kept in whole microseconds, rounded up: a limit never
// admits more than N per Per, and at most 1µs per request fewer (a limit above a million
// per second admits one per microsecond).
type Limit struct {
	N     int
	Per   time.Duration
	Burst int
}

// Request is one bucket that a call must pass: its key (any bytes; the store prefixes
// it) and its limit. The same key with another Limit is the same bucket: GCRA's state is
// a time, which stays meaningful when the rate changes.
type Request struct {
	Key   string
	Limit Limit
}

// Result of one decision on one bucket.
type Result struct {
	// Allowed is this bucket's verdict. In AllowN the call was admitted, and a request
	// taken from every bucket, only if every Result is Allowed.
	Allowed bool
	// Remaining is the requests still allowed right now: after this one when the call
	// was admitted, as the bucket stands (nothing spent) when it was refused.
	Remaining int
	// RetryAfter, when this bucket refused, is the time until it allows one request; 0
	// when it allowed.
	RetryAfter time.Duration
	// ResetAfter is the time until the bucket is full again (the reset of the IETF
	// RateLimit header fields draft).
	ResetAfter time.Duration
}

// Options configure the Redis store.
type Options struct {
	Address  string // host:port, or unix:///path/to.sock
	Password string // "" none
	// PasswordFile, when set, holds the password instead (AUTH of the default user),
	// read at every new connection: a rotated file takes effect without a restart,
	// on the next dial. Trailing newlines are not part of it.
	PasswordFile string
	DB           int           // the database number (SELECT)
	TLS          *tls.Config   // nil: plaintext
	Timeout      time.Duration // bounds each decision (dial, read, write); 0: DefaultTimeout
	// KeyPrefix starts every key; "": DefaultKeyPrefix.
	KeyPrefix string
	// Cluster: Address is one node of a Redis Cluster (or a managed service's
	// configuration endpoint), from which the client learns the others and which node
	// holds which slot. All keys of one AllowN or Refund must then hash to one slot
	// (share a {hash tag}); DB must be 0, and Address host:port.
	Cluster bool
	// Sentinel, when set, finds the primary through Redis Sentinel, and follows it when
	// Sentinel fails over to a replica; Address is then empty.
	Sentinel *Sentinel
}

// Sentinel names a primary that Redis Sentinel watches.
type Sentinel struct {
	MasterName string   // the name Sentinel monitors it under (sentinel monitor <name> …)
	Addrs      []string // host:port of one or more sentinels
	// PasswordFile, when set, holds the sentinels' own password (their requirepass),
	// read once, when the store is made. The primary's password is Options'.
	PasswordFile string
}

// Redis is the shared store, over one go-redis connection pool (one per node of a
// cluster). It is safe for concurrent use, dials lazily and reconnects by itself after
// Redis comes back.
type Redis struct {
	c       redis.UniversalClient
	addr    string // Options.Address, or the sentinels and primary name: for errors (never the password)
	timeout time.Duration
	prefix  string
}

// NewRedis returns the store that o describes. It does not dial: the first decision
// does, and a Redis that is down at start is an error of each decision, not of startup.
func NewRedis(o Options) (*Redis, error) {
	quietOnce.Do(func() {
		// go-redis logs every failed dial to stderr through a process-wide logger, in
		// its own format; the failures are errors of the decisions, which mcpgate
		// reports (once per outage, with the failure mode) in its own log.
		redis.SetLogger(discardLogger{})
	})
	if o.Sentinel != nil {
		return newSentinel(o)
	}
	if o.Address == "" {
		return nil, errors.New("ratelimit: redis address is empty")
	}
	if o.DB < 0 {
		return nil, fmt.Errorf("ratelimit: redis %s: database %d is negative", o.Address, o.DB)
	}
	if o.Timeout < 0 {
		return nil, fmt.Errorf("ratelimit: redis %s: timeout %s is negative", o.Address, o.Timeout)
	}
	o.defaults()
	network, addr := "tcp", o.Address
	if rest, ok := strings.CutPrefix(o.Address, "unix://"); ok {
		network, addr = "unix", rest
		if addr == "" {
			return nil, fmt.Errorf("ratelimit: redis %s: no socket path", o.Address)
		}
		if o.Cluster {
			// Cluster nodes announce host:port to each other and to clients.
			return nil, fmt.Errorf("ratelimit: redis %s: a cluster is reached on host:port, not a unix socket", o.Address)
		}
	}
	if o.Cluster && o.DB != 0 {
		return nil, fmt.Errorf("ratelimit: redis %s: a cluster has only database 0, not %d", o.Address, o.DB)
	}
	creds, err := o.credentials(o.Address)
	if err != nil {
		return nil, err
	}
	r := &Redis{addr: o.Address, timeout: o.Timeout, prefix: o.KeyPrefix}
	if o.Cluster {
		r.c = redis.NewClusterClient(&redis.ClusterOptions{
			Addrs:                      []string{addr},
			Password:                   o.Password,
			CredentialsProviderContext: creds,
			TLSConfig:                  o.TLS,

			DialTimeout:           o.Timeout,
			ReadTimeout:           o.Timeout,
			WriteTimeout:          o.Timeout,
			PoolTimeout:           o.Timeout,
			ContextTimeoutEnabled: true,
			DialerRetries:         1,
			// A node's own client never retries (MaxRetries -1, as below). The cluster
			// client's attempts follow MOVED and ASK, which a node answers without
			// running anything (a slot moved by a resharding or a failover), and READONLY
			// from a demoted primary; the scripts that spend run as commands marked
			// NoRetry (see once), so a lost reply is never sent again. Three redirects,
			// go-redis's default.
			MaxRetries:   -1,
			MaxRedirects: 3,
			// EVALSHA goes to the primary of its first key's slot; no COMMAND round trip
			// to learn routing policies.
			DisableRoutingPolicies: true,

			Protocol:                 2,
			DisableIdentity:          true,
			MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
		})
		return r, nil
	}
	r.c = redis.NewClient(&redis.Options{
		Network:  network,
		Addr:     addr,
		Password: o.Password,
		// A provider's error fails the dial, and so the decision, naming the file.
		CredentialsProviderContext: creds,
		DB:                         o.DB,
		TLSConfig:                  o.TLS,

		// Every step is bounded by the one timeout, and the caller's context deadline
		// too when it is earlier (ContextTimeoutEnabled), so a decision never takes
		// longer than Timeout.
		DialTimeout:           o.Timeout,
		ReadTimeout:           o.Timeout,
		WriteTimeout:          o.Timeout,
		PoolTimeout:           o.Timeout,
		ContextTimeoutEnabled: true,
		// One dial per attempt: go-redis's default retries a failed dial 5 times, 100ms
		// apart, which a 50ms budget cannot use. A refused dial then fails at once.
		DialerRetries: 1,
		// No command retries: a script that ran but whose reply was lost would spend
		// twice, and the budget is one attempt anyway. (The EVAL after NOSCRIPT is not a
		// retry: the EVALSHA ran nothing.)
		MaxRetries: -1,

		// RESP2: the script's reply is a flat array of integers, and RESP3's push
		// notifications, client-side caching and maintenance notifications are not used
		// here; disabling them keeps each new connection's handshake to HELLO (and
		// SELECT), with no CLIENT SETINFO, which Redis before 7.2 rejects anyway.
		Protocol:                 2,
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	return r, nil
}

// newSentinel is NewRedis for o.Sentinel: a go-redis failover client, which asks the
// sentinels for the primary's address at each dial and drops its connections when they
// announce another (+switch-master), with the same timeouts and no retries.
func newSentinel(o Options) (*Redis, error) {
	s := o.Sentinel
	name := fmt.Sprintf("%s (sentinel %s)", s.MasterName, strings.Join(s.Addrs, ","))
	switch {
	case o.Address != "":
		return nil, fmt.Errorf("ratelimit: redis %s: set Address or Sentinel, not both", name)
	case s.MasterName == "":
		return nil, errors.New("ratelimit: redis sentinel: no master name")
	case len(s.Addrs) == 0:
		return nil, fmt.Errorf("ratelimit: redis %s: no sentinel address", name)
	case o.Cluster:
		return nil, fmt.Errorf("ratelimit: redis %s: a cluster has no sentinels", name)
	case o.DB < 0 || o.Timeout < 0:
		return nil, fmt.Errorf("ratelimit: redis %s: negative database or timeout", name)
	}
	o.defaults()
	creds, err := o.credentials(name)
	if err != nil {
		return nil, err
	}
	var sentinelPassword string
	if s.PasswordFile != "" {
		if sentinelPassword, err = readPassword(s.PasswordFile); err != nil {
			return nil, fmt.Errorf("ratelimit: redis %s: sentinel %w", name, err)
		}
	}
	c := redis.NewFailoverClient(&redis.FailoverOptions{
		MasterName:                 s.MasterName,
		SentinelAddrs:              s.Addrs,
		SentinelPassword:           sentinelPassword,
		Password:                   o.Password,
		CredentialsProviderContext: creds,
		DB:                         o.DB,
		TLSConfig:                  o.TLS,

		DialTimeout:           o.Timeout,
		ReadTimeout:           o.Timeout,
		WriteTimeout:          o.Timeout,
		PoolTimeout:           o.Timeout,
		ContextTimeoutEnabled: true,
		DialerRetries:         1,
		MaxRetries:            -1, // as NewRedis's, and the scripts are NoRetry anyway

		Protocol:        2,
		DisableIdentity: true,
	})
	return &Redis{c: c, addr: name, timeout: o.Timeout, prefix: o.KeyPrefix}, nil
}

func (o *Options) defaults() {
	if o.Timeout == 0 {
		o.Timeout = DefaultTimeout
	}
	if o.KeyPrefix == "" {
		o.KeyPrefix = DefaultKeyPrefix
	}
}

// credentials is the credentials provider of o.PasswordFile (nil without one), which
// reads it at every new connection. name names the store in errors.
func (o *Options) credentials(name string) (func(context.Context) (string, string, error), error) {
	file := o.PasswordFile
	if file == "" {
		return nil, nil
	}
	if o.Password != "" {
		return nil, fmt.Errorf("ratelimit: redis %s: set Password or PasswordFile, not both", name)
	}
	return func(context.Context) (string, string, error) {
		pw, err := readPassword(file)
		return "", pw, err
	}, nil
}

// readPassword reads a password file, trailing newlines not part of the password.
// Its errors name the file, never its contents.
func readPassword(file string) (string, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("redis password file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("redis password file %s is empty", file)
	}
	return pw, nil
}

var quietOnce sync.Once

type discardLogger struct{}

func (discardLogger) Printf(context.Context, string, ...any) {}

// gcraSource is the decision script, kept in its own file to be read as Lua.
//
//go:embed gcra.lua
var gcraSource string

// gcraScript decides one call over several buckets: KEYS are the buckets, ARGV holds
// each bucket's emission interval and burst tolerance in microseconds. If every bucket
// allows one more request it takes one from each (and sets each key to expire when its
// bucket is full again); otherwise it changes nothing. It answers {allowed, then per key:
// allowed, remaining, retry µs, reset µs}.
var gcraScript = newScript(gcraSource)

// Allow takes one request from the bucket key under l, if it allows one, in one round
// trip (EVALSHA; EVAL once after Redis lost its script cache, as on a restart).
func (r *Redis) Allow(ctx context.Context, key string, l Limit) (Result, error) {
	res, err := r.AllowN(ctx, []Request{{Key: key, Limit: l}})
	if err != nil {
		return Result{}, err
	}
	return res[0], nil
}

// AllowN decides one call that must pass every bucket of reqs (say per caller, per tool
// and per subject) in one round trip: one script over all the keys, which takes a
// request from every bucket only if all of them allow it, so a call refused by one limit
// spends none of the others. The results are in the order of reqs. A key given twice is
// two requests from one bucket. No reqs: no round trip, no results.
//
// In a cluster (Options.Cluster) all keys of one call must hash to one slot: give them
// one {hash tag}. Keys of several slots are an error of the call (Redis's CROSSSLOT).
func (r *Redis) AllowN(ctx context.Context, reqs []Request) ([]Result, error) {
	if len(reqs) == 0 {
		return nil, nil
	}
	keys := make([]string, len(reqs))
	args := make([]any, 0, 2*len(reqs))
	for i, q := range reqs {
		interval, tolerance, err := q.Limit.gcra()
		if err != nil {
			return nil, fmt.Errorf("request %d: %w", i, err)
		}
		// Redis keys are binary safe and go to the script as KEYS, never spliced into
		// its source or a command line, so any bytes are fine after the prefix.
		keys[i] = r.prefix + q.Key
		args = append(args, interval, tolerance)
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	v, err := r.once(ctx, gcraScript, keys, args).Int64Slice()
	if err != nil {
		return nil, r.wrap(err)
	}
	if len(v) != 1+4*len(reqs) {
		return nil, fmt.Errorf("redis %s: the rate-limit script answered %d values for %d keys", r.addr, len(v), len(reqs))
	}
	out := make([]Result, len(reqs))
	for i := range out {
		f := v[1+4*i:]
		out[i] = Result{
			Allowed:    f[0] == 1,
			Remaining:  int(f[1]),
			RetryAfter: time.Duration(f[2]) * time.Microsecond,
			ResetAfter: time.Duration(f[3]) * time.Microsecond,
		}
	}
	return out, nil
}

// refundSource gives requests back, kept in its own file to be read as Lua.
//
//go:embed refund.lua
var refundSource string

// refundScript gives one request back to every bucket of KEYS (ARGV: each bucket's
// emission interval in microseconds): the bucket's TAT moves one interval earlier, and a
// bucket full again loses its key.
var refundScript = newScript(refundSource)

// Refund gives back the requests that an AllowN of the same reqs took, for a call that
// was admitted but will never be made (mcpgate decided before the call's body arrived,
// and the body was not the call the decision was for). It is one round trip, bounded by
// the timeout like a decision.
//
// A refund is exact while the bucket holds requests taken after the refunded one, and
// gives back at most one interval otherwise: a bucket that refilled since holds no
// trace of the request, and refunding it leaves it full. Refund a call at most once,
// and only one that AllowN admitted: a refused call took nothing.
func (r *Redis) Refund(ctx context.Context, reqs []Request) error {
	if len(reqs) == 0 {
		return nil
	}
	keys := make([]string, len(reqs))
	args := make([]any, len(reqs))
	for i, q := range reqs {
		interval, _, err := q.Limit.gcra()
		if err != nil {
			return fmt.Errorf("request %d: %w", i, err)
		}
		keys[i], args[i] = r.prefix+q.Key, interval
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	if err := r.once(ctx, refundScript, keys, args).Err(); err != nil {
		return r.wrap(err)
	}
	return nil
}

// gcra is l's emission interval (Per/N rounded up) and burst tolerance (interval ×
// burst), in microseconds.
func (l Limit) gcra() (interval, tolerance int64, err error) {
	if l.N <= 0 || l.Per <= 0 || l.Burst < 0 {
		return 0, 0, fmt.Errorf("%w: %d per %s, burst %d", ErrInvalidLimit, l.N, l.Per, l.Burst)
	}
	burst := int64(l.Burst)
	if burst == 0 {
		burst = int64(l.N)
	}
	if int64(l.N) > math.MaxInt64/1000 {
		return 0, 0, fmt.Errorf("%w: %d per %s is over a million per microsecond", ErrInvalidLimit, l.N, l.Per)
	}
	unit := int64(l.N) * 1000 // ns per µs, times N
	interval = l.Per.Nanoseconds() / unit
	if l.Per.Nanoseconds()%unit != 0 {
		interval++
	}
	if burst > maxTolerance/interval {
		return 0, 0, fmt.Errorf("%w: %d per %s with burst %d lets a bucket hold over 35 years", ErrInvalidLimit, l.N, l.Per, burst)
	}
	return interval, interval * burst, nil
}

// script is a Lua script and its SHA-1, for EVALSHA.
type script struct {
	src, sha string
}

func newScript(src string) script {
	return script{src: src, sha: redis.NewScript(src).Hash()}
}

// once runs s over keys with args as one EVALSHA, and as one EVAL if Redis has not
// cached the script (NOSCRIPT: after a restart or a failover; the EVALSHA ran nothing).
// Neither is sent twice: a script that spends, whose reply was lost, may have run, and
// running it again would take a second request. go-redis would re-send a command after
// a lost connection or a timeout if retries were on: they are off in a standalone
// client, and a cluster client skips commands marked NoRetry, as these are, while still
// following MOVED and ASK.
func (r *Redis) once(ctx context.Context, s script, keys []string, args []any) *redis.Cmd {
	cmd := scriptCmd(ctx, "evalsha", s.sha, keys, args)
	_ = r.c.Process(ctx, noRetry{cmd})
	if redis.HasErrorPrefix(cmd.Err(), "NOSCRIPT") {
		cmd = scriptCmd(ctx, "eval", s.src, keys, args)
		_ = r.c.Process(ctx, noRetry{cmd})
	}
	return cmd
}

func scriptCmd(ctx context.Context, name, script string, keys []string, args []any) *redis.Cmd {
	a := make([]any, 0, 3+len(keys)+len(args))
	a = append(a, name, script, len(keys))
	for _, k := range keys {
		a = append(a, k)
	}
	return redis.NewCmd(ctx, append(a, args...)...)
}

// noRetry is a command that go-redis must not send again after an error.
type noRetry struct{ *redis.Cmd }

func (noRetry) NoRetry() bool { return true }

// Ping checks that Redis answers within the timeout (for readiness).
func (r *Redis) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	if err := r.c.Ping(ctx).Err(); err != nil {
		return r.wrap(err)
	}
	return nil
}

// Close closes the connection pool; decisions after it fail.
func (r *Redis) Close() error {
	if err := r.c.Close(); err != nil {
		return r.wrap(err)
	}
	return nil
}

// wrap names the server in err. go-redis's errors carry no credentials, and neither
// does the address (Options.Address is host:port or a socket path).
func (r *Redis) wrap(err error) error {
	return fmt.Errorf("redis %s: %w", r.addr, err)
}
