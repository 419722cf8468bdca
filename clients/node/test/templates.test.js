// The hot path's template encoder and in-place reply reader agree with the
// general codec (@msgpack/msgpack) byte for byte and field for field.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { decodeBody, encodeFrame } from '../src/codec.js';
import { InvalidArgument } from '../src/errors.js';
import { Decision, Lookup } from '../src/models.js';
import { ReplyFields, checkGetOf, decisionOf, lookupOf, readReply, replyId } from '../src/replies.js';
import * as build from '../src/requests.js';
import { FrameWriter, writeCacheGet, writeCheck, writeCheckGet } from '../src/templates.js';
import { parseCheckGet } from '../src/models.js';
import { REPO } from './daemons.js';

const HOSTILE = [
  'a',
  'acme',
  'x'.repeat(31), // the longest fixstr
  'x'.repeat(32),
  'é'.repeat(15), // 30 bytes: fixstr from a non-ASCII string
  'é'.repeat(16), // 32 bytes: str8
  'y'.repeat(255),
  'y'.repeat(256), // str16
  'z'.repeat(70_000), // str32
  'ü'.repeat(40_000), // str32 from 40,000 UTF-16 units
  'nul\0inside',
  '\0',
  '日本語のキー',
  '😀 emoji 𝄞 astral',
  'mixed ascii then ü',
  'GET /items?page=2&q=%00',
];
const IDS = [1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1, 2 ** 32, Number.MAX_SAFE_INTEGER];
const COSTS = [undefined, 0, 1, 300, 2 ** 40, 2n ** 64n - 1n];
const MAX = 1 << 30;

function general(req, id) {
  req.id = id;
  return encodeFrame(req);
}

function templated(write) {
  const w = new FrameWriter();
  write(w);
  return Buffer.from(w.take());
}

test('check frames from templates are the general encoder\'s bytes', () => {
  let n = 0;
  for (const tenant of HOSTILE) {
    for (const key of HOSTILE) {
      for (const policy of [undefined, null, 'api', HOSTILE[n % HOSTILE.length]]) {
        const id = IDS[n % IDS.length];
        const opts = { policy, cost: COSTS[n % COSTS.length] };
        n++;
        const want = general(build.check(tenant, key, opts), id);
        const got = templated((w) => writeCheck(w, id, tenant, key, opts, MAX));
        assert.ok(got.equals(want), `check ${JSON.stringify([tenant.slice(0, 20), key.slice(0, 20), policy, id])}`);
      }
    }
  }
});

test('check_get and cache_get frames from templates are the general encoder\'s bytes', () => {
  let n = 0;
  for (const tenant of HOSTILE) {
    for (const key of HOSTILE) {
      const cacheKey = HOSTILE[(n * 7) % HOSTILE.length];
      const fillMs = [undefined, null, 0, 2000, 2 ** 33][n % 5];
      const id = IDS[n % IDS.length];
      const opts = { policy: n % 2 ? 'api' : undefined, cost: COSTS[n % COSTS.length], fillMs };
      n++;
      let want = general(build.checkGet(tenant, key, cacheKey, opts), id);
      let got = templated((w) => writeCheckGet(w, id, tenant, key, cacheKey, opts, MAX));
      assert.ok(got.equals(want), `check_get ${n}`);
      want = general(build.cacheGet(tenant, key, { fillMs }), id);
      got = templated((w) => writeCacheGet(w, id, tenant, key, { fillMs }, MAX));
      assert.ok(got.equals(want), `cache_get ${n}`);
    }
  }
});

test('the golden request frames come out of the templates', () => {
  const { frames } = JSON.parse(fs.readFileSync(path.join(REPO, 'tests', 'fixtures', 'frames.json'), 'utf8'));
  const hex = (name) => frames.find((f) => f.name === name).hex;
  const frame = (write) => templated(write).toString('hex');
  assert.equal(frame((w) => writeCheck(w, 2, 'acme', 'user:42', { policy: 'api', cost: 1 }, MAX)), hex('check_request'));
  assert.equal(frame((w) => writeCheck(w, 3, 'acme', 'user:42', { cost: 0 }, MAX)), hex('check_request_default_policy_peek'));
  assert.equal(frame((w) => writeCacheGet(w, 5, 'acme', 'GET /items?page=2', {}, MAX)), hex('cache_get_request'));
  assert.equal(frame((w) => writeCacheGet(w, 6, 'acme', 'GET /items?page=2', { fillMs: 2000 }, MAX)), hex('cache_get_request_fill'));
  assert.equal(
    frame((w) => writeCheckGet(w, 9, 'acme', 'user:42', 'GET /items?page=2', { policy: 'api', cost: 1, fillMs: 2000 }, MAX)),
    hex('check_get_request'),
  );
});

