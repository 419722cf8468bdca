// Real redis-server and quotad processes for the tests, on temporary Unix sockets.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client } from '../src/index.js';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

const POLICIES = `
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 5, refill_per_sec = 0.01 }]

[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 5 }, { name = "daily", kind = "daily_quota", limit = 1000 }]

[policies.fifty]
rules = [{ name = "burst", kind = "token_bucket", capacity = 50, refill_per_sec = 0.001 }]

[policies.tiny]
rules = [{ name = "per_minute", kind = "fixed_window", limit = 2, window_ms = 60000 }]
`;

export function quotadBin() {
  const bin = process.env.QUOTAD_BIN || path.join(REPO, 'target', 'debug', 'quotad');
  if (!fs.existsSync(bin)) throw new Error(`quotad binary not found at ${bin}: run \`cargo build\` in ${REPO} or set QUOTAD_BIN`);
  return bin;
}

export function tempDir(name) {
  return fs.mkdtempSync(path.join(os.tmpdir(), `quotad-node-${name}-`));
}

// Until `what` accepts connections on the Unix socket `file`: not just until
// the file exists, since it appears at bind, a moment before listen, and a
// connect in between is refused.
async function waitFor(file, proc, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (fs.existsSync(file) && (await accepts(file))) return;
    if (proc.exitCode !== null) throw new Error(`${what} exited with ${proc.exitCode} before listening on ${file}`);
    if (Date.now() > deadline) throw new Error(`${what} did not listen on ${file} in time`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function accepts(file) {
  return new Promise((resolve) => {
    const s = net.connect(file);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

function stop(proc, signal = 'SIGTERM') {
  if (proc.exitCode !== null || proc.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000);
    proc.once('exit', () => {
      clearTimeout(timer);
      resolve();
    });
    proc.kill(signal);
  });
}

export class Redis {
  static async start(dir) {
    if (spawnSync('redis-server', ['--version']).error) throw new Error('redis-server is not installed');
    const r = new Redis();
    r.socket = path.join(dir, 'redis.sock');
    r.proc = spawn('redis-server', ['--port', '0', '--unixsocket', r.socket, '--save', '', '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
    await waitFor(r.socket, r.proc, 'redis-server');
    return r;
  }

  stop() {
    return stop(this.proc);
  }
}

/** One quotad process; kill()/start() again reuse the same socket path and config. */
export class Quotad {
  static async start(dir, redis, { server = '', tables = '' } = {}) {
    const q = new Quotad();
    q.redis = redis;
    q.socket = path.join(dir, 'quotad.sock');
    q.config = path.join(dir, 'quotad.toml');
    q.log = path.join(dir, 'quotad.log');
    const redisTable = redis ? `[redis]\nurl = "redis+unix://${redis.socket}"\ntimeout_ms = 100\n` : '';
    fs.writeFileSync(q.config, `[server]\nsocket = "${q.socket}"\n${server}\n${redisTable}${tables}\n${POLICIES}`);
    await q.start();
    return q;
  }

  async start() {
    fs.rmSync(this.socket, { force: true }); // left by kill -9
    const log = fs.openSync(this.log, 'a');
    this.proc = spawn(quotadBin(), ['serve', '--config', this.config], { stdio: ['ignore', log, log] });
    fs.closeSync(log);
    await waitFor(this.socket, this.proc, 'quotad');
    await this.warmUp();
  }

  /** Waits until quotad decides from Redis (its first round trip also loads the script). */
  async warmUp(timeoutMs = 5000) {
    if (!this.redis) return;
    const c = new Client(this.socket, { timeoutMs: 1000, onWarn: () => {} });
    try {
      const deadline = Date.now() + timeoutMs;
      while ((await c.check('warm-up', 'warm-up', { policy: 'api', cost: 0 })).degraded) {
        if (Date.now() > deadline) throw new Error('quotad did not reach Redis in time');
        await new Promise((r) => setTimeout(r, 20));
      }
    } finally {
      c.close();
    }
  }

  stop() {
    return stop(this.proc);
  }

  kill() {
    return stop(this.proc, 'SIGKILL');
  }

  pause() {
    this.proc.kill('SIGSTOP');
  }

  resume() {
    this.proc.kill('SIGCONT');
  }

  async close() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      this.resume();
      await this.stop();
    }
  }
}

let n = 0;
/** A tenant no other test (or earlier run) uses. */
export const freshTenant = (name = 't') => `${name}-${process.pid}-${Date.now()}-${n++}`;

/** Starts Redis and quotad for one test file; stops both in `after`, even when tests fail. */
export async function environment(t, opts) {
  const dir = tempDir('env');
  const redis = await Redis.start(dir);
  let quotad;
  try {
    quotad = await Quotad.start(dir, redis, opts);
  } catch (e) {
    await redis.stop();
    throw e;
  }
  return {
    dir,
    redis,
    quotad,
    async close() {
      await quotad.close();
      await redis.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
