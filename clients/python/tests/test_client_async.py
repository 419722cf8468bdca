"""quotad.AsyncClient against the real daemon and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncio
import time

import pytest

from quotad import AsyncClient, BadRequest, UnknownPolicy


@pytest.fixture
async def client(socket_path: str) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(socket_path, failure_mode="raise") as c:
        yield c


async def test_hello_and_stats(client: AsyncClient) -> None:
    assert (await client.hello()).protocol == 1
    assert (await client.stats()).backend == "redis"


async def test_allowed_then_denied_with_headers(client: AsyncClient, tenant: str) -> None:
    decisions = [await client.check(tenant, "user:1") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    denied = decisions[-1]
    assert denied.headers()["Retry-After"] == str(-(-denied.retry_after_ms // 1000)) == "100"
    assert "Retry-After" not in decisions[0].headers()
    assert decisions[0].headers()["RateLimit-Policy"] == '"burst";q=5;w=500'
    assert decisions[0].headers(legacy=True)["RateLimit-Limit"] == "5"


async def test_typed_errors(client: AsyncClient, tenant: str) -> None:
    with pytest.raises(UnknownPolicy):
        await client.check(tenant, "k", policy="nope")
    with pytest.raises(BadRequest):
        await client.check(tenant, "k", cost=6)


async def test_200_concurrent_checks_one_connection(client: AsyncClient, tenant: str) -> None:
    before = (await client.stats()).counters["connections_total"]
    decisions = await asyncio.gather(*(client.check(tenant, "shared", policy="fifty") for _ in range(200)))
    assert sum(d.allowed for d in decisions) == 50
    assert all(d.degraded is False for d in decisions)
    # Remaining counts of the allowed ones are 49..0, each exactly once.
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(50))
    assert (await client.stats()).counters["connections_total"] == before


async def test_replies_out_of_order_are_matched(client: AsyncClient, tenant: str) -> None:
    # A held cache read (fill_ms) is answered after checks sent later.
    first = await client.cache_lookup(tenant, "slow", fill_ms=2000)
    assert first.fill
    held = asyncio.ensure_future(client.cache_lookup(tenant, "slow", fill_ms=2000))
    await asyncio.sleep(0.05)
    quick = [await client.check(tenant, f"k{i}", policy="api") for i in range(3)]
    assert all(d.allowed for d in quick) and not held.done()
    assert await client.cache_set(tenant, "slow", b"filled", ttl_ms=10_000)
    got = await held
    assert got.hit and got.value == b"filled"


async def test_cache_round_trip_and_tags(client: AsyncClient, tenant: str) -> None:
    assert await client.cache_get(tenant, "a") is None
    assert await client.cache_set(tenant, "a", b"A", ttl_ms=10_000, tags=["t1"])
    assert await client.cache_set(tenant, "b", bytearray(b"B"), ttl_ms=10_000, tags=["t1", "t2"])  # type: ignore[arg-type]
    assert await client.cache_get(tenant, "a") == b"A"
    assert await client.cache_delete(tenant, tags=["t2"]) == 1
    assert await client.cache_get(tenant, "b") is None
    assert await client.cache_get(tenant, "a") == b"A"


async def test_fill_only_delete_drops_the_fill_lock_not_the_value(client: AsyncClient, tenant: str) -> None:
    assert (await client.cache_lookup(tenant, "a", fill_ms=10_000)).fill  # this caller holds the lock
    assert await client.cache_delete(tenant, keys=["a"], fill_only=True) == 1  # one lock dropped
    t0 = time.monotonic()
    assert (await client.cache_lookup(tenant, "a", fill_ms=10_000)).fill  # the next caller fills at once
    assert time.monotonic() - t0 < 2.0
    assert await client.cache_set(tenant, "a", b"stored meanwhile", ttl_ms=60_000)  # by someone else
    assert await client.cache_delete(tenant, keys=["a"], fill_only=True) == 0  # no lock left
    assert await client.cache_get(tenant, "a") == b"stored meanwhile"  # and the value stays


async def test_check_get_denied_reads_nothing(client: AsyncClient, tenant: str) -> None:
    await client.cache_set(tenant, "page", b"P", ttl_ms=10_000)
    results = [await client.check_get(tenant, "u", "page", policy="tiny") for _ in range(3)]
    assert [r.decision.allowed for r in results] == [True, True, False]
    assert results[0].lookup is not None and results[0].lookup.value == b"P"
    assert results[2].lookup is None


async def test_client_outlives_an_event_loop(socket_path: str, tenant: str) -> None:
    """A client created at import time and used from a new loop (as in tests) reconnects there."""
    c = AsyncClient(socket_path)
    assert (await c.check(tenant, "k")).allowed

    def in_another_loop() -> bool:
        return asyncio.run(c.check(tenant, "k")).allowed

    assert await asyncio.get_running_loop().run_in_executor(None, in_another_loop)
    assert (await c.check(tenant, "k")).allowed  # and back
    await c.close()


async def test_usage_matches_the_check(client: AsyncClient, tenant: str) -> None:
    d = await client.check(tenant, "u", policy="tiny", cost=2)
    (u,) = await client.usage(tenant, "u", policy="tiny")
    assert (u.rule, u.kind, u.limit, u.used, u.remaining, u.window_ms) == ("per_minute", "fixed_window", 2, 2, 0, 60_000)
    assert (u.remaining, u.kind, u.window_ms) == (d.remaining, d.kind, d.window_ms)
    assert 0 <= d.reset_ms - u.reset_ms < 1000  # the same window's end, a moment later
