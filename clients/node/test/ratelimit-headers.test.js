// The RateLimit header vectors of clients/ratelimit-headers.json, which the Python suite checks too.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { Decision } from '../src/index.js';
import { sfList, sfString } from '../src/ratelimit-headers.js';
import { REPO } from './daemons.js';

const VECTORS = JSON.parse(fs.readFileSync(path.join(REPO, 'clients', 'ratelimit-headers.json'), 'utf8'));
const bare = (v) => (typeof v === 'object' ? Buffer.from(v.bytes, 'base64') : v);

test('structured fields serialize as pinned, the draft\'s own examples included', () => {
  for (const v of VECTORS.structured) {
    const items = v.items.map(([value, params]) => [value, params.map(([k, p]) => [k, bare(p)])]);
    assert.equal(sfList(items), v.serialized, v.name);
    // The draft writes lists without the optional space after the comma.
    if (v.draft !== undefined && !v.name.includes('base64')) assert.equal(v.serialized.replaceAll(', ', ','), v.draft, v.name);
  }
  assert.ok(VECTORS.structured.filter((v) => v.draft !== undefined).length >= 8);
});

test('each decision gets the pinned headers', () => {
  for (const v of VECTORS.decisions) {
    const d = Decision.fromReply({ id: 1, ok: true, ...v.decision });
    assert.deepEqual(d.headers({ legacy: v.legacy }), v.headers, v.name);
  }
  const kinds = new Set(VECTORS.decisions.map((v) => v.decision.kind));
  for (const k of ['token_bucket', 'fixed_window', 'sliding_window', 'daily_quota', 'concurrency']) assert.ok(kinds.has(k), k);
});

test('a string outside printable ASCII is refused', () => {
  for (const bad of ['é', 'a\nb', '\x7f']) assert.throws(() => sfString(bad), RangeError);
});
