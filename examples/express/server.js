// A small notes service rate-limited and cached by quotad.
//
// - Every request is rate-limited (tenant from X-Tenant, default "demo"; key
//   from X-API-Key, else the client's IP); over the limit: 429 + Retry-After.
// - GET /notes and /notes/:id are cached (X-Cache: miss / hit); POST /notes
//   drops them with invalidate(), and costs 5 units through a per-route limit.
//
// quotad runs separately (`cargo run --release -- serve` in the repo root);
// set QUOTAD_SOCKET if its socket is not at the default path. Run with
// `npm install && npm start` here (README.md).

import path from 'node:path';
import express from 'express';
import { Client, defaultSocketPath } from 'quotad';
import { apiKey, clientIp, constant, first, header, invalidate, quotad } from 'quotad/express';

// npm runs this from examples/express: resolve a relative default socket path
// (./quotad.sock) against the directory npm was started from, like quotad does.
const socketPath = path.resolve(process.env.INIT_CWD ?? process.cwd(), defaultSocketPath());
const client = new Client(socketPath); // connects on first use; fails open if quotad is down
const app = express();
app.use(express.json());

app.get('/health', (req, res) => res.json({ ok: true }));

app.use(quotad({
  client,
  tenant: first(header('x-tenant'), constant('demo')),
  key: first(apiKey(), clientIp()),
  // Notes are shared by a tenant: one cache entry per URL, not per user.
  cache: { ttlMs: 30_000, staleMs: 10_000, perUser: false, when: (req) => req.path.startsWith('/notes') },
}));

const notes = new Map(); // tenant -> Map(id -> text)
let nextId = 1;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

app.get('/notes', async (req, res) => {
  await sleep(50); // pretend this is a slow query: cache hits skip it
  const mine = notes.get(req.quotad.tenant) ?? new Map();
  res.json({ notes: [...mine].map(([id, text]) => ({ id, text })) });
});

app.get('/notes/:id', (req, res) => {
  const text = notes.get(req.quotad.tenant)?.get(Number(req.params.id));
  if (text === undefined) return res.status(404).json({ error: 'no such note' }); // never cached
  res.json({ id: Number(req.params.id), text });
});

app.post('/notes', quotad({ client, cost: 5 }), async (req, res) => {
  if (typeof req.body?.text !== 'string') return res.status(400).json({ error: 'text is required' });
  const tenant = req.quotad.tenant;
  if (!notes.has(tenant)) notes.set(tenant, new Map());
  const id = nextId++;
  notes.get(tenant).set(id, req.body.text);
  const invalidated = await invalidate(req, { paths: ['/notes'] });
  res.status(201).json({ id, invalidated });
});

const port = Number(process.env.PORT ?? 3000);
const server = app.listen(port, '127.0.0.1', () => console.log(`notes on http://127.0.0.1:${port} (quotad at ${client.socketPath})`));

// `npm start` execs node (package.json), so SIGTERM and Ctrl-C reach this
// process: finish the requests in flight, then exit.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.once(signal, () => {
    server.close();
    client.close();
  });
}
