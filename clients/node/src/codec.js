// Protocol v1 framing: a 4-byte big-endian length, then one MessagePack map.
// Maps are encoded in key order with variable-size headers, integers in
// their smallest form, strings as str and Buffers as bin — byte for byte
// what the daemon writes (the golden-frame test checks this).

import { Decoder, Encoder } from '@msgpack/msgpack';
import { readU32 } from './bytes.js';
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

/**
 * Cuts a byte stream into frame bodies. A frame cut across chunks is
 * gathered in one buffer of its full size, allocated once its length is
 * known (so a large reply read in many chunks is copied once, not once per
 * chunk); nothing else is kept, so the caller may reuse a chunk once `feed`
 * returns.
 */
export class FrameReader {
  constructor(maxFrameBytes = DEFAULT_MAX_REPLY_BYTES) {
    this.max = maxFrameBytes;
    this.head = Buffer.alloc(4); // the length of a frame cut within its first 4 bytes
    this.frame = null; // the frame being gathered, length prefix included
    this.have = 0; // bytes of it gathered so far
  }

  /** Adds received bytes; returns the bodies of the frames now complete (views of `chunk` where possible). */
  push(chunk) {
    const bodies = [];
    this.feed(chunk, (buf, start, end) => bodies.push(buf.subarray(start, end)));
    return bodies;
  }

  /**
   * Adds chunk[0, end); calls `onFrame(buf, start, end)` for each frame body
   * now complete, in order. `buf` is `chunk` itself or a buffer of the
   * reader's that it never writes again.
   */
  feed(chunk, onFrame, end = chunk.length) {
    let pos = 0;
    if (this.have > 0) {
      pos = this.#gather(chunk, 0, end);
      const frame = this.frame;
      if (frame === null || this.have < frame.length) return;
      this.frame = null;
      this.have = 0;
      onFrame(frame, 4, frame.length);
    }
    while (end - pos >= 4) {
      const n = this.#length(readU32(chunk, pos));
      if (end - pos - 4 < n) break;
      onFrame(chunk, pos + 4, pos + 4 + n);
      pos += 4 + n;
    }
    if (pos < end) this.#gather(chunk, pos, end);
  }

  #length(n) {
    if (n > this.max) throw new ProtocolViolation(`a ${n}-byte frame (the limit is ${this.max})`);
    return n;
  }

  /** Copies chunk[pos, end) into the frame being gathered, up to its end; returns the new pos. */
  #gather(chunk, pos, end) {
    if (this.frame === null) {
      while (this.have < 4 && pos < end) this.head[this.have++] = chunk[pos++];
      if (this.have < 4) return pos;
      this.frame = Buffer.allocUnsafe(4 + this.#length(this.head.readUInt32BE(0)));
      this.head.copy(this.frame);
    }
    const n = Math.min(this.frame.length - this.have, end - pos);
    chunk.copy(this.frame, this.have, pos, pos + n);
    this.have += n;
    return pos + n;
  }
}
