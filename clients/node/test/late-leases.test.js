// A check the client gave up on (its own timeout, shorter than quotad's
// answer) is answered degraded; when quotad's late reply carries a lease, the
// client releases it by itself: check and checkGet, on the hot path and on
// the general one (the first call of a client, which connects), against a
// real quotad frozen (SIGSTOP) for longer than the client's timeout.
// Afterwards `usage` counts no lease outstanding.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Client } from '../src/index.js';
import { environment, freshTenant } from './daemons.js';

const TABLES = `
[policies.inflight]
rules = [{ name = "inflight", kind = "concurrency", limit = 3, lease_ms = 60000 }]
`;
const CLIENT_TIMEOUT_MS = 150;
const FROZEN_MS = 500;

let env;
let probe;

before(async () => {
  env = await environment(undefined, { tables: TABLES });
  probe = new Client(env.quotad.socket, { timeoutMs: 5000 });
});

after(async () => {
  probe?.close();
  await env?.close();
});

const releases = async () => Number((await probe.stats()).counters.requests_release);
const held = async (t) => (await probe.usage(t, 'u', { policy: 'inflight' }))[0].used;

async function waitUntil(what, ready, withinMs = 10_000) {
  const deadline = Date.now() + withinMs;
  while (!(await ready())) {
    assert.ok(Date.now() < deadline, `timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Freezes quotad while `calls` run against a client with a short timeout; `n` leases must come back. */
async function lateLeasesReleased(warm, calls, n) {
  const t = freshTenant('late');
  const before = await releases();
  const warnings = [];
  const c = new Client(env.quotad.socket, { timeoutMs: CLIENT_TIMEOUT_MS, onWarn: (m) => warnings.push(m) });
  try {
    if (warm) await c.check(t, 'warm', { policy: 'inflight', cost: 0 }); // connected: the hot path
    env.quotad.pause();
    const thaw = setTimeout(() => env.quotad.resume(), FROZEN_MS);
    try {
      for (const d of await Promise.all(calls(c, t))) {
        const decision = d.decision ?? d;
        assert.equal(decision.degraded, true);
        assert.equal(decision.lease, null);
      }
    } finally {
      await new Promise((r) => setTimeout(r, FROZEN_MS));
      clearTimeout(thaw);
      env.quotad.resume();
    }
    await waitUntil('the late leases released', async () => (await releases()) >= before + n);
    assert.equal(await releases(), before + n);
    assert.equal(await held(t), 0);
    assert.deepEqual(warnings.filter((w) => w.includes('lease')), []);
  } finally {
    c.close();
  }
}

test('a timed-out check and checkGet release the leases of their late replies', async () => {
  await lateLeasesReleased(true, (c, t) => [
    c.check(t, 'u', { policy: 'inflight' }),
    c.checkGet(t, 'u', 'page', { policy: 'inflight' }),
  ], 2);
});

test('so does a check on the general path (a client not yet connected)', async () => {
  await lateLeasesReleased(false, (c, t) => [c.check(t, 'u', { policy: 'inflight' })], 1);
});
