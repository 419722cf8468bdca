// RateLimit response headers, per draft-ietf-httpapi-ratelimit-headers-11.
//
// RateLimit-Policy and RateLimit are Structured Fields (RFC 8941): Lists of
// Items, each a String naming a policy with Parameters. For a check, the
// item is the deciding rule:
//
// - RateLimit-Policy: "<rule>";q=<limit>;w=<window, s> (a concurrency rule:
//   ;qu="concurrent-requests" and no w; no w either when the daemon did not
//   say the window, i.e. an older quotad);
// - RateLimit: "<rule>";r=<remaining>;t=<s>, where t is the seconds until
//   the rule is full again, except on a denial: then the seconds until the
//   request would pass (Retry-After), which the draft (§6) asks Retry-After
//   not to precede.
//
// Seconds are rounded up. Retry-After comes with every denial; the older
// RateLimit-Limit/-Remaining/-Reset trio only when asked for ({ legacy:
// true }). clients/ratelimit-headers.json holds the vectors that this module
// and the Python client's both pass.

const MAX_INTEGER = 999_999_999_999_999;

/** A Structured Field String: printable ASCII, with `"` and `\` escaped. */
export function sfString(s) {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c > 0x7e) throw new RangeError(`a Structured Field String holds printable ASCII only, not ${JSON.stringify(s[i])}`);
  }
  return `"${s.replace(/[\\"]/g, (ch) => `\\${ch}`)}"`;
}

function bare(v) {
  if (typeof v === 'boolean') return v ? '?1' : '?0';
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || Math.abs(v) > MAX_INTEGER) throw new RangeError(`${v} is not a Structured Field Integer`);
    return String(v);
  }
  if (typeof v === 'string') return sfString(v);
  if (v instanceof Uint8Array) return `:${Buffer.from(v).toString('base64')}:`;
  throw new TypeError('a parameter is an integer, a string or bytes');
}

/** One Item: a String with its Parameters (`[[key, value], ...]`, in order). */
export function sfItem(value, params) {
  let out = sfString(value);
  for (const [k, v] of params) out += `;${k}=${bare(v)}`;
  return out;
}

/** A List of Items (`[[value, params], ...]`). */
export function sfList(items) {
  return items.map(([value, params]) => sfItem(value, params)).join(', ');
}

const seconds = (ms) => Math.ceil(ms / 1000);

/**
 * The headers of a response to a request that `decision` decided. When the
 * client answered by itself (daemon unavailable: degraded, no rule), no
 * limit is known: only Retry-After, on a denial.
 */
export function ratelimitHeaders(d, { legacy = false } = {}) {
  const denied = !d.allowed;
  if (d.degraded && !d.rule) return denied ? { 'Retry-After': String(seconds(d.retryAfterMs)) } : {};
  const policy = [['q', d.limit]];
  if (d.kind === 'concurrency') policy.push(['qu', 'concurrent-requests']);
  else if (d.windowMs > 0) policy.push(['w', seconds(d.windowMs)]);
  const t = seconds(denied ? d.retryAfterMs : d.resetMs);
  const h = {
    'RateLimit-Policy': sfItem(d.rule, policy),
    RateLimit: sfItem(d.rule, [['r', d.remaining], ['t', t]]),
  };
  if (denied) h['Retry-After'] = String(t);
  if (legacy) {
    h['RateLimit-Limit'] = String(d.limit);
    h['RateLimit-Remaining'] = String(d.remaining);
    h['RateLimit-Reset'] = String(seconds(d.resetMs));
  }
  return h;
}

/**
 * Every header name ratelimitHeaders may send, lower case: never stored with
 * a cached response, never replayed from one (the draft's §7.3).
 */
export const NAMES = Object.freeze(['ratelimit-policy', 'ratelimit', 'retry-after', 'ratelimit-limit', 'ratelimit-remaining', 'ratelimit-reset']);
