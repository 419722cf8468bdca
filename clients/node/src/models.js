// Results of the ops, parsed from reply maps (unknown reply fields are ignored).

import { ProtocolViolation } from './errors.js';
import { ratelimitHeaders } from './ratelimit-headers.js';

function need(reply, field, type) {
  const v = reply[field];
  const ok = type === 'uint' ? Number.isInteger(v) && v >= 0 : typeof v === type;
  if (!ok) throw new ProtocolViolation(`a reply without a valid \`${field}\``);
  return v;
}

/** The answer to `check`: may this request go ahead? */
export class Decision {
  constructor({
    allowed, limit, remaining, resetMs, retryAfterMs, degraded, rule,
    kind = '', windowMs = 0, lease = null, shadowRule = null,
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
    /** The deciding rule's kind (token_bucket, fixed_window, sliding_window, daily_quota, concurrency, ...; '' when unknown). */
    this.kind = kind;
    /** The deciding rule's quota window in ms (the IETF `w`; 0 when none, as for a concurrency rule). */
    this.windowMs = windowMs;
    /**
     * The lease this check took (an allowed check of a policy with a
     * `concurrency` rule, cost >= 1), or null; give it back with `release`.
     */
    this.lease = lease;
    /** Allowed, but this shadow rule would have denied (null: no shadow denial). */
    this.shadowRule = shadowRule;
  }

  /** True when a shadow rule would have denied this allowed request. */
  get shadowDenied() {
    return this.shadowRule !== null;
  }

  /** Seconds to wait before retrying (0 when allowed). */
  get retryAfter() {
    return this.retryAfterMs / 1000;
  }

  /**
   * The rate-limit response headers: RateLimit-Policy and RateLimit
   * (draft-ietf-httpapi-ratelimit-headers-11), Retry-After on a denial, and
   * with `legacy` the older RateLimit-Limit/-Remaining/-Reset trio; seconds
   * rounded up. See ratelimit-headers.js.
   */
  headers({ legacy = false } = {}) {
    return ratelimitHeaders(this, { legacy });
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
      // Newer fields: an older quotad does not send them.
      kind: r.kind === undefined ? '' : need(r, 'kind', 'string'),
      windowMs: r.window_ms === undefined ? 0 : need(r, 'window_ms', 'uint'),
      lease: r.lease === undefined ? null : need(r, 'lease', 'string'),
      shadowRule: r.shadow_rule === undefined ? null : need(r, 'shadow_rule', 'string'),
    });
  }
}

/** One rule of a `usage` answer: how much of it is used for the key. */
export class RuleUsage {
  constructor({ rule, kind, limit, used, remaining, resetMs, windowMs }) {
    this.rule = rule;
    this.kind = kind;
    this.limit = limit;
    /** limit - remaining: units taken and not yet back. */
    this.used = used;
    /** Units one check could take now. */
    this.remaining = remaining;
    /** ms until the rule is full again (a fixed window: until it ends; a daily quota: until the next 00:00 UTC). */
    this.resetMs = resetMs;
    /** The rule's quota window in ms (0: none). */
    this.windowMs = windowMs;
  }
}

/** The rules of a `usage` reply, in the policy's order. */
export function parseUsage(r) {
  if (!Array.isArray(r.rules)) throw new ProtocolViolation('a usage reply without `rules`');
  return r.rules.map((u) => {
    if (typeof u !== 'object' || u === null) throw new ProtocolViolation('a usage reply with a rule that is not a map');
    return new RuleUsage({
      rule: need(u, 'rule', 'string'),
      kind: need(u, 'kind', 'string'),
      limit: need(u, 'limit', 'uint'),
      used: need(u, 'used', 'uint'),
      remaining: need(u, 'remaining', 'uint'),
      resetMs: need(u, 'reset_ms', 'uint'),
      windowMs: u.window_ms === undefined ? 0 : need(u, 'window_ms', 'uint'),
    });
  });
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
  // shadowDenials: checks a shadow rule would have denied, by `<policy>.<rule>` (an older quotad has none).
  const shadowDenials = typeof r.shadow_denials === 'object' && r.shadow_denials !== null ? r.shadow_denials : {};
  return { uptimeMs: need(r, 'uptime_ms', 'uint'), backend: need(r, 'backend', 'string'), shards: need(r, 'shards', 'uint'), counters: r.counters, shadowDenials };
}
