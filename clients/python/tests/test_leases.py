"""Concurrency leases: the clients take and release them; the ASGI middleware and the FastAPI dependency hold one
per request and give it back exactly once, on a normal response, a handler's exception, a streamed body and a client
that disconnects mid-response. Outstanding leases are counted after each by `usage` (which takes none). A concurrency
rule's RateLimit headers have qu="concurrent-requests" and no w."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse

from daemons import Quotad, Redis
from quotad import AsyncClient, BadRequest, Client, identity
from quotad.fastapi import RateLimit
from quotad.starlette import QuotadMiddleware, ResponseCache
from test_fastapi import Server

LIMIT = 3
LEASED = f"""
[policies.inflight]
rules = [{{ name = "inflight", kind = "concurrency", limit = {LIMIT}, lease_ms = 60000 }}]

[policies.route_inflight]
rules = [{{ name = "slots", kind = "concurrency", limit = {LIMIT}, lease_ms = 60000 }}]
"""


@pytest.fixture(scope="module")
def leased(tmp_path_factory: pytest.TempPathFactory, redis: Redis) -> Iterator[Quotad]:
    """A quotad of its own: the tests count its `requests_release`."""
    q = Quotad(tmp_path_factory.mktemp("leases"), redis, tables=LEASED)
    yield q
    q.close()


@pytest.fixture(scope="module")
def sync(leased: Quotad) -> Iterator[Client]:
    with Client(str(leased.socket), timeout=5.0) as c:
        yield c


def outstanding(c: Client, tenant: str, key: str, policy: str = "inflight") -> int:
    """The leases held, as `usage` counts them (it takes none)."""
    (u,) = c.usage(tenant, key, policy)
    assert (u.kind, u.limit, u.used + u.remaining, u.window_ms) == ("concurrency", LIMIT, LIMIT, 0), u
    return u.used


def releases(c: Client) -> int:
    return c.stats().counters["requests_release"]


def wait_for(what: str, ready: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_sync_client_takes_and_releases_a_lease(sync: Client, tenant: str) -> None:
    held = [sync.check(tenant, "k", "inflight") for _ in range(LIMIT)]
    assert all(d.allowed and isinstance(d.lease, str) and len(d.lease) == 32 for d in held)
    full = sync.check(tenant, "k", "inflight")
    assert not full.allowed and full.lease is None and full.retry_after_ms > 0
    assert outstanding(sync, tenant, "k") == LIMIT
    first = held[0].lease
    assert first is not None
    assert sync.release(tenant, "k", first, "inflight") is True
    assert sync.release(tenant, "k", first, "inflight") is False, "released twice"
    assert outstanding(sync, tenant, "k") == LIMIT - 1
    assert sync.release(tenant, "k", "0" * 32, "inflight") is False, "an unknown lease"
    # A policy without concurrency rules takes none.
    assert sync.check(tenant, "k", "fifty").lease is None
    with pytest.raises(BadRequest):
        sync.release(tenant, "k", "not a lease", "inflight")


async def test_async_client_takes_and_releases_a_lease(leased: Quotad, tenant: str) -> None:
    async with AsyncClient(str(leased.socket), timeout=5.0) as q:
        d = await q.check(tenant, "k", "inflight")
        assert d.allowed and d.lease is not None
        got = await q.check_get(tenant, "k", "page", "inflight")
        assert got.decision.lease is not None and got.decision.lease != d.lease
        assert await q.release(tenant, "k", d.lease, "inflight") is True
        assert await q.release(tenant, "k", got.decision.lease, "inflight") is True
        assert await q.release(tenant, "k", d.lease, "inflight") is False
        peek = await q.check(tenant, "k", "inflight", cost=0)
        assert peek.remaining == LIMIT and peek.lease is None


def test_a_degraded_client_answer_has_no_lease(tmp_path: Path) -> None:
    with Client(str(tmp_path / "nobody.sock"), timeout=0.2) as c:
        d = c.check("t", "k", "inflight")
        assert d.allowed and d.degraded and d.lease is None
        assert c.release("t", "k", "0" * 32) is False


# --- the middleware and the dependency, over HTTP --------------------------------------------------------------------


class Gate:
    """Lets a streaming handler wait until the test has looked at the outstanding leases."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.opened.set)


