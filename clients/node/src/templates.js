// The hot requests (check, check_get, cache_get) written from pre-encoded
// MessagePack pieces straight into a pooled buffer: only id, tenant, key,
// cost (and cache_key, fill_ms) are encoded per call. The bytes are exactly
// the general encoder's (codec.js), which the template test checks.

import { writeU32 } from './bytes.js';
import { InvalidArgument } from './errors.js';
import { costValue, fillMsValue, text } from './requests.js';

const SLAB_BYTES = 64 << 10;
// Called as charCodeAt.call(s, i), not s.charCodeAt(i): a library that
// subclasses String (ioredis's VerbatimString) turns String.prototype into a
// dictionary, and every s.charCodeAt from optimized code is then a generic
// property lookup (~25 ns a character; 4.6% of the client's samples beside ioredis).
const charCodeAt = String.prototype.charCodeAt;
const MAX_POLICIES = 256; // policy names whose bytes are kept; others are encoded per call

/**
 * Frames appended to one growing slab; `take()` hands out the bytes written
 * since the last take. Bytes handed out are never written again (a full slab
 * is replaced, not reused), so they may be passed to socket.write as they are.
 */
export class FrameWriter {
  constructor() {
    this.buf = Buffer.allocUnsafe(SLAB_BYTES);
    this.start = 0;
    this.pos = 0;
    this.mark = 0; // where the frame being written begins
  }

  /** Bytes written and not yet taken. */
  get pending() {
    return this.pos - this.start;
  }

  /** Room for `n` more bytes (the bytes not yet taken move to a new slab if need be). */
  reserve(n) {
    if (this.buf.length - this.pos >= n) return;
    const kept = this.pos - this.start;
    // Twice what is needed: many frames written in one tick are copied O(log n) times, not O(n).
    const buf = Buffer.allocUnsafe(Math.max(SLAB_BYTES, 2 * (kept + n)));
    this.buf.copy(buf, 0, this.start, this.pos);
    this.buf = buf;
    this.start = 0;
    this.pos = kept;
  }

  take() {
    const out = this.buf.subarray(this.start, this.pos);
    this.start = this.pos;
    return out;
  }

  /** Appends a whole frame encoded elsewhere. */
  append(frame) {
    this.reserve(frame.length);
    this.buf.set(frame, this.pos);
    this.pos += frame.length;
  }

  raw(bytes) {
    const buf = this.buf;
    let pos = this.pos;
    for (let i = 0; i < bytes.length; i++) buf[pos++] = bytes[i];
    this.pos = pos;
  }

  /** A uint in its smallest form; a Number up to 2^53 - 1 or a BigInt up to 2^64 - 1. */
  uint(n) {
    const buf = this.buf;
    const pos = this.pos;
    if (typeof n === 'bigint') {
      buf[pos] = 0xcf;
      buf.writeBigUInt64BE(n, pos + 1);
      this.pos = pos + 9;
    } else if (n < 0x80) {
      buf[pos] = n;
      this.pos = pos + 1;
    } else if (n < 0x100) {
      buf[pos] = 0xcc;
      buf[pos + 1] = n;
      this.pos = pos + 2;
    } else if (n < 0x10000) {
      buf[pos] = 0xcd;
      buf[pos + 1] = n >>> 8;
      buf[pos + 2] = n & 0xff;
      this.pos = pos + 3;
    } else if (n <= 0xffffffff) {
      buf[pos] = 0xce;
      writeU32(buf, pos + 1, n);
      this.pos = pos + 5;
    } else {
      buf[pos] = 0xcf;
      writeU32(buf, pos + 1, Math.floor(n / 0x100000000));
      writeU32(buf, pos + 5, n >>> 0);
      this.pos = pos + 9;
    }
  }

  /**
   * A str, from a string the caller found non-empty; one that is not
   * well-formed (a lone surrogate) drops the frame being written and throws
   * InvalidArgument, naming it `name`. Room for 5 + 3 * length bytes must be reserved.
   */
  str(s, name) {
    const buf = this.buf;
    const pos = this.pos;
    const len = s.length;
    if (len < 32) {
      // Short ASCII, the common case, byte by byte: no call into C++.
      let i = 0;
      for (; i < len; i++) {
        const c = charCodeAt.call(s, i);
        if (c >= 0x80) break;
        buf[pos + 1 + i] = c;
      }
      if (i === len) { // ASCII: well-formed
        buf[pos] = 0xa0 | len;
        this.pos = pos + 1 + len;
        return;
      }
    }
    if (!s.isWellFormed()) {
      this.pos = this.mark;
      text(name, s); // throws
    }
    const n = Buffer.byteLength(s, 'utf8');
    let head;
    if (n < 32) {
      buf[pos] = 0xa0 | n;
      head = 1;
    } else if (n < 0x100) {
      buf[pos] = 0xd9;
      buf[pos + 1] = n;
      head = 2;
    } else if (n < 0x10000) {
      buf[pos] = 0xda;
      buf.writeUInt16BE(n, pos + 1);
      head = 3;
    } else {
      buf[pos] = 0xdb;
      buf.writeUInt32BE(n, pos + 1);
      head = 5;
    }
    buf.utf8Write(s, pos + head, n);
    this.pos = pos + head + n;
  }

