-- limiter.lua: the rate-limit rules, as functions for batch.lua (the three
-- files in lua/ are one Redis function library, or one script where Redis
-- has no functions; batch.lua has the KEYS/ARGV contract).
--
-- A rule's state is 4 packed little-endian doubles in a string key:
-- token bucket: tat; fixed window: window, count; sliding window: window,
-- current, previous; then the key's expiry ("horizon"). The key expires at
-- the horizon, so idle state vanishes by itself; the expiry is only moved
-- (with some slack) when the state needs it to be later, which spares most
-- writes the cost of setting an expiry. A concurrency rule's state is a
-- sorted set instead (member a lease id, score its expiry in µs), which
-- expires with its latest lease (see `leases` below). The arithmetic mirrors
-- src/limiter/algorithm.rs operation for operation; integers stay under
-- 2^52, where doubles are exact. Times are microseconds.
--
-- Atomic: a check reads all its rules' states, decides, and writes them
-- only if every rule allows, with nothing interleaved (Redis runs a script
-- alone); a later check in the same script sees the earlier one's writes.

-- Redis's and Lua's globals, bound at the first call: a library being
-- loaded may not read them.
local list_unpack, floor, ceil, max, min, call, pack
local function bind_globals()
  list_unpack, floor, ceil, max, min = unpack, math.floor, math.ceil, math.max, math.min
  call, pack = redis.call, struct.pack
end
local unpack -- struct's, from here on
local function bind()
  if unpack then return end
  bind_globals()
  unpack = struct.unpack
end

local MARGIN_US = 1000000 -- a state outlives the moment it stops mattering by this
local SLACK_US = 30000000 -- when the expiry must move, it moves this much further

local function sliding_avail(limit, w, cur, prev, e)
  local estimate = prev * (w - e) / w + cur
  local avail = floor(limit - estimate)
  if avail > 0 then return avail end
  return 0
end

local function sliding_retry(limit, w, cur, prev, e, c1)
  if cur + c1 <= limit then
    local need = w - (limit - cur - c1) * w / prev
    local at = max(ceil(need), e + 1)
    for _ = 1, 4 do
      if at >= w or sliding_avail(limit, w, cur, prev, at) >= c1 then break end
      at = at + 1
    end
    return min(at, w) - e
  end
  local need = w - (limit - c1) * w / cur
  local at = 0
  if need > 0 then at = ceil(need) end
  for _ = 1, 4 do
    if at >= w or sliding_avail(limit, w, 0, cur, at) >= c1 then break end
    at = at + 1
  end
  return w - e + min(at, w)
end

-- Rule kind codes, as src/backend/redis/script.rs sends them (a unit test
-- checks that both sides agree).
local KIND_TOKEN_BUCKET = 1
local KIND_FIXED_WINDOW = 2
local KIND_SLIDING_WINDOW = 3
local KIND_CONCURRENCY = 4

-- Each kind returns allowed, remaining, reset_us, retry_us, s1, s2, s3,
-- expires_us; `a` and `b` are the kind's two parameters (see batch.lua).
-- The paths every allowed check takes do their arithmetic inline (`x - x %
-- 1` is floor(x), exactly, for the integers below 2^52 used here): a call
-- to a math function costs Redis more than the arithmetic itself.

-- GCRA: s1 is when the bucket would be full again; a unit is b µs.
local function token_bucket(a, b, s1, now, cost)
  local c1 = cost
  if c1 < 1 then c1 = 1 end
  local ct = a * b
  local tat = s1 or 0
  if tat < now then tat = now end
  local used = tat - now
  if used > ct then used = ct end
  local q = (ct - used) / b
  local avail = q - q % 1
  if avail >= c1 then
    local next_tat = tat + cost * b
    return true, avail - cost, next_tat - now, 0, next_tat, 0, 0, next_tat
  end
  return false, avail, tat - now, used + c1 * b - ct, tat, 0, 0, tat
end

