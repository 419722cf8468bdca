"""The thread-safe synchronous client.

One Unix socket is shared by every thread: a caller registers a waiter
under the request's id and writes its frame; then it either reads the
socket itself (when no other thread is reading) or blocks on the waiter
until the thread reading hands it its reply, in whatever order replies
arrive. Many threads therefore pipeline on one connection, and a lone
caller pays no thread hand-off (see _Connection).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from _thread import allocate_lock as _allocate_lock
from collections.abc import Callable, Iterable, Sequence
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

_RECV_BYTES = 256 << 10


class _Waiter:
    """One call's reply slot. A plain lock, held from the start, is the signal:
    it is released once when the reply (or an error) is in, or when the
    reading role is handed to this caller (threading.Event costs a Condition and more)."""

    __slots__ = ("done", "reply", "error", "late", "lead", "counted")

    def __init__(self) -> None:
        self.done = _allocate_lock()
        self.done.acquire()
        self.reply: dict[str, Any] | None = None
        self.error: QuotadError | None = None
        # Set when the caller gave up: what to do with the reply if it still comes.
        self.late: Callable[[dict[str, Any]], None] | None = None
        # Set (under the connection's lock) while this caller holds the reading role: as it takes
        # it, or when it is handed it (``done`` released to wake it).
        self.lead = False
        # Set while the call is counted in flight (in _pending, holding a slot): until _leave.
        self.counted = False

    def answered(self) -> bool:
        return self.reply is not None or self.error is not None

    def answer(self) -> None:
        try:
            self.done.release()
        except RuntimeError:  # released already: the reading role was handed to it, and it has not woken yet
            pass


class _Stale(Exception):
    """The connection was found closed by quotad before the call was written: it may go on a new one."""


# A frame queued for the thread writing: its bytes, its caller's deadline and request id.
_Queued = tuple[bytes, float, int]
# A batch being sent: what is left of it, the latest deadline of its frames, whether none of it
# is sent yet (dropping it then leaves the stream well-framed), and its frames.
_Batch = tuple[memoryview, float, bool, list[_Queued]]

# What one read of the socket came to.
_READ, _NOTHING, _CLOSED, _REFUSED = 0, 1, 2, 3  # _REFUSED: quotad said why it closed (an id-0 error)


class _Connection:
    """One connected socket and its in-flight calls.

    One thread at a time reads the socket (it holds the reading role,
    ``_reading``) and hands each reply to its caller, in whatever order
    replies arrive. A caller whose reply has not come reads itself while
    nobody else does; once its own reply is in (or its deadline passed) it
    hands the role to a caller still waiting, or, when only calls that timed
    out remain (their late replies may carry leases to release), to a reader
    thread started for them, which ends once nothing is in flight. One caller
    at a time thus writes and reads on its own thread (no thread hand-off
    per call), and many threads pipeline on one connection.

    With nothing in flight nobody reads: the next call first looks whether
    quotad closed the connection meanwhile (a poll, no wait), and if so goes
    on a new connection.
    """

    def __init__(self, sock: socket.socket, opts: ClientOptions) -> None:
        self._sock = sock
        self._opts = opts
        # Guards _pending, _error, _closed, _queued, _writing, _reading and the slot count.
        self._lock = threading.Lock()
        # One thread writes at a time; frames of calls made meanwhile are queued (with their
        # callers' deadlines), and it sends them all in its next write (one send, not one each).
        self._writing = False
        self._queued: list[_Queued] = []
        # Set by _send_all as an exception (an interrupt) leaves it: the frames it was sending if
        # none of them went out, else None; taken by _interrupted.
        self._unsent: Sequence[_Queued] | None = None
        self._writable = select.poll()  # used by the writing thread
        self._writable.register(sock, select.POLLOUT)
        self._readable = select.poll()  # used by the reading thread
        self._readable.register(sock, select.POLLIN)
        self._either = select.poll()  # used by the writing thread while it also holds the reading role
        self._either.register(sock, select.POLLIN | select.POLLOUT)
        self._frames = FrameReader(opts.max_reply_bytes)  # used by the reading thread
        self._reading = False
        # Calls in flight, at most max_pending: counted under _lock, which a
        # call takes anyway to register (a BoundedSemaphore cost ~2 µs more per call).
        self._in_flight = 0
        self._slot_waiters = 0
        self._slot_free = threading.Condition(self._lock)
        self._pending: dict[int, _Waiter] = {}
        self._error: QuotadError | None = None  # set: no new requests on this connection
        self._closed = False  # set: the calls in flight have been failed

    @property
    def alive(self) -> bool:
        return self._error is None

    def request(
        self, req_id: int, frame: bytes, deadline: float, late: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Sends the frame and waits for its reply until ``deadline``; a reply
        that arrives after that is handed to ``late`` (on whichever thread reads).
        Raises _Stale when quotad had closed the connection before the frame was written."""
        waiter = _Waiter()
        try:
            with self._lock:
                while self._in_flight >= self._opts.max_pending and self._error is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimedOut(f"{self._opts.max_pending} calls already in flight")
                    self._slot_waiters += 1
                    try:
                        self._slot_free.wait(remaining)
                    finally:
                        self._slot_waiters -= 1
                if self._error is not None:
                    raise self._error
                # Nobody reading: this call reads, from before its write.
                if not self._reading:
                    self._reading = waiter.lead = True
                self._in_flight += 1
                self._pending[req_id] = waiter
                # Inside the try (an interrupt as the lock is let go would else leave the role
                # and the slot taken for good), with no call since the first change.
                waiter.counted = True
            if waiter.lead:
                self._read_idle()
            try:
                self._write(req_id, frame, deadline, waiter, waiter.lead)
            except RequestTimedOut:
                with self._lock:
                    self._pending.pop(req_id, None)
                raise
            while not waiter.answered():
                if waiter.lead:  # it took the reading role, or was handed it
                    self._lead(waiter, deadline)
                    break
                if not waiter.done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    break
            if not waiter.answered():
                with self._lock:
                    if late is not None and req_id in self._pending:
                        waiter.late = late  # kept: whoever reads hands it the reply, if one comes
                    else:
                        self._pending.pop(req_id, None)
                if not waiter.answered():
                    if self._error is not None:  # the write failed and the daemon never closed
                        self.close(self._error)
                    raise RequestTimedOut("no reply from quotad within the call's timeout")
            if waiter.error is not None:
                raise waiter.error
            assert waiter.reply is not None
            return waiter.reply
        finally:
            if waiter.counted:
                try:
                    self._leave(req_id, waiter, late)
                except BaseException:
                    # Cut short by an interrupt (which its caller gets): once more, or the reading
                    # role (every later call would wait for its timeout) or the slot is lost.
                    self._leave(req_id, waiter, late)
                    raise

    def _leave(self, req_id: int, waiter: _Waiter, late: Callable[[dict[str, Any]], None] | None) -> None:
        """A call's end: its waiter goes (or stays for ``late``), its slot frees, and the reading role
        passes on if it holds it. Called again after an interrupt, it does only what is left."""
        with self._lock:
            if waiter.counted:
                # Attribute tests, no call: no interrupt lands between them and what they decide.
                if waiter.reply is None and waiter.error is None and waiter.late is None and req_id in self._pending:
                    # Left by an exception (an interrupt, a signal handler's): nobody waits
                    # on it any more, so it must not be handed the reading role; a late
                    # reply still goes to ``late`` (a lease to release).
                    if late is not None:
                        waiter.late = late
                    else:
                        del self._pending[req_id]
                waiter.counted = False
                self._in_flight -= 1
            if self._slot_waiters:
                self._slot_free.notify()
        if waiter.lead:  # took the role, or was handed it (maybe while writing, or as it timed out)
            self._pass_role(waiter)

    def _read_idle(self) -> None:
        """Before the call that took the reading role is written: reads what came
        meanwhile (quotad closing the connection, late replies), without waiting."""
        while True:
            outcome = self._read_once(0)
            if outcome == _NOTHING:
                return
            if outcome == _CLOSED:
                raise _Stale()
            if outcome == _REFUSED:
                assert self._error is not None
                raise self._error

    def _lead(self, waiter: _Waiter, deadline: float) -> None:
        """Reads (handing each reply to its caller) until ``waiter``'s reply is in, the connection closed, or ``deadline``."""
        while not waiter.answered():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._read_once(remaining) >= _CLOSED:
                return

    def _pass_role(self, holder: _Waiter | None = None) -> None:
        """The reading role goes to a caller still waiting, else to a reader thread while calls remain, else to nobody.

        ``holder``: the waiter of the caller holding it (None: a reader or writer thread does). Called
        again after an interrupt (see :meth:`_leave`), it does nothing if the role was passed already.
        """
        with self._lock:
            if holder is not None and not holder.lead:
                return
            to = None
            if not self._closed:
                for w in self._pending.values():
                    if w.late is None and not w.lead and w.reply is None and w.error is None:
                        to = w
                        break
            # No call from here until the role has changed hands: an interrupt could land in it.
            if holder is not None:
                holder.lead = False
            if to is not None:
                to.lead = True
                to.done.release()  # held: its caller waits on it, unanswered
                return
            self._reading = False
            if self._closed:
                self._sock.close()
                return
            if not self._pending:
                return
        # Calls that timed out remain: a reader thread reads their late replies (leases to release).
        # It takes the role if nobody did meanwhile; an interrupt before it starts leaves them to the next call.
        threading.Thread(target=self._read_rest, name="quotad-reader", daemon=True).start()

    def _read_rest(self) -> None:
        """The reader thread: reads until nothing is in flight (or the connection closes)."""
        if not self._take_role():
            return
        try:
            while True:
                with self._lock:
                    if self._closed or not self._pending:
                        break
                if self._read_once(self._opts.timeout) >= _CLOSED:
                    break
        except Exception as e:  # a bug: report it, but do not leave the calls to time out
            self.close(ConnectionLost(f"reading from quotad failed: {e!r}"))
            raise
        finally:
            self._pass_role()

    def _read_once(self, timeout: float) -> int:
        """One read within ``timeout`` s, its replies handed to their callers; a failure closes the connection.

        The socket is blocking and every read and write says MSG_DONTWAIT: no
        timeout set per read (an ioctl) and no poll inside the socket module on
        top of this one.
        """
        receiving = False  # set as recv is called: an interrupt from then on may lose what it read
        try:
            if not self._readable.poll(timeout * 1000):
                return _NOTHING
            receiving = True
            data = self._sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            if not data:
                self._lost(ConnectionLost("quotad closed the connection"))
                return _CLOSED
            for body in self._frames.feed(data):
                self._deliver(decode_body(body))
        except BlockingIOError:
            return _NOTHING
        except OSError as e:
            self._lost(ConnectionLost(f"reading from quotad failed: {e}"))
            return _CLOSED
        except QuotadError as e:
            self._lost(e)
            return _REFUSED
        except BaseException:
            if receiving:
                # An interrupt (Ctrl-C, a signal handler's exception) between the recv and the last
                # reply handed out: bytes read may be lost (the stream's framing with them), and so
                # may replies read. The calls in flight fail now, not at their timeouts; the next
                # call reconnects. Interrupted in the poll, nothing was read: the connection goes on.
                self.close(ConnectionLost("a reply was cut short: the thread reading it was interrupted"))
            raise
        return _READ

    def _write(self, req_id: int, frame: bytes, deadline: float, waiter: _Waiter, leading: bool) -> None:
        """Writes the frame, or queues it for the thread writing now; RequestTimedOut at ``deadline``.

        The writing thread sends what was queued while it wrote, in one
        send, until nothing is left. A queued frame keeps its caller's
        deadline, and each batch goes out within the latest of its frames'
        (frames whose callers gave up before it was formed are left out; a
        batch not sent at all by then is dropped). The writer's call is
        neither failed nor kept past its own deadline for the others' frames:
        at that deadline it hands what is left to a writer thread, and once
        its own frame is out it only waits for its reply. ``send`` may take
        only part of a batch: the rest goes out as quotad reads. A batch cut
        short (at its deadline, or by an error) leaves the stream unusable;
        after an error the reader still delivers what quotad says before it
        closes (see :meth:`_write_failed`). An interrupt is handled by
        :meth:`_interrupted`.
        """
        writing = False
        try:
            with self._lock:
                if self._writing:
                    self._queued.append((frame, deadline, req_id))
                    return
                # Inside the try: an interrupt as the lock is let go would else keep the writing
                # role for good (every later frame queued behind nobody).
                self._writing = writing = True
            left = self._send_all(memoryview(frame), deadline, waiter, leading, ())
            if left is None:  # the connection failed: so do the calls in flight
                self._stop_writing()
                return
            if not left:
                with self._lock:
                    if not self._queued:
                        self._writing = False
                        return
                self._write_queued(None, deadline, waiter, leading)
                return
            if len(left) < len(frame):
                self._write_failed(ConnectionLost("a request was cut short: quotad is not reading"))
                self._stop_writing()
            else:  # not sent at all: the stream is intact, and the frames queued behind it have deadlines of their own
                self._write_queued(None, deadline, waiter, leading)
        except BaseException:
            if writing:
                self._interrupted(req_id)
            raise
        raise RequestTimedOut("quotad is not reading its socket")

    def _write_queued(self, batch: _Batch | None, until: float, waiter: _Waiter | None, leading: bool) -> None:
        """Sends the rest of ``batch`` (one begun already, if any), then what is queued, a batch at a time,
        until nothing is left; at ``until`` (the writing call's deadline) what is left goes to a writer thread.
        An exception leaving it is handled by its caller (:meth:`_write`, :meth:`_write_rest`)."""
        while True:
            if batch is None:
                with self._lock:
                    if not self._queued:
                        self._writing = False
                        return
                    queued, self._queued = self._queued, []
                now = time.monotonic()
                batch = self._batch(queued, now)
                if batch is None:
                    continue
                if now >= until:  # the writing call's own deadline passed
                    self._hand_off(batch)
                    return
            view, deadline, fresh, entries = batch
            left = self._send_all(view, min(deadline, until), waiter, leading, entries if fresh else None)
            if left is None:
                self._stop_writing()
                return
            if not left:
                batch = None
                continue
            fresh = fresh and len(left) == len(view)
            if time.monotonic() < deadline:  # the writing call's own deadline passed
                self._hand_off((left, deadline, fresh, entries))
                return
            if not fresh:
                self._write_failed(ConnectionLost("a request was cut short: quotad is not reading"))
                self._stop_writing()
                return
            self._forget(entries)  # none of it sent, and every caller in it gave up
            batch = None

    def _hand_off(self, batch: _Batch | None) -> None:
        threading.Thread(target=self._write_rest, args=(batch,), name="quotad-writer", daemon=True).start()

    def _write_rest(self, batch: _Batch | None) -> None:
        """The writer thread: sends what a writing call left at its deadline, and what is queued after it."""
        try:
            self._write_queued(batch, float("inf"), None, False)
        except BaseException as e:  # a bug: report it, but do not leave the calls to time out
            self._unsent = None
            self.close(ConnectionLost(f"writing to quotad failed: {e!r}"))
            self._stop_writing()
            raise

    def _batch(self, queued: list[_Queued], now: float) -> _Batch | None:
        """The frames of callers still waiting, joined, with the latest of their deadlines (None: all gave up)."""
        if len(queued) == 1:
            frame, deadline, _ = queued[0]
            if deadline > now:
                return memoryview(frame), deadline, True, queued
            self._forget(queued)
            return None
        deadlines = [q[1] for q in queued]
        if min(deadlines) <= now:
            self._forget([q for q in queued if q[1] <= now])
            queued = [q for q in queued if q[1] > now]
            if not queued:
                return None
            deadlines = [q[1] for q in queued]
        return memoryview(b"".join([q[0] for q in queued])), max(deadlines), True, queued

    def _forget(self, unsent: list[_Queued]) -> None:
        """Calls whose frames were dropped unsent will get no reply: their waiters go (one kept for a late
        reply, a lease to release, would else keep a reader thread reading for it)."""
        with self._lock:
            for _, _, req_id in unsent:
                self._pending.pop(req_id, None)

    def _stop_writing(self) -> None:
        with self._lock:
            self._writing = False
            self._queued = []

    def _interrupted(self, own: int) -> None:
        """The thread writing was left by an exception not the socket's (an interrupt, a signal
        handler's), which its caller gets; the stream must stay well-framed for the other calls."""
        unsent, self._unsent = self._unsent, None
        if unsent is None:
            # Part of a frame may be out (or what went out is not known) and the rest will not
            # follow: quotad would read the next frame's bytes as its end. The connection goes now (quotad drops a stream ending
            # mid-frame unanswered anyway), failing the calls on it; the next call reconnects.
            self.close(ConnectionLost("a request was cut short: the thread writing it was interrupted"))
            self._stop_writing()
            return
        # The stream is well-framed: the other callers' frames go out, within their own deadlines,
        # on a writer thread. The interrupted caller's own frame, if unsent, is dropped: no reply will come.
        with self._lock:
            if not unsent:  # its own frame (``()`` from _write), none of it out
                self._pending.pop(own, None)
            self._queued[:0] = unsent
            if not self._queued:
                self._writing = False
                return
        self._hand_off(None)

    def _take_role(self) -> bool:
        """For the writer and reader threads: takes the reading role if no other thread holds it."""
        with self._lock:
            if self._reading or self._closed:
                return False
            self._reading = True
            return True

    def _send_all(
        self, view: memoryview, until: float, waiter: _Waiter | None, leading: bool, frames: Sequence[_Queued] | None
    ) -> memoryview | None:
        """Sends ``view`` until ``until``; returns what is left of it then (empty: all sent), or None when
        the connection failed (an error sending, or the thread reading found it closed).

        While it waits for room, the thread holding the reading role reads too; the writer thread
        takes the role if nobody holds it (else replies nobody reads could stall quotad, and this
        write with it, until the batch's deadline), and gives it up on return.

        ``frames`` are those ``view`` holds, whole and unsent (None: it is the rest of a batch begun); an
        interrupt leaving while none of them is out sets ``_unsent`` to them (see :meth:`_interrupted`).
        """
        size = len(view)
        sending = reads = False  # reads: the writer thread took the reading role (given up on return)
        try:
            while view:
                sending = True  # until its count is in: an interrupt meanwhile leaves unknown what went out
                try:
                    view = view[self._sock.send(view, socket.MSG_DONTWAIT) :]
                    sending = False
                    continue
                except BlockingIOError:  # the socket's buffer is full: wait until quotad reads
                    sending = False
                remaining = until - time.monotonic()
                if remaining <= 0:
                    return view
                if not leading:
                    if waiter is not None:
                        leading = waiter.lead
                    elif not self._reading:  # the writer thread, and nobody reads: it does
                        leading = reads = self._take_role()
                if leading:
                    # This thread holds the reading role: it reads as it waits (quotad,
                    # blocked writing replies nobody reads, might stop reading too).
                    ready = self._either.poll(remaining * 1000)
                    if ready and ready[0][1] & ~select.POLLOUT and self._read_once(0) >= _CLOSED:
                        return None  # the calls in flight, this one included, have failed
                else:
                    # Woken now and then, in case the reading role is handed to this thread
                    # (or, for the writer thread, is let go) meanwhile.
                    self._writable.poll(min(remaining, 0.01) * 1000)
        except OSError as e:
            self._write_failed(ConnectionLost(f"writing to quotad failed: {e}"))
            return None
        except BaseException:
            self._unsent = None if sending or len(view) < size else frames
            raise
        finally:
            if reads:
                self._pass_role()
        return view

    def _write_failed(self, err: QuotadError) -> None:
        """A failed (maybe partial) write leaves the stream unusable for requests.

        The daemon may have closed after saying why (an id-0 error, e.g. too
        many connections) or may still answer what it read: stop writing and
        let the reader deliver that, and fail the rest at EOF.
        """
        with self._lock:
            if self._error is None:
                self._error = err
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _lost(self, err: QuotadError) -> None:
        if not self._closed:
            log.warning("quotad connection lost: %s", err)
        self.close(err)

    def drop(self) -> None:
        """In a forked child: closes this process's descriptor only. The socket is
        the parent's too, and a shutdown would end the parent's connection."""
        self._sock.close()

    def close(self, err: QuotadError) -> None:
        """Fails every call in flight (and later ones) with ``err``; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._error is None:
                self._error = err
            pending, self._pending = self._pending, {}
            self._slot_free.notify_all()  # callers waiting for a slot now fail with err
            reading = self._reading
        for waiter in pending.values():
            waiter.error = err
            waiter.answer()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread reading
        except OSError:
            pass
        if not reading:
            self._sock.close()  # else the thread reading closes it as it gives up the role

    def _deliver(self, reply: dict[str, Any]) -> None:
        req_id = reply.get("id")
        if req_id == 0 and reply.get("ok") is False:
            # A connection-level error (frame too large, too many connections):
            # the daemon closes the connection; every call in flight fails with it.
            raise connection_error(reply.get("error"))
        if not isinstance(req_id, int):
            return
        with self._lock:
            waiter = self._pending.get(req_id)
            if waiter is None:  # the caller gave up (timed out) already
                return
            late = waiter.late
            if late is None:
                # Answered before it leaves _pending: an interrupt between the two would leave
                # its caller waiting for its timeout, out of reach of close().
                waiter.reply = reply
                waiter.answer()
            del self._pending[req_id]
        if late is not None:
            late(reply)


class Client:
    """A synchronous quotad client, safe to share between threads.

    The connection is made on first use and remade after a failure, with
    exponential backoff between failed attempts. While the daemon cannot
    answer within ``timeout`` seconds, checks are answered by
    ``failure_mode`` (``"open"``: allowed, ``"closed"``: denied, both marked
    ``degraded``; ``"raise"``: the error), cache reads miss and cache writes
    do nothing.
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
        self._ids = itertools.count(1)  # next() is atomic under the GIL
        self._connect_lock = threading.Lock()
        self._conn: _Connection | None = None
        self._pid = os.getpid()
        self._closed = False
        self._down = False  # logged as unreachable; log the recovery once

    @property
    def socket_path(self) -> str:
        return self._opts.socket_path

    # -- ops ---------------------------------------------------------------

    def hello(self) -> Hello:
        return Hello.from_reply(self.call(_requests.hello()))

    def stats(self) -> Stats:
        return Stats.from_reply(self.call(_requests.stats()))

    def usage(self, tenant: str, key: str, policy: str | None = None) -> list[RuleUsage]:
        """Every rule of the policy as it stands for ``key``, charging nothing.

        Raises like :meth:`stats` when the daemon cannot answer (the failure
        mode does not apply: there is nothing to report), and
        :class:`SourceUnavailable` when its Redis cannot.
        """
        return usage_from_reply(self.call(_requests.usage(tenant, key, policy)))

    def check(self, tenant: str, key: str, policy: str | None = None, cost: int = 1) -> Decision:
        """May this request go ahead? ``cost=0`` peeks without charging."""
        req_id = next(self._ids)
        frame = _templates.check(req_id, tenant, key, policy, cost, self._opts.max_frame_bytes)
        try:
            return Decision.from_reply(self._send(req_id, frame, None, self._late_lease(tenant, key, policy)))
        except TRANSIENT as e:
            return self._opts.unavailable_decision(e)

    def cache_lookup(self, tenant: str, key: str, fill_ms: int | None = None) -> Lookup:
        """A cache read with everything the daemon said (stale, refresh, fill, ...)."""
        req_id = next(self._ids)
        frame = _templates.cache_get(req_id, tenant, key, fill_ms, self._opts.max_frame_bytes)
        try:
            return Lookup.from_reply(self._send(req_id, frame, _requests.timeout(self._opts.timeout, fill_ms)))
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return UNAVAILABLE_MISS

    def cache_get(self, tenant: str, key: str, fill_ms: int | None = None) -> bytes | None:
        """The cached bytes, or None on a miss (or when the daemon is unavailable)."""
        return self.cache_lookup(tenant, key, fill_ms).value

    def cache_set(
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
            reply = self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return False
        return reply.get("degraded") is False

    def cache_delete(
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
            reply = self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return 0
        deleted = reply.get("deleted")
        return deleted if isinstance(deleted, int) else 0

    def release(self, tenant: str, key: str, lease: str, policy: str | None = None) -> bool:
        """Gives back the lease a check took (``Decision.lease``), with the check's tenant, key and policy.

        True if it was still held; False if it was released already, expired,
        unknown, or could not be asked (its slot then frees by itself after the
        rule's ``lease_ms``). Release each lease once, however the request ends.
        """
        req = _requests.release(tenant, key, lease, policy)
        try:
            reply = self.call(req)
        except TRANSIENT as e:
            self._opts.soft_fail(e)
            return False
        return reply.get("released") is True

    def check_get(
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
            late = self._late_lease(tenant, key, policy)
            return CheckGet.from_reply(self._send(req_id, frame, timeout, late))
        except TRANSIENT as e:
            decision = self._opts.unavailable_decision(e)
            return CheckGet(decision, UNAVAILABLE_MISS if decision.allowed else None)

    # -- plumbing ----------------------------------------------------------

    def call(self, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Sends one request map (its ``id`` is assigned here) and returns the reply map.

        Raises :class:`~quotad.errors.ServerError` for an error reply and
        :class:`~quotad.errors.QuotadUnavailable` when no reply came.
        """
        req_id = next(self._ids)
        return self._send(req_id, request_frame(request, req_id, self._opts.max_frame_bytes), timeout)

    def _late_lease(self, tenant: str, key: str, policy: str | None) -> Callable[[dict[str, Any]], None]:
        """For a check the caller gave up on: a late reply's lease is released
        (in a thread of its own, not to hold up the reader; errors logged)."""

        def late(reply: dict[str, Any]) -> None:
            lease = reply.get("lease")
            if isinstance(lease, str):
                threading.Thread(target=self._release_late, args=(tenant, key, lease, policy), daemon=True).start()

        return late

    def _release_late(self, tenant: str, key: str, lease: str, policy: str | None) -> None:
        try:
            self.call(_requests.release(tenant, key, lease, policy))
        except Exception as e:  # nobody waits for it: its slot frees after lease_ms
            log.warning("releasing the lease of a timed-out check failed: %s", e)

    def _send(
        self,
        req_id: int,
        frame: bytes,
        timeout: float | None,
        late: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Sends call ``req_id``'s frame and returns the reply map (as :meth:`call` does)."""
        # One deadline for the whole call: connecting, waiting for a slot, writing, the reply.
        deadline = time.monotonic() + (self._opts.timeout if timeout is None else timeout)
        for attempt in (1, 2):
            conn = self._connection(deadline)
            try:
                reply = conn.request(req_id, frame, deadline, late)
                break
            except _Stale:  # closed by quotad while idle, before this call was written: a new connection
                if attempt == 2:
                    raise ConnectionLost("quotad closed the connection") from None
        if reply.get("ok") is not True:
            raise server_error(reply.get("error"))
        return reply

    def _connection(self, deadline: float) -> _Connection:
        conn = self._conn
        if conn is not None and conn.alive and self._pid == os.getpid():
            return conn
        # Another thread may be connecting: wait for it, but not past this call's deadline.
        if not self._connect_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise ConnectFailed(f"connecting to quotad at {self.socket_path} timed out")
        try:
            if self._closed:
                raise ConnectFailed("the client is closed")
            if self._pid != os.getpid():
                # Forked: the socket belongs to the parent, and a thread reading it did not survive.
                self._pid, self._conn = os.getpid(), None
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            now = time.monotonic()
            if now >= deadline:
                raise ConnectFailed(f"connecting to quotad at {self.socket_path} timed out")
            backoff = self._opts.backoff
            if not backoff.ready(now):
                raise ConnectFailed(f"cannot reach quotad at {self.socket_path} (retrying soon)")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(min(self._opts.connect_timeout, deadline - now))
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                backoff.failed(now)
                if not self._down:
                    self._down = True
                    log.warning("cannot reach quotad at %s: %s", self.socket_path, e)
                self._conn = None
                raise ConnectFailed(f"cannot reach quotad at {self.socket_path}: {e}") from e
            # Blocking, but every read and write says MSG_DONTWAIT and waits in its own poll (see _read_once).
            sock.setblocking(True)
            backoff.succeeded()
            if self._down:
                self._down = False
                log.warning("reconnected to quotad at %s", self.socket_path)
            self._conn = _Connection(sock, self._opts)
            return self._conn
        finally:
            self._connect_lock.release()

    def close(self) -> None:
        with self._connect_lock:
            self._closed = True
            conn, self._conn = self._conn, None
            inherited = self._pid != os.getpid()
        if conn is not None and inherited:
            conn.drop()
        elif conn is not None:
            conn.close(ConnectionLost("the client was closed"))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
