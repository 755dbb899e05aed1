-- Gives back one request to each bucket of KEYS, taken earlier by gcra.lua for a call
-- that then never used it. See refundScript in redis.go for the contract.
--
-- ARGV[i] is bucket i's emission interval T in whole microseconds, as gcra.lua had it.
-- A request taken moved the bucket's TAT T later; moving it T earlier gives the request
-- back. A TAT that then falls at or before now is a full bucket, as a missing key is:
-- the key goes. A missing key is a full bucket already, and stays missing.

if redis.replicate_commands then redis.replicate_commands() end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

for i = 1, #KEYS do
  local key = KEYS[i]
  local c = tonumber(redis.call('GET', key))
  if c ~= nil then
    c = c - tonumber(ARGV[i])
    if c <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, c, 'PX', math.ceil((c - now) / 1000))
    end
  end
end

return 0