-- At most a units per aligned window of b µs: s1 the window, s2 its count.
local function fixed_window(a, b, s1, s2, now, cost)
  local c1 = cost
  if c1 < 1 then c1 = 1 end
  local q = now / b
  local win = q - q % 1
  local fin = (win + 1) * b
  local count = 0
  if s1 == win then count = s2 end
  if count + c1 <= a then
    local used = count + cost
    local reset = 0
    if used > 0 then reset = fin - now end
    return true, a - used, reset, 0, win, used, 0, fin
  end
  local reset = 0
  if count > 0 then reset = fin - now end
  return false, max(a - count, 0), reset, fin - now, win, count, 0, fin
end

-- At most a units in any b µs: s1 the window, s2 its count, s3 the
-- previous window's, weighted by how much of it still overlaps.
local function sliding_window(a, b, s1, s2, s3, now, cost)
  local c1 = cost
  if c1 < 1 then c1 = 1 end
  local q = now / b
  local win = q - q % 1
  local start = win * b
  local e = now - start
  local cur, prev = 0, 0
  if s1 == win then
    cur, prev = s2, s3
  elseif s1 == win - 1 then
    prev = s2
  end
  local x = a - (prev * (b - e) / b + cur)
  local avail = x - x % 1
  if avail < 0 then avail = 0 end
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
  return allowed, remaining, reset, retry, win, used, prev, start + 2 * b
end

-- At most a leases outstanding, each for b µs: s1 how many are out, s2
-- the soonest expiry, s3 the latest (read by `leases`). One slot per
-- allowed check whatever its cost; a peek (cost 0) takes none.
local function concurrency(a, b, s1, s2, s3, now, cost)
  if s1 < a then
    local take = 0
    if cost > 0 then take = 1 end
    local upto = s3
    if take == 1 then upto = max(s3, now + b) end
    return true, a - s1 - take, max(upto - now, 0), 0, s1 + take, s2, upto, upto
  end
  return false, 0, max(s3 - now, 0), max(s2 - now, 1), s1, s2, s3, s3
end

local function eval(kind, a, b, s1, s2, s3, now, cost)
  if kind == KIND_TOKEN_BUCKET then return token_bucket(a, b, s1, now, cost) end
  if kind == KIND_FIXED_WINDOW then return fixed_window(a, b, s1, s2, now, cost) end
  if kind == KIND_SLIDING_WINDOW then return sliding_window(a, b, s1, s2, s3, now, cost) end
  if kind == KIND_CONCURRENCY then return concurrency(a, b, s1, s2, s3, now, cost) end
  error('quotad: unknown rule kind ' .. tostring(kind))
end

-- A concurrency rule's sorted set at `key`, with its expired leases
-- dropped: how many are out, the soonest and the latest expiry (0, 0, 0
-- when none).
local function leases(key, now)
  call('ZREMRANGEBYSCORE', key, '-inf', now)
  local n = call('ZCARD', key)
  if n == 0 then return 0, 0, 0 end
  local first = call('ZRANGE', key, 0, 0, 'WITHSCORES')
  local last = call('ZRANGE', key, -1, -1, 'WITHSCORES')
  return n, tonumber(first[2]), tonumber(last[2])
end

-- Takes `lease` in the sorted set at `key` until `expires`; the set lives
-- until its latest lease expires (`latest`: the latest of the others).
local function take_lease(key, lease, expires, latest, now)
  call('ZADD', key, expires, lease)
  call('PEXPIRE', key, ceil((max(expires, latest) - now + MARGIN_US) / 1000))
end

-- Gives `lease` back in the sorted sets at KEYS[from .. from + n - 1]:
-- 1 if it was still outstanding in one of them, else 0 (released before,
-- expired, or never taken).
local function release(keys, from, n, lease, now)
  local released = 0
  for k = from, from + n - 1 do
    local expires = call('ZSCORE', keys[k], lease)
    if expires then
      call('ZREM', keys[k], lease)
      if tonumber(expires) > now then released = 1 end
    end
  end
  return released
end

-- µs to whole ms, rounded up.
local function ms(us)
  local q = us / 1000
  local c = q - q % 1
  if c < q then return c + 1 end
  return c
