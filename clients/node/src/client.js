// The quotad client: one Unix socket connection, requests pipelined on it
// and matched to replies by id, in any order. The frames of one tick go out
// in one write; every read lands in the connection's one read buffer. The hot ops (check, checkGet, cacheLookup) are written from
// templates straight into the connection's buffer and their replies read
// field by field (templates.js, replies.js); a call then costs one object
// and one promise, and calls with the default timeout share one timer.

import net from 'node:net';
import {
  ConnectFailed, ConnectionLost, InvalidArgument, RequestTimedOut, connectionError, isTransient, serverError,
} from './errors.js';
import { DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_REPLY_BYTES, FrameReader, decodeBody, encodeFrame } from './codec.js';
import { Decision, Lookup, UNAVAILABLE_MISS, parseCheckGet, parseHello, parseStats, parseUsage } from './models.js';
import { ReplyFields, checkGetOf, decisionOf, lookupOf, readReply, replyId } from './replies.js';
import * as build from './requests.js';
import { FrameWriter, writeCacheGet, writeCheck, writeCheckGet } from './templates.js';
import { defaultSocketPath } from './path.js';

const FAILURE_MODES = new Set(['open', 'closed', 'raise']);
/** Bytes a connection buffers for writing before new calls wait for quotad to read. */
const WRITE_BUFFER_BYTES = 4 << 20;
/** Calls in the deadline queue before answered ones are dropped from anywhere in it, not just its front. */
const QUEUE_COMPACT_MIN = 1024;
/** Bytes of a connection's read buffer (reused by every read). */
const READ_BUFFER_BYTES = 64 << 10;
/** Timed-out checks per connection whose late reply is still watched for (a lease to release). */
const MAX_LATE = 4096;

// What a call resolves to: the reply map, or the result of a hot op.
const REPLY = 0;
const CHECK = 1;
const LOOKUP = 2;
const CHECK_GET = 3;

/** The result of a call of `kind` whose reply is `reply` (a decoded map with ok: true). */
function parsed(kind, reply) {
  if (kind === CHECK) return Decision.fromReply(reply);
  if (kind === LOOKUP) return Lookup.fromReply(reply);
  if (kind === CHECK_GET) return parseCheckGet(reply);
  return reply;
}

/** The same from the fields read in place, or null when the reply needs the general decoder. */
function leanParsed(kind, fields, buf) {
  if (kind === CHECK) return decisionOf(fields);
  if (kind === LOOKUP) return lookupOf(fields, buf);
  return checkGetOf(fields, buf);
}

/**
 * What a call of `kind` that failed with `err` resolves to: the failure
 * mode's answer for a transient error; otherwise (or with failureMode
 * 'raise', or for a plain call) it throws `err`.
 */
function failedAnswer(kind, err, options) {
  if (kind === REPLY || !isTransient(err) || options.failureMode === 'raise') throw err;
  if (kind === LOOKUP) return UNAVAILABLE_MISS;
  const decision = options.failureMode === 'open'
    ? new Decision({ allowed: true, limit: 0, remaining: 0, resetMs: 0, retryAfterMs: 0, degraded: true, rule: '' })
    : new Decision({ allowed: false, limit: 0, remaining: 0, resetMs: 0, retryAfterMs: options.closedRetryAfterMs, degraded: true, rule: '' });
  if (kind === CHECK) return decision;
  return { decision, lookup: decision.allowed ? UNAVAILABLE_MISS : null };
}

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

/** One request in flight. */
class Call {
  constructor(id, kind, timeoutMs, deadline, tenant, key, opts) {
    this.id = id;
    this.kind = kind;
    this.timeoutMs = timeoutMs;
    this.deadline = deadline; // performance.now() ms, for calls in the shared deadline queue
    // A check's tenant, key and options: a lease its late reply carries is released with them.
    this.tenant = tenant;
    this.key = key;
    this.opts = opts;
    this.resolve = null;
    this.reject = null;
    this.timer = null; // a call's own timer, when it is not in the queue
    this.done = false;
  }
}

