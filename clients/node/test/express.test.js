// The Express middleware, served over HTTP and called with fetch.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import express from 'express';
import { Client } from '../src/index.js';
import { apiKey, cacheKeyFor, clientIp, first, header, invalidate, jwtClaim, pathTag, pathTags, quotad, serveOrFill } from '../src/express.js';
import { REPO, environment, freshTenant, tempDir } from './daemons.js';

let env;
let client;
let base;
let server;
const calls = { hello: 0, items: 0, private: 0, login: 0 };

function buildApp(c) {
  const app = express();
  const items = new Map();
  app.use(express.json());
  app.get('/health', (req, res) => res.json({ ok: true }));
  app.use(quotad({
    client: c,
    tenant: first(header('x-tenant'), jwtClaim('tid')),
    key: first(apiKey(), clientIp()),
    policy: (req) => req.headers['x-policy'] ?? 'fifty',
    cache: { ttlMs: 60_000, fillMs: 10_000, when: (req) => req.path.startsWith('/items') },
  }));
  app.get('/hello', (req, res) => { calls.hello++; res.json({ hello: 'world' }); });
  app.get('/whoami', (req, res) => res.json({ tenant: req.quotad.tenant, key: req.quotad.key }));
  app.get('/items', (req, res) => { calls.items++; res.json({ items: items.get(req.quotad.tenant) ?? [], q: req.query, call: calls.items }); });
  app.get('/items/:id', (req, res) => res.json({ id: req.params.id }));
  app.post('/items', async (req, res, next) => {
    try {
      const list = items.get(req.quotad.tenant) ?? [];
      list.push(req.body.name);
      items.set(req.quotad.tenant, list);
      res.json({ invalidated: await invalidate(req, { paths: ['/items'] }) });
    } catch (e) {
      next(e);
    }
  });
  app.get('/items-private', (req, res) => { calls.private++; res.set('cache-control', 'private').json({ call: calls.private }); });
  app.get('/items-never', () => {}); // never answers: the client gives up
  // The app's own (stricter) RateLimit header: sent as it is, never stored.
  app.get('/items-self-limited', (req, res) => { calls.selfLimited = (calls.selfLimited ?? 0) + 1; res.set('ratelimit', '"app";r=0;t=999').json({ call: calls.selfLimited }); });
  app.get('/login', quotad({ client: c, policy: 'tiny' }), (req, res) => { calls.login++; res.json({ ok: true }); });
  return app;
}

function listen(app) {
  return new Promise((resolve) => {
    const s = app.listen(0, '127.0.0.1', () => resolve(s));
  });
}

before(async () => {
  env = await environment();
  client = new Client(env.quotad.socket, { timeoutMs: 2000 });
  server = await listen(buildApp(client));
  base = `http://127.0.0.1:${server.address().port}`;
});
after(async () => {
  await new Promise((r) => server?.close(r));
  client?.close();
  await env?.close();
});

const get = (path, headers = {}) => fetch(base + path, { headers });

test('allowed responses carry the RateLimit headers', async () => {
  const r = await get('/hello', { 'x-tenant': freshTenant(), 'x-policy': 'default' });
  assert.equal(r.status, 200);
  assert.deepEqual(await r.json(), { hello: 'world' });
  // A bucket of 5 refilled at 0.01/s: 500 s from empty; full again in 100 s.
  assert.equal(r.headers.get('ratelimit-policy'), '"burst";q=5;w=500');
  assert.equal(r.headers.get('ratelimit'), '"burst";r=4;t=100');
  assert.equal(r.headers.get('retry-after'), null);
  assert.equal(r.headers.get('ratelimit-limit'), null); // the legacy trio is an option
});

test('denied: 429, JSON body, Retry-After; the handler never runs', async () => {
  const h = { 'x-tenant': freshTenant(), 'x-policy': 'default' };
  for (let i = 0; i < 5; i++) assert.equal((await get('/hello', h)).status, 200);
  const before = calls.hello;
  const r = await get('/hello', h);
  assert.equal(r.status, 429);
  assert.match(r.headers.get('content-type'), /^application\/json/);
  const body = await r.json();
  assert.equal(body.error, 'rate_limited');
  assert.ok(body.retry_after > 99 && body.retry_after <= 100);
  assert.equal(r.headers.get('retry-after'), '100');
  assert.equal(r.headers.get('ratelimit-policy'), '"burst";q=5;w=500');
  assert.equal(r.headers.get('ratelimit'), '"burst";r=0;t=100'); // t: no quota until Retry-After
  assert.equal(calls.hello, before);
  assert.equal((await get('/hello', { ...h, 'x-api-key': 'other' })).status, 200);
});