end

-- One rule's usage without charging: remaining, reset_ms. A peek's numbers,
-- except that a fixed window (a daily quota too) always resets at its
-- window's end. Mirrors src/limiter/algorithm.rs's `usage`.
local function usage(kind, a, b, s1, s2, s3, now)
  local _, rem, reset = eval(kind, a, b, s1, s2, s3, now, 0)
  if kind == KIND_FIXED_WINDOW then
    local q = now / b
    reset = (q - q % 1 + 1) * b - now
  end
  return rem, ms(reset)
end

-- A policy's fields ({nrules, kind, a, b, ...}) from its packed form in
-- ARGV, parsed once: a library keeps this table from call to call (a
-- script starts each call with it empty). Bounded, since reloads may
-- bring new forms. A policy with shadow rules ends with one more number,
-- a bit mask of them (bit i: rule i + 1): `fields.shadow` then says, per
-- rule, whether it is shadow, and its rule count is stored negated, so
-- `check` finds it by the count test it makes anyway (other policies pay
-- nothing for shadow rules).
local POLICIES, NPOLICIES = {}, 0
local function policy(spec)
  local fields = POLICIES[spec]
  if fields then return fields end
  fields = {}
  for i = 1, #spec / 8 do fields[i] = unpack('<d', spec, (i - 1) * 8 + 1) end
  local n = fields[1]
  if #fields > 1 + 3 * n then
    local mask, shadow = fields[2 + 3 * n], {}
    for r = 1, n do
      shadow[r] = mask % 2 == 1
      mask = (mask - mask % 2) / 2
    end
    fields.shadow, fields[1] = shadow, -n
  end
  if NPOLICIES >= 1000 then POLICIES, NPOLICIES = {}, 0 end
  POLICIES[spec], NPOLICIES = fields, NPOLICIES + 1
  return fields
end

-- The batch's rule states, by index into KEYS (the first `n` KEYS are the
-- call's distinct state keys): read with one MGET when the call starts,
-- changed in place by each check in order, and written back once per
-- changed key when it ends. So a later check of the same key sees the
-- earlier one's charge, and a hot key costs one read and one write per
-- batch, however many of its checks the batch carries.
local S1, S2, S3, SH = {}, {}, {}, {} -- state fields, then the horizon
local DIRTY, MOVED = {}, {} -- changed; its expiry must move
local MGET_CHUNK = 1000 -- keys per MGET: Lua's unpack has a stack limit
-- A library keeps these tables from call to call: every entry a call uses
-- is set here first.
local function load_states(keys, n)
  for from = 1, n, MGET_CHUNK do
    local to = min(from + MGET_CHUNK - 1, n)
    local vals = call('MGET', list_unpack(keys, from, to))
    for i = from, to do
      local v = vals[i - from + 1]
      if v and #v == 32 then
        S1[i], S2[i], S3[i], SH[i] = unpack('<dddd', v)
      else
        S1[i], S2[i], S3[i], SH[i] = nil, nil, nil, 0
      end
      DIRTY[i], MOVED[i] = false, false
    end
  end
end

local function store_states(keys, n, now)
  for i = 1, n do
    if DIRTY[i] then
      local v = pack('<dddd', S1[i], S2[i], S3[i], SH[i])
      if MOVED[i] then
        call('SET', keys[i], v, 'PX', ceil((SH[i] - now) / 1000))
      else
        call('SET', keys[i], v, 'KEEPTTL')
      end
    end
  end
end

-- Charges a rule: its state at KEYS[k] becomes n1, n2, n3, needed until
-- `expires`.
local function charge(k, n1, n2, n3, expires)
  S1[k], S2[k], S3[k] = n1, n2, n3
  local needed = expires + MARGIN_US
  if SH[k] < needed then
    SH[k] = needed + SLACK_US
    MOVED[k] = true
  end
  DIRTY[k] = true
end

