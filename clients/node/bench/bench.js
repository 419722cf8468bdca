// Client-side benchmark: quotad's Client.check against per-request EVALSHA
// with ioredis, in one Node process, closed loop (`concurrency` async loops,
// each issuing a check and waiting for it). One redis-server on TCP
// loopback, started here, with a quotad (release build) in front of it.
//
//   quotad           Client.check through the daemon (one pipelined connection)
//   evalsha          ioredis, one EVALSHA of clients/python/bench/gcra.lua per
//                    check (ioredis pipelines on its one connection)
//   evalsha-autopipe the same with enableAutoPipelining (one write per tick)
//   loop             no daemon: each call's promise is resolved on the next
//                    setImmediate (the closed loop's own cost and one promise
//                    per check, in every system's CPU)
//   quotad-before    with --before DIR: Client.check of another copy of the
//                    client (DIR holds its src/index.js), against the same daemon
//
// From the repo root, after `cargo build --release` and `npm ci` in clients/node:
//   node clients/node/bench/bench.js [--seconds 5] [--concurrency 1,16,64] [--repeat 3]
//   (--quotad-connections N spreads the quotad calls over N clients;
//   --quotad-backend memory runs quotad on its in-process backend)
//
// Each repeat runs every system in turn, so that the ratios of one repeat
// are measured under the same machine load; the summary gives each ratio's
// median and range over the repeats. Client CPU is process.cpuUsage() of
// this process per check over the measured seconds, the loop's own cost
// included (the `loop` system measures that alone); reads, writes and
// wake-ups per check are this process's read and write syscalls
// (/proc/self/io) and its main thread's voluntary context switches, over the
// same seconds.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import Redis from 'ioredis';
import { Client } from '../src/index.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..', '..');
const CAPACITY = 1_000_000; // refilled at CAPACITY/s: never denied
const TENANTS = 100;
const KEYS = 100;

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}

/**
 * The `loop` system: every call gets a new promise, all of a tick's calls
 * resolved together on setImmediate (one shared answer) — the closed loop's
 * own cost plus one promise per check, the floor under any promise-based client.
 */
function instant() {
  const ANSWER = { allowed: true };
  let waiting = [];
  const answerAll = () => {
    const w = waiting;
    waiting = [];
    for (let i = 0; i < w.length; i++) w[i](ANSWER);
  };
  return () => new Promise((resolve) => {
    if (waiting.push(resolve) === 1) setImmediate(answerAll);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

async function waitFor(pred, what, ms = 10_000) {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`${what} did not come up`);
    await sleep(20);
  }
}

/**
 * This process's read and write syscalls so far (/proc/self/io) and its main
 * thread's voluntary context switches (/proc/self/status: each one a wait in
 * epoll for something to read, then a wake-up); zeros where not counted.
 */
function syscalls() {
  try {
    const io = fs.readFileSync('/proc/self/io', 'utf8');
    const status = fs.readFileSync('/proc/self/status', 'utf8');
    const get = (text, k) => Number(text.match(new RegExp(`${k}:\\s+(\\d+)`))[1]);
    return { reads: get(io, 'syscr'), writes: get(io, 'syscw'), wakeups: get(status, 'voluntary_ctxt_switches') };
  } catch {
    return { reads: 0, writes: 0, wakeups: 0 };
  }
}

function procCpuSeconds(pid) {
  const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // USER_HZ
}

async function redisCpuSeconds(r) {
  const info = await r.info('cpu');
  const get = (k) => Number(info.match(new RegExp(`${k}:([0-9.]+)`))[1]);
  return get('used_cpu_user') + get('used_cpu_sys');
}

function pct(sorted, p) {
  if (!sorted.length) return 0;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)];
}

