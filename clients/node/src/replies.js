// The replies of the hot ops read straight from the frame's bytes: only the
// fields a result needs, no general object first. Anything unusual (an error
// reply, a missing or mistyped field, a value type these replies never
// carry, non-ASCII rule or kind names) makes `readReply` return false, and the
// caller decodes the frame in full instead (codec.js + models.js), which
// gives the same result or the right error.

import { readU32 } from './bytes.js';
import { Decision, Lookup } from './models.js';

// The check reply's fields added within protocol v1 (`kind`, `window_ms`,
// `lease`, `shadow_denied`, `shadow_rule`) are read here too: a reply that
// carries them stays on this path.
const KEYS = [
  'id', 'ok', 'allowed', 'limit', 'remaining', 'reset_ms', 'retry_after_ms', 'degraded', 'rule', 'hit', 'value', 'ttl_ms',
  'stale', 'refresh', 'fill', 'kind', 'window_ms', 'lease', 'shadow_denied', 'shadow_rule',
];
const [
  ID, OK, ALLOWED, LIMIT, REMAINING, RESET_MS, RETRY_AFTER_MS, DEGRADED, RULE, HIT, VALUE, TTL_MS, STALE, REFRESH, FILL,
  KIND, WINDOW_MS, LEASE, SHADOW_DENIED, SHADOW_RULE,
] = KEYS.map((_, i) => i);
const UINT_FIELDS = (1 << ID) | (1 << LIMIT) | (1 << REMAINING) | (1 << RESET_MS) | (1 << RETRY_AFTER_MS) | (1 << TTL_MS) | (1 << WINDOW_MS);
const BOOL_FIELDS = (1 << OK) | (1 << ALLOWED) | (1 << DEGRADED) | (1 << HIT) | (1 << STALE) | (1 << REFRESH) | (1 << FILL) | (1 << SHADOW_DENIED);
// The string fields, each read (ASCII only) into `r.strs[field]` (`rule`,
// `kind`, `shadow_rule` are names, and repeat: see `ruleAt`).
const STR_FIELDS = (1 << RULE) | (1 << KIND) | (1 << LEASE) | (1 << SHADOW_RULE);
const DECISION_FIELDS = (1 << ALLOWED) | (1 << LIMIT) | (1 << REMAINING) | (1 << RESET_MS) | (1 << RETRY_AFTER_MS) | (1 << DEGRADED) | (1 << RULE);
const UNKNOWN = -1;

// A key is found by (length, first byte ^ last byte) in a table, then
// compared in full.
const KEY_BYTES = KEYS.map((k) => Buffer.from(k));
const slot = (len, first, last) => (len << 8) | (first ^ last);
const KEY_TABLE = new Int8Array(32 * 256).fill(UNKNOWN);
KEY_BYTES.forEach((b, i) => {
  const at = slot(b.length, b[0], b[b.length - 1]);
  if (KEY_TABLE[at] !== UNKNOWN) throw new Error(`keys ${KEYS[i]} and ${KEYS[KEY_TABLE[at]]} collide`);
  KEY_TABLE[at] = i;
});

function keyAt(buf, pos, len) {
  if (len === 0 || len > 31) return UNKNOWN;
  const i = KEY_TABLE[slot(len, buf[pos], buf[pos + len - 1])];
  if (i === UNKNOWN) return UNKNOWN;
  const k = KEY_BYTES[i];
  for (let j = 1; j < len; j++) if (buf[pos + j] !== k[j]) return UNKNOWN;
  return i;
}

/** The fields of one reply; a single instance is reused for every frame. */
export class ReplyFields {
  constructor() {
    this.seen = 0; // bit per field present (with the expected type)
    this.ints = new Array(KEYS.length).fill(0);
    this.bools = new Array(KEYS.length).fill(false);
    this.strs = new Array(KEYS.length).fill('');
    this.valueStart = 0;
    this.valueEnd = 0;
  }

  has(field) {
    return (this.seen & (1 << field)) !== 0;
  }
}