test('GETs are cached per sorted query and per user', async () => {
  const h = { 'x-tenant': freshTenant(), 'x-api-key': 'alice' };
  const a = await get('/items?b=2&a=1', h);
  assert.equal(a.headers.get('x-cache'), 'miss');
  const aBody = await a.json();
  const n = calls.items;
  const b = await get('/items?a=1&b=2', h);
  assert.equal(b.headers.get('x-cache'), 'hit');
  assert.deepEqual(await b.json(), aBody);
  assert.match(b.headers.get('content-type'), /^application\/json/);
  assert.equal(calls.items, n);
  // Still rate limited (and counted) on a hit: this request's headers, computed afresh.
  assert.match(a.headers.get('ratelimit'), /^"burst";r=49;/);
  assert.match(b.headers.get('ratelimit'), /^"burst";r=48;/);
  assert.equal(b.headers.get('ratelimit-policy'), '"burst";q=50;w=50000');
  const bob = await get('/items?a=1&b=2', { ...h, 'x-api-key': 'bob' });
  assert.equal(bob.headers.get('x-cache'), 'miss');
  assert.equal(calls.items, n + 1);
});

test('a write invalidates by tag', async () => {
  const h = { 'x-tenant': freshTenant(), 'x-api-key': 'alice' };
  assert.deepEqual((await (await get('/items', h)).json()).items, []);
  assert.equal((await get('/items/7', h)).headers.get('x-cache'), 'miss');
  assert.equal((await get('/items', h)).headers.get('x-cache'), 'hit');
  assert.equal((await get('/items/7', h)).headers.get('x-cache'), 'hit');
  const w = await fetch(`${base}/items`, { method: 'POST', headers: { ...h, 'content-type': 'application/json' }, body: JSON.stringify({ name: 'widget' }) });
  assert.deepEqual(await w.json(), { invalidated: 2 });
  const after = await get('/items', h);
  assert.equal(after.headers.get('x-cache'), 'miss');
  assert.deepEqual((await after.json()).items, ['widget']);
  assert.equal((await get('/items/7', h)).headers.get('x-cache'), 'miss');
});

test('private responses are not stored', async () => {
  const h = { 'x-tenant': freshTenant() };
  const before = calls.private;
  for (let i = 0; i < 2; i++) assert.equal((await get('/items-private', h)).headers.get('x-cache'), 'miss');
  assert.equal(calls.private, before + 2);
});

test('a per-route middleware applies its own policy', async () => {
  const h = { 'x-tenant': freshTenant() };
  const ok = [await get('/login', h), await get('/login', h)];
  assert.deepEqual(ok.map((r) => r.status), [200, 200]);
  // The route's policy, not the app-wide one: 2 a minute.
  assert.equal(ok[0].headers.get('ratelimit-policy'), '"per_minute";q=2;w=60');
  assert.match(ok[1].headers.get('ratelimit'), /^"per_minute";r=0;/);
  const denied = await get('/login', h);
  assert.equal(denied.status, 429);
  const retry = Number(denied.headers.get('retry-after'));
  assert.ok(retry > 0);
  assert.equal(denied.headers.get('ratelimit'), `"per_minute";r=0;t=${retry}`);
  assert.equal(denied.headers.get('ratelimit-policy'), '"per_minute";q=2;w=60');
});

test('a cached response never replays stored rate-limit headers', async () => {
  const tenant = freshTenant();
  const h = { 'x-tenant': tenant, 'x-api-key': 'carol' };
  const first = await get('/items-self-limited', h);
  assert.equal(first.headers.get('x-cache'), 'miss');
  assert.equal(first.headers.get('ratelimit'), '"app";r=0;t=999');
  const second = await get('/items-self-limited', h);
  assert.equal(second.headers.get('x-cache'), 'hit');
  assert.match(second.headers.get('ratelimit'), /^"burst";r=48;/);
  // An entry written by something else with rate-limit headers in it: dropped too.
  const { encode } = await import('@msgpack/msgpack');
  const stale = [['content-type', 'application/json'], ['RateLimit', '"burst";r=999;t=1'], ['RateLimit-Policy', '"x";q=1'],
    ['RateLimit-Remaining', '999'], ['Retry-After', '5']];
  const entry = encode({ s: 200, h: stale, b: Buffer.from('{"foreign":true}') });
  assert.equal(await client.cacheSet(tenant, 'user=5:carol GET /items/foreign', entry, { ttlMs: 60_000 }), true);
  const r = await get('/items/foreign', h);
  assert.equal(r.headers.get('x-cache'), 'hit');
  assert.deepEqual(await r.json(), { foreign: true });
  assert.match(r.headers.get('ratelimit'), /^"burst";r=47;/);
  assert.equal(r.headers.get('ratelimit-policy'), '"burst";q=50;w=50000');
  assert.equal(r.headers.get('ratelimit-remaining'), null);
  assert.equal(r.headers.get('retry-after'), null);
});

