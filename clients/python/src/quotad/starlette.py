"""ASGI middleware for Starlette and FastAPI: rate limiting and a response cache.

.. code-block:: python

    from quotad import AsyncClient
    from quotad.starlette import QuotadMiddleware, ResponseCache, invalidate
    from quotad import identity

    q = AsyncClient()
    app.add_middleware(
        QuotadMiddleware,
        client=q,
        tenant=identity.header("x-tenant"),
        key=identity.first(identity.api_key(), identity.client_ip()),
        policy="api",
        cache=ResponseCache(ttl_ms=30_000, tags=lambda req: ["items"]),
    )

Every HTTP request is checked (a cached GET through ``check_get``, which
also reads the cache in the same request). A denial is answered here with
429, a JSON body and the ``RateLimit-Policy``, ``RateLimit`` and
``Retry-After`` headers; allowed responses get ``RateLimit-Policy`` and
``RateLimit`` too (``legacy_headers=True`` adds the older
``RateLimit-Limit``/``-Remaining``/``-Reset`` trio; see
:mod:`quotad.ratelimit_headers`). A response served from the cache gets the
headers of its own request's check, never stored ones. Handlers of writes call
:func:`invalidate` to drop cached entries by tag. Under a policy with a
``concurrency`` rule, the lease an allowed check took is released exactly
once: as the response's last part goes out (the whole body, streamed or
not, so the client's next request finds the slot free), or when the
handler raised or the client went away.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Union
from urllib.parse import quote, unquote_to_bytes

import msgpack
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import identity
from ._fill import CachedCalls, cached_calls, serve_or_fill
from ._leases import HeldLease
from .aio import AsyncClient
from .identity import Extractor
from . import ratelimit_headers
from .models import Decision, Lookup

#: The tenant of requests for which the tenant extractor finds nothing.
DEFAULT_TENANT = "default"
#: The key shared by requests for which the key extractor finds nothing:
#: leaving out an API key must not escape the limit.
ANONYMOUS_KEY = "anonymous"

# Response headers never stored with a cached response, nor served from one
# (an entry may come from elsewhere): per-connection, per-request, or
# re-derived for each request, as the rate-limit headers are (the draft's
# §7.3: a cached response's RateLimit fields are stale).
_UNCACHED_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"date",
        b"server",
        b"set-cookie",
        b"x-cache",
    }
    | {name.encode() for name in ratelimit_headers.NAMES}
)

Predicate = Callable[[HTTPConnection], bool]
TagsFor = Union[Iterable[str], Callable[[HTTPConnection], Iterable[str]]]


# Cache keys and tags are built from the request as sent, in one canonical
# form shared with the Express middleware (clients/README.md, "Cache keys";
# clients/cache-keys.json holds the vectors both test suites check).
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Also literal in a path: "/" and the sub-delimiters, ":" and "@" (RFC 3986).
_PATH_LITERAL = _UNRESERVED | frozenset(b"/!$&'()*+,;=:@")
_HEX = frozenset(b"0123456789ABCDEFabcdef")


def canonical_path(raw: bytes) -> str:
    """A path as sent, normalized as RFC 3986 (6.2.2) says.

    ``%XX`` of an unreserved character is decoded, other ``%XX`` kept (hex
    upper-cased: ``/a%2Fb`` stays apart from ``/a/b``), and any other byte
    that may not appear as is gets ``%XX``.
    """
    out: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25 and i + 2 < n and raw[i + 1] in _HEX and raw[i + 2] in _HEX:
            c = int(raw[i + 1 : i + 3], 16)
            out.append(chr(c) if c in _UNRESERVED else f"%{c:02X}")
            i += 3
        else:
            out.append(chr(b) if b in _PATH_LITERAL else f"%{b:02X}")
            i += 1
    return "".join(out)


def canonical_query(raw: bytes) -> str:
    """A query string with its ``name=value`` pairs decoded, sorted by name and re-encoded.

    Pairs with the same name keep their order (it can matter to the app);
    everything but unreserved characters is written as ``%XX``.
    """
    pairs = []
    for part in raw.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            pairs.append((unquote_to_bytes(name.replace(b"+", b" ")), unquote_to_bytes(value.replace(b"+", b" "))))
    pairs.sort(key=lambda pair: pair[0])
    return "&".join(f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in pairs)


def _request_path(conn: HTTPConnection) -> str:
    raw = conn.scope.get("raw_path")
    if not isinstance(raw, bytes):  # a server that does not give it: re-encode the decoded path
        raw = quote(conn.scope["path"], safe="/!$&'()*+,;=:@").encode()
    return canonical_path(raw.partition(b"?")[0])


def path_tag(path: str) -> str:
    """The tag ``invalidate(paths=[path])`` drops: ``path:`` and the canonical path."""
    return "path:/" + canonical_path(path.encode()).strip("/")


def path_tags(conn: HTTPConnection) -> list[str]:
    """The default tags of a cached response: ``path:`` plus each prefix of its path.

    ``GET /items/7`` is tagged ``path:/items`` and ``path:/items/7``, so
    ``invalidate(request, paths=["/items"])`` drops every cached item page.
    """
    parts = [p for p in _request_path(conn).split("/") if p][:8]  # daemon default: 16 tags at most
    return [f"path:/{'/'.join(parts[: i + 1])}" for i in range(len(parts))] or ["path:/"]


@dataclass
class ResponseCache:
    """Which GET responses to cache, and for how long.

    Only ``200`` responses without ``Set-Cookie`` and without
    ``Cache-Control: no-store``/``private`` are stored, and only up to
    ``max_body_bytes``; nor are those of routes that called a ``@cached``
    function (its ``invalidate`` could not drop them).
    """

    ttl_ms: int = 30_000
    #: Serve stale for this long after ``ttl_ms`` while one caller refreshes.
    stale_ms: int | None = None
    #: Single-flight: concurrent misses wait this long for the first caller's value.
    fill_ms: int | None = 2_000
    #: Tags stored with each entry, for :func:`invalidate`.
    tags: TagsFor = path_tags
    #: Scope entries to the rate-limit key (the user / API key); off for public pages.
    #: The key must then be an authenticated identity (a verified JWT claim,
    #: ``request.state`` set by your auth), or a caller could name another's.
    per_user: bool = True
    #: Which GET requests to cache (default: all).
    when: Predicate = field(default=lambda conn: True)
    max_body_bytes: int = 256 << 10

    def tags_for(self, conn: HTTPConnection) -> list[str]:
        tags = self.tags(conn) if callable(self.tags) else self.tags
        return list(tags)


@dataclass
class QuotadContext:
    """What the middleware decided for a request; ``request.state.quotad``."""

    client: AsyncClient
    tenant: str
    key: str
    decision: Decision | None = None
    lookup: Lookup | None = None


def cache_key_for(conn: HTTPConnection, user: str | None) -> str:
    """``GET /path?query`` (canonical, as the Express middleware builds it), prefixed with the user when per user."""
    key = f"{conn.scope.get('method', 'GET')} {_request_path(conn)}"
    query = canonical_query(conn.scope.get("query_string", b""))
    if query:
        key += "?" + query
    # Prefixed with its length in UTF-8 bytes, so that no user string can forge another user's key.
    return f"user={len(user.encode('utf-8', 'surrogatepass'))}:{user} {key}" if user is not None else key


async def invalidate(
    request: HTTPConnection,
    *,
    tags: Iterable[str] | None = None,
    paths: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
) -> int:
    """Drops cached responses of this request's tenant, by tag, path prefix or cache key.

    For write endpoints: ``await invalidate(request, paths=["/items"])``.
    Returns how many entries were deleted (0 when quotad is unavailable).
    """
    ctx = context(request)
    all_tags = list(tags or ()) + [path_tag(p) for p in paths or ()]
    return await ctx.client.cache_delete(ctx.tenant, keys=list(keys or ()), tags=all_tags)


def context(request: HTTPConnection) -> QuotadContext:
    """The middleware's :class:`QuotadContext` for this request."""
    ctx = request.scope.get("state", {}).get("quotad")
    if not isinstance(ctx, QuotadContext):
        raise RuntimeError("QuotadMiddleware is not installed on this app")
    return ctx


