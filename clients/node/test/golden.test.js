// The codec agrees byte for byte with the daemon's (tests/fixtures/frames.json).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { FrameReader, decodeBody, encodeFrame } from '../src/codec.js';
import { ProtocolViolation } from '../src/errors.js';
import { cacheDel, release } from '../src/requests.js';
import { Decision } from '../src/models.js';
import { ReplyFields, decisionOf, readReply } from '../src/replies.js';
import { REPO } from './daemons.js';

const { frames } = JSON.parse(fs.readFileSync(path.join(REPO, 'tests', 'fixtures', 'frames.json'), 'utf8'));

/** The fixture's JSON form: {"$bin": hex} is a Buffer; integers beyond 2^53 are BigInt. */
function fromJson(value, raw) {
  if (Array.isArray(value)) return value.map((v) => fromJson(v));
  if (value && typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 1 && keys[0] === '$bin') return Buffer.from(value.$bin, 'hex');
    return Object.fromEntries(keys.map((k) => [k, fromJson(value[k])]));
  }
  if (typeof value === 'number' && !Number.isSafeInteger(value) && Number.isInteger(value)) return 'BIG';
  return value;
}

// JSON.parse loses u64 precision; the large ids in the fixture are all 2^64-1.
const BIG = 18446744073709551615n;
function fixBig(v) {
  if (v === 'BIG') return BIG;
  if (Array.isArray(v)) return v.map(fixBig);
  if (v && typeof v === 'object' && !Buffer.isBuffer(v)) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fixBig(x)]));
  return v;
}

test('the fixture has every kind of frame', () => {
  const names = new Set(frames.map((f) => f.name));
  for (const n of ['hello_request', 'check_request_large_id', 'check_get_reply_allowed_hit', 'error_reply_fatal_frame']) assert.ok(names.has(n), n);
  assert.ok(frames.length >= 20);
});

test('every frame decodes to its value and re-encodes to the same bytes', () => {
  for (const f of frames) {
    const raw = Buffer.from(f.hex, 'hex');
    const bodies = new FrameReader().push(raw);
    assert.equal(bodies.length, 1, f.name);
    const decoded = decodeBody(bodies[0]);
    const expected = fixBig(fromJson(f.value));
    assert.deepStrictEqual(decoded, expected, f.name);
    assert.deepStrictEqual(Object.keys(decoded), Object.keys(expected), `${f.name}: key order`);
    assert.ok(encodeFrame(decoded).equals(raw), `${f.name}: re-encoded bytes differ`);
  }
});

test('frames split anywhere are reassembled', () => {
  const stream = Buffer.concat(frames.map((f) => Buffer.from(f.hex, 'hex')));
  for (const chunk of [1, 3, 7, 64]) {
    const reader = new FrameReader();
    const bodies = [];
    for (let i = 0; i < stream.length; i += chunk) bodies.push(...reader.push(stream.subarray(i, i + chunk)));
    assert.equal(bodies.length, frames.length);
    assert.deepStrictEqual(bodies.map((b) => decodeBody(b).id), frames.map((f) => fixBig(fromJson(f.value)).id));
  }
});

test('a reader fed one reused buffer (as the client reads) keeps nothing that changes under it', () => {
  const big = encodeFrame({ id: 1, ok: true, hit: true, value: Buffer.alloc(200_000, 7) });
  const stream = Buffer.concat([...frames.map((f) => Buffer.from(f.hex, 'hex')), big, ...frames.map((f) => Buffer.from(f.hex, 'hex'))]);
  for (const size of [1, 5, 64, 4096]) {
    const chunk = Buffer.alloc(size);
    const reader = new FrameReader();
    const bodies = [];
    for (let i = 0; i < stream.length; i += size) {
      const n = stream.copy(chunk, 0, i, i + size);
      // A body that is a view of `chunk` is valid until the next feed; one of the reader's own stays valid.
      reader.feed(chunk, (buf, start, end) => bodies.push(buf === chunk ? Buffer.from(buf.subarray(start, end)) : buf.subarray(start, end)), n);
      chunk.fill(0xc1); // what the next read would overwrite
    }
    const want = [];
    new FrameReader().feed(stream, (buf, start, end) => want.push(buf.subarray(start, end)));
    assert.equal(bodies.length, 2 * frames.length + 1, String(size));
    bodies.forEach((b, i) => assert.ok(b.equals(want[i]), `chunk size ${size}, frame ${i}`));
  }
});