// Rule names and kinds repeat: the last few are kept with their bytes.
const RULES = [];
const RULES_KEPT = 16;

function ruleAt(buf, pos, len) {
  for (let i = 0; i < RULES.length; i++) {
    const r = RULES[i];
    if (r.bytes.length !== len) continue;
    let j = 0;
    while (j < len && buf[pos + j] === r.bytes[j]) j++;
    if (j === len) return r.text;
  }
  for (let j = 0; j < len; j++) if (buf[pos + j] >= 0x80) return null;
  const text = buf.latin1Slice(pos, pos + len);
  if (RULES.length >= RULES_KEPT) RULES.shift();
  RULES.push({ bytes: Buffer.from(buf.subarray(pos, pos + len)), text });
  return text;
}

/** An ASCII str's text, or null (left to the general decoder). */
function asciiAt(buf, pos, len) {
  for (let j = 0; j < len; j++) if (buf[pos + j] >= 0x80) return null;
  return buf.latin1Slice(pos, pos + len);
}

/**
 * Reads the map body in buf[pos, end) into `r`; false when it is anything
 * but a map of known value types (bool, uint up to 2^53 - 1, ASCII str, bin).
 */
export function readReply(buf, pos, end, r) {
  r.seen = 0;
  let n;
  const head = buf[pos];
  if ((head & 0xf0) === 0x80) {
    n = head & 0x0f;
    pos += 1;
  } else if (head === 0xde && end - pos >= 3) {
    n = (buf[pos + 1] << 8) | buf[pos + 2];
    pos += 3;
  } else {
    return false;
  }
  for (let i = 0; i < n; i++) {
    if (pos >= end) return false;
    const kh = buf[pos];
    if ((kh & 0xe0) !== 0xa0) return false; // keys are short strs
    const klen = kh & 0x1f;
    const field = keyAt(buf, pos + 1, klen);
    pos += 1 + klen;
    if (pos >= end) return false;
    const vh = buf[pos];
    const bit = field === UNKNOWN ? 0 : 1 << field;
    if (vh === 0xc2 || vh === 0xc3) {
      if (bit & ~BOOL_FIELDS) return false;
      if (bit) r.bools[field] = vh === 0xc3;
      pos += 1;
    } else if (vh < 0x80 || (vh >= 0xcc && vh <= 0xcf)) {
      if (bit & ~UINT_FIELDS) return false;
      let v;
      if (vh < 0x80) {
        v = vh;
        pos += 1;
      } else if (vh === 0xcc) {
        if (end - pos < 2) return false;
        v = buf[pos + 1];
        pos += 2;
      } else if (vh === 0xcd) {
        if (end - pos < 3) return false;
        v = (buf[pos + 1] << 8) | buf[pos + 2];
        pos += 3;
      } else if (vh === 0xce) {
        if (end - pos < 5) return false;
        v = readU32(buf, pos + 1);
        pos += 5;
      } else {
        if (end - pos < 9) return false;
        const hi = readU32(buf, pos + 1);
        if (hi > 0x1fffff) return false; // beyond 2^53 - 1: a BigInt, left to the general decoder
        v = hi * 0x100000000 + readU32(buf, pos + 5);
        pos += 9;
      }
      if (bit) r.ints[field] = v;
    } else if ((vh & 0xe0) === 0xa0 || vh === 0xd9 || vh === 0xc4) {
      // fixstr, str8, bin8: the only other types these replies carry (names, a lease, a cached value)
      const isBin = vh === 0xc4;
      if (bit & ~(isBin ? 1 << VALUE : STR_FIELDS)) return false;
      let len;
      if ((vh & 0xe0) === 0xa0) {
        len = vh & 0x1f;
        pos += 1;
      } else {
        if (end - pos < 2) return false;
        len = buf[pos + 1];
        pos += 2;
      }
      if (pos + len > end) return false;
      if (field === LEASE) {
        // Unique to its reply: not kept with the names.
        const lease = asciiAt(buf, pos, len);
        if (lease === null) return false;
        r.strs[LEASE] = lease;
      } else if (field === VALUE) {
        r.valueStart = pos;
        r.valueEnd = pos + len;
      } else if (bit) {
        const str = ruleAt(buf, pos, len);
        if (str === null) return false;
        r.strs[field] = str;
      }
      pos += len;
    } else if (vh === 0xc5 || vh === 0xc6) {
      if (bit & ~(1 << VALUE)) return false;
      const long = vh === 0xc6;
      if (end - pos < (long ? 5 : 3)) return false;
      const len = long ? readU32(buf, pos + 1) : (buf[pos + 1] << 8) | buf[pos + 2];
      pos += long ? 5 : 3;
      if (pos + len > end) return false;
      r.valueStart = pos;
      r.valueEnd = pos + len;
      pos += len;
    } else {
      return false;
    }
    r.seen |= bit;
  }
  return pos === end;
}

