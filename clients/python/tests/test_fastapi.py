"""The Starlette middleware and FastAPI dependency, served by uvicorn and called over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request, Response

from quotad import AsyncClient, identity
from quotad.cached import cached
from quotad.fastapi import RateLimit
from quotad.starlette import QuotadMiddleware, ResponseCache, context, invalidate


PRICES = {"B2": 100}


def build_app(client: AsyncClient, calls: Counter[str]) -> FastAPI:
    app = FastAPI()
    items: dict[str, list[str]] = {}

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        calls["hello"] += 1
        return {"hello": "world"}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/items")
    async def list_items(request: Request, a: str = "", b: str = "") -> dict[str, Any]:
        calls["items"] += 1
        return {"items": items.get(context(request).tenant, []), "a": a, "b": b, "call": calls["items"]}

    @app.get("/items/{item_id}")
    async def get_item(item_id: str) -> dict[str, str]:
        calls["item"] += 1
        return {"id": item_id}

    @app.post("/items")
    async def add_item(request: Request) -> dict[str, int]:
        body = await request.json()
        items.setdefault(context(request).tenant, []).append(body["name"])
        return {"invalidated": await invalidate(request, paths=["/items"])}

    @app.get("/items-private")
    async def private(response: Response) -> dict[str, int]:
        calls["private"] += 1
        response.headers["cache-control"] = "private"
        return {"call": calls["private"]}

    @app.get("/items-self-limited")
    async def self_limited(response: Response) -> dict[str, int]:
        # The app's own (stricter) RateLimit header: sent as it is, never stored.
        calls["self-limited"] += 1
        response.headers["ratelimit"] = '"app";r=0;t=999'
        return {"call": calls["self-limited"]}

    @app.get("/items-missing", status_code=404)
    async def missing() -> dict[str, int]:
        calls["missing"] += 1
        return {"call": calls["missing"]}

    @app.get("/whoami")
    async def whoami(request: Request) -> dict[str, str]:
        ctx = context(request)
        return {"tenant": ctx.tenant, "key": ctx.key}

    @cached(client, tenant="prices", ttl_ms=60_000)
    async def price(sku: str) -> dict[str, object]:
        calls["price"] += 1
        return {"sku": sku, "cents": PRICES[sku]}

    @app.get("/items-priced/{sku}")  # under /items: the ResponseCache would store it
    async def priced(sku: str) -> dict[str, object]:
        return await price(sku)

    @app.put("/items-priced/{sku}")
    async def set_price(sku: str, cents: int) -> dict[str, bool]:
        PRICES[sku] = cents
        return {"invalidated": await price.invalidate(sku)}

    @app.get("/login", dependencies=[Depends(RateLimit(client, policy="tiny"))])
    async def login() -> dict[str, bool]:
        calls["login"] += 1
        return {"ok": True}

    return _with_middleware(app, client)


def _with_middleware(app: FastAPI, client: AsyncClient) -> FastAPI:
    app.add_middleware(
        QuotadMiddleware,
        client=client,
        tenant=identity.first(identity.header("x-tenant"), identity.jwt_claim("tid")),
        key=identity.first(identity.api_key(), identity.client_ip()),
        # Tests pick the policy; the default one allows plenty.
        policy=lambda conn: conn.headers.get("x-policy", "fifty"),
        cache=ResponseCache(ttl_ms=60_000, fill_ms=10_000, when=lambda conn: conn.url.path.startswith("/items")),
        exempt=["/health"],
    )
    return app


class Server:
    """uvicorn on a free loopback port, in a thread with its own event loop."""

    def __init__(self, app: FastAPI) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._sock = sock
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn failed to start"
            threading.Event().wait(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self._sock.close()


@pytest.fixture(scope="module")
def calls() -> Counter[str]:
    return Counter()


@pytest.fixture(scope="module")
def http(daemon: Any, calls: Counter[str]) -> Iterator[httpx.Client]:
    client = AsyncClient(str(daemon.socket), timeout=2.0)
    server = Server(build_app(client, calls))
    with httpx.Client(base_url=server.url, timeout=10) as h:
        yield h
    server.stop()


@pytest.fixture
def h(tenant: str) -> dict[str, str]:
    return {"x-tenant": tenant}


def test_allowed_responses_carry_ratelimit_headers(http: httpx.Client, h: dict[str, str]) -> None:
    r = http.get("/hello", headers={**h, "x-policy": "default"})
    assert r.status_code == 200 and r.json() == {"hello": "world"}
    # A bucket of 5 refilled at 0.01/s: 500 s from empty; full again in 100 s.
    assert r.headers["ratelimit-policy"] == '"burst";q=5;w=500'
    assert r.headers["ratelimit"] == '"burst";r=4;t=100'
    assert "retry-after" not in r.headers
    assert "ratelimit-limit" not in r.headers  # the legacy trio is an option


def test_denied_is_429_json_with_headers(http: httpx.Client, h: dict[str, str], calls: Counter[str]) -> None:
    hdrs = {**h, "x-policy": "default"}
    assert [http.get("/hello", headers=hdrs).status_code for _ in range(5)] == [200] * 5
    before = calls["hello"]
    r = http.get("/hello", headers=hdrs)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["error"] == "rate_limited" and 99 < body["retry_after"] <= 100 and body["rule"] == "burst"
    assert r.headers["retry-after"] == "100"
    assert r.headers["ratelimit-policy"] == '"burst";q=5;w=500'
    assert r.headers["ratelimit"] == '"burst";r=0;t=100'  # t: no quota until Retry-After
    assert calls["hello"] == before  # the app never saw it
    # Keyed by API key when one is given: another key still passes.
    assert http.get("/hello", headers={**hdrs, "x-api-key": "k2"}).status_code == 200


def test_exempt_path_is_not_limited(http: httpx.Client, h: dict[str, str]) -> None:
    r = http.get("/health", headers=h)
    assert r.status_code == 200 and "ratelimit" not in r.headers and "ratelimit-policy" not in r.headers


def test_get_is_cached_per_sorted_query_and_user(http: httpx.Client, h: dict[str, str], calls: Counter[str]) -> None:
    hdrs = {**h, "x-api-key": "alice"}
    first = http.get("/items?b=2&a=1", headers=hdrs)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    n = calls["items"]
    second = http.get("/items?a=1&b=2", headers=hdrs)  # same query, other order
    assert second.headers["x-cache"] == "hit"
    assert second.json() == first.json() and calls["items"] == n
    assert second.headers["content-type"] == "application/json"
    # Still rate limited (and counted) on a hit: the headers are this
    # request's, computed afresh, not the stored response's.
    assert first.headers["ratelimit"].startswith('"burst";r=49;') and second.headers["ratelimit"].startswith('"burst";r=48;')
    assert second.headers["ratelimit-policy"] == first.headers["ratelimit-policy"] == '"burst";q=50;w=50000'
    # Per user: bob does not get alice's entry.
    bob = http.get("/items?a=1&b=2", headers={**h, "x-api-key": "bob"})
    assert bob.headers["x-cache"] == "miss" and calls["items"] == n + 1


def test_a_cached_response_never_replays_stored_ratelimit_headers(
    http: httpx.Client, daemon: Any, h: dict[str, str], calls: Counter[str]
) -> None:
    hdrs = {**h, "x-api-key": "carol"}
    first = http.get("/items-self-limited", headers=hdrs)
    assert first.headers["x-cache"] == "miss" and first.headers["ratelimit"] == '"app";r=0;t=999'
    second = http.get("/items-self-limited", headers=hdrs)
    assert second.headers["x-cache"] == "hit" and calls["self-limited"] == 1
    assert second.headers["ratelimit"].startswith('"burst";r=48;'), second.headers
    # An entry written by something else (another version, the other
    # middleware) with rate-limit headers in it: they are dropped too.
    import msgpack

    from quotad import Client

    stale = [["content-type", "application/json"], ["RateLimit", '"burst";r=999;t=1'], ["RateLimit-Policy", '"x";q=1'],
             ["RateLimit-Remaining", "999"], ["Retry-After", "5"]]
    entry = msgpack.packb({"s": 200, "h": stale, "b": b'{"foreign": true}'}, use_bin_type=True)
    with Client(str(daemon.socket)) as c:
        c.cache_set(h["x-tenant"], "user=5:carol GET /items/foreign", entry, ttl_ms=60_000)
    r = http.get("/items/foreign", headers=hdrs)
    assert r.headers["x-cache"] == "hit" and r.json() == {"foreign": True}
    assert r.headers["ratelimit"].startswith('"burst";r=47;') and r.headers["ratelimit-policy"] == '"burst";q=50;w=50000'
    assert "ratelimit-remaining" not in r.headers and "retry-after" not in r.headers


def test_legacy_headers_are_an_option(daemon: Any, tenant: str) -> None:
    client = AsyncClient(str(daemon.socket), timeout=2.0)
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, bool]:
        return {"ok": True}

    route_limit = RateLimit(client, policy="tiny", tenant=identity.constant(tenant), legacy_headers=True)

    @app.get("/login", dependencies=[Depends(route_limit)])
    async def login() -> dict[str, bool]:
        return {"ok": True}

    app.add_middleware(
        QuotadMiddleware, client=client, tenant=identity.constant(tenant), policy="default", exempt=["/login"], legacy_headers=True
    )
    server = Server(app)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/hello")
            assert r.headers["ratelimit-policy"] == '"burst";q=5;w=500' and r.headers["ratelimit"] == '"burst";r=4;t=100'
            assert (r.headers["ratelimit-limit"], r.headers["ratelimit-remaining"], r.headers["ratelimit-reset"]) == ("5", "4", "100")
            for _ in range(4):
                c.get("/hello")
            denied = c.get("/hello")
            assert denied.status_code == 429 and denied.headers["retry-after"] == "100"
            assert denied.headers["ratelimit-remaining"] == "0" and int(denied.headers["ratelimit-reset"]) >= 400
            login = [c.get("/login") for _ in range(3)]
            assert [r.status_code for r in login] == [200, 200, 429]
            assert login[0].headers["ratelimit-limit"] == "2" and login[2].headers["ratelimit-remaining"] == "0"
            assert login[2].headers["ratelimit-policy"] == '"per_minute";q=2;w=60'
    finally:
        server.stop()


def test_write_invalidates_by_tag(http: httpx.Client, h: dict[str, str]) -> None:
    hdrs = {**h, "x-api-key": "alice"}
    assert http.get("/items", headers=hdrs).json()["items"] == []
    assert http.get("/items/7", headers=hdrs).headers["x-cache"] == "miss"
    assert http.get("/items", headers=hdrs).headers["x-cache"] == "hit"
    assert http.get("/items/7", headers=hdrs).headers["x-cache"] == "hit"
    r = http.post("/items", json={"name": "widget"}, headers=hdrs)
    assert r.status_code == 200 and r.json() == {"invalidated": 2}
    after = http.get("/items", headers=hdrs)
    assert after.headers["x-cache"] == "miss" and after.json()["items"] == ["widget"]
    assert http.get("/items/7", headers=hdrs).headers["x-cache"] == "miss"


def test_uncacheable_responses_are_not_stored(http: httpx.Client, h: dict[str, str], calls: Counter[str]) -> None:
    for path, counter in (("/items-private", "private"), ("/items-missing", "missing")):
        before = calls[counter]
        for _ in range(2):
            assert http.get(path, headers=h).headers["x-cache"] == "miss"
        assert calls[counter] == before + 2


def test_a_route_using_cached_is_not_stored_so_its_invalidate_shows(
    http: httpx.Client, h: dict[str, str], calls: Counter[str]
) -> None:
    first = http.get("/items-priced/B2", headers=h)
    assert first.json() == {"sku": "B2", "cents": 100} and first.headers["x-cache"] == "miss"
    again = http.get("/items-priced/B2", headers=h)
    assert again.headers["x-cache"] == "miss", "the page was stored"
    assert again.json() == first.json() and calls["price"] == 1  # @cached served it
    assert http.put("/items-priced/B2?cents=250", headers=h).json() == {"invalidated": True}
    after = http.get("/items-priced/B2", headers=h)
    assert after.json() == {"sku": "B2", "cents": 250} and after.headers["x-cache"] == "miss"
    assert calls["price"] == 2


def test_route_dependency_applies_its_own_policy(http: httpx.Client, h: dict[str, str], calls: Counter[str]) -> None:
    ok = [http.get("/login", headers=h) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    # The route's policy, not the middleware's: 2 a minute.
    assert ok[0].headers["ratelimit-policy"] == '"per_minute";q=2;w=60'
    assert ok[1].headers["ratelimit"].startswith('"per_minute";r=0;')
    denied = http.get("/login", headers=h)
    assert denied.status_code == 429
    assert denied.json()["detail"]["error"] == "rate_limited"
    retry = int(denied.headers["retry-after"])
    assert retry > 0 and denied.headers["ratelimit"] == f'"per_minute";r=0;t={retry}'
    assert denied.headers["ratelimit-policy"] == '"per_minute";q=2;w=60' and "ratelimit-limit" not in denied.headers
    assert calls["login"] >= 2


def test_tenant_from_jwt_claim(http: httpx.Client) -> None:
    import base64

    payload = base64.urlsafe_b64encode(json.dumps({"tid": "jwt-tenant"}).encode()).rstrip(b"=").decode()
    token = f"eyJhbGciOiJub25lIn0.{payload}.sig"
    r = http.get("/whoami", headers={"authorization": f"Bearer {token}", "x-api-key": "k"})
    assert r.json() == {"tenant": "jwt-tenant", "key": "k"}
    r = http.get("/whoami")  # no identity at all: default tenant, keyed by client IP
    assert r.json() == {"tenant": "default", "key": "127.0.0.1"}


def test_sidecar_unreachable_fails_open_over_http(tmp_path: Any) -> None:
    down = AsyncClient(str(tmp_path / "nobody.sock"), timeout=0.2)
    server = Server(build_app(down, Counter()))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/hello")
            assert r.status_code == 200 and "ratelimit" not in r.headers and "ratelimit-limit" not in r.headers
            r = c.get("/items")
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    finally:
        server.stop()

    closed = AsyncClient(str(tmp_path / "nobody.sock"), timeout=0.2, failure_mode="closed")
    server = Server(build_app(closed, Counter()))
    try:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            r = c.get("/hello")
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
    finally:
        server.stop()


def test_serves_entries_in_the_shared_format(http: httpx.Client, daemon: Any, tenant: str) -> None:
    """The entry format {s, h: [[str, str]], b} is the Express middleware's too."""
    import msgpack

    from quotad import Client

    entry = msgpack.packb(
        {"s": 200, "h": [["content-type", "text/plain"], ["x-from", "node"]], "b": b"hello from elsewhere"},
        use_bin_type=True,
    )
    with Client(str(daemon.socket)) as c:
        assert c.cache_set(tenant, "user=1:k GET /items/shared", entry, ttl_ms=10_000)
        r = http.get("/items/shared", headers={"x-tenant": tenant, "x-api-key": "k"})
        assert r.headers["x-cache"] == "hit" and r.headers["x-from"] == "node" and r.text == "hello from elsewhere"
        c.cache_set(tenant, "user=1:k GET /items/shared", b"not an entry", ttl_ms=10_000)
        r = http.get("/items/shared", headers={"x-tenant": tenant, "x-api-key": "k"})
        # Not an entry: a miss (the app answers), not an error.
        assert r.headers["x-cache"] == "miss" and r.json() == {"id": "shared"}