def build_app(client: AsyncClient, gate: Gate) -> FastAPI:
    app = FastAPI()
    route_limit = RateLimit(client, policy="route_inflight", key=identity.header("x-user"))

    async def body(chunks: int) -> AsyncIterator[bytes]:
        gate.loop = asyncio.get_running_loop()
        yield b"first\n"
        for _ in range(chunks):
            await asyncio.sleep(0.02)
            yield b"more\n"

    async def gated() -> AsyncIterator[bytes]:
        gate.loop = asyncio.get_running_loop()
        yield b"first\n"
        await gate.opened.wait()
        gate.opened.clear()
        yield b"last\n"

    for prefix, deps in (("/mw", []), ("/dep", [Depends(route_limit)])):

        @app.get(f"{prefix}/ok", dependencies=deps)
        async def ok() -> dict[str, bool]:
            return {"ok": True}

        @app.get(f"{prefix}/boom", dependencies=deps)
        async def boom() -> dict[str, bool]:
            raise RuntimeError("the handler failed")

        @app.get(f"{prefix}/stream", dependencies=deps)
        async def stream() -> StreamingResponse:
            return StreamingResponse(gated(), media_type="text/plain")

        @app.get(f"{prefix}/endless", dependencies=deps)
        async def endless() -> StreamingResponse:
            return StreamingResponse(body(500), media_type="text/plain")

    @app.get("/cached/page")
    async def page() -> dict[str, bool]:
        return {"page": True}

    app.add_middleware(
        QuotadMiddleware,
        client=client,
        tenant=identity.header("x-tenant"),
        key=identity.header("x-user"),
        # The middleware's own policy under /mw and /cached; the route's under /dep.
        policy=lambda conn: "fifty" if conn.url.path.startswith("/dep") else "inflight",
        cache=ResponseCache(ttl_ms=60_000, fill_ms=None, when=lambda conn: conn.url.path.startswith("/cached")),
    )
    return app


@pytest.fixture(scope="module")
def gate() -> Gate:
    return Gate()


@pytest.fixture(scope="module")
def server(leased: Quotad, gate: Gate) -> Iterator[Server]:
    client = AsyncClient(str(leased.socket), timeout=5.0)
    s = Server(build_app(client, gate))
    yield s
    s.stop()


