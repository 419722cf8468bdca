"""Exceptions. Everything the client raises derives from :class:`QuotadError`.

* :class:`InvalidArgument` — a bad value, caught before anything is sent.
* :class:`ServerError` and its subclasses — the daemon answered with an
  error reply; one subclass per wire error ``code``.
* :class:`QuotadUnavailable` and its subclasses — the daemon could not be
  reached, the connection broke, or the reply did not come in time. Checks
  and cache calls turn these into degraded answers unless the client's
  ``failure_mode`` is ``"raise"``.

A refusal at connect by the daemon's ``[[access]]`` rules (an id-0
``forbidden`` reply, then close) is raised as :class:`Forbidden`, whatever
the failure mode.
"""

from __future__ import annotations


class QuotadError(Exception):
    """Base class of every error raised by this package."""


class InvalidArgument(QuotadError, ValueError):
    """A value that quotad would refuse; raised before anything is sent."""


class QuotadUnavailable(QuotadError):
    """The daemon could not answer: not reachable, connection lost, or too slow."""


class ConnectFailed(QuotadUnavailable):
    """Connecting to the socket failed (or is backing off after a failure)."""


class ConnectionLost(QuotadUnavailable):
    """The connection closed or broke while the request was in flight.

    ``server_error`` is set when the daemon said why before closing (an
    error reply with id 0: a frame too large, too many connections).
    """

    def __init__(self, message: str, server_error: ServerError | None = None) -> None:
        super().__init__(message)
        self.server_error = server_error


class RequestTimedOut(QuotadUnavailable):
    """No reply within the call's timeout."""


class ProtocolViolation(QuotadUnavailable):
    """The daemon sent something that is not a protocol v1 reply; the connection is dropped."""


class ServerError(QuotadError):
    """An error reply. ``code`` is the wire code; branch on it (or on the subclass)."""

    code: str = "unknown"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"quotad answered {self.code}: {self.message}"


class BadRequest(ServerError):
    code = "bad_request"


class UnknownOp(ServerError):
    code = "unknown_op"


class UnknownPolicy(ServerError):
    code = "unknown_policy"


class TooLarge(ServerError):
    code = "too_large"


class Overloaded(ServerError):
    """A bounded queue in the daemon is full: back off and retry."""

    code = "overloaded"


class Forbidden(ServerError):
    """The daemon's ``[[access]]`` rules do not let this process (by its uid
    and gid) use the tenant or the op, or do not admit it at all: then it
    answers at connect (id 0) and closes, and every call gets this error.
    Never answered by the failure mode: it is configuration, not an outage."""

    code = "forbidden"


class ShuttingDown(ServerError):
    code = "shutting_down"


class SourceUnavailable(ServerError):
    """``unavailable``: an admin op could not reach the tenants' source or
    Redis (an outage, not a bug); retry later."""

    code = "unavailable"


class ServerInternalError(ServerError):
    """``internal``: a bug in the daemon."""

    code = "internal"


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        UnknownPolicy,
        TooLarge,
        Overloaded,
        Forbidden,
        ShuttingDown,
        SourceUnavailable,
        ServerInternalError,
    )
}

#: Errors after which a check is answered by the client's failure mode
#: instead of raising: the daemon is away, stuck, overloaded or stopping.
TRANSIENT: tuple[type[QuotadError], ...] = (QuotadUnavailable, Overloaded, ShuttingDown)


def connection_error(error: object) -> QuotadError:
    """The error for every call in flight when the daemon sends an id-0 error and closes.

    A refusal by the access rules is :class:`Forbidden` itself, so the caller
    sees it rather than a lost connection the failure mode would paper over.
    """
    cause = server_error(error)
    if isinstance(cause, Forbidden):
        return cause
    return ConnectionLost(f"quotad closed the connection: {cause}", cause)


def server_error(error: object) -> ServerError:
    """The exception for a reply's ``error`` map (an unknown code gives plain :class:`ServerError`)."""
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        code = code if isinstance(code, str) else "unknown"
        message = message if isinstance(message, str) else ""
    else:
        code, message = "unknown", "an error reply without a valid `error` map"
    cls = _BY_CODE.get(code, ServerError)
    return cls(message, code)