// The one promise executor, so that a call allocates no closure for it.
let capturedResolve = null;
let capturedReject = null;
function capture(resolve, reject) {
  capturedResolve = resolve;
  capturedReject = reject;
}

const FIELDS = new ReplyFields(); // JS is single-threaded: one reader for every connection

/** Slots of a connection's table of calls in flight (see Pending). */
const PENDING_SLOTS = 4096;

/**
 * The calls in flight by id. Ids are handed out in sequence, so the live
 * ones rarely share a slot of id modulo PENDING_SLOTS; the few that do wait
 * in a Map. Cheaper than a Map alone, which hashes every id and, as calls
 * come and go, rebuilds its table (a measured 3% of the client's samples
 * and ~80 bytes of garbage per check).
 */
class Pending {
  constructor() {
    this.slots = new Array(PENDING_SLOTS).fill(null);
    this.spill = new Map(); // id -> Call whose slot was taken
    this.size = 0;
  }

  get(id) {
    if (typeof id !== 'number') return undefined; // a reply's id decoded as something else matches no call
    const call = this.slots[id & (PENDING_SLOTS - 1)];
    if (call !== null && call.id === id) return call;
    return this.spill.size === 0 ? undefined : this.spill.get(id);
  }

  add(call) {
    const i = call.id & (PENDING_SLOTS - 1);
    if (this.slots[i] === null) this.slots[i] = call;
    else this.spill.set(call.id, call);
    this.size++;
  }

  delete(call) {
    const i = call.id & (PENDING_SLOTS - 1);
    if (this.slots[i] === call) this.slots[i] = null;
    else if (!this.spill.delete(call.id)) return;
    this.size--;
  }

  /** Every call in the table, oldest id first. */
  calls() {
    return [...this.slots.filter((call) => call !== null), ...this.spill.values()].sort((a, b) => a.id - b.id);
  }
}

/** One connected socket and its calls in flight. */
class Connection {
  constructor(socket, readBuffer, options, releaseSlot, lateLease) {
    this.socket = socket;
    this.readBuffer = readBuffer; // every read lands here: see onRead
    this.options = options;
    this.releaseSlot = releaseSlot;
    this.lateLease = lateLease; // (call, lease): releases a lease a timed-out check's reply carried
    this.pending = new Pending();
    this.late = new Map(); // id -> Call: checks that timed out, whose reply may still bring a lease
    this.error = null;
    this.frames = new FrameReader(options.maxReplyBytes);
    this.out = new FrameWriter(); // frames not yet handed to the socket
    this.flushScheduled = false;
    this.flushNow = () => this.flush();
    this.onFrame = (buf, start, end) => this.frame(buf, start, end);
    // Calls with the client's default timeout expire in the order they were
    // made: one timer, at the oldest live deadline, serves them all.
    this.queue = [];
    this.head = 0;
    this.compactAt = QUEUE_COMPACT_MIN;
    this.sweeper = null;
    this.sweepNow = () => this.sweep();
    this.drain = null; // { promise, resolve } shared by every call waiting for the write buffer
    socket.on('error', (e) => this.fail(new ConnectionLost(`quotad connection failed: ${e.message}`)));
    // quotad sends nothing more once it has closed its side: fail now, not when our side closes too.
    socket.on('end', () => this.fail(new ConnectionLost('quotad closed the connection')));
    socket.on('close', () => this.fail(new ConnectionLost('quotad closed the connection')));
  }

  /** Bytes written and not yet sent by the socket. */
  get backlog() {
    return this.out.pending + this.socket.writableLength;
  }

  /** `n` bytes read into the read buffer (the socket's onread callback: no allocation, no stream events per read). */
  onRead(n) {
    try {
      this.frames.feed(this.readBuffer, this.onFrame, n);
    } catch (e) {
      this.fail(e);
    }
    this.trimQueue();
  }

