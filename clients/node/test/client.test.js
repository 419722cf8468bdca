// Client against the real daemon and Redis.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { BadRequest, Client, UnknownOp, UnknownPolicy } from '../src/index.js';
import { environment, freshTenant } from './daemons.js';

let env;
let client;
// Limits beyond 32 bits: costs and remaining counts travel as uint64.
const HUGE = `[policies.huge]
rules = [{ name = "burst", kind = "token_bucket", capacity = ${2 ** 39}, refill_per_sec = 1000 }]
`;

before(async () => {
  env = await environment(undefined, { tables: HUGE });
  client = new Client(env.quotad.socket, { failureMode: 'raise' });
});
after(async () => {
  client?.close();
  await env?.close();
});

test('hello', async () => {
  const h = await client.hello();
  assert.equal(h.protocol, 1);
  assert.equal(h.backend, 'redis');
  assert.match(h.server, /^quotad\//);
  for (const op of ['check', 'check_get', 'cache_get', 'cache_set', 'cache_del', 'usage']) assert.ok(h.ops.includes(op));
});

test('allowed, then denied, with the standard headers', async () => {
  const tenant = freshTenant();
  // default policy: a bucket of 5 refilled at 0.01/s.
  const first = await client.check(tenant, 'user:1');
  assert.equal(first.allowed, true);
  assert.equal(first.degraded, false);
  assert.deepEqual([first.limit, first.remaining, first.rule], [5, 4, 'burst']);
  assert.deepEqual([first.kind, first.windowMs, first.shadowDenied], ['token_bucket', 500_000, false]);
  // 500 s to refill from empty; 100 s until full again.
  assert.deepEqual(first.headers(), { 'RateLimit-Policy': '"burst";q=5;w=500', RateLimit: '"burst";r=4;t=100' });
  assert.deepEqual(first.headers({ legacy: true }), {
    ...first.headers(), 'RateLimit-Limit': '5', 'RateLimit-Remaining': '4', 'RateLimit-Reset': '100',
  });
  for (let i = 0; i < 4; i++) assert.equal((await client.check(tenant, 'user:1')).allowed, true);
  const denied = await client.check(tenant, 'user:1');
  assert.equal(denied.allowed, false);
  assert.ok(denied.retryAfterMs > 99_000 && denied.retryAfterMs <= 100_000, String(denied.retryAfterMs));
  assert.equal(denied.retryAfter, denied.retryAfterMs / 1000);
  const h = denied.headers({ legacy: true });
  assert.equal(h['Retry-After'], '100');
  assert.equal(h.RateLimit, '"burst";r=0;t=100');
  assert.equal(h['RateLimit-Remaining'], '0');
  assert.equal(h['RateLimit-Reset'], String(Math.ceil(denied.resetMs / 1000)));
  assert.equal((await client.check(tenant, 'user:2')).remaining, 4);
});

test('usage reports every rule without charging', async () => {
  const tenant = freshTenant();
  const before = await client.usage(tenant, 'u', { policy: 'api' });
  assert.deepEqual(before.map((u) => [u.rule, u.kind, u.limit, u.used, u.windowMs]), [
    ['burst', 'token_bucket', 10, 0, 2000],
    ['daily', 'daily_quota', 1000, 0, 86_400_000],
  ]);
  assert.ok(before[1].resetMs > 0 && before[1].resetMs <= 86_400_000); // to the next 00:00 UTC
  const d = await client.check(tenant, 'u', { policy: 'api', cost: 3 });
  const after = await client.usage(tenant, 'u', { policy: 'api' });
  assert.deepEqual([after[1].used, after[1].remaining], [3, 997]);
  assert.equal(after[0].rule, d.rule);
  assert.ok(after[0].remaining >= d.remaining && after[0].used <= 3); // it may refill a little
  assert.equal((await client.usage(tenant, 'u', { policy: 'api' }))[1].used, 3); // usage charges nothing
  const [tiny] = [await client.check(tenant, 'v', { policy: 'tiny', cost: 2 }), null];
  const [u] = await client.usage(tenant, 'v', { policy: 'tiny' });
  assert.deepEqual([u.kind, u.used, u.remaining, u.windowMs], ['fixed_window', 2, tiny.remaining, tiny.windowMs]);
  assert.ok(tiny.resetMs - u.resetMs >= 0 && tiny.resetMs - u.resetMs < 1000);
  assert.deepEqual((await client.usage(tenant, 'u')).map((x) => x.rule), ['burst']); // the default policy
  await assert.rejects(client.usage(tenant, 'u', { policy: 'nope' }), (e) => e instanceof UnknownPolicy);
});

test('cost and peek', async () => {
  const tenant = freshTenant();
  assert.equal((await client.check(tenant, 'k', { policy: 'api', cost: 3 })).remaining, 7);
  assert.equal((await client.check(tenant, 'k', { policy: 'api', cost: 0 })).remaining, 7);
  assert.equal((await client.check(tenant, 'k', { policy: 'api', cost: 0 })).remaining, 7);
});

test('server errors are typed, and the connection survives them', async () => {
  const tenant = freshTenant();
  await assert.rejects(client.check(tenant, 'k', { policy: 'nope' }), (e) => e instanceof UnknownPolicy && e.code === 'unknown_policy');
  await assert.rejects(client.check(tenant, 'k', { cost: 6 }), BadRequest);
  await assert.rejects(client.call({ op: 'launch' }), UnknownOp);
  assert.equal((await client.check(tenant, 'k')).allowed, true);
  const open = new Client(env.quotad.socket); // failing open does not hide a programming error
  await assert.rejects(open.check(tenant, 'k', { policy: 'nope' }), UnknownPolicy);
  open.close();
});

test('200 concurrent checks on one connection, limit 50: exactly 50 allowed', async () => {
  const tenant = freshTenant();
  const before = (await client.stats()).counters.connections_total;
  const decisions = await Promise.all(Array.from({ length: 200 }, () => client.check(tenant, 'shared', { policy: 'fifty' })));
  assert.equal(decisions.filter((d) => d.allowed).length, 50);
  assert.ok(decisions.every((d) => d.degraded === false));
  assert.deepEqual(decisions.filter((d) => d.allowed).map((d) => d.remaining).sort((a, b) => a - b), Array.from({ length: 50 }, (_, i) => i));
  assert.equal((await client.stats()).counters.connections_total, before);
});

test('replies out of order are matched by id', async () => {
  const tenant = freshTenant();
  assert.equal((await client.cacheLookup(tenant, 'slow', { fillMs: 2000 })).fill, true);
  let done = false;
  const held = client.cacheLookup(tenant, 'slow', { fillMs: 2000 }).then((l) => { done = true; return l; });
  await new Promise((r) => setTimeout(r, 50));
  for (let i = 0; i < 3; i++) assert.equal((await client.check(tenant, `k${i}`, { policy: 'api' })).allowed, true);
  assert.equal(done, false);
  assert.equal(await client.cacheSet(tenant, 'slow', Buffer.from('filled'), { ttlMs: 10_000 }), true);
  const got = await held;
  assert.equal(got.hit, true);
  assert.equal(got.value.toString(), 'filled');
});

test('cache round trip and invalidation by tag', async () => {
  const tenant = freshTenant();
  assert.equal(await client.cacheGet(tenant, 'GET /a'), null);
  const miss = await client.cacheLookup(tenant, 'GET /a', { fillMs: 1000 });
  assert.deepEqual([miss.hit, miss.fill, miss.degraded], [false, true, false]);
  assert.equal(await client.cacheSet(tenant, 'GET /a', Buffer.from([0, 1, 255]), { ttlMs: 60_000, tags: ['items', 'a'] }), true);
  assert.equal(await client.cacheSet(tenant, 'GET /b', new Uint8Array([98]), { ttlMs: 60_000, tags: ['items'] }), true);
  assert.equal(await client.cacheSet(tenant, 'GET /c', Buffer.from('c'), { ttlMs: 60_000, tags: ['other'] }), true);
  const hit = await client.cacheLookup(tenant, 'GET /a');
  assert.equal(hit.hit, true);
  assert.deepEqual([...hit.value], [0, 1, 255]);
  assert.ok(hit.ttlMs > 59_000 && hit.ttlMs <= 60_000);
  assert.equal(await client.cacheGet(`other-${tenant}`, 'GET /a'), null);
  assert.equal(await client.cacheDelete(tenant, { tags: ['items'] }), 2);
  assert.equal(await client.cacheGet(tenant, 'GET /a'), null);
  assert.equal(await client.cacheGet(tenant, 'GET /b'), null);
  assert.equal((await client.cacheGet(tenant, 'GET /c')).toString(), 'c');
  assert.equal(await client.cacheDelete(tenant, { keys: ['GET /c', 'GET /nope'] }), 1);
});

test('a fillOnly delete drops the fill lock, not the value', async () => {
  const tenant = freshTenant();
  assert.equal((await client.cacheLookup(tenant, 'GET /a', { fillMs: 10_000 })).fill, true); // this caller holds the lock
  assert.equal(await client.cacheDelete(tenant, { keys: ['GET /a'], fillOnly: true }), 1); // one lock dropped
  const t0 = Date.now();
  assert.equal((await client.cacheLookup(tenant, 'GET /a', { fillMs: 10_000 })).fill, true); // the next caller fills at once
  assert.ok(Date.now() - t0 < 2000);
  assert.equal(await client.cacheSet(tenant, 'GET /a', Buffer.from('stored meanwhile'), { ttlMs: 60_000 }), true); // by someone else
  assert.equal(await client.cacheDelete(tenant, { keys: ['GET /a'], fillOnly: true }), 0); // no lock left
  assert.equal((await client.cacheGet(tenant, 'GET /a')).toString(), 'stored meanwhile'); // and the value stays
});

test('stale while revalidate: one refresher', async () => {
  const tenant = freshTenant();
  await client.cacheSet(tenant, 'k', Buffer.from('old'), { ttlMs: 50, staleMs: 60_000 });
  await new Promise((r) => setTimeout(r, 100));
  const first = await client.cacheLookup(tenant, 'k');
  assert.deepEqual([first.hit, first.stale, first.refresh, first.value.toString()], [true, true, true, 'old']);
  const second = await client.cacheLookup(tenant, 'k');
  assert.deepEqual([second.stale, second.refresh], [true, false]);
});

test('cached values stay intact while later replies arrive (the connection reuses its read buffer)', async () => {
  const tenant = freshTenant();
  const values = Array.from({ length: 40 }, (_, i) => Buffer.alloc(i === 7 ? 300_000 : 50 + i, i + 1)); // one spans many reads
  for (let i = 0; i < values.length; i++) assert.equal(await client.cacheSet(tenant, `v${i}`, values[i], { ttlMs: 60_000 }), true);
  const lookups = await Promise.all(values.map((_, i) => client.cacheLookup(tenant, `v${i}`)));
  const viaCheckGet = await Promise.all(values.map((_, i) => client.checkGet(tenant, 'reader', `v${i}`, { policy: 'api', cost: 0 })));
  // Many more replies through the same buffer.
  await Promise.all(Array.from({ length: 500 }, (_, i) => client.check(tenant, `k${i}`, { policy: 'api', cost: 0 })));
  await Promise.all(values.map((_, i) => client.cacheGet(tenant, `v${(i * 7) % values.length}`)));
  for (let i = 0; i < values.length; i++) {
    assert.ok(lookups[i].value.equals(values[i]), `cacheLookup v${i}`);
    assert.ok(viaCheckGet[i].lookup.value.equals(values[i]), `checkGet v${i}`);
  }
});

test('checkGet reads only when allowed', async () => {
  const tenant = freshTenant();
  await client.cacheSet(tenant, 'page', Buffer.from('P'), { ttlMs: 10_000 });
  const rs = [];
  for (let i = 0; i < 3; i++) rs.push(await client.checkGet(tenant, 'u', 'page', { policy: 'tiny' }));
  assert.deepEqual(rs.map((r) => r.decision.allowed), [true, true, false]);
  assert.equal(rs[0].lookup.value.toString(), 'P');
  assert.equal(rs[2].lookup, null);
});

test('stats', async () => {
  const s = await client.stats();
  assert.equal(s.backend, 'redis');
  assert.ok(s.shards >= 1 && s.counters.requests_check >= 1);
});

test('integers beyond 32 bits round-trip: costs, limits and request ids', async () => {
  const tenant = freshTenant();
  const d = await client.check(tenant, 'k', { policy: 'huge', cost: 2 ** 33 + 1 });
  assert.deepEqual([d.allowed, d.limit, d.remaining], [true, 2 ** 39, 2 ** 39 - 2 ** 33 - 1]);
  // Request ids past 2^32, then past Number.MAX_SAFE_INTEGER (where they wrap to 1).
  for (const start of [2 ** 32 - 2, Number.MAX_SAFE_INTEGER - 2]) {
    client.nextId = start;
    const ds = await Promise.all(Array.from({ length: 6 }, (_, i) => client.check(tenant, `${start}-${i}`, { policy: 'api' })));
    assert.ok(ds.every((x) => x.allowed && !x.degraded));
  }
  assert.ok(client.nextId >= 1 && client.nextId < 10, String(client.nextId));
  assert.equal((await client.hello()).protocol, 1);
});
