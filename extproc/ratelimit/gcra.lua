-- GCRA over several buckets, all or nothing. See gcraScript in redis.go for the contract.
--
-- KEYS[i] holds the theoretical arrival time (TAT) of bucket i, in microseconds of Redis's
-- own clock. ARGV[2i-1] is the bucket's emission interval T and ARGV[2i] its burst
-- tolerance tau = T * burst, both whole microseconds, so every number below is a whole
-- number under 2^53 and Lua's doubles compute it exactly.
--
-- Returns {allowed, then per key: allowed, remaining, retry_us, reset_us}.

-- Redis before 5.0 replicates scripts verbatim and refuses writes after TIME unless the
-- script asks for effects replication; from 5.0 that is the default and from 7.0 the
-- call is a no-op returning true (it is deprecated, not removed).
if redis.replicate_commands then redis.replicate_commands() end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local n = #KEYS
local tat = {} -- key -> its TAT as this call has spent it so far (a key twice is 2 requests)
local verdict, before, retry, cur = {}, {}, {}, {}
local all = 1

for i = 1, n do
  local key = KEYS[i]
  local interval = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local c = tat[key]
  if c == nil then
    -- GET answers false for a missing (expired) key, and tonumber(false) is nil: a missing
    -- bucket is a full one.
    c = tonumber(redis.call('GET', key)) or now
    if c < now then c = now end
  end
  cur[i] = c
  -- Requests the bucket holds now, before this one: (tau - (c - now)) / T.
  local b = math.floor((now - c + tau) / interval)
  if b < 0 then b = 0 end
  before[i] = b
  local allow_at = c + interval - tau
  if now >= allow_at then
    verdict[i], retry[i] = 1, 0
    tat[key] = c + interval
  else
    verdict[i], retry[i] = 0, allow_at - now
    all = 0
  end
end

local out = {all}
for i = 1, n do
  local remaining, reset
  if all == 1 then
    -- Spent: one request fewer, and full again once the new TAT is reached.
    remaining, reset = before[i] - 1, cur[i] + tonumber(ARGV[2 * i - 1]) - now
  else
    -- Nothing was spent: the bucket as it is.
    remaining, reset = before[i], cur[i] - now
  end
  out[#out + 1] = verdict[i]
  out[#out + 1] = remaining
  out[#out + 1] = retry[i]
  out[#out + 1] = reset
end

if all == 1 then
  -- One write per distinct key, with its final TAT. The key expires when the TAT is
  -- reached: the bucket is full then, as a missing key is, so memory stays bounded
  -- without changing any decision. PX is milliseconds; round up so it never expires early.
  for i = 1, n do
    local key = KEYS[i]
    local v = tat[key]
    if v ~= nil then
      redis.call('SET', key, v, 'PX', math.ceil((v - now) / 1000))
      tat[key] = nil
    end
  end
end

return out
