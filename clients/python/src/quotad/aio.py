"""The asyncio client.

One connection per client (per event loop), requests pipelined on it: a
call registers a future under its id and writes its frame; the protocol's
``data_received`` resolves futures by id as replies arrive, in any order.
No task per call, no lock on the hot path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import _requests, _templates
from ._codec import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_REPLY_BYTES, FrameReader, decode_body, request_frame
from ._common import ClientOptions, FailureMode
from .errors import (
    TRANSIENT,
    ConnectFailed,
    ConnectionLost,
    QuotadError,
    RequestTimedOut,
    connection_error,
    server_error,
)
from .models import UNAVAILABLE_MISS, CheckGet, Decision, Hello, Lookup, RuleUsage, Stats, usage_from_reply

log = logging.getLogger("quotad")

Reply = dict[str, Any]

#: Bytes a connection buffers for writing before new calls wait for quotad to read.
WRITE_BUFFER_BYTES = 4 << 20
# Timed-out calls per connection whose late reply is still watched for (a lease to release).
MAX_LATE = 4096


class _Protocol(asyncio.Protocol):
    """One connection: frames in, futures resolved by id."""

    def __init__(self, max_reply_bytes: int, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[Reply]] = {}
        # Calls their callers gave up on (timed out): what to do with a late reply.
        self.late: dict[int, Callable[[Reply], None]] = {}
        self.error: QuotadError | None = None
        self._frames = FrameReader(max_reply_bytes)
        self._loop = loop
        # Frames written in one loop iteration go out in one write.
        self._out: list[bytes] = []
        self._out_bytes = 0
        # Calls with the client's default timeout expire in the order they were
        # made, so one timer (at the oldest deadline) serves them all. By id, not
        # future: a future held here until its deadline kept its reply alive too,
        # timeout * rate of them, which the GC traversed over and over (10% of the
        # client's CPU at 64 in flight). Answered calls leave as replies come.
        self._deadlines: deque[tuple[float, int, float]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        # Set while the transport's write buffer is over its high-water mark
        # (quotad reads slower than we write): new calls wait for it to drain.
        self.drained: asyncio.Future[None] | None = None
        # The transport's write buffer as of our last write: it only shrinks until the next,
        # so a call need not ask the transport (a method call) while far below the limit.
        self.buffered = 0

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = self._loop.create_future()

    def resume_writing(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def send(self, req_id: int, frame: bytes, deadline: float, timeout: float, ordered: bool) -> asyncio.Future[Reply]:
        """Queues a frame; the future gets the reply, or RequestTimedOut at ``deadline``
        (``timeout``: the seconds the error message says).

        ``ordered``: ``timeout`` is the same for every such call, and its
        deadline is ``timeout`` from now (deadlines then arrive in order and
        share the sweeper).
        """
        loop = self._loop
        fut: asyncio.Future[Reply] = loop.create_future()
        if self.error is not None:  # failed since the caller looked
            fut.set_exception(self.error)
            return fut
        self.pending[req_id] = fut
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(frame)
        self._out_bytes += len(frame)
        if ordered:
            self._deadlines.append((deadline, req_id, timeout))
            if self._sweeper is None:
                self._sweeper = loop.call_at(deadline, self._sweep)
        else:
            timer = loop.call_at(deadline, _expire, fut, timeout)
            fut.add_done_callback(lambda _: timer.cancel())
        return fut

    def backlog(self) -> asyncio.Future[None] | None:
        """A future to wait on while too much is buffered for writing, else None."""
        assert self.transport is not None
        if self._out_bytes + self.transport.get_write_buffer_size() <= WRITE_BUFFER_BYTES:
            return None
        self._flush()  # hand the batch to the transport, which pauses us if it cannot send it
        return self.drained

    def _flush(self) -> None:
        out, self._out = self._out, []
        self._out_bytes = 0
        if self.error is None and self.transport is not None and out:
            try:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                self.buffered = self.transport.get_write_buffer_size()
            except Exception as e:  # else the calls just written would wait for their timeout
                self.fail(ConnectionLost(f"writing to quotad failed: {e!r}"))

    def _sweep(self) -> None:
        self._sweeper = None
        queue = self._deadlines
        pending = self.pending
        now = self._loop.time()
        while queue and (queue[0][0] <= now or queue[0][1] not in pending):
            _, req_id, timeout = queue.popleft()
            fut = pending.get(req_id)
            if fut is not None:
                _expire(fut, timeout)
        if queue:
            self._sweeper = self._loop.call_at(queue[0][0], self._sweep)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)

    def data_received(self, data: bytes) -> None:
        try:
            for body in self._frames.feed(data):
                reply = decode_body(body)
                req_id = reply.get("id")
                if req_id == 0 and reply.get("ok") is False:
                    # Connection-level error (frame too large, too many
                    # connections): the daemon closes; fail everything in flight.
                    raise connection_error(reply.get("error"))
                fut = self.pending.pop(req_id, None) if isinstance(req_id, int) else None
                if fut is not None and not fut.done():
                    fut.set_result(reply)
                elif fut is None and isinstance(req_id, int) and (late := self.late.pop(req_id, None)):
                    late(reply)
        except QuotadError as e:
            self.fail(e)
            return
        # The answered calls at the head of the deadline queue go now, not at the oldest deadline.
        queue, pending = self._deadlines, self.pending
        while queue and queue[0][1] not in pending:
            queue.popleft()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(ConnectionLost(f"quotad closed the connection{reason}"))

    def fail(self, err: QuotadError, quiet: bool = False) -> None:
        """Fails every call in flight (and later ones) with ``err`` and drops the connection."""
        if self.error is None:
            self.error = err
            if not quiet:
                log.warning("quotad connection lost: %s", err)
        pending, self.pending = self.pending, {}
        self.late.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._out.clear()
        self._out_bytes = 0
        self._deadlines.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(err)
            self.drained.exception()  # retrieved: nobody may be waiting
        if self.transport is not None:
            self.transport.abort()


def _expire(fut: asyncio.Future[Reply], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(RequestTimedOut(f"no reply from quotad within {timeout:.3f}s"))


class _Slots:
    """At most ``limit`` calls in flight; more wait, oldest first, for a slot to be handed over."""

    __slots__ = ("limit", "in_flight", "_waiters")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Takes a slot (release it exactly once); RequestTimedOut if none is free by ``deadline``."""
        if self.in_flight < self.limit:
            self.in_flight += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)  # a waiter done by then (timed out, cancelled) is skipped
        timer = loop.call_at(deadline, _no_slot, waiter, self.limit)
        try:
            await waiter
        except asyncio.CancelledError:
            # Cancelled just after a slot was handed over: pass it on, or it is lost.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()
            raise
        finally:
            timer.cancel()

    def release(self) -> None:
        # Handed straight to a waiter: freeing it would let a new call take it too.
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


