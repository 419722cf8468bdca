// Concurrency leases: the client takes and releases them; the Express
// middleware holds one per request and releases it exactly once, on a normal
// response, a handler's error, a streamed body and a client that disconnects
// mid-response. Outstanding leases are counted after each by `usage` (which
// takes none); `requests_release` in stats counts the releases. A concurrency
// rule's RateLimit headers have qu="concurrent-requests" and no w.
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';
import express from 'express';
import { Client } from '../src/index.js';
import { header, quotad } from '../src/express.js';
import { environment, freshTenant } from './daemons.js';

const LIMIT = 3;
const TABLES = `
[policies.inflight]
rules = [{ name = "inflight", kind = "concurrency", limit = ${LIMIT}, lease_ms = 60000 }]
`;

let env;
let client; // the app's
let probe; // the test's own connection
let server;
let base;
let gate = null; // resolves a held streaming response

// The leases held, as `usage` counts them (it takes none).
async function held(tenant) {
  const [u] = await probe.usage(tenant, 'u', { policy: 'inflight' });
  assert.deepEqual([u.kind, u.limit, u.used + u.remaining, u.windowMs], ['concurrency', LIMIT, LIMIT, 0]);
  return u.used;
}

async function releases() {
  return Number((await probe.stats()).counters.requests_release);
}

