package bearer

import (
	"crypto/sha256"
	"sync"
	"time"
	"unsafe"

	"github.com/mcpgate/mcpgate/policy"
)

// cacheKey is the SHA-256 of a token. The token itself is never kept: a heap dump of the
// cache must not hand out working credentials.
type cacheKey [sha256.Size]byte

func hashToken(token string) cacheKey {
	// Hash the string's bytes in place: a []byte(token) conversion would copy every
	// token on the hot path. sha256 only reads its input, so the aliasing is safe.
	return sha256.Sum256(unsafe.Slice(unsafe.StringData(token), len(token)))
}

// cacheEntry is one successful verification.
type cacheEntry struct {
	p        *Principal   // as verified; Issuer is replaced per hit
	cfg      issuerConfig // the configuration that verified it
	deadline time.Time    // min(exp+leeway, verified+MaxCacheTTL)
}

// maxShards is the shard count for large caches. Shards keep the hit path from
// contending on one lock; each shard's RWMutex is read-locked only for a map lookup.
const maxShards = 32

// tokenCache is a sharded, bounded map from token hash to verification.
type tokenCache struct {
	shards []cacheShard
	mask   uint8
}

type cacheShard struct {
	mu  sync.RWMutex
	m   map[cacheKey]*cacheEntry
	cap int
}

// newTokenCache returns a cache holding at most size entries in total.
func newTokenCache(size int) *tokenCache {
	n := 1
	for n*2 <= maxShards && n*2 <= size {
		n *= 2
	}
	c := &tokenCache{shards: make([]cacheShard, n), mask: uint8(n - 1)}
	for i := range c.shards {
		c.shards[i].m = make(map[cacheKey]*cacheEntry)
		// Floor division keeps the total at or under size.
		c.shards[i].cap = size / n
	}
	return c
}

func (c *tokenCache) shard(k cacheKey) *cacheShard {
	// SHA-256 output is uniform, so its first byte spreads keys evenly.
	return &c.shards[k[0]&c.mask]
}

// get returns the cached Principal for k if it is still valid at now and was verified
// by an issuer in issuers whose configuration has not changed since.
func (c *tokenCache) get(k cacheKey, issuers []*policy.Issuer, now time.Time) *Principal {
	s := c.shard(k)
	s.mu.RLock()
	e := s.m[k]
	s.mu.RUnlock()
	if e == nil {
		return nil
	}
	if !now.Before(e.deadline) {
		s.mu.Lock()
		if s.m[k] == e {
			delete(s.m, k)
		}
		s.mu.Unlock()
		return nil
	}
	for _, is := range issuers {
		if is == nil || !e.cfg.matches(is) {
			continue
		}
		if is == e.p.Issuer {
			// No policy reload since: share the entry's read-only Principal, so a hit
			// allocates nothing.
			return e.p
		}
		// A shallow copy naming the caller's Issuer: after a reload the Principal
		// points at the live configuration, not the one that filled the cache.
		p := *e.p
		p.Issuer = is
		return &p
	}
	// Not trusted by this app, or its issuer was reconfigured: full verification
	// decides, and its result replaces this entry.
	return nil
}

// put records a successful verification of k by p.Issuer.
func (c *tokenCache) put(k cacheKey, p *Principal, validUntil, ttlEnd, now time.Time) {
	deadline := validUntil
	if ttlEnd.Before(deadline) {
		deadline = ttlEnd
	}
	if !now.Before(deadline) {
		return
	}
	cp := *p // the caller may modify its copy; the cache keeps its own
	e := &cacheEntry{p: &cp, cfg: configOf(p.Issuer), deadline: deadline}

	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, exists := s.m[k]; !exists && len(s.m) >= s.cap {
		s.evictLocked(now)
	}
	s.m[k] = e
}

// evictLocked removes one entry: an expired one if a short scan finds it, otherwise
// whichever the map yields first. Go randomises map iteration order, so this is cheap
// random eviction; a flood of fresh tokens cannot pin particular entries in place.
func (s *cacheShard) evictLocked(now time.Time) {
	const scan = 8
	var victim cacheKey
	i := 0
	for k, e := range s.m {
		if i == 0 {
			victim = k
		}
		if !now.Before(e.deadline) {
			victim = k
			break
		}
		if i++; i >= scan {
			break
		}
	}
	delete(s.m, victim)
}

// len reports the number of entries, for tests.
func (c *tokenCache) len() int {
	n := 0
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.RLock()
		n += len(s.m)
		s.mu.RUnlock()
	}
	return n
}
