package extproc

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.uber.org/zap"
	"golang.org/x/time/rate"

	"github.com/mcpgate/mcpgate/extproc/ratelimit"
	"github.com/mcpgate/mcpgate/policy"
)

// A message passes every limit of its app that applies to it: perCaller, perSubject,
// perTenant and the first perTool limit matching its tool. With Mesh.spec.rateLimits.redis
// the buckets live in Redis, shared by every replica, and one message costs one round
// trip however many limits apply (ratelimit.Redis.AllowN, all or nothing). Without it, or
// while Redis is unreachable under failureMode local, they live in this replica's memory
// (limiters), all or nothing as well.
//
// With Redis, the decision is taken on the request's headers when they say which buckets
// the body's message spends from (earlyLimit), so that Redis answers while the body is on
// its way; it is the same decision as on the body.

// Values of the decision label of mcpgate.ratelimit.decisions.
const (
	limitAllowed            = "allowed"             // the shared store admitted it
	limitRefused            = "refused"             // the shared store refused it
	limitLocalAllowed       = "local_allowed"       // this replica's buckets admitted it
	limitLocalRefused       = "local_refused"       // this replica's buckets refused it
	limitUnavailableAllowed = "unavailable_allowed" // store down, failureMode allow
	limitUnavailableRefused = "unavailable_refused" // store down, failureMode deny
)

// storeRetry is how long decisions skip a store that failed before trying it again: a
// Redis that hangs then costs one timeout per second, not one per call.
const storeRetry = time.Second

// limitCheck is one bucket a message must pass.
type limitCheck struct {
	name  string // the policy's name of the limit: perCaller, perTool.get_*, ...
	kind  string // the metric's key label: caller, subject, tenant or tool
	key   string // the bucket, in this replica's memory
	limit policy.RateLimit
	whose string // for the reason: "for this caller"
}

// limitVerdict is a refused message's answer.
type limitVerdict struct {
	status  int    // 429, or 503 when the store is down under failureMode deny
	rule    string // ruleRateLimit or ruleRateLimitDown
	reason  string
	wait    time.Duration
	headers []*corev3.HeaderValueOption
}

// limitChecks lists the buckets r must pass, in the order of the policy.
func (st *stream) limitChecks(r *Request, buf []limitCheck) []limitCheck {
	lim := &st.app.MCP.Limits
	app := st.app.ID
	if pc := lim.PerCaller; pc != nil {
		buf = append(buf, limitCheck{name: "perCaller", kind: "caller", limit: *pc, whose: " for this caller",
			key: lengthPrefixed(app, "caller", pc.String(), st.callerKey(r))})
	}
	if ps := lim.PerSubject; ps != nil {
		buf = append(buf, limitCheck{name: "perSubject", kind: "subject", limit: *ps, whose: " for this user",
			key: lengthPrefixed(app, "subject", ps.String(), lim.SubjectClaim, st.ident.Issuer, st.claim(lim.SubjectClaim))})
	}
	if pt := lim.PerTenant; pt != nil {
		buf = append(buf, limitCheck{name: "perTenant", kind: "tenant", limit: *pt, whose: " for this tenant",
			key: lengthPrefixed(app, "tenant", pt.String(), lim.TenantClaim, st.ident.Issuer, st.claim(lim.TenantClaim))})
	}
	if r.Method == "tools/call" {
		for _, tr := range lim.PerTool {
			if !tr.Tool.Match(r.Tool) {
				continue
			}
			c := limitCheck{name: "perTool." + tr.Tool.String(), kind: "tool", limit: tr.Rate}
			var who string
			switch tr.Per {
			case policy.PerCaller:
				who, c.whose = st.callerKey(r), " for this caller"
			case policy.PerSubject:
				who, c.whose = lengthPrefixed(tr.Claim, st.ident.Issuer, st.claim(tr.Claim)), " for this user"
			case policy.PerTenant:
				who, c.whose = lengthPrefixed(tr.Claim, st.ident.Issuer, st.claim(tr.Claim)), " for this tenant"
			}
			c.key = lengthPrefixed(app, "tool", tr.Rate.String(), tr.Tool.String(), string(tr.Per), who)
			buf = append(buf, c)
			break // the first matching limit applies
		}
	}
	return buf
}

