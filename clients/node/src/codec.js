// Protocol v1 framing: a 4-byte big-endian length, then one MessagePack map.
// Maps are encoded in key order with variable-size headers, integers in
// their smallest form, strings as str and Buffers as bin — byte for byte
// what the daemon writes (the golden-frame test checks this).

import { Packr, Unpackr } from 'msgpackr';
import { ProtocolViolation } from './errors.js';

/** The daemon's default max_frame_bytes. */
export const DEFAULT_MAX_FRAME_BYTES = 1 << 20;
/** Replies larger than this are treated as a broken stream. */
export const DEFAULT_MAX_REPLY_BYTES = 64 << 20;

const packr = new Packr({ useRecords: false, variableMapSize: true, int64AsType: 'bigint' });
// 'auto': u64 ids above 2^53 decode as BigInt, everything else as Number.
const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'auto' });

export function encodeBody(message) {
  return packr.pack(message);
}

export function encodeFrame(message) {
  const body = packr.pack(message);
  const frame = Buffer.allocUnsafe(4 + body.length);
  frame.writeUInt32BE(body.length, 0);
  body.copy(frame, 4);
  return frame;
}

/** One frame body as an object; anything but a single map is a violation. */
export function decodeBody(body) {
  let value;
  try {
    value = unpackr.unpack(body);
  } catch (e) {
    throw new ProtocolViolation(`undecodable frame: ${e.message}`);
  }
  // Only a plain object is a map (msgpackr turns the reserved byte 0xc1 into an object of its own).
  if (value === null || typeof value !== 'object' || Object.getPrototypeOf(value) !== Object.prototype) {
    throw new ProtocolViolation('a frame that is not a map with string keys');
  }
  return value;
}

/** Cuts a byte stream into frame bodies, holding at most one partial frame. */
export class FrameReader {
  constructor(maxFrameBytes = DEFAULT_MAX_REPLY_BYTES) {
    this.max = maxFrameBytes;
    this.buf = null;
  }

  /** Adds received bytes; returns the bodies of the frames now complete. */
  push(chunk) {
    let buf = this.buf ? Buffer.concat([this.buf, chunk]) : chunk;
    const bodies = [];
    let pos = 0;
    while (buf.length - pos >= 4) {
      const n = buf.readUInt32BE(pos);
      if (n > this.max) throw new ProtocolViolation(`a ${n}-byte frame (the limit is ${this.max})`);
      if (buf.length - pos - 4 < n) break;
      bodies.push(buf.subarray(pos + 4, pos + 4 + n));
      pos += 4 + n;
    }
    this.buf = pos === buf.length ? null : buf.subarray(pos);
    return bodies;
  }
}
