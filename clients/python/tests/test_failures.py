"""Bad values, a killed / hung / restarted sidecar, connection-level errors."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daemons import Quotad, Redis
from fake_server import Recorder
from quotad import (
    AsyncClient,
    Client,
    ConnectionLost,
    Forbidden,
    InvalidArgument,
    QuotadUnavailable,
    RequestTimedOut,
)

TIMEOUT = 0.3
SLACK = 0.25  # scheduling on a busy 2-CPU machine


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    r = Recorder(tmp_path / "fake.sock")
    yield r
    r.close()


BAD_CALLS: list[tuple[str, Callable[[Any], Any]]] = [
    ("empty tenant", lambda c: c.check("", "k")),
    ("tenant not str", lambda c: c.check(b"acme", "k")),
    ("key not str", lambda c: c.check("t", 42)),
    ("empty key", lambda c: c.check("t", "")),
    ("empty policy", lambda c: c.check("t", "k", policy="")),
    ("negative cost", lambda c: c.check("t", "k", cost=-1)),
    ("bool cost", lambda c: c.check("t", "k", cost=True)),
    ("float cost", lambda c: c.check("t", "k", cost=1.5)),
    ("cost over u64", lambda c: c.check("t", "k", cost=1 << 64)),
    ("lone surrogate", lambda c: c.check("t", "\udc80")),
    ("str value", lambda c: c.cache_set("t", "k", "text", ttl_ms=1000)),
    ("None value", lambda c: c.cache_set("t", "k", None, ttl_ms=1000)),
    ("zero ttl", lambda c: c.cache_set("t", "k", b"v", ttl_ms=0)),
    ("negative stale", lambda c: c.cache_set("t", "k", b"v", ttl_ms=1, stale_ms=-1)),
    ("tags as one str", lambda c: c.cache_set("t", "k", b"v", ttl_ms=1, tags="items")),
    ("empty tag", lambda c: c.cache_set("t", "k", b"v", ttl_ms=1, tags=["ok", ""])),
    ("value over the frame limit", lambda c: c.cache_set("t", "k", b"x" * (2 << 20), ttl_ms=1)),
    ("delete nothing", lambda c: c.cache_delete("t")),
    ("delete keys as str", lambda c: c.cache_delete("t", keys="GET /")),
    ("fill_only with tags", lambda c: c.cache_delete("t", keys=["k"], tags=["items"], fill_only=True)),
    ("fill_only by tag only", lambda c: c.cache_delete("t", tags=["items"], fill_only=True)),
    ("fill_only not a bool", lambda c: c.cache_delete("t", keys=["k"], fill_only=1)),
    ("negative fill_ms", lambda c: c.cache_get("t", "k", fill_ms=-5)),
    ("empty cache_key", lambda c: c.check_get("t", "k", "")),
]


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
def test_bad_values_raise_before_sending_sync(recorder: Recorder, name: str, call: Callable[[Any], Any]) -> None:
    with Client(str(recorder.path)) as c:
        with pytest.raises(InvalidArgument):
            call(c)
    time.sleep(0.02)
    assert recorder.connections == 0 and recorder.received == b""


@pytest.mark.parametrize("name,call", BAD_CALLS, ids=[n for n, _ in BAD_CALLS])
async def test_bad_values_raise_before_sending_async(
    recorder: Recorder, name: str, call: Callable[[Any], Any]
) -> None:
    async with AsyncClient(str(recorder.path)) as c:
        with pytest.raises(InvalidArgument):
            await call(c)
    await asyncio.sleep(0.02)
    assert recorder.connections == 0 and recorder.received == b""


def test_invalid_argument_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Client("/nonexistent").check("", "k")


def wait_until(predicate: Callable[[], bool], timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_killed_sidecar_fails_open_then_reconnects_sync(own_daemon: Quotad, tenant: str) -> None:
    path = str(own_daemon.socket)
    with Client(path, timeout=TIMEOUT) as open_, Client(path, timeout=TIMEOUT, failure_mode="closed") as closed, \
            Client(path, timeout=TIMEOUT, failure_mode="raise") as raising:
        for c in (open_, closed, raising):
            assert not c.check(tenant, "k", policy="api").degraded
        own_daemon.kill()

        t0 = time.monotonic()
        d = open_.check(tenant, "k", policy="api")
        assert time.monotonic() - t0 < TIMEOUT + SLACK
        assert d.allowed and d.degraded and "Retry-After" not in d.headers()

        d = closed.check(tenant, "k", policy="api")
        assert not d.allowed and d.degraded and d.retry_after_ms == 1000
        assert d.headers()["Retry-After"] == "1"
        with pytest.raises(QuotadUnavailable):
            raising.check(tenant, "k", policy="api")

        # Cache calls degrade softly when failing open/closed.
        assert open_.cache_get(tenant, "x") is None
        assert open_.cache_lookup(tenant, "x").degraded
        assert open_.cache_set(tenant, "x", b"v", ttl_ms=1000) is False
        assert open_.cache_delete(tenant, tags=["t"]) == 0
        r = open_.check_get(tenant, "k", "x", policy="api")
        assert r.decision.degraded and r.lookup is not None and r.lookup.degraded

        own_daemon.start()  # same socket path

        def decided(c: Client) -> bool:
            try:
                return not c.check(tenant, "k", policy="api").degraded
            except QuotadUnavailable:  # the "raise" client, until its backoff lets it reconnect
                return False

        for c in (open_, closed, raising):
            wait_until(lambda c=c: decided(c))  # type: ignore[misc]


async def test_killed_sidecar_fails_open_then_reconnects_async(own_daemon: Quotad, tenant: str) -> None:
    c = AsyncClient(str(own_daemon.socket), timeout=TIMEOUT)
    assert not (await c.check(tenant, "k", policy="api")).degraded
    own_daemon.kill()
    t0 = time.monotonic()
    decisions = await asyncio.gather(*(c.check(tenant, "k", policy="api") for _ in range(50)))
    assert time.monotonic() - t0 < TIMEOUT + SLACK
    assert all(d.allowed and d.degraded for d in decisions)
    assert await c.cache_get(tenant, "x") is None

    own_daemon.start()
    deadline = time.monotonic() + 6
    while (await c.check(tenant, "k", policy="api")).degraded:
        assert time.monotonic() < deadline, "did not reconnect"
        await asyncio.sleep(0.05)
    await c.close()


async def test_in_flight_calls_when_the_sidecar_dies(own_daemon: Quotad, tenant: str) -> None:
    c = AsyncClient(str(own_daemon.socket), timeout=2.0)
    assert not (await c.check(tenant, "k")).degraded
    own_daemon.pause()  # requests pile up unanswered ...
    calls = asyncio.gather(*(c.check(tenant, f"k{i}", policy="api") for i in range(100)))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    own_daemon.kill()  # ... then the connection breaks: all fail over at once, not at their timeout
    decisions = await calls
    assert time.monotonic() - t0 < 1.0
    assert all(d.allowed and d.degraded for d in decisions)
    own_daemon.start()
    deadline = time.monotonic() + 6
    while (await c.check(tenant, "k", policy="api")).degraded:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await c.close()


def test_hung_sidecar_times_out_then_recovers_sync(own_daemon: Quotad, tenant: str) -> None:
    with Client(str(own_daemon.socket), timeout=TIMEOUT) as c, \
            Client(str(own_daemon.socket), timeout=TIMEOUT, failure_mode="raise") as raising:
        assert not c.check(tenant, "k", policy="api").degraded
        assert not raising.check(tenant, "k", policy="api").degraded
        own_daemon.pause()
        try:
            t0 = time.monotonic()
            d = c.check(tenant, "k", policy="api")
            elapsed = time.monotonic() - t0
            assert d.allowed and d.degraded
            assert TIMEOUT - 0.05 < elapsed < TIMEOUT + SLACK
            with pytest.raises(RequestTimedOut):
                raising.check(tenant, "k", policy="api")
        finally:
            own_daemon.resume()
        # Same connection: the late replies are dropped, new calls are answered.
        assert not c.check(tenant, "k", policy="api").degraded


async def test_hung_sidecar_times_out_async(own_daemon: Quotad, tenant: str) -> None:
    c = AsyncClient(str(own_daemon.socket), timeout=TIMEOUT, failure_mode="raise")
    assert not (await c.check(tenant, "k")).degraded
    own_daemon.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(RequestTimedOut):
            await c.check(tenant, "k", policy="api")
        assert time.monotonic() - t0 < TIMEOUT + SLACK
    finally:
        own_daemon.resume()
    assert not (await c.check(tenant, "k", policy="api")).degraded
    await c.close()


@pytest.fixture
def strict_daemon(tmp_path: Path, redis: Redis) -> Iterator[Quotad]:
    q = Quotad(tmp_path, redis, server_extra="max_connections = 1\nmax_frame_bytes = 4096",
               tables="[cache]\nmax_value_bytes = 2048\n")
    yield q
    q.close()


def wait_for_slot(call: Callable[[], object]) -> None:
    """Retries while quotad still counts the warm-up connection (its slot is freed a moment after it closes)."""
    for attempt in range(50):
        try:
            call()
            return
        except ConnectionLost:
            assert attempt < 49
            time.sleep(0.02)


def test_connection_level_errors_fail_the_connection(strict_daemon: Quotad, tenant: str) -> None:
    path = str(strict_daemon.socket)
    with Client(path, failure_mode="raise") as first:
        wait_for_slot(lambda: first.check(tenant, "k"))
        # A frame over the daemon's max_frame_bytes: id-0 too_large, connection closed.
        with pytest.raises(ConnectionLost) as e:
            first.cache_set(tenant, "big", b"x" * 8000, ttl_ms=1000)
        assert e.value.server_error is not None and e.value.server_error.code == "too_large"
        assert not first.check(tenant, "k").degraded  # reconnected

        # A second connection is over max_connections: id-0 overloaded.
        with Client(path, failure_mode="raise") as second:
            with pytest.raises(ConnectionLost) as e:
                second.check(tenant, "k")
            assert e.value.server_error is not None and e.value.server_error.code == "overloaded"
        with Client(path) as third:
            d = third.check(tenant, "k")
            assert d.allowed and d.degraded


async def test_connection_level_error_async(strict_daemon: Quotad, tenant: str) -> None:
    c = AsyncClient(str(strict_daemon.socket), failure_mode="raise")
    for attempt in range(50):  # the warm-up connection's slot is freed a moment after it closes
        try:
            assert (await c.check(tenant, "k", policy="api")).allowed
            break
        except ConnectionLost:
            assert attempt < 49
            await asyncio.sleep(0.02)
    with pytest.raises(ConnectionLost) as e:
        await c.cache_set(tenant, "big", b"x" * 8000, ttl_ms=1000)
    assert e.value.server_error is not None and e.value.server_error.code == "too_large"
    assert not (await c.check(tenant, "k", policy="api")).degraded
    await c.close()


@pytest.fixture
def refusing_daemon(tmp_path: Path) -> Iterator[Quotad]:
    """A daemon whose ``[[access]]`` rules admit one uid, not this test's."""
    other = 4242 if os.getuid() != 4242 else 4243
    q = Quotad(tmp_path, None, tables=f'[[access]]\nuids = [{other}]\ntenants = ["*"]\n')
    yield q
    q.close()