test('oversized frames and non-map bodies are violations', () => {
  assert.throws(() => new FrameReader(16).push(Buffer.from([0, 0, 0, 17])), ProtocolViolation);
  const split = new FrameReader(16);
  split.push(Buffer.from([0, 0]));
  assert.throws(() => split.push(Buffer.from([0, 17, 1])), ProtocolViolation); // the length cut across chunks
  assert.throws(() => decodeBody(Buffer.from([0x93, 1, 2, 3])), ProtocolViolation);
  assert.throws(() => decodeBody(Buffer.from([0xc1])), ProtocolViolation);
});

test('integers beyond 32 bits are sent as uint64 and come back exact', () => {
  const big = 2n ** 64n - 1n;
  const frame = encodeFrame({ a: 2 ** 32 - 1, b: 2 ** 32, c: Number.MAX_SAFE_INTEGER, d: big, e: -(2 ** 40) });
  const hex = frame.subarray(4).toString('hex');
  // uint32 only up to 2^32 - 1; then uint64 (0xcf) / int64 (0xd3), never float64 (0xcb).
  assert.equal(hex, [
    '85', 'a161', 'ceffffffff', 'a162', 'cf0000000100000000', 'a163', 'cf001fffffffffffff',
    'a164', 'cfffffffffffffffff', 'a165', 'd3ffffff0000000000',
  ].join(''));
  assert.deepStrictEqual(decodeBody(frame.subarray(4)), { a: 2 ** 32 - 1, b: 2 ** 32, c: Number.MAX_SAFE_INTEGER, d: big, e: -(2 ** 40) });
  // A uint64 that fits is a Number, as the reply parsers expect.
  assert.equal(typeof decodeBody(Buffer.from('81a161cf0000010000000000', 'hex')).a, 'number');
});

test('a fillOnly delete is sent as the daemon encodes it', () => {
  const golden = frames.find((f) => f.name === 'cache_del_fill_only_request');
  const req = cacheDel('acme', { keys: ['GET /items?page=2'], fillOnly: true });
  req.id = 8; // as Client.call does
  assert.equal(encodeFrame(req).toString('hex'), golden.hex);
  assert.equal('fill_only' in cacheDel('acme', { keys: ['GET /items?page=2'] }), false); // sent only when true
});

test('a release is sent as the daemon encodes it, and a lease reply read', () => {
  const golden = frames.find((f) => f.name === 'release_request');
  const req = release('acme', 'user:42', '0123456789abcdef0123456789abcdef', { policy: 'api' });
  req.id = 16;
  assert.equal(encodeFrame(req).toString('hex'), golden.hex);
  const reply = frames.find((f) => f.name === 'check_reply_allowed_lease');
  const d = Decision.fromReply(decodeBody(Buffer.from(reply.hex, 'hex').subarray(4)));
  assert.equal(d.lease, '0123456789abcdef0123456789abcdef');
  assert.deepStrictEqual([d.rule, d.kind, d.windowMs, d.shadowDenied], ['inflight', 'concurrency', 0, false]);
  // Every field v1 added, in the daemon's order, read by the in-place reader as by the general one.
  const every = frames.find((f) => f.name === 'check_reply_allowed_lease_shadow_denied');
  assert.deepStrictEqual(Object.keys(every.value).slice(9), ['kind', 'window_ms', 'lease', 'shadow_denied', 'shadow_rule']);
  const raw = Buffer.from(every.hex, 'hex');
  const fields = new ReplyFields();
  assert.ok(readReply(raw, 4, raw.length, fields));
  const fast = decisionOf(fields);
  assert.deepStrictEqual(fast, Decision.fromReply(decodeBody(raw.subarray(4))));
  assert.deepStrictEqual([fast.lease, fast.kind, fast.windowMs, fast.shadowDenied, fast.shadowRule], [d.lease, 'concurrency', 0, true, 'daily']);
});

test('every error code in the fixture has its own error class', async () => {
  const { serverError, ServerError, SourceUnavailable } = await import('../src/errors.js');
  const errors = frames.filter((f) => f.name.startsWith('error_reply_')).map((f) => f.value.error);
  assert.ok(errors.some((e) => e.code === 'unavailable'));
  for (const e of errors) {
    const err = serverError(e);
    assert.notEqual(err.constructor, ServerError, e.code);
    assert.equal(err.code, e.code);
  }
  assert.ok(serverError({ code: 'unavailable', message: 'Redis: down' }) instanceof SourceUnavailable);
});