def _no_slot(waiter: asyncio.Future[None], limit: int) -> None:
    if not waiter.done():
        waiter.set_exception(RequestTimedOut(f"{limit} calls already in flight"))


class AsyncClient:
    """An asyncio quotad client. Share one per process (per event loop).

    Same behaviour as :class:`quotad.Client`: lazy connection, reconnects
    with backoff, and ``failure_mode`` deciding what a check answers while
    the daemon cannot. At most ``max_pending`` calls are in flight; more wait
    for a slot (within their timeout).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 0.5,
        connect_timeout: float = 0.25,
        failure_mode: FailureMode = "open",
        closed_retry_after_ms: int = 1000,
        max_pending: int = 1024,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self._opts = ClientOptions(
            socket_path,
            timeout=timeout,
            connect_timeout=connect_timeout,
            failure_mode=failure_mode,
            closed_retry_after_ms=closed_retry_after_ms,
            max_pending=max_pending,
            max_frame_bytes=max_frame_bytes,
            max_reply_bytes=max_reply_bytes,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        self._ids = itertools.count(1)
        self._proto: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._slots = _Slots(max_pending)
        self._late_releases: set[asyncio.Future[None]] = set()
        self._closed = False
        self._down = False

    @property
    def socket_path(self) -> str:
        return self._opts.socket_path

    # -- ops ---------------------------------------------------------------

    async def hello(self) -> Hello:
        return Hello.from_reply(await self.call(_requests.hello()))

    async def stats(self) -> Stats:
        return Stats.from_reply(await self.call(_requests.stats()))

    async def usage(self, tenant: str, key: str, policy: str | None = None) -> list[RuleUsage]:
        """Every rule of the policy as it stands for ``key``, charging nothing.

        Raises like :meth:`stats` when the daemon cannot answer (the failure
        mode does not apply: there is nothing to report), and
        :class:`SourceUnavailable` when its Redis cannot.
        """
        return usage_from_reply(await self.call(_requests.usage(tenant, key, policy)))

    async def check(self, tenant: str, key: str, policy: str | None = None, cost: int = 1) -> Decision:
        """May this request go ahead? ``cost=0`` peeks without charging."""
        req_id = next(self._ids)
        frame = _templates.check(req_id, tenant, key, policy, cost, self._opts.max_frame_bytes)
        try:
            return Decision.from_reply(await self._send(req_id, frame, None, (tenant, key, policy)))
        except TRANSIENT as e:
            return self._opts.unavailable_decision(e)

    async def cache_lookup(self, tenant: str, key: str, fill_ms: int | None = None) -> Lookup:
        """A cache read with everything the daemon said (stale, refresh, fill, ...)."""
        req_id = next(self._ids)
        frame = _templates.cache_get(req_id, tenant, key, fill_ms, self._opts.max_frame_bytes)
        try:
            return Lookup.from_reply(await self._send(req_id, frame, _requests.timeout(self._opts.timeout, fill_ms)))
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return UNAVAILABLE_MISS

    async def cache_get(self, tenant: str, key: str, fill_ms: int | None = None) -> bytes | None:
        """The cached bytes, or None on a miss (or when the daemon is unavailable)."""
        return (await self.cache_lookup(tenant, key, fill_ms)).value

    async def cache_set(
        self,
        tenant: str,
        key: str,
        value: bytes,
        ttl_ms: int,
        tags: Iterable[str] | None = None,
        stale_ms: int | None = None,
    ) -> bool:
        """Stores an entry; returns False when it could not be stored (degraded)."""
        req = _requests.cache_set(tenant, key, value, ttl_ms, tags, stale_ms)
        try:
            reply = await self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return False
        return reply.get("degraded") is False

    async def cache_delete(
        self,
        tenant: str,
        keys: Iterable[str] | None = None,
        tags: Iterable[str] | None = None,
        *,
        fill_only: bool = False,
    ) -> int:
        """Deletes entries by key and by tag; returns how many existed.

        ``fill_only=True`` (``keys`` only, no ``tags``) is for a caller told
        to fill an entry (``Lookup.fill``) that will not store a value: it
        drops only the fill locks of ``keys``, so the callers held for them
        are let go and the next caller may fill, and never deletes a value
        someone else stored meanwhile. It then returns how many locks were
        dropped.
        """
        req = _requests.cache_del(tenant, keys, tags, fill_only)
        try:
            reply = await self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return 0
        deleted = reply.get("deleted")
        return deleted if isinstance(deleted, int) else 0

    async def release(self, tenant: str, key: str, lease: str, policy: str | None = None) -> bool:
        """Gives back the lease a check took (``Decision.lease``), with the check's tenant, key and policy.

        True if it was still held; False if it was released already, expired,
        unknown, or could not be asked (its slot then frees by itself after the
        rule's ``lease_ms``). Release each lease once, however the request ends.
        """
        req = _requests.release(tenant, key, lease, policy)
        try:
            reply = await self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return False
        return reply.get("released") is True

    async def check_get(
        self,
        tenant: str,
        key: str,
        cache_key: str,
        policy: str | None = None,
        cost: int = 1,
        fill_ms: int | None = None,
    ) -> CheckGet:
        """A check and, only if it allows, a read of ``cache_key``, in one request."""
        req_id = next(self._ids)
        frame = _templates.check_get(req_id, tenant, key, cache_key, policy, cost, fill_ms, self._opts.max_frame_bytes)
        try:
            timeout = _requests.timeout(self._opts.timeout, fill_ms)
            reply = await self._send(req_id, frame, timeout, (tenant, key, policy))
            return CheckGet.from_reply(reply)
        except TRANSIENT as e:
            decision = self._opts.unavailable_decision(e)
            return CheckGet(decision, UNAVAILABLE_MISS if decision.allowed else None)

    # -- plumbing ----------------------------------------------------------

    async def call(self, request: dict[str, Any], timeout: float | None = None) -> Reply:
        """Sends one request map (its ``id`` is assigned here) and returns the reply map.

        Raises :class:`~quotad.errors.ServerError` for an error reply and
        :class:`~quotad.errors.QuotadUnavailable` when no reply came.
        """
        req_id = next(self._ids)
        return await self._send(req_id, request_frame(request, req_id, self._opts.max_frame_bytes), timeout)

    def _late_lease(self, tenant: str, key: str, policy: str | None) -> Callable[[Reply], None]:
        """For a check the caller gave up on: a late reply's lease is released
        (a task nobody awaits; errors logged)."""

        def late(reply: Reply) -> None:
            lease = reply.get("lease")
            if isinstance(lease, str):
                task = asyncio.ensure_future(self._release_late(tenant, key, lease, policy))
                self._late_releases.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(self._late_releases.discard)

        return late

    async def _release_late(self, tenant: str, key: str, lease: str, policy: str | None) -> None:
        try:
            await self.call(_requests.release(tenant, key, lease, policy))
        except Exception as e:  # nobody waits for it: its slot frees after lease_ms
            log.warning("releasing the lease of a timed-out check failed: %s", e)

    async def _send(
        self, req_id: int, frame: bytes, timeout: float | None, lease_of: tuple[str, str, str | None] | None = None
    ) -> Reply:
        """Sends call ``req_id``'s frame and returns the reply map (as :meth:`call` does).

        ``timeout`` None is the client's default: such calls, and those whose
        ``timeout`` equals it (cache reads without ``fill_ms``), share one timer
        (a timer per call cost a TimerHandle, a closure and a done callback).
        ``lease_of``: a check's (tenant, key, policy), whose lease is released
        if its reply comes after the call timed out (the closure doing it is
        made only then: made per call, it and its cells were garbage per check).
        """
        restart = timeout is None  # a default call's deadline restarts after a wait for a slot (as it always did)
        ordered = restart or timeout == self._opts.timeout
        if timeout is None:
            timeout = self._opts.timeout
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._bind(loop)
        deadline = loop.time() + timeout
        sent_by = deadline  # an ordered call's deadline
        slots = self._slots  # released to the same loop's slots even if the client moves meanwhile
        if slots.in_flight < slots.limit:
            slots.in_flight += 1  # the common case of slots.take, without a coroutine
        else:
            await slots.take(loop, deadline)
            if restart:
                sent_by = loop.time() + timeout
            else:  # an explicit timeout still ends at its deadline
                ordered = False
        try:
            proto = self._proto
            if proto is None or proto.error is not None:
                proto = await self._connect(deadline)
                ordered = False  # the connect used part of the timeout
            # proto.buffered: an upper bound of the transport's buffer (see _Protocol).
            if proto._out_bytes + proto.buffered > WRITE_BUFFER_BYTES and (backlog := proto.backlog()) is not None:
                # Bounded write buffer: wait until quotad has read some of it.
                try:
                    await asyncio.wait_for(asyncio.shield(backlog), deadline - loop.time())
                except asyncio.TimeoutError:
                    raise RequestTimedOut("quotad is not reading its socket") from None
                ordered = False
            if ordered:
                fut = proto.send(req_id, frame, sent_by, timeout, True)
            else:
                fut = proto.send(req_id, frame, deadline, deadline - loop.time(), False)
            try:
                reply = await fut
            except RequestTimedOut:
                if lease_of is not None and proto.pending.pop(req_id, None) is not None and len(proto.late) < MAX_LATE:
                    proto.late[req_id] = self._late_lease(*lease_of)
                raise
            finally:
                proto.pending.pop(req_id, None)
        finally:
            slots.release()
        if reply.get("ok") is not True:
            raise server_error(reply.get("error"))
        return reply

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """First use, or use from another event loop: a connection belongs to one loop."""
        old, old_loop = self._proto, self._loop
        if old is not None and old_loop is not None and not old_loop.is_closed():
            # That connection belongs to the other loop: drop it there.
            old_loop.call_soon_threadsafe(old.fail, ConnectionLost("the client moved to another event loop"), True)
        self._loop = loop
        self._proto = None
        self._connecting = None
        self._slots = _Slots(self._opts.max_pending)

    async def _connect(self, deadline: float) -> _Protocol:
        """Connects, or joins a connect already under way; raises ConnectFailed."""
        if self._closed:
            raise ConnectFailed("the client is closed")
        loop = asyncio.get_running_loop()
        if self._connecting is None:
            now = time.monotonic()
            if not self._opts.backoff.ready(now):
                raise ConnectFailed(f"cannot reach quotad at {self.socket_path} (retrying soon)")
            self._connecting = loop.create_future()
            task = loop.create_task(self._open())
            task.add_done_callback(self._connected)
        waiter = self._connecting
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ConnectFailed(f"connecting to quotad at {self.socket_path} timed out") from None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        max_reply = self._opts.max_reply_bytes
        try:
            _, proto = await asyncio.wait_for(
                loop.create_unix_connection(lambda: _Protocol(max_reply, loop), self.socket_path),
                self._opts.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectFailed(f"cannot reach quotad at {self.socket_path}: {e or 'timed out'}") from e
        return proto

    def _connected(self, task: asyncio.Task[_Protocol]) -> None:
        waiter, self._connecting = self._connecting, None
        backoff = self._opts.backoff
        if task.cancelled():
            err: BaseException = ConnectFailed("connect cancelled")
        elif task.exception() is not None:
            err = task.exception()  # type: ignore[assignment]
        else:
            proto = task.result()
            backoff.succeeded()
            if self._closed:
                proto.fail(ConnectionLost("the client was closed"), quiet=True)
            if self._down:
                self._down = False
                log.warning("reconnected to quotad at %s", self.socket_path)
            self._proto = proto
            if waiter is not None and not waiter.done():
                waiter.set_result(proto)
            return
        backoff.failed(time.monotonic())
        if not self._down:
            self._down = True
            log.warning("%s", err)
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)
            waiter.exception()  # retrieved: no "never retrieved" warning when nobody waits

    async def close(self) -> None:
        """Closes the connection; later calls fail as unavailable (or raise, per ``failure_mode``)."""
        self._closed = True
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(ConnectionLost("the client was closed"), quiet=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
