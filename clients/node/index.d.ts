/// <reference types="node" />
// Types for the quotad client (hand-written; the package is plain ESM JavaScript).

export type FailureMode = 'open' | 'closed' | 'raise';

export interface ClientOptions {
  socketPath?: string;
  /** Per-call deadline in ms (a cache read with fillMs gets fillMs more). Default 500. */
  timeoutMs?: number;
  /** Default 250. */
  connectTimeoutMs?: number;
  /** What a check answers while the daemon cannot: allow, deny (both `degraded`), or throw. Default 'open'. */
  failureMode?: FailureMode;
  /** retryAfterMs of a 'closed' failure answer. Default 1000. */
  closedRetryAfterMs?: number;
  /** Calls in flight at most; more wait for a slot within their timeout. Default 1024. */
  maxPending?: number;
  /** Largest request frame; larger throws InvalidArgument before sending. Default 1 MiB. */
  maxFrameBytes?: number;
  maxReplyBytes?: number;
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** Connection state changes (lost, reconnected). Default: process.emitWarning. */
  onWarn?: (message: string) => void;
}

export interface CheckOptions {
  /** A configured policy; default: the policy named `default`. */
  policy?: string | null;
  /** Units to charge (default 1); 0 peeks. */
  cost?: number | bigint;
}

export interface CacheGetOptions {
  /** Single-flight: on a miss, the first caller fills; others wait up to this long. */
  fillMs?: number;
}

export interface CacheSetOptions {
  ttlMs: number;
  staleMs?: number;
  tags?: string[];
}

export interface CacheDeleteOptions {
  keys?: string[];
  tags?: string[];
  /**
   * Drop only the fill locks of `keys` (no `tags`): for a caller told to
   * fill (`Lookup.fill`) that will not store a value. Entries stay; resolves
   * to the number of locks dropped. Default false.
   */
  fillOnly?: boolean;
}

export type Bytes = Buffer | Uint8Array;

export class Decision {
  readonly allowed: boolean;
  readonly limit: number;
  readonly remaining: number;
  readonly resetMs: number;
  readonly retryAfterMs: number;
  readonly degraded: boolean;
  readonly rule: string;
  /** The deciding rule's kind: token_bucket, fixed_window, sliding_window, daily_quota, concurrency, ... ('' when unknown). */
  readonly kind: string;
  /** The deciding rule's quota window in ms (the IETF `w`; 0 when none, as for a concurrency rule). */
  readonly windowMs: number;
  /**
   * The lease this check took (an allowed check of a policy with a
   * `concurrency` rule, cost >= 1), else null. Give it back with `release`.
   */
  readonly lease: string | null;
  /** Allowed, but this shadow rule would have denied (null: none). */
  readonly shadowRule: string | null;
  readonly shadowDenied: boolean;
  /** Seconds to wait before retrying (0 when allowed). */
  readonly retryAfter: number;
  /**
   * RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-11),
   * Retry-After on a denial; with `legacy`, RateLimit-Limit, -Remaining, -Reset too.
   */
  headers(options?: { legacy?: boolean }): Record<string, string>;
}

/** One rule of a `usage` answer. */
export class RuleUsage {
  readonly rule: string;
  readonly kind: string;
  readonly limit: number;
  /** limit - remaining: units taken and not yet back. */
  readonly used: number;
  readonly remaining: number;
  /** ms until full again (a fixed window: until it ends; a daily quota: until 00:00 UTC). */
  readonly resetMs: number;
  readonly windowMs: number;
}

export class Lookup {
  readonly hit: boolean;
  readonly value: Buffer | null;
  readonly ttlMs: number;
  readonly stale: boolean;
  readonly refresh: boolean;
  readonly fill: boolean;
  readonly degraded: boolean;
  readonly shouldStore: boolean;
}

export interface CheckGet {
  decision: Decision;
  /** null when denied (nothing was read). */
  lookup: Lookup | null;
}

export interface Hello {
  protocol: number;
  server: string;
  backend: string;
  ops: string[];
}

export interface Stats {
  uptimeMs: number;
  backend: string;
  shards: number;
  /** Numbers; a counter past Number.MAX_SAFE_INTEGER is a bigint. */
  counters: Record<string, number | bigint>;
  /** Checks a shadow rule would have denied, by `<policy>.<rule>` (those above 0). */
  shadowDenials: Record<string, number | bigint>;
}

export class Client {
  constructor(socketPath?: string | null, options?: ClientOptions);
  constructor(options: ClientOptions);
  readonly socketPath: string;
  hello(): Promise<Hello>;
  stats(): Promise<Stats>;
  /** Every rule of the policy as it stands for `key`, charging nothing; rejects when quotad cannot answer. */
  usage(tenant: string, key: string, options?: { policy?: string | null }): Promise<RuleUsage[]>;
  check(tenant: string, key: string, options?: CheckOptions): Promise<Decision>;
  cacheLookup(tenant: string, key: string, options?: CacheGetOptions): Promise<Lookup>;
  cacheGet(tenant: string, key: string, options?: CacheGetOptions): Promise<Buffer | null>;
  cacheSet(tenant: string, key: string, value: Bytes, options: CacheSetOptions): Promise<boolean>;
  cacheDelete(tenant: string, options: CacheDeleteOptions): Promise<number>;
  checkGet(tenant: string, key: string, cacheKey: string, options?: CheckOptions & CacheGetOptions): Promise<CheckGet>;
  /**
   * Gives back `decision.lease`, with the check's tenant, key and policy:
   * true if it was still held; false if released already, expired, unknown,
   * or quotad could not be asked (the slot then frees after `lease_ms`).
   */
  release(tenant: string, key: string, lease: string, options?: { policy?: string | null }): Promise<boolean>;
  /** One raw request map (its id is assigned); resolves to the raw reply map. */
  call(request: Record<string, unknown>, timeoutMs?: number): Promise<Record<string, unknown>>;
  close(): void;
}

export function defaultSocketPath(): string;
export function encodeFrame(message: Record<string, unknown>): Buffer;
export function decodeBody(body: Buffer): Record<string, unknown>;
export class FrameReader {
  constructor(maxFrameBytes?: number);
  push(chunk: Buffer): Buffer[];
}

export class QuotadError extends Error {}
export class InvalidArgument extends QuotadError {}
export class QuotadUnavailable extends QuotadError {}
export class ConnectFailed extends QuotadUnavailable {}
export class ConnectionLost extends QuotadUnavailable {
  readonly serverError: ServerError | null;
}
export class RequestTimedOut extends QuotadUnavailable {}
export class ProtocolViolation extends QuotadUnavailable {}
export class ServerError extends QuotadError {
  readonly code: string;
  readonly serverMessage: string;
}
export class BadRequest extends ServerError {}
export class UnknownOp extends ServerError {}
export class UnknownPolicy extends ServerError {}
export class TooLarge extends ServerError {}
export class Overloaded extends ServerError {}
/** `forbidden`: the daemon's `[[access]]` rules refuse this process the tenant or op, or (at connect, id 0) refuse it outright; never answered by the failure mode. */
export class Forbidden extends ServerError {}
export class ShuttingDown extends ServerError {}
/** `unavailable`: an admin op could not reach the tenants' source or Redis, or a usage its Redis (an outage); retry later. */
export class SourceUnavailable extends ServerError {}
export class ServerInternalError extends ServerError {}
export function serverError(error: unknown): ServerError;
export function connectionError(error: unknown): ConnectionLost;
export function isTransient(error: unknown): boolean;