/** The id of a reply map whose first field is `id` (as the daemon writes), or -1. */
export function replyId(buf, pos, end) {
  // A fixmap, or a map16 (a check_get hit, with 16 fields and more).
  if (buf[pos] === 0xde) pos += 2;
  else if ((buf[pos] & 0xf0) !== 0x80) return -1;
  if (end - pos < 13) return -1;
  if (buf[pos + 1] !== 0xa2 || buf[pos + 2] !== 0x69 || buf[pos + 3] !== 0x64) return -1;
  const vh = buf[pos + 4];
  if (vh < 0x80) return vh;
  if (vh === 0xcc) return buf[pos + 5];
  if (vh === 0xcd) return (buf[pos + 5] << 8) | buf[pos + 6];
  if (vh === 0xce) return readU32(buf, pos + 5);
  if (vh === 0xcf) {
    const hi = readU32(buf, pos + 5);
    return hi > 0x1fffff ? -1 : hi * 0x100000000 + readU32(buf, pos + 9);
  }
  return -1;
}

/** A successful check reply's Decision, or null (decode in full). */
export function decisionOf(r) {
  if (!r.has(OK) || !r.bools[OK] || (r.seen & DECISION_FIELDS) !== DECISION_FIELDS) return null;
  return new Decision({
    allowed: r.bools[ALLOWED],
    limit: r.ints[LIMIT],
    remaining: r.ints[REMAINING],
    resetMs: r.ints[RESET_MS],
    retryAfterMs: r.ints[RETRY_AFTER_MS],
    degraded: r.bools[DEGRADED],
    rule: r.strs[RULE],
    kind: r.has(KIND) ? r.strs[KIND] : '',
    windowMs: r.has(WINDOW_MS) ? r.ints[WINDOW_MS] : 0,
    lease: r.has(LEASE) ? r.strs[LEASE] : null,
    shadowRule: r.has(SHADOW_RULE) ? r.strs[SHADOW_RULE] : null,
  });
}

/** A successful cache read's Lookup (from the reply's fields in `buf`), or null. */
export function lookupOf(r, buf) {
  if (!r.has(OK) || !r.bools[OK] || !r.has(HIT)) return null;
  const degraded = r.has(DEGRADED) && r.bools[DEGRADED];
  if (!r.bools[HIT]) return new Lookup({ hit: false, fill: r.has(FILL) && r.bools[FILL], degraded });
  if (!r.has(VALUE)) return null;
  return new Lookup({
    hit: true,
    value: buf.subarray(r.valueStart, r.valueEnd),
    ttlMs: r.has(TTL_MS) ? r.ints[TTL_MS] : 0,
    stale: r.has(STALE) && r.bools[STALE],
    refresh: r.has(REFRESH) && r.bools[REFRESH],
    degraded,
  });
}

/** A successful check_get reply's { decision, lookup }, or null. */
export function checkGetOf(r, buf) {
  const decision = decisionOf(r);
  if (decision === null) return null;
  if (!decision.allowed || !r.has(HIT)) return { decision, lookup: null };
  const lookup = lookupOf(r, buf);
  return lookup === null ? null : { decision, lookup };
}
