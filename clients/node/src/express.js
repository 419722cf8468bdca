// Express middleware: rate limiting (429 with a JSON body and the
// RateLimit-Policy, RateLimit and Retry-After headers; RateLimit-Policy and
// RateLimit on allowed responses too; `legacyHeaders: true` adds the older
// RateLimit-Limit/-Remaining/-Reset trio: ratelimit-headers.js), and an
// optional response cache for GETs through checkGet/cacheSet. A response
// served from the cache gets its own request's headers, never stored ones.
// Under a policy with a `concurrency` rule, the lease an allowed check took
// is released when the response is over: on 'finish' (sent, streamed or
// not, after an error handler too) or 'close' (the client went away), once.
//
//   app.use(quotad({ client, tenant: header('x-tenant'), key: first(apiKey(), clientIp()), policy: 'api' }));
//   app.get('/login', quotad({ client, policy: 'login' }), handler);   // per route
//   app.post('/items', async (req, res) => { ...; await invalidate(req, { paths: ['/items'] }); });

import { decode, encode } from '@msgpack/msgpack';
import * as identity from './identity.js';
import { NAMES as RATELIMIT_HEADERS } from './ratelimit-headers.js';

export * from './identity.js';

/** The tenant of requests for which the tenant extractor finds nothing. */
export const DEFAULT_TENANT = 'default';
/** The key shared by requests without one: leaving out an API key must not escape the limit. */
export const ANONYMOUS_KEY = 'anonymous';
const DEFAULT_KEY = identity.clientIp();

// Response headers never stored with a cached response, nor served from one
// (an entry may come from elsewhere): per-connection, per-request, or
// re-derived for each request, as the rate-limit headers are (the draft's
// §7.3: a cached response's RateLimit fields are stale).
const UNCACHED_HEADERS = new Set([
  'connection', 'keep-alive', 'transfer-encoding', 'date', 'set-cookie', 'x-cache', ...RATELIMIT_HEADERS,
]);

