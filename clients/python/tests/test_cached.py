"""@cached against the real daemon."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from daemons import Quotad
from quotad import AsyncClient
from quotad.cached import cached


@pytest.fixture
async def client(socket_path: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(socket_path, failure_mode="raise") as c:
        yield c


async def test_computes_once_per_arguments(client: AsyncClient, tenant: str) -> None:
    calls: list[tuple[str, str]] = []

    @cached(client, tenant=tenant, ttl_ms=60_000, tags=["prices"])
    async def price(sku: str, currency: str = "EUR") -> dict[str, object]:
        calls.append((sku, currency))
        return {"sku": sku, "currency": currency, "cents": 1234}

    first = await price("A1")
    assert first == {"sku": "A1", "currency": "EUR", "cents": 1234}
    assert await price("A1") == first
    assert await price(sku="A1") == first  # bound to the signature: the same entry
    assert await price("A1", "EUR") == first
    assert calls == [("A1", "EUR")]
    await price("A1", currency="USD")
    assert calls == [("A1", "EUR"), ("A1", "USD")]
    assert price.cache_key("A1") == price.cache_key(sku="A1", currency="EUR")
    assert price.cache_key("A1").startswith(f"{__name__}.test_computes_once_per_arguments.<locals>.price:")

    assert await price.invalidate("A1") is True
    await price("A1")
    assert len(calls) == 3
    assert await client.cache_delete(tenant, tags=["prices"]) == 2
    await price("A1")
    assert len(calls) == 4


async def test_key_is_stable_across_processes(client: AsyncClient, tenant: str) -> None:
    """Same key under different hash seeds: hash() is never part of it."""
    script = textwrap.dedent(
        """
        from quotad import AsyncClient
        from quotad.cached import cached

        @cached(AsyncClient("/nonexistent"), tenant="t", ttl_ms=1000)
        async def f(a, b=None, *, c=("x", 1)):
            return None

        print(f.cache_key("s", {"k": [1, 2.5, None, True]}, c=(b"\\x00", "é")))
        """
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": seed},
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert len(keys) == 1
    (key,) = keys
    assert key.startswith("__main__.f:") and len(key) == len("__main__.f:") + 32


async def test_refuses_what_it_cannot_key(client: AsyncClient, tenant: str) -> None:
    @cached(client, tenant=tenant, ttl_ms=1000)
    async def f(x: object) -> int:
        return 1

    with pytest.raises(TypeError, match="stable cache key"):
        await f(object())
    with pytest.raises(TypeError):

        @cached(client, tenant=tenant, ttl_ms=1000)  # type: ignore[arg-type]
        def sync(x: int) -> int:
            return x

    with pytest.raises(TypeError):
        cached(client, tenant=tenant, ttl_ms=1000, tags="one")


async def test_custom_key_and_serializer(client: AsyncClient, tenant: str) -> None:
    n = 0

    @cached(client, tenant=tenant, ttl_ms=60_000, key=lambda user: user["id"], dumps=lambda v: v, loads=lambda b: b)
    async def avatar(user: dict[str, str]) -> bytes:
        nonlocal n
        n += 1
        return b"\x89PNG" + user["id"].encode()

    assert await avatar({"id": "u1", "name": "A"}) == b"\x89PNGu1"
    assert await avatar({"id": "u1", "name": "B"}) == b"\x89PNGu1"
    assert n == 1


async def test_sidecar_unavailable_computes_every_time(tmp_path: object) -> None:
    down = AsyncClient(f"{tmp_path}/none.sock", timeout=0.2)
    n = 0

    @cached(down, tenant="t", ttl_ms=1000)
    async def f() -> int:
        nonlocal n
        n += 1
        return n

    assert [await f(), await f()] == [1, 2]


async def test_a_failed_fill_releases_the_lock(client: AsyncClient, tenant: str) -> None:
    """The filler raised: the next caller fills at once instead of waiting fill_ms for the lock."""

    @cached(client, tenant=tenant, ttl_ms=60_000, fill_ms=10_000)
    async def boom() -> int:
        raise RuntimeError("failed")

    with pytest.raises(RuntimeError):
        await boom()
    t0 = time.monotonic()
    lookup = await client.cache_lookup(tenant, boom.cache_key(), fill_ms=10_000)
    assert lookup.fill and time.monotonic() - t0 < 2.0


async def test_a_fill_cancelled_by_a_cancel_scope_releases_the_lock(own_daemon: Quotad, tenant: str) -> None:
    """Cancelled by an anyio cancel scope (as under Starlette): the release is not cancelled too.

    quotad restarts while the function runs, so the release has to connect
    again: a cancel scope cancels that await as well unless it is shielded.
    """
    anyio = pytest.importorskip("anyio")
    async with AsyncClient(str(own_daemon.socket), failure_mode="raise", timeout=2.0) as client:
        with anyio.CancelScope() as scope:

            @cached(client, tenant=tenant, ttl_ms=60_000, fill_ms=5_000)
            async def slow() -> int:
                own_daemon.stop()
                own_daemon.start()
                await asyncio.sleep(0.1)  # the client sees its connection closed
                scope.cancel()
                await asyncio.sleep(30)
                return 1

            await slow()
        assert scope.cancelled_caught
        t0 = time.monotonic()
        lookup = await client.cache_lookup(tenant, slow.cache_key(), fill_ms=5_000)
        assert lookup.fill and time.monotonic() - t0 < 2.0, "the fill lock is still held"


async def test_a_store_failing_after_the_call_is_logged_not_raised(
    own_daemon: Quotad, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """failure_mode="raise": the value is computed; failing to store it is a later miss, not this call's error."""
    async with AsyncClient(str(own_daemon.socket), failure_mode="raise", timeout=0.3) as client:

        @cached(client, tenant=tenant, ttl_ms=60_000)
        async def f() -> int:
            own_daemon.pause()  # quotad hangs before the value is stored
            return 7

        try:
            with caplog.at_level(logging.WARNING, logger="quotad"):
                assert await f() == 7
        finally:
            own_daemon.resume()
    assert "could not store the cache entry" in caplog.text


async def test_a_failed_fill_keeps_a_value_stored_meanwhile(client: AsyncClient, tenant: str) -> None:
    """Another caller (whose own fill_ms ran out) stored the value while the filler worked,
    then the filler failed: its release drops its lock only, never that value."""

    @cached(client, tenant=tenant, ttl_ms=60_000, fill_ms=10_000)
    async def raced() -> int:
        await client.cache_set(tenant, raced.cache_key(), b"2", ttl_ms=60_000)
        raise RuntimeError("failed")

    with pytest.raises(RuntimeError):
        await raced()
    assert await client.cache_get(tenant, raced.cache_key()) == b"2"
    assert await raced() == 2  # a hit