  /** Starts a frame: its length prefix is written by `end`. */
  begin(maxBody) {
    this.reserve(maxBody + 4);
    const mark = this.pos;
    this.mark = mark;
    this.pos += 4;
    return mark;
  }

  /** Ends the frame begun at `mark`; over `maxFrameBytes`, it is dropped and InvalidArgument thrown. */
  end(mark, maxFrameBytes) {
    const n = this.pos - mark - 4;
    if (n > maxFrameBytes) {
      this.pos = mark;
      throw new InvalidArgument(`a ${n}-byte request is over maxFrameBytes (${maxFrameBytes})`);
    }
    writeU32(this.buf, mark, n);
  }
}

// Upper bound on an encoded str: a 5-byte header, 3 bytes per UTF-16 unit.
const textBound = (s) => 5 + 3 * s.length;

const bytes = (...parts) => Buffer.from(parts.join(''), 'hex');
const key = (k) => Buffer.concat([Buffer.from([0xa0 | k.length]), Buffer.from(k)]).toString('hex');

const K_ID = bytes(key('id'));
const CHECK_HEAD = bytes(key('op'), key('check'), key('tenant'));
const CHECK_GET_HEAD = bytes(key('op'), key('check_get'), key('tenant'));
const CACHE_GET_HEAD = bytes(key('op'), key('cache_get'), key('tenant'));
const K_KEY = bytes(key('key'));
const K_COST = bytes(key('cost'));
const K_CACHE_KEY = bytes(key('cache_key'));
const K_FILL_MS = bytes(key('fill_ms'));

/** The bytes between `key` and `cost`'s value: `policy` (when given) and the `cost` key. */
class PolicyPart {
  constructor(policy) {
    this.policy = policy;
    if (policy === null) {
      this.bytes = K_COST;
    } else {
      const w = new FrameWriter();
      w.reserve(16 + textBound(policy));
      w.raw(bytes(key('policy')));
      w.str(policy, 'policy');
      w.raw(K_COST);
      this.bytes = Buffer.from(w.take());
    }
  }
}

const NO_POLICY = new PolicyPart(null);
const policies = new Map();

function policyPart(policy) {
  if (policy === undefined || policy === null) return NO_POLICY;
  let part = policies.get(policy);
  if (part === undefined) {
    part = new PolicyPart(text('policy', policy));
    if (policies.size < MAX_POLICIES) policies.set(policy, part);
  }
  return part;
}

/** Refuses what `text` refuses but for well-formedness, which `str` checks as it writes. */
function nonEmpty(name, value) {
  if (typeof value !== 'string' || value.length === 0) text(name, value); // throws, saying why
}

function writeHead(w, id, fields, head, tenant, key) {
  w.buf[w.pos++] = 0x80 | fields;
  w.raw(K_ID);
  w.uint(id);
  w.raw(head);
  w.str(tenant, 'tenant');
  w.raw(K_KEY);
  w.str(key, 'key');
}

/** A check frame for call `id`; the arguments are refused as requests.check refuses them, and a refused frame leaves nothing written. */
export function writeCheck(w, id, tenant, key, opts, maxFrameBytes) {
  nonEmpty('tenant', tenant);
  nonEmpty('key', key);
  const policy = policyPart(opts.policy);
  const cost = costValue(opts.cost);
  const mark = w.begin(32 + textBound(tenant) + textBound(key) + policy.bytes.length);
  writeHead(w, id, policy.policy === null ? 5 : 6, CHECK_HEAD, tenant, key);
  w.raw(policy.bytes);
  w.uint(cost);
  w.end(mark, maxFrameBytes);
}

export function writeCheckGet(w, id, tenant, key, cacheKey, opts, maxFrameBytes) {
  nonEmpty('tenant', tenant);
  nonEmpty('key', key);
  const policy = policyPart(opts.policy);
  const cost = costValue(opts.cost);
  nonEmpty('cacheKey', cacheKey);
  const fillMs = fillMsValue(opts.fillMs);
  const mark = w.begin(64 + textBound(tenant) + textBound(key) + textBound(cacheKey) + policy.bytes.length);
  writeHead(w, id, (policy.policy === null ? 6 : 7) + (fillMs ? 1 : 0), CHECK_GET_HEAD, tenant, key);
  w.raw(policy.bytes);
  w.uint(cost);
  w.raw(K_CACHE_KEY);
  w.str(cacheKey, 'cacheKey');
  if (fillMs) {
    w.raw(K_FILL_MS);
    w.uint(fillMs);
  }
  w.end(mark, maxFrameBytes);
}

export function writeCacheGet(w, id, tenant, key, opts, maxFrameBytes) {
  nonEmpty('tenant', tenant);
  nonEmpty('key', key);
  const fillMs = fillMsValue(opts.fillMs);
  const mark = w.begin(48 + textBound(tenant) + textBound(key));
  writeHead(w, id, fillMs ? 5 : 4, CACHE_GET_HEAD, tenant, key);
  if (fillMs) {
    w.raw(K_FILL_MS);
    w.uint(fillMs);
  }
  w.end(mark, maxFrameBytes);
}
