-- Baseline for the client benchmark: one atomic GCRA token bucket per call.
-- KEYS[1]: the bucket. ARGV: capacity (tokens), interval (µs per token), cost.
-- Returns {allowed (1/0), remaining, retry_after_us}. Time comes from Redis
-- (TIME), so every client shares one clock; the state is the bucket's
-- "theoretical arrival time" (TAT) in µs, kept no longer than it matters.
local capacity = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local burst = capacity * interval
local new_tat = tat + cost * interval
if new_tat - now > burst then
  -- Denied: nothing is charged.
  return {0, math.floor((burst - (tat - now)) / interval), math.ceil(new_tat - burst - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, math.floor((burst - (new_tat - now)) / interval), 0}