-- Decides one check over the rules of `spec` ({nrules, kind, a, b, ...}),
-- whose states are at KEYS[first .. first + nrules - 1], and charges it if
-- every rule allows. Returns allowed (1/0, or 2 + i: see check_shadow),
-- the deciding rule (0-based), remaining, reset_ms, retry_after_ms.
local R = {} -- per rule: 1 allowed, 2 remaining, 3 reset, 4 retry, 5-7 next state, 8 expires

-- A check of a policy with shadow rules (see src/limiter/mod.rs,
-- `shadow_verdict`): only enforcing rules deny. When they allow, every
-- rule that passes is charged (not a shadow rule that would deny), and
-- the first result is 2 + the 0-based index of the shadow rule that would
-- have denied (the longest wait), or 1. The enforcing rules decide the
-- numbers, or, when every rule is shadow, that shadow rule.
local function check_shadow(spec, first, cost, now)
  local n, sh = -spec[1], spec.shadow
  local all = true
  for r = 1, n do
    local o = (r - 1) * 8
    local k = first + r - 1
    local f = 2 + (r - 1) * 3
    local ok, rem, reset, retry, n1, n2, n3, exp =
      eval(spec[f], spec[f + 1], spec[f + 2], S1[k], S2[k], S3[k], now, cost)
    R[o + 1], R[o + 2], R[o + 3], R[o + 4] = ok, rem, reset, retry
    R[o + 5], R[o + 6], R[o + 7], R[o + 8] = n1, n2, n3, exp
    if not ok and not sh[r] then all = false end
  end
  if not all then
    local best
    for r = 0, n - 1 do
      local x = r * 8
      if not sh[r + 1] then
        if best == nil then
          best = r
        else
          local y = best * 8
          if (not R[x + 1]) and (R[y + 1] or R[x + 4] > R[y + 4]) then best = r end
        end
      end
    end
    local b = best * 8
    return 0, best, R[b + 2], ms(R[b + 3]), ms(R[b + 4])
  end
  local shadow, best
  for r = 0, n - 1 do
    local x = r * 8
    if sh[r + 1] then
      if not R[x + 1] and (shadow == nil or R[x + 4] > R[shadow * 8 + 4]) then shadow = r end
    elseif best == nil or R[x + 2] < R[best * 8 + 2] then
      best = r
    end
  end
  if best == nil then best = shadow end
  if best == nil then
    best = 0
    for r = 1, n - 1 do
      if R[r * 8 + 2] < R[best * 8 + 2] then best = r end
    end
  end
  if cost > 0 then
    for r = 0, n - 1 do
      local o = r * 8
      if R[o + 1] then charge(first + r, R[o + 5], R[o + 6], R[o + 7], R[o + 8]) end
    end
  end
  local code = 1
  if shadow then code = 2 + shadow end
  local b = best * 8
  return code, best, R[b + 2], ms(R[b + 3]), 0
end

local function check(spec, first, cost, now)
  local n = spec[1]
  if n == 1 then -- most policies: no rule to choose between
    local k = first
    local ok, rem, reset, retry, n1, n2, n3, exp =
      eval(spec[2], spec[3], spec[4], S1[k], S2[k], S3[k], now, cost)
    if not ok then return 0, 0, rem, ms(reset), ms(retry) end
    if cost > 0 then charge(k, n1, n2, n3, exp) end
    return 1, 0, rem, ms(reset), 0
  end
  if n < 0 then return check_shadow(spec, first, cost, now) end
  local all = true
  for r = 1, n do
    local o = (r - 1) * 8
    local k = first + r - 1
    local f = 2 + (r - 1) * 3
    local ok, rem, reset, retry, n1, n2, n3, exp =
      eval(spec[f], spec[f + 1], spec[f + 2], S1[k], S2[k], S3[k], now, cost)
    R[o + 1], R[o + 2], R[o + 3], R[o + 4] = ok, rem, reset, retry
    R[o + 5], R[o + 6], R[o + 7], R[o + 8] = n1, n2, n3, exp
    if not ok then all = false end
  end
  -- Allowed: the rule with the fewest units left decides. Denied: the rule
  -- needing the longest wait decides. Ties go to the earlier rule.
  local best = 0
  for r = 1, n - 1 do
    local x, y = r * 8, best * 8
    if all then
      if R[x + 2] < R[y + 2] then best = r end
    elseif (not R[x + 1]) and (R[y + 1] or R[x + 4] > R[y + 4]) then
      best = r
    end
  end
  if all and cost > 0 then
    for r = 0, n - 1 do
      local o = r * 8
      charge(first + r, R[o + 5], R[o + 6], R[o + 7], R[o + 8])
    end
  end
  local b = best * 8
  local allowed = 0
  if all then allowed = 1 end
  return allowed, best, R[b + 2], ms(R[b + 3]), ms(R[b + 4])
