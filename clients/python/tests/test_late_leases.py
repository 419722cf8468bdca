"""A check the client gave up on (its own timeout, shorter than quotad's answer) is answered degraded; when quotad's
late reply carries a lease, the client releases it by itself: the sync and the async client, against a real quotad
frozen (SIGSTOP) for longer than the client's timeout. Afterwards `usage` counts no lease outstanding."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import Quotad, Redis
from quotad import AsyncClient, Client
from test_leases import LEASED, outstanding, releases, wait_for

CLIENT_TIMEOUT = 0.15
FROZEN = 0.5


@pytest.fixture
def frozen(tmp_path: Path, redis: Redis) -> Iterator[Quotad]:
    q = Quotad(tmp_path, redis, tables=LEASED)
    yield q
    q.close()


def freeze(q: Quotad) -> None:
    """Freezes quotad now and thaws it FROZEN seconds later: a request sent meanwhile is answered late."""
    q.pause()
    threading.Timer(FROZEN, q.resume).start()


def assert_released_late(q: Quotad, tenant: str, before: int) -> None:
    with Client(str(q.socket), timeout=5.0) as probe:
        wait_for("the client's release of the late lease", lambda: releases(probe) > before)
        assert releases(probe) == before + 1
        assert outstanding(probe, tenant, "k") == 0


def test_sync_client_releases_the_lease_of_a_late_reply(frozen: Quotad, tenant: str) -> None:
    with Client(str(frozen.socket), timeout=5.0) as probe:
        before = releases(probe)
    with Client(str(frozen.socket), timeout=CLIENT_TIMEOUT) as c:
        assert c.check(tenant, "warm", "inflight", cost=0).lease is None  # connected
        freeze(frozen)
        d = c.check(tenant, "k", "inflight")
        assert d.degraded and d.lease is None, d
        assert_released_late(frozen, tenant, before)


def test_sync_check_get_releases_the_lease_of_a_late_reply(frozen: Quotad, tenant: str) -> None:
    with Client(str(frozen.socket), timeout=5.0) as probe:
        before = releases(probe)
    with Client(str(frozen.socket), timeout=CLIENT_TIMEOUT) as c:
        c.check(tenant, "warm", "inflight", cost=0)
        freeze(frozen)
        got = c.check_get(tenant, "k", "page", "inflight")
        assert got.decision.degraded and got.decision.lease is None
        assert_released_late(frozen, tenant, before)


def test_async_client_releases_the_lease_of_a_late_reply(frozen: Quotad, tenant: str) -> None:
    with Client(str(frozen.socket), timeout=5.0) as probe:
        before = releases(probe)

    async def run() -> None:
        async with AsyncClient(str(frozen.socket), timeout=CLIENT_TIMEOUT) as q:
            await q.check(tenant, "warm", "inflight", cost=0)
            freeze(frozen)
            d = await q.check(tenant, "k", "inflight")
            assert d.degraded and d.lease is None, d
            got = await q.check_get(tenant, "k", "page", "inflight")
            assert got.decision.degraded
            # The replies arrive once quotad thaws; the client stays open to release their leases.
            await asyncio.sleep(FROZEN + 0.5)

    asyncio.run(run())
    with Client(str(frozen.socket), timeout=5.0) as probe:
        wait_for("the client's releases of the late leases", lambda: releases(probe) >= before + 2)
        assert releases(probe) == before + 2
        assert outstanding(probe, tenant, "k") == 0