@pytest.mark.parametrize("mode", ["open", "closed", "raise"])
def test_a_refusal_at_connect_raises_forbidden_sync(refusing_daemon: Quotad, tenant: str, mode: Any) -> None:
    with Client(str(refusing_daemon.socket), failure_mode=mode) as c:
        for _ in range(2):  # the next call reconnects, and is refused again
            with pytest.raises(Forbidden) as e:
                c.check(tenant, "k")
            assert e.value.code == "forbidden"
            assert f"no `[[access]]` rule admits uid {os.getuid()}" in e.value.message
        with pytest.raises(Forbidden):
            c.cache_get(tenant, "k")


@pytest.mark.parametrize("mode", ["open", "closed", "raise"])
async def test_a_refusal_at_connect_raises_forbidden_async(refusing_daemon: Quotad, tenant: str, mode: Any) -> None:
    c = AsyncClient(str(refusing_daemon.socket), failure_mode=mode)
    try:
        for _ in range(2):
            with pytest.raises(Forbidden) as e:
                await c.check(tenant, "k")
            assert f"no `[[access]]` rule admits uid {os.getuid()}" in e.value.message
        with pytest.raises(Forbidden):
            await c.cache_get(tenant, "k")
    finally:
        await c.close()


async def test_max_pending_bounds_calls_in_flight(socket_path: str, tenant: str) -> None:
    c = AsyncClient(socket_path, max_pending=4)
    decisions = await asyncio.gather(*(c.check(tenant, f"k{i}", policy="api") for i in range(100)))
    assert all(d.allowed and not d.degraded for d in decisions)
    await c.close()