async function waitUntil(what, ready, withinMs = 10_000) {
  const deadline = Date.now() + withinMs;
  while (!(await ready())) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const released = (tenant) => waitUntil('the lease to come back', async () => (await held(tenant)) === 0);

function buildApp(c) {
  const app = express();
  app.use(quotad({
    client: c,
    tenant: header('x-tenant'),
    key: header('x-user'),
    policy: 'inflight',
    cache: { ttlMs: 60_000, fillMs: 0, when: (req) => req.path.startsWith('/cached') },
  }));
  app.get('/ok', (req, res) => res.json({ ok: true }));
  app.get('/boom', () => {
    throw new Error('the handler failed');
  });
  app.get('/async-boom', async (req, res, next) => {
    await new Promise((r) => setTimeout(r, 5));
    next(new Error('the handler failed later'));
  });
  app.get('/stream', (req, res) => {
    res.write('first\n');
    gate = () => res.end('last\n');
  });
  app.get('/endless', (req, res) => {
    res.write('first\n');
    const timer = setInterval(() => res.write('more\n'), 20);
    res.on('close', () => clearInterval(timer));
  });
  app.get('/cached/page', (req, res) => res.json({ page: true }));
  // eslint-disable-next-line no-unused-vars
  app.use((err, req, res, next) => res.status(500).json({ error: err.message }));
  return app;
}

before(async () => {
  env = await environment(undefined, { tables: TABLES });
  client = new Client(env.quotad.socket, { timeoutMs: 5000 });
  probe = new Client(env.quotad.socket, { timeoutMs: 5000 });
  server = await new Promise((resolve) => {
    const s = buildApp(client).listen(0, '127.0.0.1', () => resolve(s));
  });
  base = `http://127.0.0.1:${server.address().port}`;
});

after(async () => {
  server?.close();
  client?.close();
  probe?.close();
  await env?.close();
});

const get = (path, tenant) => fetch(`${base}${path}`, { headers: { 'x-tenant': tenant, 'x-user': 'u' } });

test('the client takes a lease per allowed check and releases each once', async () => {
  const t = freshTenant('client');
  const taken = [];
  for (let i = 0; i < LIMIT; i++) taken.push(await probe.check(t, 'u', { policy: 'inflight' }));
  assert.ok(taken.every((d) => d.allowed && typeof d.lease === 'string' && d.lease.length === 32));
  const full = await probe.check(t, 'u', { policy: 'inflight' });
  assert.equal(full.allowed, false);
  assert.equal(full.lease, null);
  assert.equal(await held(t), LIMIT);
  assert.equal(await probe.release(t, 'u', taken[0].lease, { policy: 'inflight' }), true);
  assert.equal(await probe.release(t, 'u', taken[0].lease, { policy: 'inflight' }), false, 'released twice');
  assert.equal(await probe.release(t, 'u', '0'.repeat(32), { policy: 'inflight' }), false, 'an unknown lease');
  assert.equal(await held(t), LIMIT - 1);
  const { decision } = await probe.checkGet(t, 'u', 'page', { policy: 'inflight' });
  assert.ok(decision.lease !== null && decision.lease !== taken[1].lease);
  for (const lease of [taken[1].lease, taken[2].lease, decision.lease]) assert.equal(await probe.release(t, 'u', lease, { policy: 'inflight' }), true);
  assert.equal(await held(t), 0);
  await assert.rejects(probe.release(t, 'u', 'not a lease', { policy: 'inflight' }), { code: 'bad_request' });
});

test('released after a normal response', async () => {
  const t = freshTenant('ok');
  const before = await releases();
  for (let i = 0; i < 2 * LIMIT; i++) { // more than the limit: each one's slot came back
    const r = await get('/ok', t);
    assert.equal(r.status, 200);
    await r.json();
    await released(t);
  }
  assert.equal(await releases() - before, 2 * LIMIT, 'exactly one release per request');
});

test('released when the handler throws or fails later', async () => {
  const t = freshTenant('boom');
  const before = await releases();
  for (const path of ['/boom', '/async-boom', '/boom', '/async-boom']) {
    const r = await get(path, t);
    assert.equal(r.status, 500);
    await r.text();
    await released(t);
  }
  assert.equal(await releases() - before, 4);
});

test('held while a body streams, released when it ends', async () => {
  const t = freshTenant('stream');
  const before = await releases();
  const r = await get('/stream', t);
  const reader = r.body.getReader();
  assert.equal(new TextDecoder().decode((await reader.read()).value), 'first\n');
  assert.equal(await held(t), 1, 'released before the body was sent');
  gate();
  let rest = '';
  for (let c = await reader.read(); !c.done; c = await reader.read()) rest += new TextDecoder().decode(c.value);
  assert.equal(rest, 'last\n');
  await released(t);
  assert.equal(await releases() - before, 1);
});

test('released when the client disconnects mid-response', async () => {
  const t = freshTenant('gone');
  const before = await releases();
  for (let i = 0; i <= LIMIT; i++) {
    await new Promise((resolve, reject) => {
      const req = http.get(`${base}/endless`, { headers: { 'x-tenant': t, 'x-user': 'u' } }, (res) => {
        res.once('data', async () => {
          try {
            assert.equal(await held(t), 1, `request ${i}: still streaming`);
            req.destroy(); // gone mid-body
            resolve();
          } catch (e) {
            reject(e);
          }
        });
      });
      req.on('error', () => {});
    });
    await released(t);
  }
  assert.equal(await releases() - before, LIMIT + 1);
});

test('a cached response releases its lease too; a denial takes none', async () => {
  const t = freshTenant('cached');
  const before = await releases();
  let r = await get('/cached/page', t);
  assert.equal(r.headers.get('x-cache'), 'miss');
  await r.json();
  await released(t);
  for (let i = 0; i <= LIMIT; i++) {
    r = await get('/cached/page', t);
    assert.equal(r.headers.get('x-cache'), 'hit');
    await r.json();
    await released(t);
  }
  assert.equal(await releases() - before, LIMIT + 2);

  const taken = [];
  for (let i = 0; i < LIMIT; i++) taken.push((await probe.check(t, 'u', { policy: 'inflight' })).lease);
  const mark = await releases();
  r = await get('/ok', t);
  assert.equal(r.status, 429);
  assert.ok(Number(r.headers.get('retry-after')) > 0);
  await r.json();
  assert.equal(await releases(), mark, 'a denial has nothing to release');
  for (const lease of taken) assert.equal(await probe.release(t, 'u', lease, { policy: 'inflight' }), true);
});

test('a concurrency rule sends its RateLimit headers: qu="concurrent-requests", no w', async () => {
  const t = freshTenant('headers');
  const policy = `"inflight";q=${LIMIT};qu="concurrent-requests"`;
  let r = await get('/ok', t);
  assert.equal(r.status, 200);
  // The request's own lease: LIMIT - 1 left, until it would expire (lease_ms 60 s).
  assert.deepEqual([r.headers.get('ratelimit-policy'), r.headers.get('ratelimit')], [policy, `"inflight";r=${LIMIT - 1};t=60`]);
  await r.json();
  await released(t);
  const taken = [];
  for (let i = 0; i < LIMIT; i++) taken.push((await probe.check(t, 'u', { policy: 'inflight' })).lease);
  const peek = await probe.check(t, 'u', { policy: 'inflight', cost: 0 });
  assert.deepEqual([peek.lease, peek.remaining, await held(t)], [null, 0, LIMIT], 'a peek takes no lease');
  r = await get('/ok', t);
  assert.equal(r.status, 429);
  const retry = Number(r.headers.get('retry-after'));
  assert.ok(retry > 0 && retry <= 60, `retry-after ${retry}`);
  assert.deepEqual([r.headers.get('ratelimit-policy'), r.headers.get('ratelimit')], [policy, `"inflight";r=0;t=${retry}`]);
  await r.json();
  for (const lease of taken) assert.equal(await probe.release(t, 'u', lease, { policy: 'inflight' }), true);
});
