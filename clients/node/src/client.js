// The quotad client: one Unix socket connection, requests pipelined on it
// and matched to replies by id, in any order. Frames written in the same
// tick go out in one write (cork/uncork).

import net from 'node:net';
import {
  ConnectFailed, ConnectionLost, InvalidArgument, RequestTimedOut, connectionError, isTransient, serverError,
} from './errors.js';
import { DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_REPLY_BYTES, FrameReader, decodeBody, encodeFrame } from './codec.js';
import { Decision, Lookup, UNAVAILABLE_MISS, parseCheckGet, parseHello, parseStats } from './models.js';
import * as build from './requests.js';
import { defaultSocketPath } from './path.js';

const FAILURE_MODES = new Set(['open', 'closed', 'raise']);
/** Bytes a connection buffers for writing before new calls wait for quotad to read. */
const WRITE_BUFFER_BYTES = 4 << 20;

/** Exponential reconnect delay with jitter, reset by a successful connect. */
class Backoff {
  constructor(initialMs, maxMs) {
    this.initial = initialMs;
    this.max = maxMs;
    this.delay = 0;
    this.next = 0;
  }
  ready(now) { return now >= this.next; }
  failed(now) {
    this.delay = Math.min(this.max, this.delay * 2 || this.initial);
    this.next = now + this.delay * (0.5 + Math.random() / 2);
  }
  succeeded() { this.delay = 0; this.next = 0; }
}

/** One connected socket and its calls in flight. */
class Connection {
  constructor(socket, maxReplyBytes, onWarn) {
    this.socket = socket;
    this.pending = new Map(); // id -> { resolve, reject, timer }
    this.error = null;
    this.frames = new FrameReader(maxReplyBytes);
    this.corked = false;
    this.drain = null; // { promise, resolve } shared by every call waiting for the write buffer
    this.onWarn = onWarn;
    socket.on('data', (chunk) => this.onData(chunk));
    socket.on('error', (e) => this.fail(new ConnectionLost(`quotad connection failed: ${e.message}`)));
    // quotad sends nothing more once it has closed its side: fail now, not when our side closes too.
    socket.on('end', () => this.fail(new ConnectionLost('quotad closed the connection')));
    socket.on('close', () => this.fail(new ConnectionLost('quotad closed the connection')));
  }

  onData(chunk) {
    try {
      for (const body of this.frames.push(chunk)) {
        const reply = decodeBody(body);
        if (reply.id === 0 && reply.ok === false) {
          // Connection-level error (frame too large, too many connections):
          // the daemon closes; every call in flight fails with it.
          throw connectionError(reply.error);
        }
        const call = this.pending.get(reply.id);
        if (call !== undefined) {
          this.pending.delete(reply.id);
          clearTimeout(call.timer);
          call.resolve(reply);
        } // else the caller gave up (timed out) already
      }
    } catch (e) {
      this.fail(e);
    }
  }

