// Bad values, a killed / hung / restarted sidecar, connection-level errors.
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { Client, ConnectionLost, Forbidden, FrameReader, InvalidArgument, QuotadUnavailable, RequestTimedOut, decodeBody, encodeFrame } from '../src/index.js';
import { Quotad, environment, freshTenant, tempDir } from './daemons.js';

const TIMEOUT = 300;
const SLACK = 250; // scheduling on a busy 2-CPU machine
const quiet = { onWarn: () => {} };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let env;
before(async () => {
  env = await environment();
});
after(async () => {
  await env?.close();
});

async function untilFresh(client, tenant, timeoutMs = 6000) {
  const deadline = Date.now() + timeoutMs;
  while ((await client.check(tenant, 'k', { policy: 'api' })).degraded) {
    assert.ok(Date.now() < deadline, 'did not reconnect in time');
    await sleep(50);
  }
}

const BAD_CALLS = [
  ['empty tenant', (c) => c.check('', 'k')],
  ['tenant not a string', (c) => c.check(Buffer.from('a'), 'k')],
  ['key not a string', (c) => c.check('t', 42)],
  ['empty policy', (c) => c.check('t', 'k', { policy: '' })],
  ['negative cost', (c) => c.check('t', 'k', { cost: -1 })],
  ['fractional cost', (c) => c.check('t', 'k', { cost: 1.5 })],
  ['string cost', (c) => c.check('t', 'k', { cost: '1' })],
  ['cost over u64', (c) => c.check('t', 'k', { cost: 1n << 64n })],
  ['lone surrogate', (c) => c.check('t', '\udc80')],
  ['string value', (c) => c.cacheSet('t', 'k', 'text', { ttlMs: 1000 })],
  ['missing ttl', (c) => c.cacheSet('t', 'k', Buffer.from('v'))],
  ['zero ttl', (c) => c.cacheSet('t', 'k', Buffer.from('v'), { ttlMs: 0 })],
  ['tags as one string', (c) => c.cacheSet('t', 'k', Buffer.from('v'), { ttlMs: 1, tags: 'items' })],
  ['empty tag', (c) => c.cacheSet('t', 'k', Buffer.from('v'), { ttlMs: 1, tags: ['ok', ''] })],
  ['value over the frame limit', (c) => c.cacheSet('t', 'k', Buffer.alloc(2 << 20), { ttlMs: 1 })],
  ['delete nothing', (c) => c.cacheDelete('t')],
  ['fillOnly with tags', (c) => c.cacheDelete('t', { keys: ['k'], tags: ['items'], fillOnly: true })],
  ['fillOnly by tag only', (c) => c.cacheDelete('t', { tags: ['items'], fillOnly: true })],
  ['fillOnly not a boolean', (c) => c.cacheDelete('t', { keys: ['k'], fillOnly: 1 })],
  ['negative fillMs', (c) => c.cacheGet('t', 'k', { fillMs: -5 })],
  ['empty cache key', (c) => c.checkGet('t', 'k', '')],
];

test('bad values throw before anything is sent', async () => {
  const dir = tempDir('fake');
  let connections = 0;
  let received = 0;
  const server = net.createServer((s) => {
    connections++;
    s.on('data', (d) => { received += d.length; });
  });
  const sock = path.join(dir, 'fake.sock');
  await new Promise((r) => server.listen(sock, r));
  const client = new Client(sock, quiet);
  try {
    for (const [name, call] of BAD_CALLS) {
      await assert.rejects(call(client), InvalidArgument, name);
    }
    await sleep(20);
    assert.equal(connections, 0);
    assert.equal(received, 0);
  } finally {
    client.close();
    server.close();
  }
});

test('killed sidecar: fails open within the timeout, reconnects by itself', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('kill'), env.redis);
  const open = new Client(q.socket, { timeoutMs: TIMEOUT, ...quiet });
  const closed = new Client(q.socket, { timeoutMs: TIMEOUT, failureMode: 'closed', ...quiet });
  const raising = new Client(q.socket, { timeoutMs: TIMEOUT, failureMode: 'raise', ...quiet });
  try {
    for (const c of [open, closed, raising]) assert.equal((await c.check(tenant, 'k', { policy: 'api' })).degraded, false);
    await q.kill();

    let t0 = Date.now();
    const burst = await Promise.all(Array.from({ length: 50 }, () => open.check(tenant, 'k', { policy: 'api' })));
    assert.ok(Date.now() - t0 < TIMEOUT + SLACK);
    assert.ok(burst.every((d) => d.allowed && d.degraded));
    assert.deepEqual(burst[0].headers(), {});

    const d = await closed.check(tenant, 'k', { policy: 'api' });
    assert.deepEqual([d.allowed, d.degraded, d.retryAfterMs], [false, true, 1000]);
    assert.equal(d.headers()['Retry-After'], '1');
    await assert.rejects(raising.check(tenant, 'k', { policy: 'api' }), QuotadUnavailable);

    assert.equal(await open.cacheGet(tenant, 'x'), null);
    assert.equal((await open.cacheLookup(tenant, 'x')).degraded, true);
    assert.equal(await open.cacheSet(tenant, 'x', Buffer.from('v'), { ttlMs: 1000 }), false);
    assert.equal(await open.cacheDelete(tenant, { tags: ['t'] }), 0);
    const cg = await open.checkGet(tenant, 'k', 'x', { policy: 'api' });
    assert.ok(cg.decision.degraded && cg.lookup.degraded);

    await q.start(); // same socket path
    for (const c of [open, closed, raising]) await untilFresh(c, tenant);
  } finally {
    for (const c of [open, closed, raising]) c.close();
    await q.close();
  }
});