  frame(buf, start, end) {
    const id = replyId(buf, start, end);
    let call;
    if (id > 0) {
      call = this.pending.get(id);
      if (call === undefined) return this.lateFrame(id, buf, start, end); // the caller gave up (timed out)
    }
    if (buf === this.readBuffer && call?.kind !== CHECK) {
      // What the result keeps (a cached value, the general decoder's bin views) must outlive the next read.
      buf = Buffer.from(buf.subarray(start, end));
      end -= start;
      start = 0;
    }
    if (call !== undefined) {
      if (call.kind !== REPLY && readReply(buf, start, end, FIELDS)) {
        const value = leanParsed(call.kind, FIELDS, buf);
        if (value !== null) {
          this.settled(call);
          call.resolve(value);
          return;
        }
      }
    }
    const reply = decodeBody(buf.subarray(start, end));
    if (reply.id === 0 && reply.ok === false) {
      // Connection-level error (frame too large, too many connections):
      // the daemon closes; every call in flight fails with it.
      throw connectionError(reply.error);
    }
    call ??= this.pending.get(reply.id);
    if (call === undefined) return;
    this.settled(call);
    if (reply.ok !== true) {
      this.failCall(call, serverError(reply.error));
      return;
    }
    let value;
    try {
      value = parsed(call.kind, reply);
    } catch (e) {
      this.failCall(call, e);
      return;
    }
    call.resolve(value);
  }

  /** The reply of a check that timed out: a lease it carries is released. */
  lateFrame(id, buf, start, end) {
    const call = this.late.get(id);
    if (call === undefined) return;
    this.late.delete(id);
    const reply = decodeBody(buf.subarray(start, end));
    if (typeof reply.lease === 'string') this.lateLease(call, reply.lease);
  }

  /**
   * Registers call `id`, whose frame is already in `out`; resolves to its
   * result. A check passes its `tenant`, `key` and `opts` (see `lateFrame`).
   */
  register(id, kind, timeoutMs, ordered, tenant = null, key = null, opts = null) {
    const call = new Call(id, kind, timeoutMs, ordered ? performance.now() + timeoutMs : 0, tenant, key, opts);
    const promise = new Promise(capture);
    call.resolve = capturedResolve;
    call.reject = capturedReject;
    this.pending.add(call);
    if (ordered) {
      this.queue.push(call);
      if (this.sweeper === null) this.arm(timeoutMs);
    } else {
      call.timer = setTimeout(expire, timeoutMs, this, call);
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flushNow);
    }
    return promise;
  }

  /** Sends a frame encoded elsewhere; the call's slot is released when it settles. */
  send(id, frame, kind, timeoutMs, tenant = null, key = null, opts = null) {
    if (this.error !== null) { // nothing would ever answer
      this.releaseSlot();
      return Promise.reject(this.error);
    }
    this.out.append(frame);
    return this.register(id, kind, timeoutMs, false, tenant, key, opts);
  }

  flush() {
    this.flushScheduled = false;
    if (this.error === null && this.out.pending > 0) this.socket.write(this.out.take());
  }

  /** The call is answered (or given up): out of the books, its slot free. */
  settled(call) {
    this.pending.delete(call);
    call.done = true;
    if (call.timer !== null) clearTimeout(call.timer);
    this.releaseSlot();
  }

  failCall(call, err) {
    let value;
    try {
      value = failedAnswer(call.kind, err, this.options);
    } catch (e) {
      call.reject(e);
      return;
    }
    call.resolve(value);
  }

  arm(delayMs) {
    this.sweeper = setTimeout(this.sweepNow, Math.max(1, delayMs));
    this.sweeper.unref(); // the socket keeps the process alive while calls are in flight
  }

  sweep() {
    this.sweeper = null;
    const now = performance.now();
    const queue = this.queue;
    let h = this.head;
    for (; h < queue.length; h++) {
      const call = queue[h];
      if (call.done) continue;
      if (call.deadline > now) break;
      expire(this, call);
    }
    this.head = h;
    this.trimQueue();
    if (this.head < this.queue.length) this.arm(this.queue[this.head].deadline - now);
  }

  /**
   * Drops answered calls from the front of the queue (replies mostly come in
   * order), and all of them once the queue has doubled: one call that stays
   * unanswered until its deadline does not keep every call made since.
   */
  trimQueue() {
    const queue = this.queue;
    let h = this.head;
    while (h < queue.length && queue[h].done) h++;
    if (h === queue.length) {
      queue.length = 0;
      h = 0;
    } else if (queue.length - h > this.compactAt) {
      this.queue = queue.slice(h).filter((call) => !call.done);
      this.compactAt = Math.max(QUEUE_COMPACT_MIN, 2 * this.queue.length);
      h = 0;
    } else if (h > QUEUE_COMPACT_MIN && h * 2 > queue.length) {
      this.queue = queue.slice(h);
      h = 0;
    }
    this.head = h;
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
    if (!quiet) this.options.onWarn(`quotad connection lost: ${err.message}`);
    this.drain?.resolve();
    if (this.sweeper !== null) clearTimeout(this.sweeper);
    this.sweeper = null;
    this.queue = [];
    this.head = 0;
    this.late.clear();
    const pending = this.pending.calls();
    this.pending = new Pending();
    for (const call of pending) {
      this.settled(call);
      this.failCall(call, err);
    }
    this.socket.destroy();
  }
}

