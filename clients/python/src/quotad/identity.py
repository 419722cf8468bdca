"""Who is asking: extractors for a request's tenant and rate-limit key.

An extractor takes a Starlette ``HTTPConnection`` (a ``Request``) and
returns a string, or None when the request does not carry that identity;
it may be sync or async. Combine them with :func:`first`.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Any, Union

from starlette.requests import HTTPConnection
from starlette.routing import Match

Extractor = Callable[[HTTPConnection], Union[str, None, Awaitable[Union[str, None]]]]


async def resolve(extractor: Extractor, conn: HTTPConnection) -> str | None:
    value = extractor(conn)
    if inspect.isawaitable(value):
        value = await value
    if value is None or value == "":
        return None
    return str(value)


def constant(value: str) -> Extractor:
    """Always ``value`` (e.g. one tenant for the whole service)."""
    return lambda conn: value


def header(name: str) -> Extractor:
    """The value of request header ``name``."""
    return lambda conn: conn.headers.get(name)


def api_key(name: str = "x-api-key") -> Extractor:
    """An API key from request header ``name``."""
    return header(name)


def state(attribute: str) -> Extractor:
    """``request.state.<attribute>``, as set by an earlier (e.g. auth) middleware."""
    return lambda conn: getattr(conn.state, attribute, None)


def client_ip(trust_forwarded: bool = False) -> Extractor:
    """The peer's address; with ``trust_forwarded``, the first ``X-Forwarded-For`` hop.

    Only trust ``X-Forwarded-For`` behind a proxy that sets it: clients can
    put anything there.
    """

    def extract(conn: HTTPConnection) -> str | None:
        if trust_forwarded:
            forwarded = conn.headers.get("x-forwarded-for")
            if forwarded:
                return forwarded.split(",")[0].strip() or None
        return conn.client.host if conn.client else None

    return extract


def route() -> Extractor:
    """``"<METHOD> <route path template>"``, e.g. ``"GET /items/{item_id}"``.

    Resolved against the app's routes, so every item shares one key; falls
    back to the raw path when no route matches.
    """

    def extract(conn: HTTPConnection) -> str | None:
        method = conn.scope.get("method", "")
        app = conn.scope.get("app")
        for r in getattr(app, "routes", ()):
            match, _ = r.matches(conn.scope)
            if match is Match.FULL and hasattr(r, "path"):
                return f"{method} {r.path}"
        return f"{method} {conn.url.path}"

    return extract


def jwt_claim(
    claim: str,
    *,
    header_name: str = "authorization",
    decode: Callable[[str], dict[str, Any]] | None = None,
) -> Extractor:
    """A claim of the bearer JWT in header ``header_name``.

    Without ``decode``, the payload is read WITHOUT checking the signature:
    only do that behind something that has verified the token (a gateway,
    an auth middleware). Pass ``decode`` (e.g. a PyJWT ``jwt.decode`` with
    your key) to verify here; a token it rejects gives None.
    """

    def extract(conn: HTTPConnection) -> str | None:
        value = conn.headers.get(header_name, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims = decode(token) if decode else _unverified_claims(token)
        except Exception:  # a bad or unverifiable token carries no identity
            return None
        found = claims.get(claim) if isinstance(claims, dict) else None
        return None if found is None else str(found)

    return extract


def first(*extractors: Extractor) -> Extractor:
    """The first identity any of ``extractors`` finds."""

    async def extract(conn: HTTPConnection) -> str | None:
        for e in extractors:
            value = await resolve(e, conn)
            if value is not None:
                return value
        return None

    return extract


def _unverified_claims(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError) as e:
        raise ValueError("undecodable JWT payload") from e
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not an object")
    return claims