// Cache keys and tags are built from the request as sent, in one canonical
// form shared with the Python middleware (clients/README.md, "Cache keys";
// clients/cache-keys.json holds the vectors both test suites check).
const isUnreserved = (b) => (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
  || b === 0x2d || b === 0x2e || b === 0x5f || b === 0x7e;
// Also literal in a path: "/" and the sub-delimiters, ":" and "@" (RFC 3986).
const PATH_LITERAL = new Set(Buffer.from("/!$&'()*+,;=:@"));
const isHex = (b) => (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66);
const pct = (b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`;
/** The byte a valid `%XX` at raw[i] stands for, else -1. */
const escaped = (raw, i) => (raw[i] === 0x25 && i + 2 < raw.length && isHex(raw[i + 1]) && isHex(raw[i + 2])
  ? parseInt(String.fromCharCode(raw[i + 1], raw[i + 2]), 16) : -1);

/**
 * A path as sent, normalized as RFC 3986 (6.2.2) says: `%XX` of an
 * unreserved character is decoded, other `%XX` kept (hex upper-cased:
 * `/a%2Fb` stays apart from `/a/b`), and any other byte that may not appear
 * as is gets `%XX`.
 */
export function canonicalPath(path) {
  const raw = Buffer.from(path);
  let out = '';
  for (let i = 0; i < raw.length; i++) {
    const c = escaped(raw, i);
    if (c >= 0) {
      out += isUnreserved(c) ? String.fromCharCode(c) : pct(c);
      i += 2;
    } else {
      out += isUnreserved(raw[i]) || PATH_LITERAL.has(raw[i]) ? String.fromCharCode(raw[i]) : pct(raw[i]);
    }
  }
  return out;
}

/** Form decoding to bytes: `+` is a space, `%XX` a byte. */
function formBytes(text) {
  const raw = Buffer.from(text.replaceAll('+', ' '));
  const out = Buffer.allocUnsafe(raw.length);
  let n = 0;
  for (let i = 0; i < raw.length; i++) {
    const c = escaped(raw, i);
    out[n++] = c >= 0 ? c : raw[i];
    if (c >= 0) i += 2;
  }
  return out.subarray(0, n);
}

const formText = (bytes) => Array.from(bytes, (b) => (isUnreserved(b) ? String.fromCharCode(b) : pct(b))).join('');

/**
 * A query string with its `name=value` pairs decoded, sorted by name and
 * re-encoded. Pairs with the same name keep their order (it can matter to
 * the app); everything but unreserved characters is written as `%XX`.
 */
export function canonicalQuery(query) {
  const pairs = query.split('&').filter(Boolean).map((part) => {
    const eq = part.indexOf('=');
    return eq < 0 ? [formBytes(part), Buffer.alloc(0)] : [formBytes(part.slice(0, eq)), formBytes(part.slice(eq + 1))];
  });
  pairs.sort((a, b) => Buffer.compare(a[0], b[0])); // a stable sort
  return pairs.map(([name, value]) => `${formText(name)}=${formText(value)}`).join('&');
}

/** The request target's path and query, as sent. */
function target(req) {
  const url = req.originalUrl ?? req.url;
  const q = url.indexOf('?');
  return q < 0 ? [url, ''] : [url.slice(0, q), url.slice(q + 1)];
}

/** The tag `invalidate(req, { paths: [path] })` drops: `path:` and the canonical path. */
export function pathTag(path) {
  return `path:/${canonicalPath(path).replace(/^\/+|\/+$/g, '')}`;
}

/** Default tags of a cached response: `path:` plus each prefix of its path. */
export function pathTags(req) {
  const parts = canonicalPath(target(req)[0]).split('/').filter(Boolean).slice(0, 8); // daemon default: 16 tags at most
  return parts.length ? parts.map((_, i) => `path:/${parts.slice(0, i + 1).join('/')}`) : ['path:/'];
}

/** `GET /path?query` (canonical, as the Python middleware builds it), prefixed with the user when per user. */
export function cacheKeyFor(req, user) {
  const [path, q] = target(req);
  const query = canonicalQuery(q);
  const key = `${req.method} ${canonicalPath(path)}${query ? `?${query}` : ''}`;
  // Prefixed with its length in UTF-8 bytes, so that no user string can forge another user's key.
  return user === null || user === undefined ? key : `user=${Buffer.byteLength(user)}:${user} ${key}`;
}

/**
 * Drops cached responses of this request's tenant, by tag, path prefix or
 * cache key. Resolves to how many entries were deleted (0 when quotad is unavailable).
 */
export async function invalidate(req, { tags = [], paths = [], keys = [] } = {}) {
  const ctx = req.quotad;
  if (!ctx) throw new Error('the quotad middleware did not run for this request');
  const all = [...tags, ...paths.map(pathTag)];
  return ctx.client.cacheDelete(ctx.tenant, { tags: all, keys });
}

/**
 * The middleware. Options: client (required); tenant, key (extractors;
 * without them, the tenant and key an earlier quotad middleware found for
 * the request, else the default tenant and the client's IP); policy, cost
 * (values or functions of the request); cache ({ ttlMs, staleMs, fillMs,
 * tags, perUser, when, maxBodyBytes }); skip(req); legacyHeaders (also send
 * RateLimit-Limit/-Remaining/-Reset; default false).
 */
export function quotad(options) {
  const {
    client,
    tenant = null,
    key = null,
    policy = null,
    cost = 1,
    cache = null,
    skip = () => false,
    legacyHeaders = false,
  } = options ?? {};
  if (!client) throw new TypeError('quotad middleware: `client` is required');
  const cacheRule = cache ? {
    ttlMs: 30_000, staleMs: undefined, fillMs: 2_000, tags: pathTags, perUser: true, when: () => true, maxBodyBytes: 256 << 10, ...cache,
  } : null;

  return async function quotadMiddleware(req, res, next) {
    try {
      if (skip(req)) return next();
      const parent = req.quotad;
      // A per-route limit counts against the identity the app-wide middleware found.
      const t = (tenant ? await identity.resolve(tenant, req) : parent?.tenant) ?? DEFAULT_TENANT;
      const k = (key ? await identity.resolve(key, req) : parent?.key ?? await identity.resolve(DEFAULT_KEY, req)) ?? ANONYMOUS_KEY;
      const opts = { policy: typeof policy === 'function' ? policy(req) : policy, cost: typeof cost === 'function' ? cost(req) : cost };
      const ctx = { client, tenant: t, key: k, decision: null, lookup: null };
      req.quotad = parent ?? ctx; // the app-wide context stays the one invalidate() uses

      let cacheKey = null;
      if (cacheRule && req.method === 'GET' && cacheRule.when(req)) {
        cacheKey = cacheKeyFor(req, cacheRule.perUser ? k : null);
        const r = await client.checkGet(t, k, cacheKey, { ...opts, fillMs: cacheRule.fillMs });
        ctx.decision = r.decision;
        ctx.lookup = r.lookup;
      } else {
        ctx.decision = await client.check(t, k, opts);
      }
      const decision = ctx.decision;
      // A stricter limit (a per-route middleware after an app-wide one) gets the last word on headers.
      for (const name of RATELIMIT_HEADERS) res.removeHeader(name);
      for (const [name, value] of Object.entries(decision.headers({ legacy: legacyHeaders }))) res.setHeader(name, value);
      if (!decision.allowed) {
        res.status(429).json({ error: 'rate_limited', message: 'Too many requests; retry later.', retry_after: decision.retryAfter, limit: decision.limit, rule: decision.rule });
        return;
      }
      if (decision.lease !== null) releaseWhenOver(res, client, t, k, opts.policy, decision.lease);
      const lookup = ctx.lookup;
      if (cacheKey === null || lookup === null || lookup.degraded) {
        if (cacheKey !== null) res.setHeader('x-cache', 'miss');
        return next();
      }
      await serveOrFill(client, t, cacheKey, lookup, {
        serve: (hit) => sendCached(res, hit),
        compute: () => new Promise((resolve) => {
          res.setHeader('x-cache', 'miss');
          record(res, cacheRule.maxBodyBytes, resolve);
          next();
        }),
        ttlMs: cacheRule.ttlMs,
        staleMs: cacheRule.staleMs,
        tags: () => (typeof cacheRule.tags === 'function' ? cacheRule.tags(req) : cacheRule.tags),
      });
    } catch (e) {
      next(e); // a bad value (e.g. an empty tenant from a custom extractor) is the app's error
    }
  };
}

/**
 * Releases `lease` once the response is over: 'finish' (all of it handed to
 * the OS) or 'close' (the connection went first), whichever comes first,
 * and only then. Its failures are the daemon's to expire (`lease_ms`),
 * never this request's error.
 */
function releaseWhenOver(res, client, tenant, key, policy, lease) {
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    res.off('finish', release);
    res.off('close', release);
    client.release(tenant, key, lease, { policy }).catch(() => {});
  };
  res.once('finish', release);
  res.once('close', release);
}

/**
 * Serves a cache hit, or computes the answer and stores it. `serve(lookup)`
 * answers from a hit, false if the entry is not usable (it is then
 * recomputed and overwritten). `compute()` answers by itself and resolves to
 * the bytes to store, or null when this answer must not be stored. A caller
 * told to fill the entry (`lookup.fill`) that stores nothing, or fails,
 * releases its fill lock instead (`cacheDelete` with `fillOnly`): the callers
 * quotad holds for this value are let go now, not when the lock lapses
 * (fillMs), and a value someone else stored meanwhile stays.
 */
export async function serveOrFill(client, tenant, key, lookup, { serve, compute, ttlMs, staleMs, tags }) {
  if (lookup.hit && !lookup.refresh && (await serve(lookup))) return;
  let value = null;
  try {
    value = await compute();
  } finally {
    try {
      if (value !== null && !lookup.degraded) await client.cacheSet(tenant, key, value, { ttlMs, staleMs, tags: tags() });
      else if (lookup.fill) await client.cacheDelete(tenant, { keys: [key], fillOnly: true });
    } catch {
      // The answer is out already: a failed store is a later miss, never this request's error.
    }
  }
}

// A cached response is the MessagePack map {s: status, h: [[name, value], ...], b: body}
// (names and values str, body bin), the same as the Python middleware's.
const text = (v) => (typeof v === 'string' ? v : v instanceof Uint8Array ? Buffer.from(v).toString('latin1') : null);

function sendCached(res, lookup) {
  let entry;
  let headers;
  try {
    entry = decode(lookup.value);
    if (!Number.isInteger(entry?.s) || !Array.isArray(entry.h) || !(entry.b instanceof Uint8Array)) return false;
    headers = entry.h.map(([name, value]) => [text(name), text(value)]);
    if (headers.some(([n, v]) => n === null || v === null || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(n))) return false;
  } catch {
    return false; // written by something else: a miss
  }
  res.status(entry.s);
  // Whatever wrote the entry, its rate-limit headers are not this request's (set already).
  for (const [name, value] of headers) if (!UNCACHED_HEADERS.has(name.toLowerCase())) res.setHeader(name, value);
  res.setHeader('x-cache', lookup.stale ? 'stale' : 'hit');
  res.end(entry.b);
  return true;
}

/**
 * Passes the response through while keeping a copy; once it is over,
 * `done(entry)` with the entry to store, or null if it is not cacheable
 * (or the connection closed before the response ended).
 */
function record(res, maxBody, done) {
  const chunks = [];
  let size = 0;
  let ok = true;
  let over = false;
  const finish = (entry) => {
    if (!over) {
      over = true;
      done(entry);
    }
  };
  res.once('close', () => finish(null));
  const { write, end } = res;
  const keep = (chunk, encoding) => {
    if (!ok || chunk === undefined || chunk === null || typeof chunk === 'function') return;
    const b = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk, typeof encoding === 'string' ? encoding : 'utf8');
    size += b.length;
    if (size > maxBody) { ok = false; chunks.length = 0; } else chunks.push(b);
  };
  res.write = function (chunk, encoding, cb) {
    keep(chunk, encoding);
    return write.call(this, chunk, encoding, cb);
  };
  res.end = function (chunk, encoding, cb) {
    keep(chunk, encoding);
    const result = end.call(this, chunk, encoding, cb);
    if (!ok || over || !storable(res)) {
      finish(null);
    } else {
      const headers = Object.entries(res.getHeaders())
        .filter(([name]) => !UNCACHED_HEADERS.has(name))
        .map(([name, value]) => [name, Array.isArray(value) ? value.join(', ') : String(value)]);
      finish(encode({ s: res.statusCode, h: headers, b: Buffer.concat(chunks) }));
    }
    return result;
  };
}

function storable(res) {
  if (res.statusCode !== 200 || res.getHeader('set-cookie') !== undefined) return false;
  const cc = String(res.getHeader('cache-control') ?? '').toLowerCase();
  return !cc.includes('no-store') && !cc.includes('private');
}

export default quotad;
