-- tenant_set.lua: replaces a tenant's record in the `redis` quota source
-- (`quotad tenant set`).
--
-- KEYS[1]: the record, <prefix>:tenant:{<tenant>}, a hash.
-- ARGV:    field, value, field, value, ...: `plan` and one
--          `limit:<policy>.<rule>.<parameter>` per own limit.
-- Returns: the number of fields written.
--
-- Atomic because Redis runs the script alone: a lookup sees the old record
-- or the new one, never none (DEL then HSET as two commands would show a
-- moment without a record, read as "unknown tenant: default plan").
redis.call('DEL', KEYS[1])
return redis.call('HSET', KEYS[1], unpack(ARGV))