/** Closed loop over `system.call(tenant, key)`, each answer tested by `system.allowed`. */
async function run(system, concurrency, seconds, warmup) {
  const { call, allowed } = system;
  const names = [];
  for (let t = 0; t < TENANTS; t++) for (let k = 0; k < KEYS; k++) names.push([`tenant${t}`, `user:${k}`]);
  let seed = 7;
  const rand = () => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed; };
  const lat = [];
  let done = 0;
  let measuring = false;
  let stop = false;
  const worker = async () => {
    while (!stop) {
      const [tenant, key] = names[rand() % names.length];
      const t0 = performance.now(); // a double: no BigInt per check, as process.hrtime.bigint() made
      if (!allowed(await call(tenant, key))) throw new Error('a check was denied: the benchmark keys should never be');
      if (measuring) {
        lat.push((performance.now() - t0) * 1000);
        done++;
      }
    }
  };
  const workers = Array.from({ length: concurrency }, worker);
  await sleep(warmup * 1000);
  // This process's CPU and syscalls over the measured seconds only: not the
  // warm-up (JIT compilation), nor the latency sort below (~0.3 µs per check at 200k checks/s).
  const c0 = process.cpuUsage();
  const s0 = syscalls();
  measuring = true;
  const t0 = process.hrtime.bigint();
  await sleep(seconds * 1000);
  measuring = false;
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const c1 = process.cpuUsage(c0);
  const s1 = syscalls();
  stop = true;
  await Promise.all(workers);
  lat.sort((a, b) => a - b);
  return {
    done, wall, p50: pct(lat, 50), p99: pct(lat, 99),
    cpu: (c1.user + c1.system) / done, reads: (s1.reads - s0.reads) / done, writes: (s1.writes - s0.writes) / done,
    wakeups: (s1.wakeups - s0.wakeups) / done,
  };
}