test('calls in flight when the sidecar dies fail over at once', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('inflight'), env.redis);
  const c = new Client(q.socket, { timeoutMs: 2000, ...quiet });
  try {
    assert.equal((await c.check(tenant, 'k')).degraded, false);
    q.pause();
    const calls = Promise.all(Array.from({ length: 100 }, (_, i) => c.check(tenant, `k${i}`, { policy: 'api' })));
    await sleep(100);
    const t0 = Date.now();
    await q.kill();
    const decisions = await calls;
    assert.ok(Date.now() - t0 < 1000);
    assert.ok(decisions.every((d) => d.allowed && d.degraded));
    await q.start();
    await untilFresh(c, tenant);
  } finally {
    c.close();
    await q.close();
  }
});

test('hung sidecar: calls time out, then the same connection recovers', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('hung'), env.redis);
  const c = new Client(q.socket, { timeoutMs: TIMEOUT, ...quiet });
  const raising = new Client(q.socket, { timeoutMs: TIMEOUT, failureMode: 'raise', ...quiet });
  try {
    assert.equal((await c.check(tenant, 'k', { policy: 'api' })).degraded, false);
    assert.equal((await raising.check(tenant, 'k', { policy: 'api' })).degraded, false);
    q.pause();
    try {
      const t0 = Date.now();
      const d = await c.check(tenant, 'k', { policy: 'api' });
      const elapsed = Date.now() - t0;
      assert.ok(d.allowed && d.degraded);
      assert.ok(elapsed >= TIMEOUT - 50 && elapsed < TIMEOUT + SLACK, String(elapsed));
      await assert.rejects(raising.check(tenant, 'k', { policy: 'api' }), RequestTimedOut);
    } finally {
      q.resume();
    }
    assert.equal((await c.check(tenant, 'k', { policy: 'api' })).degraded, false);
  } finally {
    c.close();
    raising.close();
    await q.close();
  }
});

test('connection-level errors (id 0) fail the connection, which is then remade', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('strict'), env.redis, {
    server: 'max_connections = 1\nmax_frame_bytes = 4096',
    tables: '[cache]\nmax_value_bytes = 2048\n',
  });
  const c = new Client(q.socket, { failureMode: 'raise', ...quiet });
  try {
    // The warm-up connection's slot is freed a moment after it closes.
    for (let i = 0; ; i++) {
      try {
        assert.equal((await c.check(tenant, 'k')).allowed, true);
        break;
      } catch (e) {
        if (!(e instanceof ConnectionLost) || i > 50) throw e;
        await sleep(20);
      }
    }
    await assert.rejects(
      c.cacheSet(tenant, 'big', Buffer.alloc(8000), { ttlMs: 1000 }),
      (e) => e instanceof ConnectionLost && e.serverError?.code === 'too_large',
    );
    assert.equal((await c.check(tenant, 'k')).degraded, false);
    // Over max_connections: degraded (or, when raising, a lost connection).
    const second = new Client(q.socket, quiet);
    const d = await second.check(tenant, 'k');
    assert.ok(d.allowed && d.degraded);
    second.close();
  } finally {
    c.close();
    await q.close();
  }
});

test('a refusal at connect by the access rules rejects with Forbidden, whatever the failure mode', async () => {
  const tenant = freshTenant();
  const uid = process.getuid();
  const other = uid === 4242 ? 4243 : 4242;
  const q = await Quotad.start(tempDir('refusing'), null, {
    tables: `[[access]]\nuids = [${other}]\ntenants = ["*"]\n`,
  });
  try {
    for (const failureMode of ['open', 'closed', 'raise']) {
      const c = new Client(q.socket, { failureMode, ...quiet });
      try {
        for (let i = 0; i < 2; i++) { // the next call reconnects, and is refused again
          await assert.rejects(c.check(tenant, 'k'), (e) => e instanceof Forbidden && e.code === 'forbidden'
            && e.serverMessage.includes(`no \`[[access]]\` rule admits uid ${uid}`));
        }
        await assert.rejects(c.cacheGet(tenant, 'k'), Forbidden);
      } finally {
        c.close();
      }
    }
  } finally {
    await q.close();
  }
});

test('maxPending bounds the calls in flight; the rest wait for a slot', async () => {
  const tenant = freshTenant();
  const c = new Client(env.quotad.socket, { maxPending: 4, ...quiet });
  try {
    const ds = await Promise.all(Array.from({ length: 100 }, (_, i) => c.check(tenant, `k${i}`, { policy: 'api' })));
    assert.ok(ds.every((d) => d.allowed && !d.degraded));
  } finally {
    c.close();
  }
});