test('the templates refuse what the general builders refuse, and write nothing', () => {
  const bad = [
    ['', 'k', {}], ['t', '', {}], ['t', 'k', { policy: '' }], ['\udc80', 'k', {}], ['t', 'k\ud800', {}],
    [42, 'k', {}], ['t', null, {}], ['t', 'k', { cost: -1 }], ['t', 'k', { cost: 1.5 }], ['t', 'k', { cost: 1n << 64n }],
    ['t', 'k', { policy: 7 }],
  ];
  const w = new FrameWriter();
  for (const [tenant, key, opts] of bad) {
    assert.throws(() => build.check(tenant, key, opts), InvalidArgument);
    assert.throws(() => writeCheck(w, 1, tenant, key, opts, MAX), InvalidArgument, JSON.stringify([tenant, key]));
    assert.throws(() => writeCheckGet(w, 1, tenant, key, 'c', opts, MAX), InvalidArgument);
    if (Object.keys(opts).length === 0) assert.throws(() => writeCacheGet(w, 1, tenant, key, opts, MAX), InvalidArgument);
    assert.equal(w.pending, 0, `bytes left behind by ${JSON.stringify([tenant, key])}`);
  }
  // A lone surrogate found while writing (after an ASCII tenant, in a long key) drops what was written of the frame.
  writeCheck(w, 1, 't', 'k', {}, MAX);
  const good = w.pending;
  assert.throws(() => writeCheck(w, 2, 'tenant', `${'k'.repeat(40)}\ud800`, {}, MAX), InvalidArgument);
  assert.throws(() => writeCheckGet(w, 2, 'tenant', 'key', `c\udfff`, {}, MAX), InvalidArgument);
  assert.equal(w.pending, good);
  w.take();
  assert.throws(() => writeCheckGet(w, 1, 't', 'k', '', {}, MAX), InvalidArgument);
  assert.throws(() => writeCacheGet(w, 1, 't', 'k', { fillMs: -1 }, MAX), InvalidArgument);
  // Over the frame limit: refused, and the bytes already written for it are dropped.
  assert.throws(() => writeCheck(w, 1, 't', 'k'.repeat(100), {}, 64), InvalidArgument);
  assert.equal(w.pending, 0);
});

test('frames written after a slab fills keep the bytes not yet taken', () => {
  const w = new FrameWriter();
  const want = [];
  for (let i = 1; i <= 3000; i++) {
    writeCheck(w, i, 'tenant', `key:${i}:${'k'.repeat(i % 50)}`, { policy: 'api' }, MAX);
    want.push(general(build.check('tenant', `key:${i}:${'k'.repeat(i % 50)}`, { policy: 'api' }), i));
    if (i % 700 === 0) assert.ok(w.take().equals(Buffer.concat(want.splice(0))));
  }
  assert.ok(w.take().equals(Buffer.concat(want)));
});

const REPLIES = [
  { id: 2, ok: true, allowed: true, limit: 10, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'burst' },
  { id: 3, ok: true, allowed: false, limit: 2 ** 40, remaining: 0, reset_ms: 70000, retry_after_ms: 300, degraded: true, rule: 'per_minute' },
  { id: 4, ok: true, allowed: true, limit: 1, remaining: 0, reset_ms: 0, retry_after_ms: 0, degraded: false, rule: 'x'.repeat(40), extra: 5 },
  { id: 5, ok: true, hit: true, value: Buffer.from('{"items":[]}'), ttl_ms: 29500, stale: false, refresh: false, degraded: false },
  { id: 5, ok: true, hit: true, value: Buffer.alloc(70_000, 1), ttl_ms: 0, stale: true, refresh: true, degraded: false },
  { id: 6, ok: true, hit: false, fill: true, degraded: false },
  { id: 6, ok: true, hit: false, fill: false, degraded: true },
  { id: 9, ok: true, allowed: true, limit: 10, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'burst', hit: true, value: Buffer.from('v'), ttl_ms: 1, stale: false, refresh: false },
  { id: 9, ok: true, allowed: false, limit: 10, remaining: 0, reset_ms: 200, retry_after_ms: 200, degraded: false, rule: 'burst' },
  // The fields added within protocol v1 stay on the fast path.
  { id: 2, ok: true, allowed: true, limit: 20, remaining: 19, reset_ms: 30000, retry_after_ms: 0, degraded: false, rule: 'inflight', lease: '0123456789abcdef0123456789abcdef' },
  {
    id: 2, ok: true, allowed: true, limit: 20, remaining: 19, reset_ms: 30000, retry_after_ms: 0, degraded: false, rule: 'inflight',
    kind: 'concurrency', window_ms: 0, lease: 'fedcba9876543210fedcba9876543210', shadow_denied: true, shadow_rule: 'daily',
  },
  { id: 9, ok: true, allowed: true, limit: 10, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'burst', kind: 'token_bucket', window_ms: 2000, hit: false, fill: false },
  // uint32s with their top bit set and a uint64 just under 2^53 (read byte by byte: bytes.js).
  { id: 2 ** 32 - 1, ok: true, allowed: false, limit: 2 ** 32 - 1, remaining: 2 ** 31 + 5, reset_ms: 2 ** 53 - 1, retry_after_ms: 0x80000000, degraded: false, rule: 'burst' },
];

