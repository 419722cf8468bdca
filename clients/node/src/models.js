// Results of the ops, parsed from reply maps (unknown reply fields are ignored).

import { ProtocolViolation } from './errors.js';

const ceilSeconds = (ms) => Math.ceil(ms / 1000);

function need(reply, field, type) {
  const v = reply[field];
  const ok = type === 'uint' ? Number.isInteger(v) && v >= 0 : typeof v === type;
  if (!ok) throw new ProtocolViolation(`a reply without a valid \`${field}\``);
  return v;
}

/** A field that may be absent (null), or else must have `type`. */
function optional(reply, field, type) {
  return reply[field] === undefined ? null : need(reply, field, type);
}

/** The answer to `check`: may this request go ahead? */
export class Decision {
  constructor({
    allowed, limit, remaining, resetMs, retryAfterMs, degraded, rule,
    lease = null, kind = null, windowMs = null, shadowDenied = false, shadowRule = null,
  }) {
    this.allowed = allowed;
    /** The deciding rule's limit. */
    this.limit = limit;
    /** Units the deciding rule has left (if denied: units available now). */
    this.remaining = remaining;
    /** ms until the deciding rule is back to its full limit. */
    this.resetMs = resetMs;
    /** 0 when allowed; when denied, ms after which the same request will pass. */
    this.retryAfterMs = retryAfterMs;
    /** Decided by a failure mode (the daemon's, or this client's when the daemon is away). */
    this.degraded = degraded;
    /** The deciding rule ('' when the client answered by itself). */
    this.rule = rule;
    /**
     * The lease this check took (an allowed check of a policy with a
     * `concurrency` rule, cost >= 1), or null; give it back with `release`.
     */
    this.lease = lease;
    /** The deciding rule's kind, when the daemon says (null otherwise). */
    this.kind = kind;
    /** The deciding rule's quota window in ms, when the daemon says (null otherwise). */
    this.windowMs = windowMs;
    /** A shadow rule would have denied this allowed check. */
    this.shadowDenied = shadowDenied;
    /** That shadow rule, or null. */
    this.shadowRule = shadowRule;
  }

  /** Seconds to wait before retrying (0 when allowed). */
  get retryAfter() {
    return this.retryAfterMs / 1000;
  }

  /**
   * The standard rate-limit headers: RateLimit-Limit, -Remaining, -Reset
   * (seconds, rounded up) and, on a denial, Retry-After (seconds, rounded
   * up). When the client answered by itself (daemon unavailable), no limit
   * is known: only Retry-After, on a denial.
   */
  headers() {
    if (this.degraded && !this.rule) {
      return this.allowed ? {} : { 'Retry-After': String(ceilSeconds(this.retryAfterMs)) };
    }
    const h = {
      'RateLimit-Limit': String(this.limit),
      'RateLimit-Remaining': String(this.remaining),
      'RateLimit-Reset': String(ceilSeconds(this.resetMs)),
    };
    if (!this.allowed) h['Retry-After'] = String(ceilSeconds(this.retryAfterMs));
    return h;
  }

  static fromReply(r) {
    return new Decision({
      allowed: need(r, 'allowed', 'boolean'),
      limit: need(r, 'limit', 'uint'),
      remaining: need(r, 'remaining', 'uint'),
      resetMs: need(r, 'reset_ms', 'uint'),
      retryAfterMs: need(r, 'retry_after_ms', 'uint'),
      degraded: need(r, 'degraded', 'boolean'),
      rule: need(r, 'rule', 'string'),
      lease: optional(r, 'lease', 'string'),
      kind: optional(r, 'kind', 'string'),
      windowMs: optional(r, 'window_ms', 'uint'),
      shadowDenied: r.shadow_denied === true,
      shadowRule: optional(r, 'shadow_rule', 'string'),
    });
  }
}

/** The answer to a cache read. */
export class Lookup {
  constructor({ hit, value = null, ttlMs = 0, stale = false, refresh = false, fill = false, degraded = false }) {
    this.hit = hit;
    /** The entry's bytes (hits only). */
    this.value = value;
    this.ttlMs = ttlMs;
    this.stale = stale;
    /** Stale hits only: this caller should recompute and cacheSet the value. */
    this.refresh = refresh;
    /** Misses only: this caller should compute and cacheSet the value. */
    this.fill = fill;
    this.degraded = degraded;
  }

  /** True when this caller is the one to (re)compute and store the value. */
  get shouldStore() {
    return this.fill || this.refresh || (!this.hit && !this.degraded);
  }

  static fromReply(r) {
    const degraded = r.degraded === true;
    if (need(r, 'hit', 'boolean')) {
      if (!Buffer.isBuffer(r.value)) throw new ProtocolViolation('a cache hit without a valid `value`');
      return new Lookup({
        hit: true, value: r.value, ttlMs: r.ttl_ms ?? 0, stale: r.stale === true, refresh: r.refresh === true, degraded,
      });
    }
    return new Lookup({ hit: false, fill: r.fill === true, degraded });
  }
}

/** A miss reported when the daemon could not be asked. */
export const UNAVAILABLE_MISS = Object.freeze(new Lookup({ hit: false, degraded: true }));

export function parseCheckGet(r) {
  const decision = Decision.fromReply(r);
  const lookup = decision.allowed && 'hit' in r ? Lookup.fromReply(r) : null;
  return { decision, lookup };
}

export function parseHello(r) {
  const ops = r.ops;
  if (!Array.isArray(ops)) throw new ProtocolViolation('a hello reply without `ops`');
  return { protocol: need(r, 'protocol', 'uint'), server: need(r, 'server', 'string'), backend: need(r, 'backend', 'string'), ops };
}

export function parseStats(r) {
  if (typeof r.counters !== 'object' || r.counters === null) throw new ProtocolViolation('a stats reply without `counters`');
  return { uptimeMs: need(r, 'uptime_ms', 'uint'), backend: need(r, 'backend', 'string'), shards: need(r, 'shards', 'uint'), counters: r.counters };
}
