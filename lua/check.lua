-- check.lua: decide a batch of rate-limit checks, one policy each.
--
-- KEYS: one state key per rule of each check, in order
--       (<prefix>:{<tenant>}:l:<policy>:<rule>:<key>).
-- ARGV[1]: the time in microseconds since the Unix epoch, or "" to take it
--          from Redis TIME (the one clock every sidecar shares; tests pin it).
-- ARGV[2..]: for each check: rule count, cost, then for each rule
--          kind, a, b:  1 token bucket  (a = capacity, b = µs per unit)
--                       2 fixed window  (a = limit,    b = window µs)
--                       3 sliding window (a = limit,   b = window µs)
-- Returns: a flat array of 5 integers per check: allowed (1/0), index of
--          the deciding rule (0-based), remaining, reset_ms, retry_after_ms.
--
-- Atomic because Redis runs a script with nothing interleaved: each check
-- reads and writes its rules' states without a race, a later check in the
-- batch sees the writes of an earlier one, and if any rule of a check
-- denies, none of its rules is written. States are plain strings
-- ("tat", "window:count", "window:current:previous") with an expiry, so
-- idle keys vanish by themselves. The arithmetic mirrors
-- src/limiter/algorithm.rs operation for operation; integers stay under
-- 2^52, where Lua's doubles are exact.

local MARGIN_US = 1000000

local function sliding_avail(limit, w, cur, prev, e)
  local estimate = prev * (w - e) / w + cur
  local avail = math.floor(limit - estimate)
  if avail > 0 then return avail end
  return 0
end

local function sliding_retry(limit, w, cur, prev, e, c1)
  if cur + c1 <= limit then
    local need = w - (limit - cur - c1) * w / prev
    local at = math.max(math.ceil(need), e + 1)
    for _ = 1, 4 do
      if at >= w or sliding_avail(limit, w, cur, prev, at) >= c1 then break end
      at = at + 1
    end
    return math.min(at, w) - e
  end
  local need = w - (limit - c1) * w / cur
  local at = 0
  if need > 0 then at = math.ceil(need) end
  for _ = 1, 4 do
    if at >= w or sliding_avail(limit, w, 0, cur, at) >= c1 then break end
    at = at + 1
  end
  return w - e + math.min(at, w)
end

-- Returns {allowed, remaining, reset_us, retry_us, s1, s2, s3, expires_us}.
local function eval(kind, a, b, s1, s2, s3, now, cost)
  local c1 = math.max(cost, 1)
  if kind == 1 then
    local ct = a * b
    local tat = math.max(s1 or 0, now)
    local used = math.min(tat - now, ct)
    local avail = math.floor((ct - used) / b)
    if avail >= c1 then
      local next_tat = tat + cost * b
      return {true, avail - cost, next_tat - now, 0, next_tat, 0, 0, next_tat}
    end
    return {false, avail, tat - now, used + c1 * b - ct, tat, 0, 0, tat}
  elseif kind == 2 then
    local win = math.floor(now / b)
    local fin = (win + 1) * b
    local count = 0
    if s1 == win then count = s2 end
    if count + c1 <= a then
      local used = count + cost
      local reset = 0
      if used > 0 then reset = fin - now end
      return {true, a - used, reset, 0, win, used, 0, fin}
    end
    local reset = 0
    if count > 0 then reset = fin - now end
    return {false, math.max(a - count, 0), reset, fin - now, win, count, 0, fin}
  end
  local win = math.floor(now / b)
  local start = win * b
  local e = now - start
  local cur, prev = 0, 0
  if s1 == win then
    cur, prev = s2, s3
  elseif s1 == win - 1 then
    prev = s2
  end
  local avail = sliding_avail(a, b, cur, prev, e)
  local allowed = avail >= c1
  local used, remaining, retry = cur, avail, 0
  if allowed then
    used, remaining = cur + cost, avail - cost
  else
    retry = sliding_retry(a, b, cur, prev, e, c1)
  end
  local reset = 0
  if used > 0 then
    reset = start + 2 * b - now
  elseif prev > 0 then
    reset = start + b - now
  end
  return {allowed, remaining, reset, retry, win, used, prev, start + 2 * b}
end

local function load(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local a, b, c = string.match(v, '^(%d+):?(%d*):?(%d*)$')
  if not a then return nil end
  return tonumber(a), tonumber(b) or 0, tonumber(c) or 0
end

local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local out = {}
local ai, ki = 2, 1
while ai <= #ARGV do
  local n, cost = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
  ai = ai + 2
  local res, kinds, all = {}, {}, true
  for r = 1, n do
    local kind, a, b = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1]), tonumber(ARGV[ai + 2])
    ai = ai + 3
    local s1, s2, s3 = load(KEYS[ki + r - 1])
    res[r] = eval(kind, a, b, s1, s2, s3, now, cost)
    kinds[r] = kind
    if not res[r][1] then all = false end
  end
  -- Allowed: the rule with the fewest units left decides. Denied: the rule
  -- needing the longest wait decides. Ties go to the earlier rule.
  local best = 1
  for r = 2, n do
    local x, y = res[r], res[best]
    if all then
      if x[2] < y[2] then best = r end
    elseif (not x[1]) and (y[1] or x[4] > y[4]) then
      best = r
    end
  end
  if all and cost > 0 then
    for r = 1, n do
      local x = res[r]
      local v
      if kinds[r] == 1 then
        v = string.format('%d', x[5])
      elseif kinds[r] == 2 then
        v = string.format('%d:%d', x[5], x[6])
      else
        v = string.format('%d:%d:%d', x[5], x[6], x[7])
      end
      redis.call('SET', KEYS[ki + r - 1], v, 'PX', math.ceil((x[8] + MARGIN_US - now) / 1000))
    end
  end
  ki = ki + n
  local d = res[best]
  local allowed = 0
  if all then allowed = 1 end
  out[#out + 1] = allowed
  out[#out + 1] = best - 1
  out[#out + 1] = d[2]
  out[#out + 1] = math.ceil(d[3] / 1000)
  out[#out + 1] = math.ceil(d[4] / 1000)
end
return out