test('a check reply with a lease and the other v1 additions is read in place', () => {
  const fields = new ReplyFields();
  const frame = encodeFrame(REPLIES[10]);
  assert.ok(readReply(frame, 4, frame.length, fields));
  const d = decisionOf(fields);
  assert.equal(d.lease, 'fedcba9876543210fedcba9876543210');
  assert.equal(d.kind, 'concurrency');
  assert.equal(d.windowMs, 0);
  assert.equal(d.shadowDenied, true);
  assert.equal(d.shadowRule, 'daily');
  const plain = encodeFrame(REPLIES[0]);
  assert.ok(readReply(plain, 4, plain.length, fields));
  const p = decisionOf(fields);
  assert.deepStrictEqual([p.lease, p.kind, p.windowMs, p.shadowDenied, p.shadowRule], [null, '', 0, false, null]);
});

test('replies read in place give the results of the general decoder', () => {
  const fields = new ReplyFields();
  for (const reply of REPLIES) {
    const frame = encodeFrame(reply);
    const body = frame.subarray(4);
    assert.ok(readReply(frame, 4, frame.length, fields), JSON.stringify(reply).slice(0, 80));
    const decoded = decodeBody(body);
    if ('allowed' in reply) {
      assert.deepStrictEqual(decisionOf(fields), Decision.fromReply(decoded));
      assert.deepStrictEqual(checkGetOf(fields, frame), parseCheckGet(decoded));
    } else {
      assert.deepStrictEqual(lookupOf(fields, frame), Lookup.fromReply(decoded));
    }
  }
});

test('a reply\'s id is read in place for every size of id', () => {
  for (const id of IDS) {
    const frame = encodeFrame({ id, ok: true, allowed: true, limit: 1, remaining: 0, reset_ms: 0, retry_after_ms: 0, degraded: false, rule: 'r' });
    assert.equal(replyId(frame, 4, frame.length), id);
  }
});

test('replies the in-place reader cannot vouch for are left to the general decoder', () => {
  const fields = new ReplyFields();
  const unusual = [
    { id: 7, ok: false, error: { code: 'overloaded', message: 'full' } }, // an error map
    { id: 2, ok: true, allowed: true, limit: -1, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'b' },
    { id: 2, ok: true, allowed: 'yes', limit: 1, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'b' },
    { id: 2, ok: true, allowed: true, limit: 2n ** 60n, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'b' },
    { id: 2, ok: true, allowed: true, limit: 1, remaining: 9, reset_ms: 200, retry_after_ms: 0, degraded: false, rule: 'règle' },
    { id: 2, ok: true, allowed: true, limit: 1, remaining: 9, reset_ms: 1.5, retry_after_ms: 0, degraded: false, rule: 'b' },
    { id: 5, ok: true, hit: true, value: 'text, not bin', degraded: false },
    { id: 2, ok: true, allowed: true, limit: 1, remaining: 0, reset_ms: 1, retry_after_ms: 0, degraded: false, rule: 'b', lease: 7 },
    { id: 2, ok: true, allowed: true, limit: 1, remaining: 0, reset_ms: 1, retry_after_ms: 0, degraded: false, rule: 'b', window_ms: 'soon' },
  ];
  for (const reply of unusual) {
    const frame = encodeFrame(reply);
    assert.equal(readReply(frame, 4, frame.length, fields), false, JSON.stringify(reply, (_, v) => (typeof v === 'bigint' ? String(v) : v)));
  }
  // Fields missing: read, but no result vouched for.
  const partial = encodeFrame({ id: 2, ok: true, allowed: true, limit: 1 });
  assert.ok(readReply(partial, 4, partial.length, fields));
  assert.equal(decisionOf(fields), null);
  const hitWithoutValue = encodeFrame({ id: 5, ok: true, hit: true, degraded: false });
  assert.ok(readReply(hitWithoutValue, 4, hitWithoutValue.length, fields));
  assert.equal(lookupOf(fields, hitWithoutValue), null);
  // Cut short anywhere: never read past the body.
  const full = encodeFrame(REPLIES[7]);
  for (let end = 5; end < full.length; end++) assert.equal(readReply(full, 4, end, fields), false, String(end));
});