class QuotadMiddleware:
    """Pure ASGI middleware (works with streaming responses and does not buffer uncached ones)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: AsyncClient,
        tenant: Extractor = identity.constant(DEFAULT_TENANT),
        key: Extractor = identity.client_ip(),
        policy: str | None | Callable[[HTTPConnection], str | None] = None,
        cost: int | Callable[[HTTPConnection], int] = 1,
        cache: ResponseCache | None = None,
        exempt: Predicate | Iterable[str] = (),
        deny: Callable[[HTTPConnection, Decision], Awaitable[tuple[int, dict[str, str], bytes]]] | None = None,
        legacy_headers: bool = False,
    ) -> None:
        self.app = app
        self.client = client
        self.tenant = tenant
        self.key = key
        self.policy = policy
        self.cost = cost
        self.cache = cache
        if callable(exempt):
            self.exempt: Predicate = exempt
        else:
            paths = frozenset(exempt)
            self.exempt = lambda conn: conn.url.path in paths
        self.deny = deny
        #: Also send the older RateLimit-Limit/-Remaining/-Reset trio.
        self.legacy_headers = legacy_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if self.exempt(conn):
            await self.app(scope, receive, send)
            return
        tenant = await identity.resolve(self.tenant, conn) or DEFAULT_TENANT
        key = await identity.resolve(self.key, conn) or ANONYMOUS_KEY
        policy = self.policy(conn) if callable(self.policy) else self.policy
        cost = self.cost(conn) if callable(self.cost) else self.cost
        ctx = QuotadContext(self.client, tenant, key)
        scope.setdefault("state", {})["quotad"] = ctx

        cache = self.cache
        cache_key = None
        if cache is not None and scope["method"] == "GET" and cache.when(conn):
            cache_key = cache_key_for(conn, key if cache.per_user else None)
            result = await self.client.check_get(tenant, key, cache_key, policy, cost, cache.fill_ms)
            ctx.decision, ctx.lookup = result.decision, result.lookup
        else:
            ctx.decision = await self.client.check(tenant, key, policy, cost)
        decision = ctx.decision

        if not decision.allowed:
            await self._send_denial(conn, decision, send)
            return
        if decision.lease is None:
            await self._respond(scope, receive, send, conn, ctx, cache_key)
            return
        held = HeldLease(self.client, tenant, key, policy, decision.lease)

        async def send_releasing(message: Message) -> None:
            # Given back as the response's last part goes out, not after: a
            # client that sends its next request once this one is answered
            # must find the slot free.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await held.release()
            await send(message)

        try:
            await self._respond(scope, receive, send_releasing, conn, ctx, cache_key)
        finally:
            await held.release()  # no last part sent: an error, a disconnect, a cancellation

    async def _respond(
        self, scope: Scope, receive: Receive, send: Send, conn: HTTPConnection, ctx: QuotadContext, cache_key: str | None
    ) -> None:
        """An allowed request's response: from the app, or from (and into) the cache."""
        decision, lookup, cache = ctx.decision, ctx.lookup, self.cache
        assert decision is not None
        # This request's own headers, computed once, whatever serves it.
        limits = _ratelimit_headers(decision, self.legacy_headers)
        if cache is None or cache_key is None or lookup is None or lookup.degraded:
            extra = [(b"x-cache", b"miss")] if cache_key is not None else []
            await self.app(scope, receive, _with_headers(send, limits, extra))
            return
        rule = cache

        async def serve(hit: Lookup) -> bool:
            return await _send_cached(hit, limits, send)

        async def compute() -> bytes | None:
            recorder = _Recorder(send, limits, rule.max_body_bytes)
            calls = CachedCalls()
            token = cached_calls.set(calls)
            try:
                await self.app(scope, receive, recorder.send)
            finally:
                cached_calls.reset(token)
            # A route that uses @cached is not stored: invalidating the
            # function's entry would leave this page with the old value.
            return recorder.entry() if recorder.cacheable and not calls.seen else None

        await serve_or_fill(
            self.client, ctx.tenant, cache_key, lookup, serve, compute,
            ttl_ms=rule.ttl_ms, stale_ms=rule.stale_ms, tags=lambda: rule.tags_for(conn),
        )

    async def _send_denial(self, conn: HTTPConnection, decision: Decision, send: Send) -> None:
        if self.deny is not None:
            status, headers, body = await self.deny(conn, decision)
        else:
            status, headers, body = 429, {}, _denial_body(decision)
            headers["content-type"] = "application/json"
        all_headers = {**decision.headers(legacy=self.legacy_headers), **headers}
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in all_headers.items()]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def _denial_body(decision: Decision) -> bytes:
    return json.dumps(
        {
            "error": "rate_limited",
            "message": "Too many requests; retry later.",
            "retry_after": decision.retry_after,
            "limit": decision.limit,
            "rule": decision.rule,
        }
    ).encode()


