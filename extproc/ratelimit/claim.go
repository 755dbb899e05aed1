package ratelimit

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"
)

// The store also holds small records that belong to one owner, shared by the replicas
// (mcpgate's MCP task table: which caller created a task). A record is a hash of its
// owner and value, expiring with the record.

// claimScript sets KEYS[1] to owner ARGV[1] and value ARGV[2] for ARGV[3] ms unless
// another owner holds it; it answers 1 when set, 0 when the key is someone else's.
var claimScript = redis.NewScript(`
local o = redis.call('HGET', KEYS[1], 'owner')
if o and o ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'value', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
`)

// Claim stores value under key for ttl (at least 1ms), owned by owner, unless another
// owner holds key: then it changes nothing and reports false. One round trip, atomic.
func (r *Redis) Claim(ctx context.Context, key, owner string, value []byte, ttl time.Duration) (bool, error) {
	ms := max(ttl.Milliseconds(), 1)
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	n, err := claimScript.Run(ctx, r.c, []string{r.prefix + key}, owner, value, ms).Int64()
	if err != nil {
		return false, r.wrap(err)
	}
	return n == 1, nil
}

// Owned returns the value stored under key if owner holds it (ok false when the key is
// absent, expired or someone else's), and the time it has left.
func (r *Redis) Owned(ctx context.Context, key, owner string) (value []byte, ttl time.Duration, ok bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	pipe := r.c.Pipeline()
	get := pipe.HMGet(ctx, r.prefix+key, "owner", "value")
	left := pipe.PTTL(ctx, r.prefix+key)
	if _, err := pipe.Exec(ctx); err != nil && !errors.Is(err, redis.Nil) {
		return nil, 0, false, r.wrap(err)
	}
	v := get.Val()
	if len(v) != 2 {
		return nil, 0, false, nil
	}
	o, _ := v[0].(string)
	val, _ := v[1].(string)
	if o != owner || v[1] == nil || left.Val() <= 0 {
		return nil, 0, false, nil
	}
	return []byte(val), left.Val(), true, nil
}
