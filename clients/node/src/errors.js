// Errors. Everything the client throws is a QuotadError:
// - InvalidArgument: a bad value, caught before anything is sent;
// - ServerError and one subclass per wire error code: the daemon answered an error;
// - QuotadUnavailable and subclasses: not reachable, connection lost, too slow.
//   Checks and cache calls turn these into degraded answers unless the
//   client's failureMode is 'raise'.
// A refusal at connect by the daemon's [[access]] rules (an id-0 `forbidden`,
// then close) rejects with Forbidden, whatever the failure mode.

export class QuotadError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

export class InvalidArgument extends QuotadError {}

export class QuotadUnavailable extends QuotadError {}
export class ConnectFailed extends QuotadUnavailable {}
/** The connection closed while the request was in flight; `serverError` says why, when the daemon did. */
export class ConnectionLost extends QuotadUnavailable {
  constructor(message, serverError = null) {
    super(message, serverError ? { cause: serverError } : undefined);
    this.serverError = serverError;
  }
}
export class RequestTimedOut extends QuotadUnavailable {}
export class ProtocolViolation extends QuotadUnavailable {}

export class ServerError extends QuotadError {
  constructor(message, code) {
    super(`quotad answered ${code}: ${message}`);
    this.code = code;
    this.serverMessage = message;
  }
}
export class BadRequest extends ServerError {}
export class UnknownOp extends ServerError {}
export class UnknownPolicy extends ServerError {}
export class TooLarge extends ServerError {}
/** A bounded queue in the daemon is full: back off and retry. */
export class Overloaded extends ServerError {}
/**
 * The daemon's `[[access]]` rules do not let this process (by uid and gid) use
 * the tenant or the op, or do not admit it at all: then it answers at connect
 * (id 0) and closes, and every call rejects with this. Never answered by the
 * failure mode: it is configuration, not an outage.
 */
export class Forbidden extends ServerError {}
export class ShuttingDown extends ServerError {}
/** An admin op could not reach the tenants' source or Redis: an outage; retry later. */
export class SourceUnavailable extends ServerError {}
export class ServerInternalError extends ServerError {}

const BY_CODE = {
  bad_request: BadRequest,
  unknown_op: UnknownOp,
  unknown_policy: UnknownPolicy,
  too_large: TooLarge,
  overloaded: Overloaded,
  forbidden: Forbidden,
  shutting_down: ShuttingDown,
  unavailable: SourceUnavailable,
  internal: ServerInternalError,
};

/** The error for a reply's `error` map (an unknown code gives a plain ServerError). */
export function serverError(error) {
  const code = typeof error?.code === 'string' ? error.code : 'unknown';
  const message = typeof error?.message === 'string' ? error.message : '';
  const Cls = BY_CODE[code] ?? ServerError;
  return new Cls(message, code);
}

/**
 * The error for every call in flight when the daemon sends an id-0 error and
 * closes. A refusal by the access rules is Forbidden itself, so the caller
 * sees it rather than a lost connection the failure mode would paper over.
 */
export function connectionError(error) {
  const cause = serverError(error);
  if (cause instanceof Forbidden) return cause;
  return new ConnectionLost(`quotad closed the connection: ${cause.message}`, cause);
}

/** Errors after which a check is answered by the failure mode instead of thrown. */
export function isTransient(err) {
  return err instanceof QuotadUnavailable || err instanceof Overloaded || err instanceof ShuttingDown;
}
