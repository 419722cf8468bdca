// Builds request maps, refusing bad values before anything is sent. Each
// map has a placeholder `id` first (the client fills it in), then the
// fields in the daemon's order; optional fields are left out, not nil.

import { InvalidArgument } from './errors.js';

const U64_MAX = (1n << 64n) - 1n;

export function text(name, value) {
  if (typeof value !== 'string') throw new InvalidArgument(`${name} must be a string, not ${describe(value)}`);
  if (value.length === 0) throw new InvalidArgument(`${name} must not be empty`);
  if (!value.isWellFormed()) throw new InvalidArgument(`${name} is not valid UTF-16 text (a lone surrogate)`);
  return value;
}

function uint(name, value, min = 0) {
  if (typeof value === 'bigint') {
    if (value < BigInt(min) || value > U64_MAX) throw new InvalidArgument(`${name} must be between ${min} and 2^64-1, not ${value}`);
    return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
  }
  if (!Number.isSafeInteger(value)) throw new InvalidArgument(`${name} must be an integer, not ${describe(value)}`);
  if (value < min) throw new InvalidArgument(`${name} must be at least ${min}, not ${value}`);
  return value;
}

function texts(name, values) {
  if (values === undefined || values === null) return [];
  // A bare string would be sent as one tag per character elsewhere; refuse it.
  if (!Array.isArray(values)) throw new InvalidArgument(`${name} must be an array of strings, not ${describe(values)}`);
  return values.map((v, i) => text(`${name}[${i}]`, v));
}

function bytes(name, value) {
  if (Buffer.isBuffer(value)) return value;
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  const hint = typeof value === 'string' ? ' (encode it first, e.g. Buffer.from(text))' : '';
  throw new InvalidArgument(`${name} must be a Buffer or Uint8Array, not ${describe(value)}${hint}`);
}

function describe(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'number' && !Number.isInteger(v)) return `the non-integer ${v}`;
  return typeof v === 'object' ? v.constructor?.name ?? 'an object' : typeof v === 'number' || typeof v === 'bigint' ? String(v) : `a ${typeof v}`;
}

/** A check's cost (default 1). */
export const costValue = (value) => uint('cost', value ?? 1);

/** A cache read's fill_ms; 0 (no single-flight) when not given. */
export const fillMsValue = (value) => (value === undefined || value === null ? 0 : uint('fillMs', value));

function checkFields(req, tenant, key, opts) {
  req.tenant = text('tenant', tenant);
  req.key = text('key', key);
  if (opts.policy !== undefined && opts.policy !== null) req.policy = text('policy', opts.policy);
  req.cost = costValue(opts.cost);
}

function fillMs(req, value) {
  const v = fillMsValue(value);
  if (v) req.fill_ms = v;
}

export const hello = () => ({ id: 0, op: 'hello' });
export const stats = () => ({ id: 0, op: 'stats' });

export function check(tenant, key, opts = {}) {
  const req = { id: 0, op: 'check' };
  checkFields(req, tenant, key, opts);
  return req;
}

export function usage(tenant, key, opts = {}) {
  const req = { id: 0, op: 'usage', tenant: text('tenant', tenant), key: text('key', key) };
  if (opts.policy !== undefined && opts.policy !== null) req.policy = text('policy', opts.policy);
  return req;
}

export function cacheGet(tenant, key, opts = {}) {
  const req = { id: 0, op: 'cache_get', tenant: text('tenant', tenant), key: text('key', key) };
  fillMs(req, opts.fillMs);
  return req;
}

export function cacheSet(tenant, key, value, opts = {}) {
  const req = {
    id: 0,
    op: 'cache_set',
    tenant: text('tenant', tenant),
    key: text('key', key),
    value: bytes('value', value),
    ttl_ms: uint('ttlMs', opts.ttlMs, 1),
  };
  if (opts.staleMs !== undefined && opts.staleMs !== null) req.stale_ms = uint('staleMs', opts.staleMs);
  const tags = texts('tags', opts.tags);
  if (tags.length) req.tags = tags;
  return req;
}

export function cacheDel(tenant, opts = {}) {
  const req = { id: 0, op: 'cache_del', tenant: text('tenant', tenant) };
  const keys = texts('keys', opts.keys);
  const tags = texts('tags', opts.tags);
  const fillOnly = opts.fillOnly ?? false;
  if (typeof fillOnly !== 'boolean') throw new InvalidArgument(`fillOnly must be a boolean, not ${describe(fillOnly)}`);
  if (!keys.length && !tags.length) throw new InvalidArgument('cacheDelete needs at least one key or tag');
  if (fillOnly && tags.length) throw new InvalidArgument('fillOnly drops the fill locks of keys: it takes no tags');
  if (keys.length) req.keys = keys;
  if (tags.length) req.tags = tags;
  if (fillOnly) req.fill_only = true;
  return req;
}

export function release(tenant, key, lease, opts = {}) {
  const req = { id: 0, op: 'release', tenant: text('tenant', tenant), key: text('key', key) };
  if (opts.policy !== undefined && opts.policy !== null) req.policy = text('policy', opts.policy);
  req.lease = text('lease', lease);
  return req;
}

export function checkGet(tenant, key, cacheKey, opts = {}) {
  const req = { id: 0, op: 'check_get' };
  checkFields(req, tenant, key, opts);
  req.cache_key = text('cacheKey', cacheKey);
  fillMs(req, opts.fillMs);
  return req;
}