end

-- `check` for a policy with concurrency rules, whose states at KEYS[k] are
-- sorted sets of leases: decided like `check` (like `check_shadow` for a
-- policy with shadow rules), and if it allows and the cost is not 0,
-- `lease` is taken in each concurrency rule that allows and the other
-- rules that allow are charged (only a shadow rule can deny then: it
-- takes nothing). A policy without concurrency rules never comes here, so
-- their checks pay nothing for it.
local function check_leased(keys, spec, first, cost, now, lease)
  local n, sh = spec[1], spec.shadow
  if n < 0 then n = -n end -- a policy with shadow rules (see `policy`)
  local all = true -- every enforcing rule allows
  for r = 1, n do
    local o = (r - 1) * 8
    local k = first + r - 1
    local f = 2 + (r - 1) * 3
    local kind = spec[f]
    local s1, s2, s3 = S1[k], S2[k], S3[k]
    if kind == KIND_CONCURRENCY then s1, s2, s3 = leases(keys[k], now) end
    local ok, rem, reset, retry, n1, n2, n3, exp =
      eval(kind, spec[f + 1], spec[f + 2], s1, s2, s3, now, cost)
    R[o + 1], R[o + 2], R[o + 3], R[o + 4] = ok, rem, reset, retry
    R[o + 5], R[o + 6], R[o + 7], R[o + 8] = n1, n2, n3, exp
    if not ok and not (sh and sh[r]) then all = false end
  end
  -- The deciding rule, chosen as `check` and `check_shadow` choose it
  -- (written out again rather than shared, so that `check` pays no call
  -- for it). Denied: the enforcing rule needing the longest wait. Allowed:
  -- the enforcing rule with the fewest units left, else the shadow rule
  -- that would have denied, else the rule with the fewest units left.
  local best, shadow
  for r = 0, n - 1 do
    local x = r * 8
    if sh and sh[r + 1] then
      if all and not R[x + 1] and (shadow == nil or R[x + 4] > R[shadow * 8 + 4]) then shadow = r end
    elseif best == nil then
      best = r
    elseif all then
      if R[x + 2] < R[best * 8 + 2] then best = r end
    else
      local y = best * 8
      if (not R[x + 1]) and (R[y + 1] or R[x + 4] > R[y + 4]) then best = r end
    end
  end
  if all and best == nil then best = shadow end
  if best == nil then
    best = 0
    for r = 1, n - 1 do
      if R[r * 8 + 2] < R[best * 8 + 2] then best = r end
    end
  end
  if all and cost > 0 then
    for r = 0, n - 1 do
      local o = r * 8
      if R[o + 1] then
        if spec[2 + r * 3] == KIND_CONCURRENCY then
          -- quotad sends a lease with every check of cost > 0 of such a
          -- policy; a missing one must not take a slot nobody can release.
          if lease ~= '' then take_lease(keys[first + r], lease, now + spec[4 + r * 3], R[o + 7], now) end
        else
          charge(first + r, R[o + 5], R[o + 6], R[o + 7], R[o + 8])
        end
      end
    end
  end
  local b = best * 8
  if not all then return 0, best, R[b + 2], ms(R[b + 3]), ms(R[b + 4]) end
  local code = 1
  if shadow then code = 2 + shadow end
  return code, best, R[b + 2], ms(R[b + 3]), 0
end