def test_a_filler_that_stores_nothing_releases_the_fill_lock(http: httpx.Client, daemon: Any, tenant: str) -> None:
    """A 404 is not stored: the fill lock its request took is dropped, not left for fill_ms (10 s) to lapse."""
    from quotad import Client

    hdrs = {"x-tenant": tenant, "x-api-key": "k"}
    assert http.get("/items-missing", headers=hdrs).status_code == 404  # this request was the filler
    with Client(str(daemon.socket), failure_mode="raise") as c:
        # The middleware releases the lock after the response went out, so it may still be
        # held now: poll until it is gone. A read held on the lock is let go as soon as quotad
        # sees it gone, with a plain miss: ask again then.
        deadline = time.monotonic() + 2.0
        while not c.cache_lookup(tenant, "user=1:k GET /items-missing", fill_ms=100).fill:
            assert time.monotonic() < deadline, "the fill lock is still held"


async def test_a_filler_release_keeps_a_value_stored_meanwhile(daemon: Any, tenant: str) -> None:
    """The filler's response is not stored (404), but another caller (whose own fill_ms ran
    out) stored the page meanwhile: the release drops the fill lock only, the page stays.
    Without a page stored, the release lets the next caller fill at once."""
    import msgpack

    client = AsyncClient(str(daemon.socket), failure_mode="raise", timeout=2.0)
    app = FastAPI()
    page = msgpack.packb({"s": 200, "h": [["content-type", "text/plain"]], "b": b"stored meanwhile"}, use_bin_type=True)

    @app.get("/items/{item_id}")
    async def item(item_id: str, request: Request, response: Response) -> dict[str, str]:
        if item_id == "raced":
            await client.cache_set(context(request).tenant, "user=1:k GET /items/raced", page, ttl_ms=60_000)
        response.status_code = 404
        return {"id": item_id}

    _with_middleware(app, client)
    hdrs = {"x-tenant": tenant, "x-api-key": "k"}
    try:
        # In-process: a request returns once the middleware is done, its release included.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            r = await http.get("/items/raced", headers=hdrs)
            assert r.status_code == 404 and r.headers["x-cache"] == "miss"  # the filler
            r = await http.get("/items/raced", headers=hdrs)
            assert r.headers["x-cache"] == "hit" and r.text == "stored meanwhile"

            assert (await http.get("/items/7", headers=hdrs)).status_code == 404  # the filler, nothing stored
            t0 = time.monotonic()
            assert (await client.cache_lookup(tenant, "user=1:k GET /items/7", fill_ms=10_000)).fill
            assert time.monotonic() - t0 < 2.0, "the fill lock was still held"
    finally:
        await client.close()


