/// <reference types="node" />
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Client, Decision, Lookup } from './index.js';

type Req = IncomingMessage & { ip?: string; path?: string; originalUrl?: string; quotad?: QuotadContext; [k: string]: unknown };
type Res = ServerResponse & { locals?: Record<string, unknown> };

export type Extractor = (req: Req) => string | null | undefined | Promise<string | null | undefined>;

export interface QuotadContext {
  client: Client;
  tenant: string;
  key: string;
  decision: Decision | null;
  lookup: Lookup | null;
}

export interface CacheRule {
  ttlMs?: number;
  staleMs?: number;
  fillMs?: number;
  tags?: string[] | ((req: Req) => string[]);
  /** Scope entries to the key; the key must then be an authenticated identity. Default true. */
  perUser?: boolean;
  when?: (req: Req) => boolean;
  maxBodyBytes?: number;
}

export interface QuotadOptions {
  client: Client;
  /** Default: the tenant an earlier quotad middleware found for the request, else DEFAULT_TENANT. */
  tenant?: Extractor | null;
  /** Default: the key an earlier quotad middleware found for the request, else the client's IP. */
  key?: Extractor | null;
  policy?: string | null | ((req: Req) => string | null | undefined);
  cost?: number | ((req: Req) => number);
  cache?: CacheRule | null;
  skip?: (req: Req) => boolean;
  /** Also send the legacy RateLimit-Limit, -Remaining, -Reset headers. Default false. */
  legacyHeaders?: boolean;
}

export const DEFAULT_TENANT: string;
export const ANONYMOUS_KEY: string;

export function quotad(options: QuotadOptions): (req: any, res: any, next: (err?: unknown) => void) => Promise<void>;
export default quotad;

export function invalidate(req: any, options?: { tags?: string[]; paths?: string[]; keys?: string[] }): Promise<number>;
export function pathTags(req: Req): string[];
export function serveOrFill(
  client: Client,
  tenant: string,
  key: string,
  lookup: Lookup,
  steps: {
    serve: (hit: Lookup) => boolean | Promise<boolean>;
    compute: () => Promise<Uint8Array | null>;
    ttlMs: number;
    staleMs?: number;
    tags: () => string[];
  },
): Promise<void>;
export function cacheKeyFor(req: Req, user: string | null): string;
export function canonicalPath(path: string): string;
export function canonicalQuery(query: string): string;
export function pathTag(path: string): string;

export function constant(value: string): Extractor;
export function header(name: string): Extractor;
export function apiKey(name?: string): Extractor;
export function clientIp(): Extractor;
export function property(name: string): Extractor;
export function jwtClaim(claim: string, options?: { headerName?: string; decode?: ((token: string) => Record<string, unknown>) | null }): Extractor;
export function first(...extractors: Extractor[]): Extractor;
export function resolve(extractor: Extractor, req: Req): Promise<string | null>;
