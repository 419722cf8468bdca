// Who is asking: extractors for a request's tenant and rate-limit key.
// An extractor takes an Express (or plain node:http) request and returns a
// string, or null/undefined when the request does not carry that identity;
// it may return a promise.

export const constant = (value) => () => value;

/** The value of request header `name`. */
export const header = (name) => (req) => {
  const v = req.headers[name.toLowerCase()];
  return Array.isArray(v) ? v[0] : v;
};

/** An API key from request header `name`. */
export const apiKey = (name = 'x-api-key') => header(name);

/** The peer's address (Express's `req.ip`, which honours the app's `trust proxy` setting). */
export const clientIp = () => (req) => req.ip ?? req.socket?.remoteAddress;

/** A property set on the request by earlier (e.g. auth) middleware: `req[name]` or `res.locals`. */
export const property = (name) => (req) => req[name] ?? req.res?.locals?.[name];

/**
 * A claim of the bearer JWT in header `headerName`. Without `decode`, the
 * payload is read WITHOUT checking the signature: only do that behind
 * something that verified the token. Pass `decode(token) => claims` to verify here.
 */
export function jwtClaim(claim, { headerName = 'authorization', decode = null } = {}) {
  return (req) => {
    const value = req.headers[headerName] ?? '';
    const [scheme, token] = String(value).split(' ', 2);
    if (scheme?.toLowerCase() !== 'bearer' || !token) return null;
    try {
      const claims = decode ? decode(token) : unverifiedClaims(token);
      const found = claims?.[claim];
      return found === undefined || found === null ? null : String(found);
    } catch {
      return null; // a bad or unverifiable token carries no identity
    }
  };
}

/** The first identity any of `extractors` finds. */
export function first(...extractors) {
  return async (req) => {
    for (const e of extractors) {
      const v = await resolve(e, req);
      if (v !== null) return v;
    }
    return null;
  };
}

export async function resolve(extractor, req) {
  const v = await extractor(req);
  return v === undefined || v === null || v === '' ? null : String(v);
}

function unverifiedClaims(token) {
  const parts = token.split('.');
  if (parts.length !== 3) throw new Error('not a JWT');
  const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
  if (typeof claims !== 'object' || claims === null || Array.isArray(claims)) throw new Error('not an object');
  return claims;
}