@pytest.fixture(params=["mw", "dep"])
def route(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Each case through the middleware, then through the route dependency: (path prefix, policy)."""
    return ("/mw", "inflight") if request.param == "mw" else ("/dep", "route_inflight")


def held(sync: Client, tenant: str, policy: str) -> int:
    return outstanding(sync, tenant, "u", policy)


def released(sync: Client, tenant: str, prefix: str, policy: str) -> None:
    """The middleware releases before the response's last part goes out, so its lease is back once the client has
    the response; the dependency's runs after the response is sent (FastAPI's exit of a dependency with yield)."""
    if prefix == "/mw":
        assert held(sync, tenant, policy) == 0
    else:
        wait_for("the dependency's release", lambda: held(sync, tenant, policy) == 0)


def test_released_after_a_normal_response(server: Server, sync: Client, tenant: str, route: tuple[str, str]) -> None:
    prefix, policy = route
    before = releases(sync)
    with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}) as h:
        for _ in range(2 * LIMIT):  # more than the limit: each one's slot came back
            assert h.get(f"{prefix}/ok").status_code == 200
            released(sync, tenant, prefix, policy)
    assert releases(sync) - before == 2 * LIMIT, "exactly one release per request"


def test_released_when_the_handler_raises(server: Server, sync: Client, tenant: str, route: tuple[str, str]) -> None:
    prefix, policy = route
    before = releases(sync)
    for _ in range(LIMIT + 1):
        # One connection each: uvicorn closes one whose app raised.
        with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}) as h:
            assert h.get(f"{prefix}/boom").status_code == 500
        released(sync, tenant, prefix, policy)
    assert releases(sync) - before == LIMIT + 1


def test_held_while_a_body_streams_then_released(
    server: Server, sync: Client, gate: Gate, tenant: str, route: tuple[str, str]
) -> None:
    prefix, policy = route
    before = releases(sync)
    with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}, timeout=10) as h:
        with h.stream("GET", f"{prefix}/stream") as r:
            lines = r.iter_lines()
            assert next(lines) == "first"
            assert held(sync, tenant, policy) == 1, "released before the body was sent"
            gate.open()
            assert list(lines) == ["last"]
        released(sync, tenant, prefix, policy)
    assert releases(sync) - before == 1


def test_released_when_the_client_disconnects_mid_response(
    server: Server, sync: Client, tenant: str, route: tuple[str, str]
) -> None:
    prefix, policy = route
    before = releases(sync)
    for i in range(LIMIT + 1):
        with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}, timeout=10) as h:
            with h.stream("GET", f"{prefix}/endless") as r:
                lines = r.iter_lines()  # kept: dropping it would close the response
                assert next(lines) == "first"
                assert held(sync, tenant, policy) == 1, f"request {i}: still streaming"
                assert next(lines) == "more"
        # The connection is closed mid-body; the server notices at its next chunk.
        wait_for(f"disconnect {i}'s lease to come back", lambda: held(sync, tenant, policy) == 0)
    assert releases(sync) - before == LIMIT + 1


def test_a_cached_response_releases_its_lease_too(server: Server, sync: Client, tenant: str) -> None:
    before = releases(sync)
    with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}) as h:
        assert h.get("/cached/page").headers["x-cache"] == "miss"
        assert held(sync, tenant, "inflight") == 0
        for _ in range(LIMIT + 1):
            assert h.get("/cached/page").headers["x-cache"] == "hit"
            assert held(sync, tenant, "inflight") == 0
    assert releases(sync) - before == LIMIT + 2


def test_a_full_route_is_429_and_takes_nothing(server: Server, sync: Client, tenant: str) -> None:
    taken = [sync.check(tenant, "u", "inflight") for _ in range(LIMIT)]
    before = releases(sync)
    with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}) as h:
        r = h.get("/mw/ok")
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert releases(sync) == before, "a denial has nothing to release"
    for d in taken:
        assert d.lease is not None and sync.release(tenant, "u", d.lease, "inflight")


def test_a_concurrency_rule_sends_its_ratelimit_headers(
    server: Server, sync: Client, tenant: str, route: tuple[str, str]
) -> None:
    prefix, policy = route
    rule = "inflight" if policy == "inflight" else "slots"
    want_policy = f'"{rule}";q={LIMIT};qu="concurrent-requests"'
    with httpx.Client(base_url=server.url, headers={"x-tenant": tenant, "x-user": "u"}) as h:
        r = h.get(f"{prefix}/ok")
        assert r.status_code == 200
        # The request's own lease: LIMIT - 1 left, until it would expire (lease_ms 60 s).
        assert (r.headers["ratelimit-policy"], r.headers["ratelimit"]) == (want_policy, f'"{rule}";r={LIMIT - 1};t=60')
        released(sync, tenant, prefix, policy)
        taken = [sync.check(tenant, "u", policy) for _ in range(LIMIT)]
        r = h.get(f"{prefix}/ok")
        assert r.status_code == 429
        assert r.headers["ratelimit-policy"] == want_policy
        assert r.headers["ratelimit"] == f'"{rule}";r=0;t={r.headers["retry-after"]}'
        assert 0 < int(r.headers["retry-after"]) <= 60
    peek = sync.check(tenant, "u", policy, cost=0)
    assert peek.lease is None and peek.remaining == 0 and outstanding(sync, tenant, "u", policy) == LIMIT, peek
    for d in taken:
        assert d.lease is not None and sync.release(tenant, "u", d.lease, policy)