def test_closed_client_is_unavailable(socket_path: str, tenant: str) -> None:
    c = Client(socket_path, failure_mode="raise")
    c.check(tenant, "k", policy="api")
    c.close()
    with pytest.raises(QuotadUnavailable):
        c.check(tenant, "k", policy="api")


async def test_write_buffer_is_bounded_while_the_sidecar_does_not_read(own_daemon: Quotad, tenant: str) -> None:
    from quotad.aio import WRITE_BUFFER_BYTES

    c = AsyncClient(str(own_daemon.socket), timeout=0.5)
    assert not (await c.check(tenant, "k")).degraded
    own_daemon.pause()
    try:
        value = b"v" * (200 << 10)
        calls = asyncio.gather(*(c.cache_set(tenant, f"k{i}", value, ttl_ms=10_000) for i in range(100)))
        await asyncio.sleep(0.2)
        assert c._proto is not None and c._proto.transport is not None
        buffered = c._proto.transport.get_write_buffer_size()
        assert 0 < buffered <= WRITE_BUFFER_BYTES + (256 << 10)  # not 20 MB
        assert await calls == [False] * 100  # timed out: not stored
    finally:
        own_daemon.resume()
    assert not (await c.check(tenant, "k")).degraded
    await c.close()


async def test_cancelled_calls_release_their_slots(socket_path: str, tenant: str) -> None:
    """Calls cancelled or timed out anywhere (waiting for a slot, in flight) give their slot back."""
    c = AsyncClient(socket_path, max_pending=2, timeout=5.0, failure_mode="raise")
    assert (await c.cache_lookup(tenant, "held", fill_ms=3000)).fill  # later reads are held by quotad
    waiting: list[asyncio.Task[Any]] = []

    async def held_then_cancel() -> None:
        await c.cache_lookup(tenant, "held", fill_ms=3000)
        # The slot of that call was just handed to a waiting call, which has not run yet:
        # cancel it (and every other waiting call) right now.
        for task in waiting:
            task.cancel()

    holders = [asyncio.ensure_future(held_then_cancel()) for _ in range(2)]
    await asyncio.sleep(0.05)
    waiting += [asyncio.ensure_future(c.check(tenant, f"k{i}", policy="api")) for i in range(50)]
    await asyncio.sleep(0.05)
    assert c._slots.in_flight == 2
    async with AsyncClient(socket_path) as other:
        assert await other.cache_set(tenant, "held", b"v", ttl_ms=10_000)  # answers the held reads
    await asyncio.gather(*holders)
    await asyncio.gather(*waiting, return_exceptions=True)
    assert all(t.cancelled() for t in waiting)  # a cancelled call does not go on regardless
    assert c._slots.in_flight == 0

    # Timed out from outside, while waiting for a slot or for the reply.
    calls = [asyncio.wait_for(c.cache_lookup(tenant, "held2", fill_ms=3000), 0.05) for _ in range(20)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, asyncio.TimeoutError) for r in results) >= 18
    assert c._slots.in_flight == 0
    assert c._proto is not None and not c._proto.pending
    assert (await c.check(tenant, "k", policy="api")).allowed  # and the client still works
    await c.close()