test('the legacy trio is an option', async () => {
  const tenant = freshTenant();
  const app = express();
  app.use(quotad({ client, tenant: () => tenant, policy: 'default', legacyHeaders: true }));
  app.get('/hello', (req, res) => res.json({ ok: true }));
  const s = await listen(app);
  const at = (p) => fetch(`http://127.0.0.1:${s.address().port}${p}`);
  try {
    const r = await at('/hello');
    assert.equal(r.headers.get('ratelimit-policy'), '"burst";q=5;w=500');
    assert.equal(r.headers.get('ratelimit'), '"burst";r=4;t=100');
    assert.deepEqual(['limit', 'remaining', 'reset'].map((n) => r.headers.get(`ratelimit-${n}`)), ['5', '4', '100']);
    for (let i = 0; i < 4; i++) await at('/hello');
    const denied = await at('/hello');
    assert.equal(denied.status, 429);
    assert.equal(denied.headers.get('retry-after'), '100');
    assert.equal(denied.headers.get('ratelimit-remaining'), '0');
    assert.ok(Number(denied.headers.get('ratelimit-reset')) >= 400);
  } finally {
    await new Promise((res) => s.close(res));
  }
  // A per-route limit without the option replaces every rate-limit header: no stale trio.
  const t2 = freshTenant();
  const app2 = express();
  app2.use(quotad({ client, tenant: () => t2, policy: 'fifty', legacyHeaders: true }));
  app2.get('/login', quotad({ client, policy: 'tiny' }), (req, res) => res.json({ ok: true }));
  const s2 = await listen(app2);
  try {
    const r = await fetch(`http://127.0.0.1:${s2.address().port}/login`);
    assert.equal(r.status, 200);
    assert.equal(r.headers.get('ratelimit-policy'), '"per_minute";q=2;w=60');
    assert.equal(r.headers.get('ratelimit-limit'), null);
  } finally {
    await new Promise((res) => s2.close(res));
  }
});

test('identity from a JWT claim, and the defaults', async () => {
  const payload = Buffer.from(JSON.stringify({ tid: 'jwt-tenant' })).toString('base64url');
  const r = await get('/whoami', { authorization: `Bearer eyJhbGciOiJub25lIn0.${payload}.sig`, 'x-api-key': 'k' });
  assert.deepEqual(await r.json(), { tenant: 'jwt-tenant', key: 'k' });
  assert.deepEqual(await (await get('/whoami')).json(), { tenant: 'default', key: '127.0.0.1' });
});

test('sidecar unreachable: fails open (no headers), or closed with Retry-After', async () => {
  const dir = tempDir('down');
  for (const [mode, status] of [['open', 200], ['closed', 429]]) {
    const down = new Client(`${dir}/nobody.sock`, { timeoutMs: 200, failureMode: mode, onWarn: () => {} });
    const s = await listen(buildApp(down));
    try {
      const r = await fetch(`http://127.0.0.1:${s.address().port}/hello`);
      assert.equal(r.status, status);
      assert.equal(r.headers.get('ratelimit'), null);
      assert.equal(r.headers.get('ratelimit-limit'), null);
      if (mode === 'closed') assert.equal(r.headers.get('retry-after'), '1');
    } finally {
      await new Promise((res) => s.close(res));
      down.close();
    }
  }
});

