-- batch.lua: one Redis round trip's worth of quotad operations, `batch`.
-- limiter.lua, cache.lua and this file (in that order) are one function
-- library, whose one function src/backend/redis/script.rs registers and
-- calls with FCALL; where Redis has no functions (before 7.0) they are one
-- script that calls it, run by EVALSHA. Either way Redis runs a call alone,
-- so a whole batch is decided atomically and a later operation sees the
-- writes of an earlier one. A library is loaded once, so its functions and
-- tables are made once, not at every call as a script's are.
--
-- KEYS[1 .. N]: the call's distinct rule state keys (checks of the same
-- tenant, policy and key share theirs); then the cache operations' keys.
-- ARGV[1]: the time in µs since the Unix epoch for the rate-limit rules, or
--          "" to take it from Redis TIME, the one clock every sidecar shares
--          (tests pin it; cache expiry always follows Redis's own clock).
-- ARGV[2]: N. ARGV[3]: P, the number of policies; ARGV[4 .. 3+P]: one
--          policy each, as packed little-endian doubles: the rule count,
--          then per rule kind, a, b: 1 token bucket (capacity, µs per
--          unit), 2 fixed window (limit, window µs), 3 sliding window
--          (limit, window µs), 4 concurrency (limit, lease µs); then,
--          only for a policy with shadow rules, a bit mask of them (see
--          limiter.lua's `policy`).
-- ARGV[4+P]: C, the number of plain checks (those of policies without
--          concurrency rules, which take no lease); ARGV[5+P]: all C of them in
--          one string of packed doubles, three per check: its policy's
--          index, its cost, its first state key's index (its rules' keys
--          follow it). One string rather than one ARGV each, since every
--          ARGV costs Redis an object and Lua a string. The plain checks
--          run first: they touch no key a cache operation does, so running
--          them ahead of the rest decides nothing differently (a usage in
--          the same batch, a concurrent request, sees their charges).
-- Then the other operations, in order. Each starts with one ARGV of packed
-- doubles, its header; a cache operation takes its keys from KEYS after the
-- state keys, in order:
--   2 cache_get  header 2, fill_ms                     keys: entry, fill lock, refresh lock
--   3 cache_set  header 3, ttl_ms, stale_ms, tags      keys: entry, fill lock, refresh lock,
--                then ARGV: the value, the tag names        then one per tag
--   4 cache_del  header 4, entries, tags, fill_only    keys: entry, fill lock, refresh lock
--                then ARGV: the tag names and, with        per entry, then one per tag
--                tags, the entry, fill and refresh
--                markers of key names (see cache_del)
--   5 check_get  header 5, policy index, cost,         keys: entry, fill lock, refresh lock
--                fill_ms, first, and for a policy
--                with concurrency rules a 6th value, 1:
--                then ARGV: the lease ("" for a peek)
--   6 usage      header 6, policy index, first         keys: none (its rules' state keys
--                                                          are among the first N)
--  10 check      header 10, policy index, cost, first  keys: none (its state keys are
--     (leased)   (a policy with concurrency rules),        among the first N)
--                then ARGV: the lease ("" for a peek)
--  11 release    header 11, n                          keys: the policy's n concurrency
--                then ARGV: the lease                      rules' state keys
-- Returns an array: first one string of packed little-endian doubles, the
-- numbers of every result, the plain checks' in order, then the other
-- operations' in order; then the value of every hit, in order. A plain
-- check: remaining, reset_ms when it is allowed by its first rule with no
-- shadow rule denying (most checks: three numbers fewer to build and to
-- read; remaining is never below 0), else -1 - allowed (below 0), rule,
-- remaining, reset_ms, retry_after_ms.
-- Others (check: allowed, rule, remaining, reset_ms, retry_after_ms; usage:
-- remaining, reset_ms per rule of its policy, charging nothing; cache_get:
-- hit, ttl_ms, stale, refresh, fill; cache_set: 1; cache_del: deleted;
-- check_get: the check's 5, then the cache_get's 5, zeros when denied: a
-- denied check_get reads nothing; leased check: the check's 5; release: 1
-- if the lease was still outstanding, else 0). One string, not a reply
-- integer each: packing costs Redis no more than making the integers, and
-- quotad reads a string in one step where it parses every reply element
-- (see docs/benchmarks.md, 2026-12-07 second session). quotad truncates
-- each number towards zero, as Redis does a Lua number it turns into an
-- integer.
--
-- A plain cache_get reads a fresh entry with HMGET and PTTL instead (much
-- cheaper for Redis than through Lua); it comes here only when a lock is at
-- stake: a stale hit names a refresher, a miss with fill_ms a filler.

-- Operation codes, as src/backend/redis/script.rs sends them (a unit test
-- checks that both sides agree). An unknown code is an error: the whole
-- call fails and its checks are answered by failure mode.
local OP_CACHE_GET = 2
local OP_CACHE_SET = 3
local OP_CACHE_DEL = 4
local OP_CHECK_GET = 5
local OP_USAGE = 6
local OP_CHECK_LEASE = 10
local OP_RELEASE = 11

-- out[1 .. n] as one string of little-endian doubles, packed at most
-- PACK_CHUNK at a time (struct.pack takes them as arguments, and Lua's
-- unpack has a stack limit). A format is made once per count.
local PACK_CHUNK = 100
local FORMATS = {}
local function format(count)
  local f = '<' .. string.rep('d', count)
  FORMATS[count] = f
  return f
end
local function packed(out, n)
  if n <= PACK_CHUNK then return pack(FORMATS[n] or format(n), list_unpack(out, 1, n)) end
  local parts = {}
  for from = 1, n, PACK_CHUNK do
    local to = min(from + PACK_CHUNK - 1, n)
    parts[#parts + 1] = pack(FORMATS[to - from + 1] or format(to - from + 1), list_unpack(out, from, to))
  end
  return table.concat(parts)
end

local function batch(KEYS, ARGV)
  bind()
  local now = tonumber(ARGV[1])
  if not now then
    local t = call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end

  local redis_now_ms
  local function clock_ms()
    if not redis_now_ms then
      local t = call('TIME')
      redis_now_ms = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
    end
    return redis_now_ms
  end

  local nstates = tonumber(ARGV[2])
  load_states(KEYS, nstates)

  local npolicies = tonumber(ARGV[3])
  local policies = {}
  for p = 1, npolicies do policies[p] = policy(ARGV[3 + p]) end

  -- the reply: the numbers (packed at the end), then the values of hits
  local out, no, values = {}, 0, {''}
  local nchecks, checks = tonumber(ARGV[4 + npolicies]), ARGV[5 + npolicies]
  for at = 1, nchecks * 24, 24 do
    local pi, cost, first = unpack('<ddd', checks, at)
    local allowed, rule, remaining, reset, retry = check(policies[pi + 1], first, cost, now)
    if allowed == 1 and rule == 0 and remaining >= 0 then -- the common answer, in 2 numbers
      out[no + 1], out[no + 2] = remaining, reset
      no = no + 2
    else
      out[no + 1], out[no + 2], out[no + 3], out[no + 4], out[no + 5] =
        -1 - allowed, rule, remaining, reset, retry
      no = no + 5
    end
  end

  local ai, ki = 6 + npolicies, nstates + 1
  while ai <= #ARGV do
    local h = ARGV[ai]
    ai = ai + 1
    local op = unpack('<d', h)
    if op == OP_CACHE_GET then
      local _, fill_ms = unpack('<dd', h)
      local v
      out[no + 1], out[no + 2], out[no + 3], out[no + 4], out[no + 5], v =
        cache_get(KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], fill_ms)
      no = no + 5
      if v then values[#values + 1] = v end
      ki = ki + 3
    elseif op == OP_CACHE_SET then
      local _, ttl, stale, ntags = unpack('<dddd', h)
      local value = ARGV[ai]
      local tagkeys, tagnames = {}, {}
      for i = 1, ntags do
        tagkeys[i] = KEYS[ki + 2 + i]
        tagnames[i] = ARGV[ai + i]
      end
      ai = ai + 1 + ntags
      cache_set(KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], value, ttl, stale, tagkeys, tagnames, clock_ms())
      no = no + 1
      out[no] = 1
      ki = ki + 3 + ntags
    elseif op == OP_CACHE_DEL then
      local _, nentries, ntags, fill_only = unpack('<dddd', h)
      local entries, tagkeys, tagnames = {}, {}, {}
      for i = 1, nentries do
        local k = ki + (i - 1) * 3
        entries[i] = {KEYS[k], KEYS[k + 1], KEYS[k + 2]}
      end
      ki = ki + nentries * 3
      for i = 1, ntags do
        tagkeys[i] = KEYS[ki + i - 1]
        tagnames[i] = ARGV[ai + i - 1]
      end
      ai = ai + ntags
      ki = ki + ntags
      local marks
      if ntags > 0 then
        marks = {ARGV[ai], ARGV[ai + 1], ARGV[ai + 2]}
        ai = ai + 3
      end
      no = no + 1
      if fill_only == 1 then out[no] = release_fills(entries) else out[no] = cache_del(entries, tagkeys, tagnames, marks, clock_ms()) end
    elseif op == OP_CHECK_LEASE then
      local _, pi, cost, first = unpack('<dddd', h)
      out[no + 1], out[no + 2], out[no + 3], out[no + 4], out[no + 5] =
        check_leased(KEYS, policies[pi + 1], first, cost, now, ARGV[ai])
      ai = ai + 1
      no = no + 5
    elseif op == OP_RELEASE then
      local _, n = unpack('<dd', h)
      no = no + 1
      out[no] = release(KEYS, ki, n, ARGV[ai], now)
      ai = ai + 1
      ki = ki + n
    elseif op == OP_CHECK_GET then
      local _, pi, cost, fill_ms, first = unpack('<ddddd', h)
      local allowed, rule, remaining, reset, retry
      if #h > 40 then -- a policy with concurrency rules: its lease follows
        allowed, rule, remaining, reset, retry =
          check_leased(KEYS, policies[pi + 1], first, cost, now, ARGV[ai])
        ai = ai + 1
      else
        allowed, rule, remaining, reset, retry = check(policies[pi + 1], first, cost, now)
      end
      out[no + 1], out[no + 2], out[no + 3], out[no + 4], out[no + 5] = allowed, rule, remaining, reset, retry
      if allowed >= 1 then
        local v
        out[no + 6], out[no + 7], out[no + 8], out[no + 9], out[no + 10], v =
          cache_get(KEYS[ki], KEYS[ki + 1], KEYS[ki + 2], fill_ms)
        if v then values[#values + 1] = v end
      else
        out[no + 6], out[no + 7], out[no + 8], out[no + 9], out[no + 10] = 0, 0, 0, 0, 0
      end
      no = no + 10
      ki = ki + 3
    elseif op == OP_USAGE then
      local _, pi, first = unpack('<ddd', h)
      local spec = policies[pi + 1]
      local n = spec[1]
      if n < 0 then n = -n end -- a policy with shadow rules (limiter.lua's `policy`)
      for r = 1, n do
        local f, k = 2 + (r - 1) * 3, first + r - 1
        local s1, s2, s3 = S1[k], S2[k], S3[k]
        -- a concurrency rule's state is its sorted set of leases
        if spec[f] == KIND_CONCURRENCY then s1, s2, s3 = leases(KEYS[k], now) end
        out[no + 1], out[no + 2] = usage(spec[f], spec[f + 1], spec[f + 2], s1, s2, s3, now)
        no = no + 2
      end
    else
      error('quotad: unknown operation code ' .. tostring(op))
    end
  end

  store_states(KEYS, nstates, now)

  values[1] = packed(out, no)
  return values
end
