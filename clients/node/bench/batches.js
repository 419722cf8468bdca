// What a check costs the client as a function of how many replies arrive per
// socket read. A stand-in daemon (a child Node process, so that its CPU is not
// the client's) answers with a fixed reply every check it has read, in one
// write, `--delay-us` after it read them (0: on the next event-loop turn; a
// delay makes the client wait, and wake up, as a daemon waiting on Redis
// does). The client runs a closed loop with N checks in flight for each N of
// `--concurrency` (so that at most N replies arrive per read) and reports its
// CPU, read and write syscalls and voluntary context switches (wake-ups) per
// check; a least-squares fit of CPU per check against reads per check splits
// it into a cost per check and a cost per read (with its write, and its
// wake-up when the client had nothing to do).
//
//   node clients/node/bench/batches.js [--seconds 3] [--concurrency 4,8,16,32,64] [--delay-us 0]
//
// Not a model of quotad: a real daemon also spends CPU on the same cores.

import { fork } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client, FrameReader, encodeFrame } from '../src/index.js';

const SELF = fileURLToPath(import.meta.url);

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

/** The stand-in daemon: `node batches.js --serve SOCK DELAY_US`. */
function serve(sock, delayUs) {
  // A check reply with a 4-byte id (uint32) patched per request; the client reads it on its fast path.
  const reply = encodeFrame({
    id: 0x7fffffff, ok: true, allowed: true, limit: 1000, remaining: 999, reset_ms: 1, retry_after_ms: 0, degraded: false, rule: 'burst',
  });
  const idAt = reply.indexOf(Buffer.from([0xa2, 0x69, 0x64, 0xce])) + 4;
  const server = net.createServer((s) => {
    const frames = new FrameReader();
    let ids = [];
    let scheduled = false;
    let due = 0;
    const answer = () => {
      if (performance.now() < due) { // spin through event-loop turns until the delay is over
        setImmediate(answer);
        return;
      }
      scheduled = false;
      const n = ids.length;
      const out = Buffer.allocUnsafe(n * reply.length);
      for (let i = 0; i < n; i++) {
        reply.copy(out, i * reply.length);
        out.writeUInt32BE(ids[i], i * reply.length + idAt);
      }
      ids = [];
      s.write(out);
    };
    s.on('data', (chunk) => {
      for (const body of frames.push(chunk)) {
        // Every request map starts with its id (the client writes it first): a uint of any width.
        const h = body[4];
        ids.push(h < 0x80 ? h : h === 0xcc ? body[5] : h === 0xcd ? body.readUInt16BE(5) : body.readUInt32BE(5));
      }
      if (!scheduled) {
        scheduled = true;
        due = performance.now() + delayUs / 1000;
        setImmediate(answer);
      }
    });
    s.on('error', () => {});
  });
  server.listen(sock, () => process.send('ready'));
}

function counters() {
  const io = fs.readFileSync('/proc/self/io', 'utf8');
  const status = fs.readFileSync('/proc/self/status', 'utf8');
  const get = (text, k) => Number(text.match(new RegExp(`${k}:\\s+(\\d+)`))[1]);
  return { reads: get(io, 'syscr'), writes: get(io, 'syscw'), wakeups: get(status, 'voluntary_ctxt_switches') };
}

async function measure(sock, concurrency, seconds) {
  const c = new Client(sock, { timeoutMs: 5000, failureMode: 'raise', maxPending: concurrency });
  await c.check('t', 'k'); // connected
  let stop = false;
  let done = 0;
  const worker = async () => {
    while (!stop) {
      if (!(await c.check('tenant', 'user:1', { policy: 'bench' })).allowed) throw new Error('denied');
      done++;
    }
  };
  const workers = Array.from({ length: concurrency }, worker);
  await new Promise((r) => setTimeout(r, 1000)); // warm-up
  const d0 = done;
  const c0 = process.cpuUsage();
  const s0 = counters();
  const t0 = performance.now();
  await new Promise((r) => setTimeout(r, seconds * 1000));
  const n = done - d0;
  const cpu = process.cpuUsage(c0);
  const s1 = counters();
  const wall = (performance.now() - t0) / 1000;
  stop = true;
  await Promise.all(workers);
  c.close();
  return {
    rate: n / wall,
    cpu: (cpu.user + cpu.system) / n,
    user: cpu.user / n,
    system: cpu.system / n,
    reads: (s1.reads - s0.reads) / n,
    writes: (s1.writes - s0.writes) / n,
    wakeups: (s1.wakeups - s0.wakeups) / n,
  };
}

async function main() {
  const seconds = Number(arg('seconds', '3'));
  const levels = arg('concurrency', '4,8,16,32,64').split(',').map(Number);
  const delayUs = Number(arg('delay-us', '0'));
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'quotad-batches-'));
  console.log(`# ${new Date().toISOString().slice(0, 16)}, ${os.cpus().length} CPUs, Node ${process.version}, daemon delay ${delayUs} µs, ${seconds} s per run`);
  console.log('| in flight | checks/s | client CPU µs/check (user + system) | reads / writes per check | wake-ups per check |');
  console.log('|---|---|---|---|---|');
  const points = [];
  try {
    for (const concurrency of levels) {
      const sock = path.join(tmp, `c${concurrency}.sock`);
      const daemon = fork(SELF, ['--serve', sock, String(delayUs)], { stdio: 'inherit' });
      await new Promise((r) => daemon.once('message', r));
      try {
        const m = await measure(sock, concurrency, seconds);
        points.push(m);
        console.log(`| ${concurrency} | ${m.rate.toFixed(0)} | ${m.cpu.toFixed(2)} (${m.user.toFixed(2)} + ${m.system.toFixed(2)}) | ${m.reads.toFixed(3)} / ${m.writes.toFixed(3)} | ${m.wakeups.toFixed(3)} |`);
      } finally {
        daemon.kill();
      }
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  // cpu = perCheck + perRead * reads, least squares.
  const mx = points.reduce((a, p) => a + p.reads, 0) / points.length;
  const my = points.reduce((a, p) => a + p.cpu, 0) / points.length;
  const sxy = points.reduce((a, p) => a + (p.reads - mx) * (p.cpu - my), 0);
  const sxx = points.reduce((a, p) => a + (p.reads - mx) ** 2, 0);
  if (points.length >= 2 && sxx > 0) {
    const perRead = sxy / sxx;
    console.log(`# fit: ${(my - perRead * mx).toFixed(2)} µs per check + ${perRead.toFixed(1)} µs per read (with its write and wake-up)`);
  }
}

if (process.argv[2] === '--serve') serve(process.argv[3], Number(process.argv[4]));
else main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