function expire(conn, call) {
  conn.settled(call);
  if (call.tenant !== null && conn.late.size < MAX_LATE) conn.late.set(call.id, call);
  conn.failCall(call, new RequestTimedOut(`no reply from quotad within ${call.timeoutMs} ms`));
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

  /**
   * Every rule of the policy as it stands for `key`, charging nothing.
   * Rejects like stats() when quotad cannot answer (the failure mode does
   * not apply: there is nothing to report), with SourceUnavailable when its
   * Redis cannot.
   */
  async usage(tenant, key, opts = {}) {
    return parseUsage(await this.call(build.usage(tenant, key, opts)));
  }

  /** May this request go ahead? `cost: 0` peeks without charging. */
  check(tenant, key, opts = {}) {
    const conn = this.#writable();
    if (conn === null) return this.#slow(CHECK, () => build.check(tenant, key, opts), this.options.timeoutMs, tenant, key, opts);
    const id = this.#id();
    try {
      writeCheck(conn.out, id, tenant, key, opts, this.options.maxFrameBytes);
    } catch (e) {
      return Promise.reject(e);
    }
    this.inFlight++;
    return conn.register(id, CHECK, this.options.timeoutMs, true, tenant, key, opts);
  }

  /** A cache read with everything the daemon said (stale, refresh, fill, ...). */
  cacheLookup(tenant, key, opts = {}) {
    const timeoutMs = this.#timeout(opts.fillMs);
    const conn = this.#writable();
    if (conn === null) return this.#slow(LOOKUP, () => build.cacheGet(tenant, key, opts), timeoutMs);
    const id = this.#id();
    try {
      writeCacheGet(conn.out, id, tenant, key, opts, this.options.maxFrameBytes);
    } catch (e) {
      return Promise.reject(e);
    }
    this.inFlight++;
    return conn.register(id, LOOKUP, timeoutMs, timeoutMs === this.options.timeoutMs);
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

  /**
   * Gives back the lease a check took (`decision.lease`), with the check's
   * tenant, key and `policy`. Resolves to true if it was still held; false if
   * it was released already, expired, unknown, or quotad could not be asked
   * (the slot then frees by itself after the rule's `lease_ms`).
   */
  async release(tenant, key, lease, opts = {}) {
    const req = build.release(tenant, key, lease, opts);
    try {
      return (await this.call(req)).released === true;
    } catch (e) {
      this.#softFail(e);
      return false;
    }
  }

  /** A check and, only if it allows, a read of `cacheKey`, in one request. */
  checkGet(tenant, key, cacheKey, opts = {}) {
    const timeoutMs = this.#timeout(opts.fillMs);
    const conn = this.#writable();
    if (conn === null) {
      return this.#slow(CHECK_GET, () => build.checkGet(tenant, key, cacheKey, opts), timeoutMs, tenant, key, opts);
    }
    const id = this.#id();
    try {
      writeCheckGet(conn.out, id, tenant, key, cacheKey, opts, this.options.maxFrameBytes);
    } catch (e) {
      return Promise.reject(e);
    }
    this.inFlight++;
    return conn.register(id, CHECK_GET, timeoutMs, timeoutMs === this.options.timeoutMs, tenant, key, opts);
  }

  // -- plumbing --------------------------------------------------------------

  /**
   * Sends one request map (its `id` is assigned here) and resolves to the
   * reply map. Rejects with a ServerError for an error reply and a
   * QuotadUnavailable when no reply came.
   */
  async call(request, timeoutMs = this.options.timeoutMs) {
    return this.#general(request, REPLY, timeoutMs);
  }

  /**
   * The connection a hot op can write to right now (connected, a slot free,
   * the write buffer not full), else null: the op takes the general path.
   */
  #writable() {
    const conn = this.conn;
    if (conn === null || conn.error !== null || this.inFlight >= this.options.maxPending) return null;
    return conn.backlog <= WRITE_BUFFER_BYTES ? conn : null;
  }

  #id() {
    const id = this.nextId;
    // Past 2^53 `id + 1` is `id` again: wrap long before (no call waits that long).
    this.nextId = id === Number.MAX_SAFE_INTEGER ? 1 : id + 1;
    return id;
  }

  /** A hot op on the general path (connecting, waiting for a slot or the write buffer). */
  async #slow(kind, request, timeoutMs, tenant = null, key = null, opts = null) {
    try {
      return await this.#general(request(), kind, timeoutMs, tenant, key, opts);
    } catch (e) {
      return failedAnswer(kind, e, this.options);
    }
  }

  async #general(request, kind, timeoutMs, tenant = null, key = null, opts = null) {
    const id = this.#id();
    request.id = id;
    const frame = encodeFrame(request);
    if (frame.length - 4 > this.options.maxFrameBytes) {
      throw new InvalidArgument(`a ${frame.length - 4}-byte request is over maxFrameBytes (${this.options.maxFrameBytes})`);
    }
    const deadline = Date.now() + timeoutMs;
    if (this.inFlight < this.options.maxPending) this.inFlight++;
    else await this.#slot(deadline); // handed over by the call that frees it
    let conn;
    try {
      // Bounded write buffer: while quotad reads slower than we write, wait for it.
      for (let retried = false; ; retried = true) {
        conn = this.conn;
        if (conn === null || conn.error !== null) conn = await this.#connect(deadline);
        if (conn.backlog > WRITE_BUFFER_BYTES) conn.flush(); // so that the socket can report 'drain'
        while (conn.error === null && conn.socket.writableLength > WRITE_BUFFER_BYTES) {
          await withDeadline(conn.drained(), deadline, () => new RequestTimedOut('quotad is not reading its socket'));
        }
        // A connection that failed while we waited never got this request: use a new one (once).
        if (conn.error === null || retried) break;
      }
    } catch (e) {
      this.#releaseSlot();
      throw e;
    }
    // Releases the slot when settled.
    return conn.send(id, frame, kind, Math.max(1, deadline - Date.now()), tenant, key, opts);
  }

  /** Closes the connection; later calls fail as unavailable. */
  close() {
    this.closed = true;
    const conn = this.conn;
    this.conn = null;
    conn?.fail(new ConnectionLost('the client was closed'), true);
  }

  /** Releases a lease that came in the reply of a check that had timed out (nobody waits: failures are logged). */
  #releaseLate(call, lease) {
    this.release(call.tenant, call.key, lease, { policy: call.opts.policy }).catch((e) => {
      this.options.onWarn(`releasing the lease of a timed-out check failed: ${e.message}`);
    });
  }

  #timeout(fillMs) {
    // A held cache read may legitimately take fillMs longer.
    return this.options.timeoutMs + (typeof fillMs === 'number' && fillMs > 0 ? fillMs : 0);
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
      let conn = null;
      const readBuffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
      const socket = net.createConnection({
        path: this.socketPath,
        onread: { buffer: readBuffer, callback: (n) => conn.onRead(n) },
      });
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
        conn = new Connection(socket, readBuffer, this.options, () => this.#releaseSlot(), (call, lease) => this.#releaseLate(call, lease));
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