  send(id, frame, timeoutMs) {
    if (this.error !== null) return Promise.reject(this.error); // nothing would ever answer
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RequestTimedOut(`no reply from quotad within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      if (!this.corked) {
        this.corked = true;
        this.socket.cork();
        process.nextTick(() => {
          this.corked = false;
          this.socket.uncork();
        });
      }
      this.socket.write(frame);
    });
  }

  /**
   * Resolves once the socket's write buffer has drained, or the connection
   * failed. One 'drain' listener however many calls wait.
   */
  drained() {
    if (this.error !== null) return Promise.resolve();
    if (this.drain === null) {
      let resolve;
      const promise = new Promise((r) => { resolve = r; });
      this.drain = { promise, resolve };
      this.socket.once('drain', () => {
        this.drain = null;
        resolve();
      });
    }
    return this.drain.promise;
  }

  /** Fails every call in flight (and later ones) with `err`; idempotent. */
  fail(err, quiet = false) {
    if (this.error !== null) return;
    this.error = err;
    if (!quiet) this.onWarn(`quotad connection lost: ${err.message}`);
    this.drain?.resolve();
    const pending = this.pending;
    this.pending = new Map();
    for (const call of pending.values()) {
      clearTimeout(call.timer);
      call.reject(err);
    }
    this.socket.destroy();
  }
}

/**
 * A quotad client. Share one per process: calls are pipelined on its one
 * connection. Connects on first use and after a failure, with exponential
 * backoff between failed attempts. While the daemon cannot answer within
 * `timeoutMs`, checks are answered by `failureMode` ('open': allowed,
 * 'closed': denied, both `degraded`; 'raise': the error is thrown), cache
 * reads miss and cache writes do nothing.
 */
export class Client {
  constructor(socketPath = null, options = {}) {
    if (typeof socketPath === 'object' && socketPath !== null) {
      options = socketPath;
      socketPath = options.socketPath ?? null;
    }
    const o = {
      timeoutMs: 500,
      connectTimeoutMs: 250,
      failureMode: 'open',
      closedRetryAfterMs: 1000,
      maxPending: 1024,
      maxFrameBytes: DEFAULT_MAX_FRAME_BYTES,
      maxReplyBytes: DEFAULT_MAX_REPLY_BYTES,
      backoffInitialMs: 50,
      backoffMaxMs: 2000,
      onWarn: (msg) => process.emitWarning(msg, 'QuotadWarning'),
      ...options,
    };
    if (!FAILURE_MODES.has(o.failureMode)) throw new TypeError(`failureMode must be 'open', 'closed' or 'raise', not ${o.failureMode}`);
    if (!(o.timeoutMs > 0) || !(o.connectTimeoutMs > 0)) throw new TypeError('timeouts must be positive');
    if (!(o.maxPending >= 1)) throw new TypeError('maxPending must be at least 1');
    this.socketPath = socketPath ?? defaultSocketPath();
    this.options = o;
    this.nextId = 1;
    this.conn = null;
    this.connecting = null;
    this.backoff = new Backoff(o.backoffInitialMs, o.backoffMaxMs);
    this.waitingForSlot = new Set(); // wake-ups of calls waiting for a slot, oldest first
    this.inFlight = 0; // calls holding a slot (at most maxPending)
    this.closed = false;
    this.down = false;
  }

  // -- ops -----------------------------------------------------------------

  async hello() {
    return parseHello(await this.call(build.hello()));
  }

  async stats() {
    return parseStats(await this.call(build.stats()));
  }

  /** May this request go ahead? `cost: 0` peeks without charging. */
  async check(tenant, key, opts = {}) {
    const req = build.check(tenant, key, opts);
    try {
      return Decision.fromReply(await this.call(req));
    } catch (e) {
      return this.#unavailableDecision(e);
    }
  }

  /** A cache read with everything the daemon said (stale, refresh, fill, ...). */
  async cacheLookup(tenant, key, opts = {}) {
    const req = build.cacheGet(tenant, key, opts);
    try {
      return Lookup.fromReply(await this.call(req, this.#timeout(opts.fillMs)));
    } catch (e) {
      this.#softFail(e);
      return UNAVAILABLE_MISS;
    }
  }

  /** The cached bytes, or null on a miss (or when the daemon is unavailable). */
  async cacheGet(tenant, key, opts = {}) {
    return (await this.cacheLookup(tenant, key, opts)).value;
  }

  /** Stores an entry; resolves to false when it could not be stored (degraded). */
  async cacheSet(tenant, key, value, opts = {}) {
    const req = build.cacheSet(tenant, key, value, opts);
    try {
      return (await this.call(req)).degraded === false;
    } catch (e) {
      this.#softFail(e);
      return false;
    }
  }

  /**
   * Deletes entries by key and by tag; resolves to how many existed. With
   * `fillOnly: true` (keys only, no tags), for a caller told to fill an entry
   * that will not store a value: drops only the fill locks of `keys` (the
   * callers held for them are let go, the next caller may fill), never a
   * value someone else stored meanwhile; resolves to how many locks went.
   */
  async cacheDelete(tenant, opts = {}) {
    const req = build.cacheDel(tenant, opts);
    try {
      const deleted = (await this.call(req)).deleted;
      return Number.isInteger(deleted) ? deleted : 0;
    } catch (e) {
      this.#softFail(e);
      return 0;
    }
  }

  /** A check and, only if it allows, a read of `cacheKey`, in one request. */
  async checkGet(tenant, key, cacheKey, opts = {}) {
    const req = build.checkGet(tenant, key, cacheKey, opts);
    try {
      return parseCheckGet(await this.call(req, this.#timeout(opts.fillMs)));
    } catch (e) {
      const decision = this.#unavailableDecision(e);
      return { decision, lookup: decision.allowed ? UNAVAILABLE_MISS : null };
    }
  }

  // -- plumbing --------------------------------------------------------------

  /**
   * Sends one request map (its `id` is assigned here) and resolves to the
   * reply map. Rejects with a ServerError for an error reply and a
   * QuotadUnavailable when no reply came.
   */
  async call(request, timeoutMs = this.options.timeoutMs) {
    const id = this.nextId;
    // Past 2^53 `id + 1` is `id` again: wrap long before (no call waits that long).
    this.nextId = id === Number.MAX_SAFE_INTEGER ? 1 : id + 1;
    request.id = id;
    const frame = encodeFrame(request);
    if (frame.length - 4 > this.options.maxFrameBytes) {
      throw new InvalidArgument(`a ${frame.length - 4}-byte request is over maxFrameBytes (${this.options.maxFrameBytes})`);
    }
    const deadline = Date.now() + timeoutMs;
    if (this.inFlight < this.options.maxPending) this.inFlight++;
    else await this.#slot(deadline); // handed over by the call that frees it
    let reply;
    try {
      reply = await this.#exchange(id, frame, deadline);
    } finally {
      this.#releaseSlot();
    }
    if (reply.ok !== true) throw serverError(reply.error);
    return reply;
  }

  /** Writes the frame on a live connection (connecting if need be) and waits for its reply. */
  async #exchange(id, frame, deadline) {
    for (let retried = false; ; retried = true) {
      let conn = this.conn;
      if (conn === null || conn.error !== null) conn = await this.#connect(deadline);
      // Bounded write buffer: while quotad reads slower than we write, wait for it.
      while (conn.error === null && conn.socket.writableLength > WRITE_BUFFER_BYTES) {
        await withDeadline(conn.drained(), deadline, () => new RequestTimedOut('quotad is not reading its socket'));
      }
      // A connection that failed while we waited never got this request: use a new one (once).
      if (conn.error === null || retried) return conn.send(id, frame, Math.max(1, deadline - Date.now()));
    }
  }

  /** Closes the connection; later calls fail as unavailable. */
  close() {
    this.closed = true;
    const conn = this.conn;
    this.conn = null;
    conn?.fail(new ConnectionLost('the client was closed'), true);
  }

  #timeout(fillMs) {
    // A held cache read may legitimately take fillMs longer.
    return this.options.timeoutMs + (typeof fillMs === 'number' && fillMs > 0 ? fillMs : 0);
  }

  #unavailableDecision(err) {
    if (!isTransient(err) || this.options.failureMode === 'raise') throw err;
    if (this.options.failureMode === 'open') {
      return new Decision({ allowed: true, limit: 0, remaining: 0, resetMs: 0, retryAfterMs: 0, degraded: true, rule: '' });
    }
    return new Decision({
      allowed: false, limit: 0, remaining: 0, resetMs: 0, retryAfterMs: this.options.closedRetryAfterMs, degraded: true, rule: '',
    });
  }

  #softFail(err) {
    if (!isTransient(err) || this.options.failureMode === 'raise') throw err;
  }

  #slot(deadline) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waitingForSlot.delete(wake);
        reject(new RequestTimedOut(`${this.options.maxPending} calls already in flight`));
      }, Math.max(1, deadline - Date.now()));
      const wake = () => {
        clearTimeout(timer);
        resolve();
      };
      this.waitingForSlot.add(wake);
    });
  }

  /**
   * A call is done with its slot: hand it straight to the oldest waiting
   * call. (Freeing it instead would let a new call take it before the
   * waiter runs, and both would be in flight: one over maxPending.)
   */
  #releaseSlot() {
    const [wake] = this.waitingForSlot;
    if (wake === undefined) {
      this.inFlight--;
      return;
    }
    this.waitingForSlot.delete(wake);
    wake();
  }

  /** Connects, or joins a connect under way; rejects with ConnectFailed. */
  #connect(deadline) {
    if (this.closed) return Promise.reject(new ConnectFailed('the client is closed'));
    if (this.connecting === null) {
      if (!this.backoff.ready(Date.now())) {
        return Promise.reject(new ConnectFailed(`cannot reach quotad at ${this.socketPath} (retrying soon)`));
      }
      this.connecting = this.#open().finally(() => {
        this.connecting = null;
      });
    }
    return withDeadline(this.connecting, deadline, () => new ConnectFailed(`connecting to quotad at ${this.socketPath} timed out`));
  }

  #open() {
    return new Promise((resolve, reject) => {
      const socket = net.createConnection(this.socketPath);
      const timer = setTimeout(() => socket.destroy(new Error('timed out')), this.options.connectTimeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeAllListeners('error');
        socket.setNoDelay?.(true);
        this.backoff.succeeded();
        if (this.down) {
          this.down = false;
          this.options.onWarn(`reconnected to quotad at ${this.socketPath}`);
        }
        const conn = new Connection(socket, this.options.maxReplyBytes, this.options.onWarn);
        if (this.closed) conn.fail(new ConnectionLost('the client was closed'), true);
        else this.conn = conn;
        resolve(conn);
      });
      socket.once('error', (e) => {
        clearTimeout(timer);
        socket.destroy();
        this.backoff.failed(Date.now());
        const err = new ConnectFailed(`cannot reach quotad at ${this.socketPath}: ${e.message}`);
        if (!this.down) {
          this.down = true;
          this.options.onWarn(err.message);
        }
        reject(err);
      });
    });
  }
}

/** `promise`, or a rejection with `timeoutError()` at `deadline` (ms since the epoch). */
function withDeadline(promise, deadline, timeoutError) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(timeoutError()), Math.max(1, deadline - Date.now()));
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