Headers = list[tuple[bytes, bytes]]


def _ratelimit_headers(decision: Decision, legacy: bool) -> Headers:
    return [(k.lower().encode(), v.encode()) for k, v in decision.headers(legacy=legacy).items()]


def _merge_headers(headers: Iterable[tuple[bytes, bytes]], limits: Headers) -> Headers:
    """Adds the request's rate-limit headers unless the app set its own (e.g. a stricter per-route limit)."""
    out = list(headers)
    present = {k.lower() for k, _ in out}
    out.extend(h for h in limits if h[0] not in present)
    return out


def _with_headers(send: Send, limits: Headers, extra: Headers) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": _merge_headers(message.get("headers", ()), limits) + extra}
        await send(message)

    return wrapped


async def _send_cached(lookup: Lookup, limits: Headers, send: Send) -> bool:
    """Answers from a cached entry; False if the entry is not one of ours."""
    assert lookup.value is not None
    try:
        entry = msgpack.unpackb(lookup.value, raw=False)
        status, stored, body = int(entry["s"]), entry["h"], entry["b"]
        headers = [(_latin1(k).lower(), _latin1(v)) for k, v in stored]
        if not isinstance(body, bytes):
            return False
    except Exception:  # written by something else: treat as a miss
        return False
    # Whatever wrote the entry, its rate-limit headers are not this request's.
    headers = [(k, v) for k, v in headers if k not in _UNCACHED_HEADERS]
    headers.append((b"x-cache", b"stale" if lookup.stale else b"hit"))
    await send({"type": "http.response.start", "status": status, "headers": _merge_headers(headers, limits)})
    await send({"type": "http.response.body", "body": body})
    return True


