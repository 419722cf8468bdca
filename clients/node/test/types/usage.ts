// Compile-only check of index.d.ts and express.d.ts (npm run typecheck).
import { Client, Decision, InvalidArgument, QuotadError, RuleUsage, UnknownPolicy } from 'quotad';
import quotad, { apiKey, clientIp, first, header, invalidate } from 'quotad/express';

async function main(): Promise<void> {
  const c = new Client('/tmp/quotad.sock', { timeoutMs: 200, failureMode: 'closed' });
  const d: Decision = await c.check('acme', 'user:42', { policy: 'api', cost: 1 });
  const h: Record<string, string> = d.headers();
  const legacy: Record<string, string> = d.headers({ legacy: true });
  const shadow: string | null = d.shadowDenied ? d.shadowRule : null;
  const w: number = d.windowMs + d.kind.length;
  const rules: RuleUsage[] = await c.usage('acme', 'user:42', { policy: 'api' });
  const used: number = rules[0].used + rules[0].resetMs;
  const retry: number = d.retryAfter;
  const cached: Buffer | null = await c.cacheGet('acme', 'k', { fillMs: 100 });
  const stored: boolean = await c.cacheSet('acme', 'k', Buffer.from('v'), { ttlMs: 1000, tags: ['a'] });
  const n: number = await c.cacheDelete('acme', { tags: ['a'] });
  const locks: number = await c.cacheDelete('acme', { keys: ['k'], fillOnly: true });
  const r = await c.checkGet('acme', 'u', 'GET /', { policy: 'api', fillMs: 100 });
  if (r.lookup?.hit) r.lookup.value?.length;
  const lease: string | null = d.lease;
  const freed: boolean = lease === null ? false : await c.release('acme', 'user:42', lease, { policy: 'api' });
  const mw = quotad({ client: c, tenant: header('x-tenant'), key: first(apiKey(), clientIp()), cache: { ttlMs: 1000 }, legacyHeaders: true });
  void [h, legacy, shadow, w, used, freed, d.kind, d.windowMs, d.shadowDenied, d.shadowRule, retry, cached, stored, n, locks, mw, invalidate];
  try {
    await c.check('', 'k');
  } catch (e) {
    if (e instanceof InvalidArgument || e instanceof UnknownPolicy || e instanceof QuotadError) void e;
  }
  c.close();
}
void main;