// callerKey names the caller a perCaller bucket counts: its App ID in its namespace (two
// namespaces may each run an App ID, as access control tells them apart), or for a
// JWT-only caller without an App ID its token's issuer and subject. A claim's value is
// counted per issuer likewise: another issuer the app trusts may mint any sub or tid.
func (st *stream) callerKey(r *Request) string {
	if r.Caller.AppID == "" {
		return lengthPrefixed("sub", st.ident.Issuer, r.Subject)
	}
	return lengthPrefixed("app", r.Caller.Namespace, r.Caller.AppID)
}

// claim is the value of a claim of the caller's verified token: the verified subject
// for sub, a string claim as it is, any other JSON value as its JSON text, "" without a
// token or the claim. The claims are decoded once per stream, only when a limit needs a
// claim other than sub.
func (st *stream) claim(name string) string {
	if name == policy.DefaultSubjectClaim {
		return st.req.Subject
	}
	if st.claims == nil {
		st.claims = map[string]json.RawMessage{}
		if st.req.ClaimsJSON != "" {
			// A payload that does not decode (it was verified, so it does) leaves no
			// claims: every such caller shares the allowance of "no value".
			_ = json.Unmarshal([]byte(st.req.ClaimsJSON), &st.claims)
		}
	}
	raw, ok := st.claims[name]
	if !ok {
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	return string(raw)
}

// rateLimit checks the app's limits for one message. It returns a verdict when the
// message is refused.
func (st *stream) rateLimit(ctx context.Context, r *Request, now time.Time) (limitVerdict, bool) {
	var buf [4]limitCheck
	checks := st.limitChecks(r, buf[:0])
	if len(checks) == 0 {
		return limitVerdict{}, false
	}
	s := st.s
	if store := s.shared.get(st.snap.Mesh.RateLimits); store != nil {
		var res []ratelimit.Result
		var err error
		if e := st.takeEarly(); e != nil && e.store == store && e.decides(checks) {
			<-e.done // bounded by the store's timeout
			res, err = e.res, e.err
		} else {
			e.release()
			_, res, err = store.spend(ctx, st.app.ID, checks, now)
		}
		if errors.Is(err, ratelimit.ErrInvalidLimit) {
			// Not the store's failure: this replica's buckets count the call, whatever
			// the failure mode.
			return st.localLimits(checks, now, limitLocalAllowed, limitLocalRefused)
		}
		if err == nil {
			v, refused := verdict(s, st.app.ID, checks, res)
			if !refused && st.wantsQuota() {
				for i, c := range checks {
					st.noteQuota(c, res[i].Remaining, res[i].ResetAfter)
				}
			}
			return v, refused
		}
		switch store.cfg.FailureMode {
		case policy.FailAllow:
			s.countLimits(st.app.ID, checks, limitUnavailableAllowed)
			return limitVerdict{}, false
		case policy.FailDeny:
			s.countLimits(st.app.ID, checks, limitUnavailableRefused)
			return limitVerdict{status: 503, rule: ruleRateLimitDown, wait: storeRetry,
				// The caller learns that the store is down, not where it is or what it
				// said (an internal address, AUTH errors): those are in the outage's log
				// line and /readyz.
				reason:  "rate limits unavailable: the shared store did not answer (spec.rateLimits.failureMode deny)",
				headers: []*corev3.HeaderValueOption{rawHeader("retry-after", retryAfter(storeRetry))}}, true
		}
		// failureMode local: this replica's buckets, below.
		return st.localLimits(checks, now, limitLocalAllowed, limitLocalRefused)
	}
	return st.localLimits(checks, now, limitAllowed, limitRefused)
}

// earlyLimit is a decision on the shared limits taken when a request's headers arrive,
// for the message its body will hold, while Envoy buffers the body and sends it: the
// round trip to Redis then overlaps the ext_proc round trip of the headers, as Envoy's
// own rate-limit filter decides on headers, instead of adding to the call's latency.
//
// It is made only when the headers say which buckets the body's message spends from
// (earlyChecks), and used only if the message, once parsed, has exactly those buckets
// (decides). Otherwise, and when the body never comes or is refused before its limits,
// the requests it took are given back (release): a call is limited as if decided on its
// body, whatever its headers said.
type earlyLimit struct {
	store  *sharedStore
	checks []limitCheck
	done   chan struct{} // closed when reqs, res and err are set
	reqs   []ratelimit.Request
	res    []ratelimit.Result
	err    error
}

// limitEarly starts the early decision on the request whose headers st holds, when
// there is one to make (earlyChecks).
func (st *stream) limitEarly(ctx context.Context, now time.Time) {
	store := st.s.shared.get(st.snap.Mesh.RateLimits)
	if store == nil || store.r == nil || store.skipping(now) {
		// Local limits cost no round trip, and a store being skipped decides nothing.
		return
	}
	checks := st.earlyChecks()
	if len(checks) == 0 {
		return
	}
	e := &earlyLimit{store: store, checks: checks, done: make(chan struct{})}
	target := st.app.ID
	go func() {
		defer close(e.done)
		e.reqs, e.res, e.err = store.spend(ctx, target, checks, now)
	}()
	st.early = e
}

// earlyChecks are the buckets that the message of the body to come will spend from, when
// the headers say so: nil when they do not.
//
// A body may hold several messages (a JSON-RPC batch) only in protocol 2025-03-26, the
// one a request without MCP-Protocol-Version speaks: there the count is unknown. Later
// versions send one message per POST. Its buckets are then known from the MCP 2026-07-28
// Mcp-Method and Mcp-Name headers, which the body must match (checkHeaders refuses it
// otherwise), or without them when the app has no perTool limit, whose buckets are the
// same for every message.
func (st *stream) earlyChecks() []limitCheck {
	if batchEra(st.req.ProtocolVersion) {
		return nil
	}
	r := st.req
	switch {
	case st.mcpMethodHeader != "":
		r.Method = st.mcpMethodHeader
		setTarget(&r, st.mcpMethodHeader, st.mcpNameHeader)
	case len(st.app.MCP.Limits.PerTool) == 0:
		r.Method = "" // any: no limit depends on it
	default:
		return nil
	}
	return st.limitChecks(&r, nil)
}

// takeEarly hands over the stream's early decision, if any, to be used or released.
func (st *stream) takeEarly() *earlyLimit {
	e := st.early
	st.early = nil
	return e
}

// decides reports whether the early decision was on exactly the buckets of checks.
func (e *earlyLimit) decides(checks []limitCheck) bool {
	if len(checks) != len(e.checks) {
		return false
	}
	for i := range checks {
		if checks[i].key != e.checks[i].key {
			return false
		}
	}
	return true
}

// release gives back what an unused early decision took, once it is known, without
// waiting for it: the stream goes on. A refund that fails (Redis gone meanwhile) leaves
// the requests spent, as a call that was made would have. Nil e is a no-op.
func (e *earlyLimit) release() {
	if e == nil {
		return
	}
	go func() {
		<-e.done
		if e.err != nil {
			return
		}
		for _, r := range e.res {
			if !r.Allowed {
				return // refused: nothing was taken
			}
		}
		start := time.Now()
		e.store.observe(start, storeRefund, e.store.r.Refund(context.Background(), e.reqs))
	}()
}

// localLimits decides in this replica's buckets, all or nothing: a message refused by
// one limit gives back what it took from the others.
func (st *stream) localLimits(checks []limitCheck, now time.Time, allowed, refused string) (limitVerdict, bool) {
	var taken [4]*rate.Reservation
	var left [4]quotaLeft
	want := st.wantsQuota()
	for i, c := range checks {
		var l *quotaLeft
		if want {
			l = &left[i]
		}
		res, ok, wait := st.s.limits.reserve(c.key, c.limit, now, l)
		if ok {
			taken[i] = res
			continue
		}
		for _, t := range taken[:i] {
			t.CancelAt(now)
		}
		st.s.countLimit(st.app.ID, c.kind, refused)
		return refusedBy(c, wait), true
	}
	st.s.countLimits(st.app.ID, checks, allowed)
	if want {
		for i, c := range checks {
			st.noteQuota(c, left[i].remaining, left[i].reset)
		}
	}
	return limitVerdict{}, false
}

// quotaField is a limit that the call's messages passed, as the RateLimit fields of
// its answer show it (limits.responseHeaders).
type quotaField struct {
	name  string
	limit policy.RateLimit
	quotaLeft
}

// quotaLeft is what a bucket holds after a request was taken from it.
type quotaLeft struct {
	remaining int           // requests allowed right now
	reset     time.Duration // until the bucket is full again
}

// wantsQuota reports whether the answer is to carry the RateLimit fields of the limits
// passed: when the app asks, on Streamable HTTP. A gRPC stream's headers precede all of
// its messages, each limited on its own.
func (st *stream) wantsQuota() bool {
	return st.app.MCP.Limits.ResponseHeaders && !st.isGRPC
}

// noteQuota keeps what limit c has left after an admitted message. In a batch, a later
// message's figures replace an earlier one's for the same limit: they are newer.
func (st *stream) noteQuota(c limitCheck, remaining int, reset time.Duration) {
	left := quotaLeft{remaining: max(remaining, 0), reset: max(reset, 0)}
	for i := range st.quota {
		if st.quota[i].name == c.name {
			st.quota[i].quotaLeft = left
			return
		}
	}
	st.quota = append(st.quota, quotaField{name: c.name, limit: c.limit, quotaLeft: left})
}

// quotaHeaders are the IETF RateLimit-Policy and RateLimit fields of the limits the
// call passed, one list item each (none unless limits.responseHeaders): each limit's
// quota and window, what it has left and the seconds until it is full again.
func (st *stream) quotaHeaders(action corev3.HeaderValueOption_HeaderAppendAction) []*corev3.HeaderValueOption {
	if len(st.quota) == 0 {
		return nil
	}
	var pol, left []byte
	for i, q := range st.quota {
		if i > 0 {
			pol, left = append(pol, ", "...), append(left, ", "...)
		}
		name := sfString(q.name)
		pol = appendPolicyItem(pol, name, q.limit)
		left = append(append(left, name...), ";r="...)
		left = strconv.AppendInt(left, int64(q.remaining), 10)
		left = append(left, ";t="...)
		left = strconv.AppendInt(left, int64(math.Ceil(q.reset.Seconds())), 10)
	}
	return []*corev3.HeaderValueOption{
		{Header: &corev3.HeaderValue{Key: "ratelimit-policy", RawValue: pol}, AppendAction: action},
		{Header: &corev3.HeaderValue{Key: "ratelimit", RawValue: left}, AppendAction: action},
	}
}

// appendPolicyItem appends the RateLimit-Policy item of limit l named name (an sf-string):
// its quota q and window w in seconds.
func appendPolicyItem(b []byte, name string, l policy.RateLimit) []byte {
	b = append(append(b, name...), ";q="...)
	b = strconv.AppendInt(b, int64(l.N), 10)
	b = append(b, ";w="...)
	return strconv.AppendInt(b, int64(l.Per/time.Second), 10)
}

// refusedBy is the answer to a message that limit c refused, retry after wait: 429 with
// Retry-After and the IETF RateLimit-Policy and RateLimit fields
// (draft-ietf-httpapi-ratelimit-headers) naming the limit, its quota and window, and
// nothing remaining until the retry.
func refusedBy(c limitCheck, wait time.Duration) limitVerdict {
	ra := retryAfter(wait)
	name := sfString(c.name)
	return limitVerdict{status: 429, rule: ruleRateLimit, wait: wait,
		reason: "rate limit exceeded: limits." + strings.Replace(c.name, ".", " ", 1) + " " + c.limit.String() + c.whose,
		headers: []*corev3.HeaderValueOption{
			rawHeader("retry-after", ra),
			rawHeader("ratelimit-policy", string(appendPolicyItem(nil, name, c.limit))),
			rawHeader("ratelimit", name+";r=0;t="+ra),
		}}
}

// sfString renders s as an RFC 9651 structured-field string: printable ASCII, with
// backslash and double quote escaped; anything else (a tool glob is the caller's text
// only through the policy, but still) becomes '?'.
func sfString(s string) string {
	var b strings.Builder
	b.Grow(len(s) + 2)
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteByte(c)
		case c < 0x20 || c > 0x7e:
			b.WriteByte('?')
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

// countLimits counts one decision on every bucket of checks.
func (s *Server) countLimits(target string, checks []limitCheck, decision string) {
	for _, c := range checks {
		s.countLimit(target, c.kind, decision)
	}
}

type limitCountKey struct{ target, kind, decision string }

func (s *Server) countLimit(target, kind, decision string) {
	k := limitCountKey{target, kind, decision}
	set, ok := s.limitAttrs.Load(k)
	if !ok {
		// target is an App ID of the policy and kind and decision are constants: the
		// label sets are bounded by the policy, never by callers.
		set, _ = s.limitAttrs.LoadOrStore(k, metric.WithAttributeSet(attribute.NewSet(
			attribute.String("target", target), attribute.String("key", kind), attribute.String("decision", decision))))
	}
	s.limitCount.Add(context.Background(), 1, set.(metric.AddOption))
}

// sharedLimits holds the client of the shared store the policy names, made again when
// the Mesh's spec.rateLimits changes.
type sharedLimits struct {
	mu  sync.Mutex
	cur atomic.Pointer[sharedStore]
	log *zap.Logger
	dur metric.Float64Histogram // mcpgate.ratelimit.store.duration
}

// sharedStore is one Redis the limits are counted in, and what is known of its health.
type sharedStore struct {
	dur    metric.Float64Histogram // nil in tests that make stores directly
	cfg    policy.RateLimitStore
	r      *ratelimit.Redis // nil when the configuration could not be used (cfgErr)
	cfgErr error
	log    *zap.Logger

	skipUntil atomic.Int64 // unix ns: decisions use the failure mode until then

	mu        sync.Mutex
	down      bool
	lastErr   string
	downSince time.Time
}

// get returns the store cfg names, making it on first use or after a change; nil when
// the policy names none.
func (sl *sharedLimits) get(cfg *policy.RateLimitStore) *sharedStore {
	cur := sl.cur.Load()
	if cfg == nil {
		if cur != nil {
			sl.swap(nil)
		}
		return nil
	}
	if cur != nil && cur.cfg.Equal(cfg) {
		return cur
	}
	sl.mu.Lock()
	defer sl.mu.Unlock()
	if cur := sl.cur.Load(); cur != nil && cur.cfg.Equal(cfg) {
		return cur
	}
	n := newSharedStore(*cfg, sl.log)
	n.dur = sl.dur
	sl.swapLocked(n)
	return n
}

func (sl *sharedLimits) swap(n *sharedStore) {
	sl.mu.Lock()
	defer sl.mu.Unlock()
	sl.swapLocked(n)
}

func (sl *sharedLimits) swapLocked(n *sharedStore) {
	old := sl.cur.Swap(n)
	if n != nil {
		sl.log.Info("rate limits are counted in redis, shared by the replicas",
			zap.String("address", n.cfg.Where()), zap.Bool("cluster", n.cfg.Cluster), zap.Int("db", n.cfg.DB), zap.String("failure_mode", string(n.cfg.FailureMode)))
	} else if old != nil {
		sl.log.Info("rate limits are counted in each replica (no spec.rateLimits.redis)")
	}
	if old != nil && old.r != nil {
		// Decisions in flight may still hold the old client: close it once they are done.
		time.AfterFunc(2*policy.MaxRateLimitTimeout, func() { _ = old.r.Close() })
	}
}

func (sl *sharedLimits) close() {
	if cur := sl.cur.Swap(nil); cur != nil && cur.r != nil {
		_ = cur.r.Close()
	}
}

func newSharedStore(cfg policy.RateLimitStore, log *zap.Logger) *sharedStore {
	ss := &sharedStore{cfg: cfg, log: log}
	opts := ratelimit.Options{Address: cfg.Address, DB: cfg.DB, PasswordFile: cfg.PasswordFile, Timeout: cfg.Timeout, Cluster: cfg.Cluster, KeyPrefix: cfg.KeyPrefix}
	if s := cfg.Sentinel; s != nil {
		opts.Sentinel = &ratelimit.Sentinel{MasterName: s.MasterName, Addrs: s.Addrs, PasswordFile: s.PasswordFile}
	}
	if cfg.TLS {
		tc, err := redisTLS(cfg)
		if err != nil {
			ss.cfgErr = err
			ss.markDown(err, time.Now())
			return ss
		}
		opts.TLS = tc
	}
	r, err := ratelimit.NewRedis(opts)
	if err != nil {
		ss.cfgErr = err
		ss.markDown(err, time.Now())
		return ss
	}
	ss.r = r
	return ss
}

func redisTLS(cfg policy.RateLimitStore) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.ServerName}
	// A cluster's nodes, and the sentinels and the primary they name, are each verified
	// by their own host (Go's TLS dial takes the name from the address when ServerName
	// is empty).
	if tc.ServerName == "" && !cfg.Cluster && cfg.Sentinel == nil && !strings.HasPrefix(cfg.Address, "unix://") {
		host, _, _ := strings.Cut(cfg.Address, ":")
		if strings.HasPrefix(cfg.Address, "[") {
			host, _, _ = strings.Cut(strings.TrimPrefix(cfg.Address, "["), "]")
		}
		tc.ServerName = host
	}
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("redis %s: tls.caFile: %w", cfg.Where(), err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("redis %s: tls.caFile %s holds no PEM certificate", cfg.Where(), cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	return tc, nil
}

var errStoreSkipped = errors.New("skipped after a recent failure")

// spend takes one request from every bucket of checks in Redis, in one round trip, and
// returns Redis's answers (verdict reads them). An error means Redis did not decide
// (down, slow, refusing): the failure mode does. It touches no stream state, so an early
// decision can run it beside the stream's own goroutine.
func (ss *sharedStore) spend(ctx context.Context, target string, checks []limitCheck, now time.Time) ([]ratelimit.Request, []ratelimit.Result, error) {
	if ss.r == nil {
		return nil, nil, ss.cfgErr
	}
	if ss.skipping(now) {
		return nil, nil, ss.currentErr()
	}
	reqs := make([]ratelimit.Request, 0, len(checks))
	for _, c := range checks {
		reqs = append(reqs, ratelimit.Request{Key: sharedKey(target, c), Limit: ratelimit.Limit{N: c.limit.N, Per: c.limit.Per, Burst: c.limit.Burst}})
	}
	start := time.Now()
	res, err := ss.r.AllowN(ctx, reqs)
	ss.observe(start, storeDecide, err)
	if err != nil {
		if ctx.Err() != nil || errors.Is(err, ratelimit.ErrInvalidLimit) {
			// The call ended (the client went away), or one of its limits is beyond what
			// the store counts (the policy refuses those): that says nothing about Redis,
			// and no other call must follow the failure mode for it.
			return nil, nil, err
		}
		ss.markDown(err, now)
		return nil, nil, err
	}
	ss.markUp()
	return reqs, res, nil
}

// The attributes of mcpgate.ratelimit.store.duration, op and result, made once: a
// decision records one on the call's path.
var (
	storeDecide = storeAttrs("decide")
	storeRefund = storeAttrs("refund")
)

func storeAttrs(op string) [2]metric.RecordOption {
	set := func(result string) metric.RecordOption {
		return metric.WithAttributeSet(attribute.NewSet(attribute.String("op", op), attribute.String("result", result)))
	}
	return [2]metric.RecordOption{set("ok"), set("error")}
}

// observe records one round trip of op to the store, begun at start.
func (ss *sharedStore) observe(start time.Time, op [2]metric.RecordOption, err error) {
	if ss.dur == nil {
		return
	}
	attrs := op[0]
	if err != nil {
		attrs = op[1]
	}
	ss.dur.Record(context.Background(), time.Since(start).Seconds(), attrs)
}

// skipping reports whether decisions skip the store after a recent failure.
func (ss *sharedStore) skipping(now time.Time) bool {
	until := ss.skipUntil.Load()
	return until != 0 && now.UnixNano() < until
}

// verdict reads Redis's answers on checks (from spend), counting the decision.
func verdict(s *Server, target string, checks []limitCheck, res []ratelimit.Result) (limitVerdict, bool) {
	for i, r := range res {
		if !r.Allowed {
			s.countLimit(target, checks[i].kind, limitRefused)
			return refusedBy(checks[i], r.RetryAfter), true
		}
	}
	s.countLimits(target, checks, limitAllowed)
	return limitVerdict{}, false
}

// sharedKey is the Redis key of c's bucket: the app and kind in clear, for operators
// reading Redis, and the rest (rate, claim values: who the caller is) as a hash, so that
// Redis holds no user identifiers and keys stay short. The app is the key's Redis Cluster
// hash tag ({app}: an App ID is a DNS label, never a brace), so that every bucket of one
// call, all of its target, lives in one slot and is decided by one script on one node.
func sharedKey(target string, c limitCheck) string {
	sum := sha256.Sum256([]byte(c.key))
	return "{" + target + "}:" + c.kind + ":" + hex.EncodeToString(sum[:16])
}

func (ss *sharedStore) markDown(err error, now time.Time) {
	ss.skipUntil.Store(now.Add(storeRetry).UnixNano())
	msg := err.Error()
	ss.mu.Lock()
	was := ss.down
	ss.down, ss.lastErr = true, msg
	if !was {
		ss.downSince = now
	}
	ss.mu.Unlock()
	if !was {
		ss.log.Warn("rate-limit store unreachable: limited calls follow the failure mode until it answers",
			zap.String("address", ss.cfg.Where()), zap.String("failure_mode", string(ss.cfg.FailureMode)), zap.String("error", msg))
	}
}

func (ss *sharedStore) markUp() {
	if ss.skipUntil.Load() == 0 {
		return // the common case: one atomic load
	}
	ss.skipUntil.Store(0)
	ss.mu.Lock()
	was, since := ss.down, ss.downSince
	ss.down, ss.lastErr, ss.downSince = false, "", time.Time{}
	ss.mu.Unlock()
	if was {
		ss.log.Info("rate-limit store reachable again: limits are shared by the replicas",
			zap.String("address", ss.cfg.Where()), zap.Duration("down_for", time.Since(since)))
	}
}

func (ss *sharedStore) currentErr() error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.lastErr == "" {
		return errStoreSkipped
	}
	return fmt.Errorf("%s (%w)", ss.lastErr, errStoreSkipped)
}

// RateLimitStatus is what /readyz shows about the rate-limit store.
type RateLimitStatus struct {
	// Store is "redis" or "local" (each replica's memory).
	Store       string    `json:"store"`
	Address     string    `json:"address,omitempty"`
	FailureMode string    `json:"failure_mode,omitempty"`
	Reachable   bool      `json:"reachable"`
	Error       string    `json:"error,omitempty"`
	DownSince   time.Time `json:"down_since,omitzero"`
	// Effect says what limited calls get right now.
	Effect string `json:"effect"`
}

// RateLimitStatus checks the store the policy in force names (one PING, bounded by its
// timeout) and says what limited calls get.
func (s *Server) RateLimitStatus(ctx context.Context) RateLimitStatus {
	snap := s.store.Current()
	if snap == nil || snap.Mesh.RateLimits == nil {
		return RateLimitStatus{Store: "local", Reachable: true, Effect: "limits are counted in each replica"}
	}
	ss := s.shared.get(snap.Mesh.RateLimits)
	st := RateLimitStatus{Store: "redis", Address: ss.cfg.Where(), FailureMode: string(ss.cfg.FailureMode)}
	err := ss.cfgErr
	if err == nil {
		err = ss.r.Ping(ctx)
	}
	now := time.Now()
	if err == nil {
		ss.markUp()
		st.Reachable, st.Effect = true, "limits are shared by the replicas"
		return st
	}
	ss.markDown(err, now)
	ss.mu.Lock()
	st.Error, st.DownSince = ss.lastErr, ss.downSince
	ss.mu.Unlock()
	switch ss.cfg.FailureMode {
	case policy.FailAllow:
		st.Effect = "failureMode allow: limited calls are admitted without a limit"
	case policy.FailDeny:
		st.Effect = "failureMode deny: limited calls are refused (503)"
	default:
		st.Effect = "failureMode local: limits are counted in each replica until redis answers"
	}
	return st
}