class _Recorder:
    """Passes a response through while keeping a copy of it, if it may be cached."""

    def __init__(self, send: Send, limits: Headers, max_body: int) -> None:
        self._send = send
        self._limits = limits
        self._max = max_body
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._complete = False
        self._ok = True

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            headers = list(message.get("headers", ()))
            self._ok = self._status == 200 and _storable(headers)
            self._headers = [(k, v) for k, v in headers if k.lower() not in _UNCACHED_HEADERS]
            message = {**message, "headers": _merge_headers(headers, self._limits) + [(b"x-cache", b"miss")]}
        elif message["type"] == "http.response.body" and self._ok:
            self._body += message.get("body", b"")
            if len(self._body) > self._max:
                self._ok = False
                self._body = bytearray()
            if not message.get("more_body", False):
                self._complete = True
        await self._send(message)

    @property
    def cacheable(self) -> bool:
        return self._ok and self._complete

    def entry(self) -> bytes:
        # {s: status, h: [[name, value], ...], b: body}, names and values as str:
        # the Express middleware reads and writes the same entries.
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self._headers]
        packed: bytes = msgpack.packb({"s": self._status, "h": headers, "b": self._body}, use_bin_type=True)
        return packed


def _latin1(v: object) -> bytes:
    if isinstance(v, str):
        return v.encode("latin-1")
    if isinstance(v, bytes):
        return v
    raise TypeError("a header that is neither str nor bytes")


def _storable(headers: list[tuple[bytes, bytes]]) -> bool:
    for k, v in headers:
        name = k.lower()
        if name == b"set-cookie":
            return False
        if name == b"cache-control" and (b"no-store" in v.lower() or b"private" in v.lower()):
            return False
    return True


__all__ = [
    "ANONYMOUS_KEY",
    "DEFAULT_TENANT",
    "QuotadContext",
    "QuotadMiddleware",
    "ResponseCache",
    "cache_key_for",
    "context",
    "canonical_path",
    "canonical_query",
    "invalidate",
    "path_tag",
    "path_tags",
]