async def test_a_failed_write_fails_the_calls_at_once(socket_path: str, tenant: str) -> None:
    c = AsyncClient(socket_path, timeout=5.0, failure_mode="raise")
    assert (await c.check(tenant, "k", policy="api")).allowed
    assert c._proto is not None and c._proto.transport is not None

    def broken(data: object) -> None:
        raise OSError("broken by the test")

    c._proto.transport.write = broken  # type: ignore[method-assign]
    t0 = time.monotonic()
    with pytest.raises(ConnectionLost):
        await c.check(tenant, "k", policy="api")
    assert time.monotonic() - t0 < 1.0
    assert c._slots.in_flight == 0
    assert (await c.check(tenant, "k", policy="api")).allowed  # on a new connection
    await c.close()


def test_reader_ends_cleanly_when_closed_between_reads(
    own_daemon: Quotad, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    with Client(str(own_daemon.socket), timeout=0.1) as c:
        assert c.check(tenant, "k").allowed
        conn = c._conn
        assert conn is not None
        assert not [t for t in threading.enumerate() if t.name == "quotad-reader"], "a reader while nothing is in flight"
        own_daemon.pause()
        try:
            assert c.check(tenant, "k").degraded  # timed out: a reader thread waits for its late reply
            (reader,) = [t for t in threading.enumerate() if t.name == "quotad-reader"]
            # Closed without the shutdown that wakes the reader (it raced with a recv timeout,
            # or the shutdown failed): the reader notices at its next timeout and ends.
            conn._closed = True
            reader.join(2)
            assert not reader.is_alive()
        finally:
            own_daemon.resume()
    assert errors == []


def test_connecting_counts_within_the_timeout(recorder: Recorder) -> None:
    """A call waiting for another thread's connect still ends at its own timeout."""
    with Client(str(recorder.path), timeout=TIMEOUT, failure_mode="raise") as c:
        c._connect_lock.acquire()  # another thread is connecting, slowly
        threading.Timer(0.25, c._connect_lock.release).start()
        t0 = time.monotonic()
        with pytest.raises(QuotadUnavailable):
            c.check("t", "k")  # the fake server never answers
        assert time.monotonic() - t0 < TIMEOUT + SLACK


def test_writes_to_a_sidecar_that_stopped_reading_end_at_the_timeout(own_daemon: Quotad, tenant: str) -> None:
    with Client(str(own_daemon.socket), timeout=TIMEOUT) as c:
        assert not c.check(tenant, "k").degraded
        own_daemon.pause()
        try:
            value = b"v" * (400 << 10)  # more than the socket buffer takes

            def store(i: int) -> float:
                t0 = time.monotonic()
                assert c.cache_set(tenant, f"k{i}", value, ttl_ms=10_000) is False
                return time.monotonic() - t0

            with ThreadPoolExecutor(4) as pool:
                elapsed = list(pool.map(store, range(8)))
            assert max(elapsed) < TIMEOUT + SLACK, elapsed  # not one timeout per writer queued ahead
        finally:
            own_daemon.resume()
        wait_until(lambda: not c.check(tenant, "k").degraded)


def test_large_values_round_trip_sync(socket_path: str, tenant: str) -> None:
    """A frame bigger than the socket buffer goes out in several partial sends."""
    value = bytes(range(256)) * 2000  # 512000 bytes
    with Client(socket_path, failure_mode="raise", timeout=5.0) as c:
        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda i: c.cache_set(tenant, f"big{i}", value, ttl_ms=10_000), range(8)))
        assert all(c.cache_get(tenant, f"big{i}") == value for i in range(8))
