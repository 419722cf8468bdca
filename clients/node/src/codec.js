// Protocol v1 framing: a 4-byte big-endian length, then one MessagePack map.
// Maps are encoded in key order with variable-size headers, integers in
// their smallest form, strings as str and Buffers as bin — byte for byte
// what the daemon writes (the golden-frame test checks this).

import { Decoder, Encoder } from '@msgpack/msgpack';
import { ProtocolViolation } from './errors.js';

/** The daemon's default max_frame_bytes. */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;
/** Replies larger than this are treated as a broken stream. */
export const DEFAULT_MAX_REPLY_BYTES = 64 << 20;

// Integers are exact both ways up to 2^64 - 1: numbers up to
// Number.MAX_SAFE_INTEGER are Numbers, larger ones BigInts.
class U64Encoder extends Encoder {
  // With useBigInt64 the library writes safe integers beyond 32 bits as
  // float64, which the daemon refuses: write them as (u)int64 instead.
  encodeNumber(n) {
    if (Number.isSafeInteger(n) && (n > 0xffffffff || n < -0x80000000)) this.encodeBigInt64(BigInt(n));
    else super.encodeNumber(n);
  }
}

const encoder = new U64Encoder({ useBigInt64: true, ignoreUndefined: true });
const decoder = new Decoder({ useBigInt64: true });
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

export function encodeFrame(message) {
  const body = encoder.encodeSharedRef(message); // a view of the encoder's buffer: copied once, below
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  frame.set(body, 4);
  return frame;
}

/** One frame body as an object (bin values as Buffers); anything but a single map is a violation. */
export function decodeBody(body) {
  let value;
  try {
    value = decoder.decode(body);
  } catch (e) {
    throw new ProtocolViolation(`undecodable frame: ${e.message}`);
  }
  if (value === null || typeof value !== 'object' || Object.getPrototypeOf(value) !== Object.prototype) {
    throw new ProtocolViolation('a frame that is not a map with string keys');
  }
  return normalize(value);
}

/** bin values as Buffers (views, no copy); 64-bit integers that fit as Numbers. */
function normalize(v) {
  if (typeof v === 'bigint') return v >= -MAX_SAFE && v <= MAX_SAFE ? Number(v) : v;
  if (v instanceof Uint8Array) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) v[i] = normalize(v[i]);
  } else if (v !== null && typeof v === 'object') {
    for (const k in v) v[k] = normalize(v[k]);
  }
  return v;
}

/** Cuts a byte stream into frame bodies, holding at most one partial frame. */
export class FrameReader {
  constructor(maxFrameBytes = DEFAULT_MAX_REPLY_BYTES) {
    this.max = maxFrameBytes;
    this.buf = null;
  }

  /** Adds received bytes; returns the bodies of the frames now complete. */
  push(chunk) {
    const bodies = [];
    this.feed(chunk, (buf, start, end) => bodies.push(buf.subarray(start, end)));
    return bodies;
  }

  /** Adds received bytes; calls `onFrame(buf, start, end)` for each frame body now complete, in order. */
  feed(chunk, onFrame) {
    const buf = this.buf ? Buffer.concat([this.buf, chunk]) : chunk;
    this.buf = null;
    let pos = 0;
    while (buf.length - pos >= 4) {
      const n = buf.readUInt32BE(pos);
      if (n > this.max) throw new ProtocolViolation(`a ${n}-byte frame (the limit is ${this.max})`);
      if (buf.length - pos - 4 < n) break;
      onFrame(buf, pos + 4, pos + 4 + n);
      pos += 4 + n;
    }
    if (pos !== buf.length) this.buf = buf.subarray(pos);
  }
}