test('serves entries in the shared format (as the Python middleware writes them)', async () => {
  const { encode } = await import('@msgpack/msgpack');
  const tenant = freshTenant();
  const entry = encode({ s: 200, h: [['content-type', 'text/plain; charset=utf-8'], ['x-from', 'python']], b: Buffer.from('hello from elsewhere') });
  assert.equal(await client.cacheSet(tenant, 'user=1:k GET /items/shared', entry, { ttlMs: 10_000 }), true);
  const r = await get('/items/shared', { 'x-tenant': tenant, 'x-api-key': 'k' });
  assert.equal(r.headers.get('x-cache'), 'hit');
  assert.equal(r.headers.get('x-from'), 'python');
  assert.equal(await r.text(), 'hello from elsewhere');
  // Something else under that key is a miss, not an error.
  await client.cacheSet(tenant, 'user=1:k GET /items/shared', Buffer.from('not an entry'), { ttlMs: 10_000 });
  const miss = await get('/items/shared', { 'x-tenant': tenant, 'x-api-key': 'k' });
  assert.equal(miss.status, 200);
  assert.equal(miss.headers.get('x-cache'), 'miss');
});

/** Asserts that the fill lock on `key` is gone well before its fillMs (10 s) would have lapsed. */
async function assertFillLockReleased(tenant, key) {
  const deadline = Date.now() + 2000;
  // A read that waits on the lock is let go as soon as quotad sees it gone: ask again.
  while (!(await client.cacheLookup(tenant, key, { fillMs: 100 })).fill) {
    assert.ok(Date.now() < deadline, 'the fill lock is still held');
  }
}

test('a filler whose response is not stored releases the fill lock', async () => {
  const tenant = freshTenant();
  const r = await get('/items-private', { 'x-tenant': tenant, 'x-api-key': 'k' }); // the filler; private: not stored
  assert.equal(r.headers.get('x-cache'), 'miss');
  await assertFillLockReleased(tenant, 'user=1:k GET /items-private');
});

test('a filler whose client went away releases the fill lock', async () => {
  const tenant = freshTenant();
  await assert.rejects(fetch(`${base}/items-never`, { headers: { 'x-tenant': tenant, 'x-api-key': 'k' }, signal: AbortSignal.timeout(100) }));
  await assertFillLockReleased(tenant, 'user=1:k GET /items-never');
});

test('a filler that stores nothing keeps a value stored meanwhile, and lets the next caller fill at once', async () => {
  const tenant = freshTenant();
  const steps = (compute) => ({ serve: () => true, compute, ttlMs: 60_000, tags: () => [] });
  // Another caller (whose own fillMs ran out) stores the value while the filler works; the filler stores nothing.
  const raced = await client.cacheLookup(tenant, 'raced', { fillMs: 10_000 });
  assert.equal(raced.fill, true);
  await serveOrFill(client, tenant, 'raced', raced, steps(async () => {
    await client.cacheSet(tenant, 'raced', Buffer.from('stored meanwhile'), { ttlMs: 60_000 });
    return null;
  }));
  assert.equal((await client.cacheGet(tenant, 'raced'))?.toString(), 'stored meanwhile');
  // Nothing stored by anyone: the next caller is the filler at once, not after fillMs.
  const lone = await client.cacheLookup(tenant, 'lone', { fillMs: 10_000 });
  assert.equal(lone.fill, true);
  await serveOrFill(client, tenant, 'lone', lone, steps(async () => null));
  const t0 = Date.now();
  assert.equal((await client.cacheLookup(tenant, 'lone', { fillMs: 10_000 })).fill, true);
  assert.ok(Date.now() - t0 < 2000, 'the fill lock was still held');
});

test('a per-route middleware limits the tenant and key the app-wide one found', async () => {
  // /login allows 2 a minute: per tenant and key, not for everyone behind one IP.
  for (const h of [{ 'x-tenant': freshTenant() }, { 'x-tenant': freshTenant() }, { 'x-tenant': freshTenant(), 'x-api-key': 'k' }]) {
    assert.deepEqual([(await get('/login', h)).status, (await get('/login', h)).status], [200, 200]);
  }
});

const VECTORS = JSON.parse(fs.readFileSync(path.join(REPO, 'clients', 'cache-keys.json'), 'utf8'));

test('cache keys and tags match the shared vectors (clients/cache-keys.json, checked by the Python suite too)', () => {
  for (const v of VECTORS.keys) {
    const req = { method: 'GET', url: v.target, originalUrl: v.target };
    assert.equal(cacheKeyFor(req, v.user), v.key, v.target);
    assert.deepEqual(pathTags(req), v.tags, v.target);
  }
  for (const v of VECTORS.path_tags) assert.equal(pathTag(v.path), v.tag, v.path);
});