async function main() {
  const seconds = Number(arg('seconds', '5'));
  const warmup = Number(arg('warmup', '1'));
  const levels = arg('concurrency', '1,16,64').split(',').map(Number);
  const only = arg('only', `quotad,evalsha,evalsha-autopipe${arg('before', null) === null ? '' : ',quotad-before'}`).split(',');
  const bin = arg('quotad-bin', path.join(REPO, 'target', 'release', 'quotad'));
  if (!fs.existsSync(bin)) throw new Error(`${bin} not found: run \`cargo build --release\``);

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'quotad-bench-node-'));
  const port = await freePort();
  const redisProc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', tmp], { stdio: 'ignore' });
  let quotadProc = null;
  const clients = [];
  let admin = null;
  try {
    const accepts = () => new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    await waitFor(accepts, 'redis-server');
    admin = new Redis({ port });
    const sock = path.join(tmp, 'quotad.sock');
    // --quotad-backend memory: quotad decides in process, so that its Redis round trips do not pace the client.
    const redisTable = arg('quotad-backend', 'redis') === 'memory' ? '' : `[redis]\nurl = "redis://127.0.0.1:${port}"\ntimeout_ms = 1000\n\n`;
    fs.writeFileSync(path.join(tmp, 'quotad.toml'), `[server]\nsocket = "${sock}"\n\n${redisTable}[policies.bench]\nrules = [{ name = "burst", kind = "token_bucket", capacity = ${CAPACITY}, refill_per_sec = ${CAPACITY} }]\n`);
    quotadProc = spawn(bin, ['serve', '--config', path.join(tmp, 'quotad.toml')], { stdio: 'ignore' });
    await waitFor(() => fs.existsSync(sock), 'quotad');

    const conns = Number(arg('quotad-connections', '1'));
    const qs = Array.from({ length: conns }, () => new Client(sock, { timeoutMs: 5000 }));
    let turn = 0;
    const lua = fs.readFileSync(path.join(REPO, 'clients', 'python', 'bench', 'gcra.lua'), 'utf8');
    const plain = new Redis({ port });
    const auto = new Redis({ port, enableAutoPipelining: true });
    clients.push(...qs, plain, auto);
    const sha = await plain.script('LOAD', lua);
    const interval = 1_000_000 / CAPACITY;
    // Each system is the call an application makes and the test of its answer (no async wrapper in between).
    const decided = (d) => d.allowed;
    const granted = (res) => res[0] === 1;
    const systems = {
      quotad: { call: (t, k) => qs[turn++ % conns].check(t, k, { policy: 'bench' }), allowed: decided },
      evalsha: { call: (t, k) => plain.evalsha(sha, 1, `bench:{${t}}:${k}`, CAPACITY, interval, 1), allowed: granted },
      'evalsha-autopipe': { call: (t, k) => auto.evalsha(sha, 1, `bench:{${t}}:${k}`, CAPACITY, interval, 1), allowed: granted },
      loop: { call: instant(), allowed: decided },
    };
    const before = arg('before', null);
    if (before !== null) {
      const { Client: Before } = await import(path.resolve(before, 'src', 'index.js'));
      const qb = new Before(sock, { timeoutMs: 5000 });
      clients.push(qb);
      systems['quotad-before'] = { call: (t, k) => qb.check(t, k, { policy: 'bench' }), allowed: decided };
    }

    const redisVersion = (await admin.info('server')).match(/redis_version:(\S+)/)[1];
    console.log(`# ${new Date().toISOString().slice(0, 16)}, ${os.cpus().length} CPUs, Node ${process.version}, redis-server ${redisVersion}, ${seconds} s per run`);
    console.log('| system | in flight | checks/s | p50 µs | p99 µs | Redis CPU µs/check | client CPU µs/check | quotad CPU µs/check | reads / writes / wake-ups per check |');
    console.log('|---|---|---|---|---|---|---|---|---|');
    const unknown = only.filter((name) => !(name in systems));
    if (unknown.length) throw new Error(`--only: no system ${unknown.join(', ')} (there are ${Object.keys(systems).join(', ')})`);
    const repeats = Number(arg('repeat', '1'));
    const results = {}; // `${name}/${c}` -> [{ rate, cpu }] one per repeat
    for (let rep = 0; rep < repeats; rep++) {
    for (const c of levels) {
      for (const name of only) {
        const r0 = await redisCpuSeconds(admin);
        const q0 = procCpuSeconds(quotadProc.pid);
        const { done, wall, p50, p99, cpu, reads, writes, wakeups } = await run(systems[name], c, seconds, warmup);
        const r1 = await redisCpuSeconds(admin);
        const q1 = procCpuSeconds(quotadProc.pid);
        const total = (done * (seconds + warmup)) / seconds; // Redis's and quotad's CPU deltas include the warm-up
        (results[`${name}/${c}`] ??= []).push({ rate: done / wall, cpu });
        const qcpu = name.startsWith('quotad') ? (((q1 - q0) / total) * 1e6).toFixed(1) : '—';
        console.log(`| ${name} | ${c} | ${(done / wall).toFixed(0)} | ${p50.toFixed(0)} | ${p99.toFixed(0)} | ${(((r1 - r0) / total) * 1e6).toFixed(1)} | ${cpu.toFixed(2)} | ${qcpu} | ${reads.toFixed(3)} / ${writes.toFixed(3)} / ${wakeups.toFixed(3)} |`);
      }
    }
    }
    const spread = (xs) => {
      const s = [...xs].sort((a, b) => a - b);
      return `${s[Math.floor(s.length / 2)].toFixed(2)}x (${s[0].toFixed(2)}–${s[s.length - 1].toFixed(2)})`;
    };
    for (const c of levels) {
      const loop = results[`loop/${c}`];
      if (loop) console.log(`# ${c} in flight, the loop's own CPU per check: ${loop.map((r) => r.cpu.toFixed(2)).join(', ')} µs`);
      for (const base of ['evalsha', 'evalsha-autopipe', 'quotad-before']) {
        const q = results[`quotad/${c}`];
        const b = results[`${base}/${c}`];
        if (!q || !b) continue;
        console.log(`# ${c} in flight, quotad / ${base}, median (range) over ${q.length}: checks/s ${spread(q.map((r, i) => r.rate / b[i].rate))}, client CPU per check ${spread(q.map((r, i) => r.cpu / b[i].cpu))}`);
      }
    }
  } finally {
    for (const c of clients) {
      if (c.quit) c.quit().catch(() => {});
      else c.close();
    }
    admin?.disconnect();
    if (quotadProc) {
      quotadProc.kill('SIGTERM');
      await new Promise((r) => quotadProc.once('exit', r));
    }
    redisProc.kill('SIGTERM');
    await new Promise((r) => redisProc.once('exit', r));
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