async def test_a_store_or_release_failing_after_the_response_is_logged_not_raised(
    own_daemon: Any, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """failure_mode="raise": once the app has answered, failing to store the response (or
    to release the fill lock) is logged; nothing is raised into the server after the response."""
    client = AsyncClient(str(own_daemon.socket), failure_mode="raise", timeout=0.3)
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str, response: Response) -> dict[str, str]:
        own_daemon.pause()  # quotad hangs once the app has answered
        if item_id == "gone":
            response.status_code = 404  # not stored: the lock is released instead
        return {"id": item_id}

    _with_middleware(app, client)
    hdrs = {"x-tenant": tenant, "x-api-key": "k"}
    try:
        # In-process: whatever the app raises, even after its response, is raised here.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            for path, status, what in (("/items/7", 200, "store"), ("/items/gone", 404, "release")):
                caplog.clear()
                with caplog.at_level(logging.WARNING, logger="quotad"):
                    r = await http.get(path, headers=hdrs)
                own_daemon.resume()
                assert r.status_code == status and r.json()["id"] == path.rsplit("/", 1)[1]
                assert f"could not {what} the cache entry" in caplog.text
    finally:
        own_daemon.resume()
        await client.close()


async def test_route_limit_without_the_middleware_has_the_middleware_defaults() -> None:
    """The default tenant, keyed by the client's IP (the IP is not the tenant)."""
    from quotad import Decision

    seen: list[tuple[str, str]] = []

    class Recording:
        async def check(self, tenant: str, key: str, policy: str | None = None, cost: int = 1) -> Decision:
            seen.append((tenant, key))
            return Decision(True, 1, 0, 0, 0, False, "r")

    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b"",
             "client": ("10.1.2.3", 5555)}
    # A dependency with yield (it may hold a lease until the response is done).
    held = RateLimit(Recording(), policy="p")(Request(scope), Response())  # type: ignore[arg-type]
    assert (await anext(held)).allowed
    await held.aclose()
    assert seen == [("default", "10.1.2.3")]
