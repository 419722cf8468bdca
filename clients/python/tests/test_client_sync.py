"""quotad.Client against the real daemon and Redis."""

from __future__ import annotations

from collections.abc import Iterator

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import quotad
from quotad import BadRequest, Client, UnknownPolicy


@pytest.fixture
def client(socket_path: str) -> Iterator[Client]:
    with Client(socket_path, failure_mode="raise") as c:
        yield c


def test_hello(client: Client) -> None:
    h = client.hello()
    assert h.protocol == 1
    assert h.backend == "redis"
    assert h.server.startswith("quotad/")
    assert {"check", "check_get", "cache_get", "cache_set", "cache_del", "usage"} <= set(h.ops)


def test_allowed_then_denied_with_headers(client: Client, tenant: str) -> None:
    # default policy: a bucket of 5, refilled at 0.01/s (one unit per 100 s).
    first = client.check(tenant, "user:1")
    assert first.allowed and not first.degraded
    assert (first.limit, first.remaining, first.rule) == (5, 4, "burst")
    assert (first.kind, first.window_ms, first.shadow_denied) == ("token_bucket", 500_000, False)
    # 500 s to refill from empty; 100 s until full again.
    assert first.headers() == {"RateLimit-Policy": '"burst";q=5;w=500', "RateLimit": '"burst";r=4;t=100'}
    assert first.headers(legacy=True) == {
        **first.headers(),
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": str(-(-first.reset_ms // 1000)),
    }
    assert first.headers(legacy=True)["RateLimit-Reset"] == "100"
    for _ in range(4):
        assert client.check(tenant, "user:1").allowed
    denied = client.check(tenant, "user:1")
    assert not denied.allowed
    assert denied.remaining == 0
    assert 99_000 < denied.retry_after_ms <= 100_000
    assert denied.retry_after == pytest.approx(denied.retry_after_ms / 1000)
    h = denied.headers(legacy=True)
    assert h["Retry-After"] == "100"  # ceil of 99.9xx s
    assert h["RateLimit"] == '"burst";r=0;t=100'
    assert h["RateLimit-Remaining"] == "0"
    assert int(h["RateLimit-Reset"]) == -(-denied.reset_ms // 1000) >= 400
    # Another key is untouched.
    assert client.check(tenant, "user:2").remaining == 4


def test_peek_and_cost(client: Client, tenant: str) -> None:
    assert client.check(tenant, "k", policy="api", cost=3).remaining == 7
    assert client.check(tenant, "k", policy="api", cost=0).remaining == 7  # peek charges nothing
    assert client.check(tenant, "k", policy="api", cost=0).remaining == 7


def test_server_errors_are_typed(client: Client, tenant: str) -> None:
    with pytest.raises(UnknownPolicy) as e:
        client.check(tenant, "k", policy="nope")
    assert e.value.code == "unknown_policy"
    with pytest.raises(BadRequest, match="cost"):
        client.check(tenant, "k", cost=6)  # more than the bucket can ever hold
    with pytest.raises(quotad.UnknownOp):
        client.call({"op": "launch"})
    # The connection survives request-level errors.
    assert client.check(tenant, "k").allowed


def test_server_errors_raise_even_when_failing_open(socket_path: str, tenant: str) -> None:
    with Client(socket_path) as c:  # failure_mode="open"
        with pytest.raises(UnknownPolicy):
            c.check(tenant, "k", policy="nope")


def test_cache_round_trip_and_tags(client: Client, tenant: str) -> None:
    assert client.cache_get(tenant, "GET /a") is None
    miss = client.cache_lookup(tenant, "GET /a", fill_ms=1000)
    assert (miss.hit, miss.fill, miss.degraded) == (False, True, False)
    assert client.cache_set(tenant, "GET /a", b"\x00page a\xff", ttl_ms=60_000, tags=["items", "a"])
    assert client.cache_set(tenant, "GET /b", b"page b", ttl_ms=60_000, tags=["items"])
    assert client.cache_set(tenant, "GET /c", b"page c", ttl_ms=60_000, tags=["other"])
    hit = client.cache_lookup(tenant, "GET /a")
    assert hit.hit and hit.value == b"\x00page a\xff" and not hit.stale
    assert 59_000 < hit.ttl_ms <= 60_000
    assert client.cache_get(tenant, "GET /b") == b"page b"
    assert client.cache_get("someone-else-" + tenant, "GET /a") is None  # tenants are isolated
    assert client.cache_delete(tenant, tags=["items"]) == 2
    assert client.cache_get(tenant, "GET /a") is None
    assert client.cache_get(tenant, "GET /b") is None
    assert client.cache_get(tenant, "GET /c") == b"page c"
    assert client.cache_delete(tenant, keys=["GET /c", "GET /missing"]) == 1


def test_stale_while_revalidate(client: Client, tenant: str) -> None:
    import time

    client.cache_set(tenant, "k", b"old", ttl_ms=50, stale_ms=60_000)
    time.sleep(0.1)
    first = client.cache_lookup(tenant, "k")
    assert (first.hit, first.stale, first.refresh, first.value) == (True, True, True, b"old")
    second = client.cache_lookup(tenant, "k")
    assert (second.stale, second.refresh) == (True, False)  # one refresher per stale period


def test_fill_only_delete_drops_the_fill_lock_not_the_value(client: Client, tenant: str) -> None:
    assert client.cache_lookup(tenant, "GET /a", fill_ms=10_000).fill  # this caller holds the lock
    assert client.cache_delete(tenant, keys=["GET /a"], fill_only=True) == 1  # one lock dropped
    t0 = time.monotonic()
    assert client.cache_lookup(tenant, "GET /a", fill_ms=10_000).fill  # the next caller fills at once
    assert time.monotonic() - t0 < 2.0
    assert client.cache_set(tenant, "GET /a", b"stored meanwhile", ttl_ms=60_000)  # by someone else
    assert client.cache_delete(tenant, keys=["GET /a"], fill_only=True) == 0  # no lock left
    assert client.cache_get(tenant, "GET /a") == b"stored meanwhile"  # and the value stays


def test_check_get(client: Client, tenant: str) -> None:
    r = client.check_get(tenant, "u", "GET /x", policy="tiny", fill_ms=500)
    assert r.decision.allowed and r.lookup is not None and r.lookup.fill
    client.cache_set(tenant, "GET /x", b"x", ttl_ms=10_000)
    r = client.check_get(tenant, "u", "GET /x", policy="tiny")
    assert r.decision.allowed and r.lookup is not None and r.lookup.value == b"x"
    r = client.check_get(tenant, "u", "GET /x", policy="tiny")
    assert not r.decision.allowed and r.lookup is None  # denied: nothing read


def test_stats(client: Client, tenant: str) -> None:
    client.check(tenant, "k")
    s = client.stats()
    assert s.backend == "redis" and s.shards >= 1 and s.uptime_ms > 0
    assert s.counters["requests_check"] >= 1


def test_threads_pipeline_on_one_connection(client: Client, tenant: str) -> None:
    """200 concurrent checks from 32 threads, one socket, a limit of 50: exactly 50 pass."""
    before = client.stats().counters["connections_total"]
    barrier = threading.Barrier(32)

    def one(_: int) -> bool:
        if _ < 32:
            barrier.wait()
        return client.check(tenant, "shared", policy="fifty").allowed

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert sum(results) == 50
    assert client.stats().counters["connections_total"] == before  # no other connection was made


def test_usage_reports_every_rule_without_charging(client: Client, tenant: str) -> None:
    before = client.usage(tenant, "u", policy="api")
    assert [(u.rule, u.kind, u.limit, u.used, u.window_ms) for u in before] == [
        ("burst", "token_bucket", 10, 0, 2000),
        ("daily", "daily_quota", 1000, 0, 86_400_000),
    ]
    assert 0 < before[1].reset_ms <= 86_400_000  # to the next 00:00 UTC, used or not
    d = client.check(tenant, "u", policy="api", cost=3)
    after = client.usage(tenant, "u", policy="api")
    assert after[1].used == 3 and after[1].remaining == 997
    burst = after[0]
    assert burst.rule == d.rule and burst.remaining >= d.remaining and burst.used <= 3  # it may refill a little
    assert client.usage(tenant, "u", policy="api")[1].used == 3  # a usage charges nothing
    assert [u.rule for u in client.usage(tenant, "u")] == ["burst"]  # the default policy
    with pytest.raises(UnknownPolicy):
        client.usage(tenant, "u", policy="nope")