test('a closed client is unavailable', async () => {
  const c = new Client(env.quotad.socket, { failureMode: 'raise', ...quiet });
  await c.check(freshTenant(), 'k', { policy: 'api' });
  c.close();
  await assert.rejects(c.check(freshTenant(), 'k', { policy: 'api' }), QuotadUnavailable);
});

test('the write buffer is bounded while the sidecar does not read', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('buffer'), env.redis);
  const c = new Client(q.socket, { timeoutMs: 500, ...quiet });
  try {
    assert.equal((await c.check(tenant, 'k')).degraded, false);
    q.pause();
    try {
      const value = Buffer.alloc(200 << 10, 118);
      const calls = Promise.all(Array.from({ length: 100 }, (_, i) => c.cacheSet(tenant, `k${i}`, value, { ttlMs: 10_000 })));
      await sleep(200);
      const buffered = c.conn.socket.writableLength;
      assert.ok(buffered > 0 && buffered <= (4 << 20) + (256 << 10), String(buffered)); // not 20 MB
      // The waiting calls share one 'drain' listener (not one each: MaxListenersExceededWarning).
      assert.ok(c.conn.socket.listenerCount('drain') <= 2, String(c.conn.socket.listenerCount('drain')));
      assert.ok(c.conn.socket.listenerCount('close') <= 2, String(c.conn.socket.listenerCount('close')));
      assert.deepEqual(await calls, Array(100).fill(false));
    } finally {
      q.resume();
    }
    assert.equal((await c.check(tenant, 'k')).degraded, false);
  } finally {
    c.close();
    await q.close();
  }
});

/** A fake quotad answering {id, ok: true} to anything, in batches: every reply outstanding, in one write, 20 ms after the last request. */
async function batchingServer() {
  const dir = tempDir('batch');
  const state = { outstanding: [], maxOutstanding: 0 };
  const server = net.createServer((s) => {
    const frames = new FrameReader();
    let timer = null;
    s.on('data', (chunk) => {
      for (const body of frames.push(chunk)) state.outstanding.push(decodeBody(body).id);
      state.maxOutstanding = Math.max(state.maxOutstanding, state.outstanding.length);
      clearTimeout(timer);
      timer = setTimeout(() => {
        s.write(Buffer.concat(state.outstanding.map((id) => encodeFrame({ id, ok: true }))));
        state.outstanding = [];
      }, 20);
    });
  });
  const sock = path.join(dir, 'batch.sock');
  await new Promise((r) => server.listen(sock, r));
  return { sock, state, close: () => server.close() };
}

test('maxPending is never exceeded, even when a new call comes as a slot is freed', async () => {
  const fake = await batchingServer();
  const c = new Client(fake.sock, { maxPending: 2, timeoutMs: 2000, failureMode: 'raise', ...quiet });
  try {
    // Two calls in flight, answered in one write; each is followed at once by a new call
    // (the next microtask), while two more calls wait for a slot.
    const chained = () => c.call({ op: 'x' }).then(() => c.call({ op: 'x' }));
    await Promise.all([chained(), chained(), c.call({ op: 'x' }), c.call({ op: 'x' })]);
    assert.equal(fake.state.maxOutstanding, 2);
    assert.equal(c.inFlight, 0);
  } finally {
    c.close();
    fake.close();
  }
});

test('a call whose connection died before it was written fails at once, not at its timeout', async () => {
  const fake = await batchingServer();
  const c = new Client(fake.sock, { timeoutMs: 2000, failureMode: 'raise', ...quiet });
  try {
    const t0 = Date.now();
    const call = c.check('t', 'k'); // connecting ...
    c.close(); // ... and the connection is failed as soon as it is made
    await assert.rejects(call, QuotadUnavailable);
    assert.ok(Date.now() - t0 < 500, String(Date.now() - t0));
    assert.equal(c.inFlight, 0);
  } finally {
    fake.close();
  }
});

test('calls waiting to write when their connection fails go out on a new one', async () => {
  const tenant = freshTenant();
  const q = await Quotad.start(tempDir('rewrite'), env.redis);
  const c = new Client(q.socket, { timeoutMs: 3000, ...quiet });
  try {
    assert.equal((await c.check(tenant, 'k')).degraded, false);
    q.pause();
    let calls;
    try {
      const value = Buffer.alloc(200 << 10, 119);
      calls = Promise.all(Array.from({ length: 40 }, (_, i) => c.cacheSet(tenant, `k${i}`, value, { ttlMs: 10_000 })));
      await sleep(200); // about 4 MB written, the rest waiting for the buffer to drain
      c.conn.fail(new ConnectionLost('broken by the test'));
    } finally {
      q.resume();
    }
    const stored = await calls;
    // Those written on the broken connection are lost; the ones that were waiting are not.
    assert.ok(stored.includes(false), 'some calls were on the broken connection');
    assert.ok(stored.filter(Boolean).length >= 10, String(stored));
  } finally {
    c.close();
    await q.close();
  }
});
