// 100k checks pipelined on one connection to a daemon that answers out of
// order: every reply reaches the call it answers. And the hot path's answers
// to replies it cannot read in place (errors, mistyped fields) or that never come.
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import {
  Client, ConnectionLost, FrameReader, Overloaded, ProtocolViolation, RequestTimedOut, decodeBody, encodeFrame,
} from '../src/index.js';
import { tempDir } from './daemons.js';

const CALLS = 100_000;

/**
 * A fake quotad answering each check with its key as the rule and the key's
 * number as `remaining`: requests are held until 1,000 are in (or 5 ms pass),
 * then answered shuffled.
 */
async function shufflingServer() {
  const state = { requests: 0, outOfOrder: 0, maxHeld: 0 };
  let seed = 12345;
  const rand = (n) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const server = net.createServer((s) => {
    const frames = new FrameReader();
    let held = [];
    let timer = null;
    const answer = () => {
      clearTimeout(timer);
      timer = null;
      for (let i = held.length - 1; i > 0; i--) {
        const j = rand(i + 1);
        [held[i], held[j]] = [held[j], held[i]];
      }
      for (let i = 1; i < held.length; i++) if (held[i].id < held[i - 1].id) state.outOfOrder++;
      s.write(Buffer.concat(held.map((r) => encodeFrame({
        id: r.id, ok: true, allowed: true, limit: CALLS, remaining: Number(r.key.slice(1)), reset_ms: 0, retry_after_ms: 0, degraded: false, rule: r.key,
      }))));
      held = [];
    };
    s.on('data', (chunk) => {
      for (const body of frames.push(chunk)) {
        held.push(decodeBody(body));
        state.requests++;
      }
      state.maxHeld = Math.max(state.maxHeld, held.length);
      if (held.length >= 1000) answer();
      else timer ??= setTimeout(answer, 5);
    });
  });
  const sock = path.join(tempDir('shuffle'), 'shuffle.sock');
  await new Promise((r) => server.listen(sock, r));
  return { sock, state, close: () => server.close() };
}

test('100k pipelined checks answered out of order each get their own reply', async () => {
  const fake = await shufflingServer();
  const c = new Client(fake.sock, { maxPending: CALLS, timeoutMs: 60_000, failureMode: 'raise', onWarn: () => {} });
  try {
    assert.equal((await c.check('acme', 'k0')).rule, 'k0'); // connected: the rest take the hot path
    const decisions = await Promise.all(Array.from({ length: CALLS }, (_, i) => c.check('acme', `k${i}`, { policy: 'api' })));
    assert.equal(fake.state.requests, CALLS + 1);
    assert.ok(fake.state.outOfOrder > CALLS / 4, `only ${fake.state.outOfOrder} replies out of order`);
    assert.ok(fake.state.maxHeld >= 1000, 'the calls were pipelined');
    for (let i = 0; i < CALLS; i++) {
      const d = decisions[i];
      if (d.rule !== `k${i}` || d.remaining !== i || d.degraded) assert.fail(`call ${i} got ${JSON.stringify(d)}`);
    }
    assert.equal(c.inFlight, 0);
    assert.equal(c.conn.pending.size, 0);
  } finally {
    c.close();
    fake.close();
  }
});

/** A fake quotad answering each check by its key: 'ok', 'overloaded', 'mistyped' or 'silent' (no answer). */
async function scriptedServer() {
  const server = net.createServer((s) => {
    const frames = new FrameReader();
    s.on('data', (chunk) => {
      for (const body of frames.push(chunk)) {
        const { id, key } = decodeBody(body);
        const decision = { allowed: true, limit: 10, remaining: 9, reset_ms: 100, retry_after_ms: 0, degraded: false, rule: 'burst' };
        if (key === 'ok') s.write(encodeFrame({ id, ok: true, ...decision }));
        if (key === 'overloaded') s.write(encodeFrame({ id, ok: false, error: { code: 'overloaded', message: 'shard mailbox full' } }));
        if (key === 'mistyped') s.write(encodeFrame({ id, ok: true, ...decision, remaining: 'nine' }));
      }
    });
  });
  const sock = path.join(tempDir('scripted'), 'scripted.sock');
  await new Promise((r) => server.listen(sock, r));
  return { sock, close: () => server.close() };
}

test('hot-path checks map error replies, bad replies and silence as the failure mode says', async () => {
  const fake = await scriptedServer();
  const raising = new Client(fake.sock, { timeoutMs: 200, failureMode: 'raise', onWarn: () => {} });
  const open = new Client(fake.sock, { timeoutMs: 200, onWarn: () => {} });
  try {
    for (const c of [raising, open]) assert.equal((await c.check('t', 'ok')).rule, 'burst'); // connected
    const t0 = Date.now();
    const [ok, overloaded, mistyped, silent] = await Promise.allSettled(['ok', 'overloaded', 'mistyped', 'silent'].map((k) => raising.check('t', k)));
    assert.equal(ok.value.degraded, false);
    assert.ok(overloaded.reason instanceof Overloaded, String(overloaded.reason));
    assert.ok(mistyped.reason instanceof ProtocolViolation, String(mistyped.reason));
    assert.ok(silent.reason instanceof RequestTimedOut, String(silent.reason));
    assert.ok(Date.now() - t0 >= 150, 'the silent call waited for its deadline');
    const answers = await Promise.all(['ok', 'overloaded', 'mistyped', 'silent'].map((k) => open.check('t', k)));
    assert.deepEqual(answers.map((d) => [d.allowed, d.degraded]), [[true, false], [true, true], [true, true], [true, true]]);
    // One call unanswered until its deadline while thousands are answered: the deadline queue stays small.
    const hanging = new Client(fake.sock, { timeoutMs: 5000, failureMode: 'raise', onWarn: () => {} });
    try {
      await hanging.check('t', 'ok'); // connected: the silent call below is in the deadline queue
      const silence = hanging.check('t', 'silent');
      for (let round = 0; round < 20; round++) await Promise.all(Array.from({ length: 500 }, () => hanging.check('t', 'ok')));
      assert.ok(hanging.conn.queue.length - hanging.conn.head < 2100, String(hanging.conn.queue.length - hanging.conn.head));
      hanging.close();
      await assert.rejects(silence, ConnectionLost);
    } finally {
      hanging.close();
    }
    for (const c of [raising, open]) {
      assert.equal(c.inFlight, 0);
      assert.equal(c.conn.error, null, 'one bad reply does not break the connection');
    }
  } finally {
    raising.close();
    open.close();
    fake.close();
  }
});
