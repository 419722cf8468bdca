-- cache.lua: the response cache, as functions for batch.lua (see
-- limiter.lua for how the three files in lua/ reach Redis).
--
-- An entry is a hash <prefix>:c:{<tenant>}:<key> with fields v (the value),
-- s (its stale_ms) and g (its tags, encoded, space-separated). It expires
-- ttl_ms + stale_ms after it was set: fresh while its PTTL is above s, then
-- stale until it expires. Beside it, <prefix>:f:{<tenant>}:<key> is the
-- single-flight fill lock (SET NX PX fill_ms) and <prefix>:r:{<tenant>}:<key>
-- the refresh lock, taken by the one caller told to refresh a stale entry
-- (SET NX PX until the entry expires).
--
-- A tag is a sorted set <prefix>:g:{<tenant>}:<tag> of entry key names
-- scored by their expiry (ms, Redis clock). Every write to a tag prunes its
-- expired members and the set expires with its longest-lived member, so a
-- tag holds no more than the live entries carrying it and vanishes with the
-- last of them; no KEYS or SCAN. Deleting by tag deletes only entries whose
-- own tag list still names the tag (an entry overwritten without the tag
-- leaves a stale member that is pruned when its score passes).
--
-- Atomic because Redis runs the script alone. All of a tenant's keys share
-- its hash tag, hence one Cluster slot, so entry keys found through a tag
-- live in the same slot as the script's declared keys.

-- Returns hit (1/0), ttl_ms, stale (1/0), refresh (1/0), fill (1/0), value
-- (false on a miss).
local function cache_get(kentry, kfill, kref, fill_ms)
  local r = call('HMGET', kentry, 'v', 's')
  local v = r[1]
  if v then
    local pttl = call('PTTL', kentry)
    local fresh = pttl - (tonumber(r[2]) or 0)
    if fresh > 0 or pttl < 0 then return 1, max(fresh, 0), 0, 0, 0, v end
    local refresh = 0
    if call('SET', kref, '1', 'NX', 'PX', pttl) then refresh = 1 end
    return 1, 0, 1, refresh, 0, v
  end
  local fill = 0
  if fill_ms > 0 and call('SET', kfill, '1', 'NX', 'PX', fill_ms) then fill = 1 end
  return 0, 0, 0, 0, fill, false
end

-- Stores an entry, replacing any previous one and its locks, and indexes
-- it under its tags (keys in `tagkeys`, encoded names in `tagnames`).
local function cache_set(kentry, kfill, kref, value, ttl_ms, stale_ms, tagkeys, tagnames, now_ms)
  local life = ttl_ms + stale_ms
  call('DEL', kentry, kfill, kref)
  call('HSET', kentry, 'v', value, 's', stale_ms, 'g', table.concat(tagnames, ' '))
  call('PEXPIRE', kentry, life)
  for i = 1, #tagkeys do
    local k = tagkeys[i]
    call('ZREMRANGEBYSCORE', k, '-inf', now_ms)
    call('ZADD', k, now_ms + life, kentry)
    if call('PTTL', k) < life then call('PEXPIRE', k, life) end
  end
end

-- Drops the fill lock at each of `entries` (a filler giving up: callers
-- held for it are let go, a new caller may fill); entries stay. Returns
-- how many locks were dropped.
local function release_fills(entries)
  local n = 0
  for i = 1, #entries do n = n + call('DEL', entries[i][2]) end
  return n
end

-- The name of an entry's lock: the entry's name with the `from` marker
-- swapped for `to` (src/keys.rs names every key; it sends the markers).
-- An entry named without the marker (by an older quotad's key layout) has
-- no lock of this layout: its own name is returned, already deleted.
local function lock_of(entry, from, to)
  local i, j = string.find(entry, from, 1, true)
  if not i then return entry end
  return string.sub(entry, 1, i - 1) .. to .. string.sub(entry, j + 1)
end

-- Deletes the entry (with its locks) at each of `entries` ({entry, fill,
-- refresh} key triples) and every live entry still carrying one of the
-- tags; returns how many entries were deleted. Entries found through a tag
-- are known only here, so their locks' names come from `marks` ({entry,
-- fill, refresh} markers).
local function cache_del(entries, tagkeys, tagnames, marks, now_ms)
  local n = 0
  for i = 1, #entries do
    local e = entries[i]
    n = n + call('DEL', e[1])
    call('DEL', e[2], e[3])
  end
  for i = 1, #tagkeys do
    local needle = ' ' .. tagnames[i] .. ' '
    local members = call('ZRANGEBYSCORE', tagkeys[i], '(' .. now_ms, '+inf')
    for _, m in ipairs(members) do
      local g = call('HGET', m, 'g')
      if g and string.find(' ' .. g .. ' ', needle, 1, true) then
        n = n + call('DEL', m)
        call('DEL', lock_of(m, marks[1], marks[2]), lock_of(m, marks[1], marks[3]))
      end
    end
    call('DEL', tagkeys[i])
  end
  return n
end
