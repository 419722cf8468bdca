"""Who the sync Client's writes are for: frames queued behind the thread
writing go out within their own callers' deadlines, not the writer's; a
writer whose frame is out is not failed for the others' frames; a batch
cut short at its deadline still ends the connection."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemons import Quotad
from fake_server import ThreadedServer, run_catching
from quotad import Client, ConnectionLost, RequestTimedOut
from quotad._codec import Body, FrameReader, decode_body, encode_frame
from quotad.client import _Connection

BIG = b"p" * (900 << 10)  # several times the socket's buffer: a write of it waits for the daemon to read


class PausingServer(ThreadedServer):
    """Reads nothing for ``first_at`` s after the connection, then exactly the
    first request, then nothing again until ``rest_at`` s (the client's socket
    buffer fills meanwhile); then reads on until EOF. Answers every request it
    reads, but the first one only if ``answer_first``; records their ops."""

    def __init__(self, path: Path, first_at: float, rest_at: float, answer_first: bool) -> None:
        super().__init__(path)
        self._first_at, self._rest_at, self._answer_first = first_at, rest_at, answer_first
        self.ops: list[str] = []
        self.start()

    def _recv_exactly(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _answer(self, conn: socket.socket, body: Body) -> None:
        request = decode_body(body)
        self.ops.append(request["op"])
        if len(self.ops) > 1 or self._answer_first:
            conn.sendall(encode_frame({"id": request["id"], "ok": True}))

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        t0 = time.monotonic()
        with conn:
            if self._stop.wait(self._first_at):
                return
            header = self._recv_exactly(conn, 4)
            self._answer(conn, self._recv_exactly(conn, int.from_bytes(header, "big")))
            if self._stop.wait(max(0.0, t0 + self._rest_at - time.monotonic())):
                return
            frames = FrameReader(8 << 20)
            while data := conn.recv(1 << 16):
                for body in frames.feed(data):
                    self._answer(conn, body)


def wait_queued(conn: _Connection, n: int) -> None:
    """Until ``n`` frames are queued behind the thread writing."""
    deadline = time.monotonic() + 2
    while len(conn._queued) < n:
        assert time.monotonic() < deadline, f"{n} calls were not queued behind the writer"
        time.sleep(0.002)


def wait_writing(c: Client) -> None:
    """Until the first call is connected and stuck writing its frame."""
    deadline = time.monotonic() + 2
    while not (c._conn is not None and c._conn._writing):
        assert time.monotonic() < deadline, "the first call never started writing"
        time.sleep(0.002)
    time.sleep(0.02)  # its send has filled the socket's buffer


def test_a_writer_past_its_deadline_leaves_the_frames_queued_behind_it_their_own(tmp_path: Path) -> None:
    """The writer (0.5 s) gets its frame out, then its deadline passes while the
    frame of a caller queued behind it (3 s) waits for the daemon to read on:
    that caller is answered once it does; the writer times out for its own
    reply only (the daemon never answers it), at its own deadline."""
    server = PausingServer(tmp_path / "pause.sock", first_at=0.2, rest_at=1.0, answer_first=False)
    try:
        with Client(str(server.path), failure_mode="raise") as c:
            writer, w = run_catching(lambda: c.call({"op": "w", "pad": BIG}, timeout=0.5))
            wait_writing(c)
            t0 = time.monotonic()
            assert c.call({"op": "l", "pad": BIG}, timeout=3.0)["ok"] is True
            assert time.monotonic() - t0 < 2.0
            writer.join(3)
            assert isinstance(w.get("error"), RequestTimedOut), w
            assert "no reply" in str(w["error"]), w["error"]
            assert w["took"] < 0.8, "the writer's call outlasted its own timeout, writing for another"
        assert server.ops == ["w", "l"]
    finally:
        server.close()


def test_frames_whose_callers_gave_up_before_their_batch_are_not_sent(tmp_path: Path) -> None:
    """A writer with a long deadline (3 s) does not send a queued frame whose
    caller (0.2 s) gave up meanwhile; the stream stays well-framed."""
    server = PausingServer(tmp_path / "pause.sock", first_at=0.6, rest_at=0.6, answer_first=True)
    try:
        with Client(str(server.path), failure_mode="raise") as c:
            writer, w = run_catching(lambda: c.call({"op": "w", "pad": BIG}, timeout=3.0))
            wait_writing(c)
            conn = c._conn
            with pytest.raises(RequestTimedOut, match="no reply"):
                c.call({"op": "s"}, timeout=0.2)
            writer.join(3)
            assert w.get("result") == {"id": 1, "ok": True}, w
            assert c.call({"op": "after"}, timeout=1.0)["ok"] is True
            assert c._conn is conn
        assert server.ops == ["w", "after"]
    finally:
        server.close()


def test_a_batch_cut_short_at_its_deadline_ends_the_connection(tmp_path: Path) -> None:
    """The writer (3 s) gets its frame out; the frame queued behind it (0.5 s)
    is cut short at that caller's deadline: the writer's call fails with
    ConnectionLost (the stream is unusable) instead of waiting out its timeout."""
    server = PausingServer(tmp_path / "pause.sock", first_at=0.2, rest_at=1.2, answer_first=False)
    try:
        with Client(str(server.path), failure_mode="raise") as c:
            writer, w = run_catching(lambda: c.call({"op": "w", "pad": BIG}, timeout=3.0))
            wait_writing(c)
            with pytest.raises(RequestTimedOut):
                c.call({"op": "s", "pad": BIG}, timeout=0.5)
            writer.join(4)
            assert isinstance(w.get("error"), ConnectionLost), w
            assert w["took"] < 2.0
        assert server.ops == ["w"]
    finally:
        server.close()


def test_frames_queued_behind_a_writer_that_sent_nothing_still_go_out(tmp_path: Path) -> None:
    """The socket's buffer is full before the writer (0.3 s) writes: its frame
    is never sent and it times out as before, but the frame queued behind it
    (3 s) goes out once the daemon reads, and is answered."""
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, daemon:
        conn = _Connection(ours, Client(str(tmp_path / "unused.sock"))._opts)
        filler = encode_frame({"id": 1 << 40, "op": "fill"})  # whole frames: the stream stays well-framed
        while True:
            try:
                ours.send(filler, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
        writer, w = run_catching(lambda: conn.request(1, encode_frame({"id": 1, "op": "w"}), time.monotonic() + 0.3))
        time.sleep(0.05)
        queued, q = run_catching(lambda: conn.request(2, encode_frame({"id": 2, "op": "q"}), time.monotonic() + 3.0))
        time.sleep(0.5)  # past the writer's deadline
        frames = FrameReader()
        ops: list[str] = []
        daemon.settimeout(0.5)
        while not ops:
            try:
                data = daemon.recv(1 << 16)
            except socket.timeout:
                pytest.fail("the frame queued behind the writer was never sent")
            for body in frames.feed(data):
                request = decode_body(body)
                if request["op"] != "fill":
                    ops.append(request["op"])
                    daemon.sendall(encode_frame({"id": request["id"], "ok": True}))
        writer.join(2)
        queued.join(2)
        assert isinstance(w.get("error"), RequestTimedOut) and "not reading" in str(w["error"]), w
        assert q.get("result") == {"id": 2, "ok": True}, q
        assert ops == ["q"]


class SendOnce:
    """A connection's socket whose first ``send`` is ``first`` (a socket's own methods cannot be patched)."""

    def __init__(self, sock: socket.socket, first: Callable[[socket.socket, memoryview, int], int]) -> None:
        self._sock, self._first = sock, first
        self._used = False

    def send(self, data: memoryview, flags: int) -> int:
        if self._used:
            return self._sock.send(data, flags)
        self._used = True
        return self._first(self._sock, data, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_write_interrupted_part_way_ends_the_connection(socket_path: str, tenant: str) -> None:
    """Ctrl-C (or a signal handler's exception) lands as half a frame is out: the
    caller sees it, and the next call is answered on a new connection (on the old
    one quotad would read the next frame's bytes as the rest of the cut one)."""

    def half_then_interrupt(sock: socket.socket, data: memoryview, flags: int) -> int:
        sock.send(data[: len(data) // 2], flags)
        raise KeyboardInterrupt

    with Client(socket_path, failure_mode="raise") as c:
        assert c.check(tenant, "k").allowed
        conn = c._conn
        assert conn is not None
        conn._sock = SendOnce(conn._sock, half_then_interrupt)  # type: ignore[assignment]
        with pytest.raises(KeyboardInterrupt):
            c.check(tenant, "k")
        decision = c.check(tenant, "k")  # raises (failure_mode="raise") if the stream was corrupted
        assert decision.allowed and decision.remaining == 3, decision  # capacity 5: the cut check was not charged
        assert c._conn is not conn and conn._closed


class InterruptedPoll:
    """Stands for a connection's poll object: the first wait is interrupted (once ``interrupt`` is set)."""

    def __init__(self, poll: Any, entered: threading.Event, interrupt: threading.Event) -> None:
        self._poll, self._entered, self._interrupt = poll, entered, interrupt
        self._used = False

    def poll(self, timeout: float) -> Any:
        if self._used:
            return self._poll.poll(timeout)
        self._used = True
        self._entered.set()
        self._interrupt.wait(2)
        raise KeyboardInterrupt


def test_a_write_interrupted_before_its_first_byte_leaves_the_connection_and_the_frames_behind_it(
    socket_path: str,
) -> None:
    """Ctrl-C lands while the writer waits for room in the socket's buffer, none of
    its frame sent, with another caller's frame queued behind it: that frame still
    goes out and is answered, and the connection goes on (the stream is well-framed)."""

    def full(sock: socket.socket, data: memoryview, flags: int) -> int:
        raise BlockingIOError

    entered, interrupt = threading.Event(), threading.Event()
    with Client(socket_path, failure_mode="raise", timeout=1.0) as c:
        assert c.hello().protocol
        conn = c._conn
        assert conn is not None
        conn._sock = SendOnce(conn._sock, full)  # type: ignore[assignment]
        conn._either = InterruptedPoll(conn._either, entered, interrupt)  # type: ignore[assignment]
        first, f = run_catching(lambda: c.call({"op": "hello"}))  # reads (nobody else does): waits in _either
        assert entered.wait(2)
        queued, q = run_catching(lambda: c.call({"op": "stats"}))
        wait_queued(conn, 1)
        interrupt.set()
        first.join(3)
        queued.join(3)
        assert isinstance(f.get("error"), KeyboardInterrupt), f
        assert q.get("result", {}).get("ok") is True, q
        assert q["took"] < 0.5, "the queued call waited for its timeout"
        assert c.hello().protocol
        assert c._conn is conn and conn.alive
        assert conn._pending == {}, "the interrupted call's unsent frame still awaits a reply"


def test_a_signal_handler_interrupting_a_blocked_write_ends_the_connection(own_daemon: Quotad) -> None:
    """The realistic case: quotad is stopped, a large frame fills the socket's buffer,
    and a signal handler's exception interrupts the wait for it to drain."""
    import signal

    class Interrupted(Exception):
        pass

    def handler(*_: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        with Client(str(own_daemon.socket), failure_mode="raise", timeout=2.0) as c:
            assert c.hello().protocol
            conn = c._conn
            own_daemon.pause()
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                with pytest.raises(Interrupted):
                    c.call({"op": "hello", "pad": BIG})
            finally:
                own_daemon.resume()
            t0 = time.monotonic()
            assert c.hello().protocol
            assert time.monotonic() - t0 < 1.0
            assert c._conn is not conn
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class BigRepliesServer(PausingServer):
    """As PausingServer, but answers op "x" with a 600 KB reply (sent before it reads on)."""

    def _answer(self, conn: socket.socket, body: Body) -> None:
        request = decode_body(body)
        self.ops.append(request["op"])
        if len(self.ops) > 1 or self._answer_first:
            pad = b"r" * (600 << 10) if request["op"] == "x" else b""
            conn.sendall(encode_frame({"id": request["id"], "ok": True, "pad": pad}))


def test_the_writer_thread_reads_while_nobody_else_does(tmp_path: Path) -> None:
    """The writer (0.5 s) hands the batch [y (5 s), x, x (0.8 s, large, large
    replies)] to a writer thread at its deadline. y is answered and leaves; the
    x callers gave up: nobody reads. quotad, blocked writing the first x's reply,
    stops reading; the writer thread reads it (as a caller holding the reading
    role would), so the second x goes out now, not at the batch's deadline (5 s,
    then cut short, ending the connection)."""
    server = BigRepliesServer(tmp_path / "pause.sock", first_at=0.3, rest_at=1.2, answer_first=False)
    try:
        with Client(str(server.path), failure_mode="raise") as c:
            t0 = time.monotonic()
            writer, w = run_catching(lambda: c.call({"op": "a", "pad": BIG}, timeout=0.5))
            wait_writing(c)
            conn = c._conn
            assert conn is not None
            calls = [run_catching(lambda: c.call({"op": "y"}, timeout=5.0))]
            for n in (1, 2):  # queued in this order
                wait_queued(conn, n)
                calls.append(run_catching(lambda: c.call({"op": "x", "pad": BIG}, timeout=0.8)))
            while server.ops != ["a", "y", "x", "x"]:
                assert time.monotonic() - t0 < 3.0, f"the writer thread stalled: quotad read only {server.ops}"
                time.sleep(0.01)
            for t, _ in [(writer, w), *calls]:
                t.join(5)
            assert isinstance(w.get("error"), RequestTimedOut), w
            assert calls[0][1].get("result", {}).get("ok") is True, calls[0][1]
            assert all(isinstance(out.get("error"), RequestTimedOut) for _, out in calls[1:])
            assert c.call({"op": "after"}, timeout=2.0)["ok"] is True
            assert c._conn is conn and conn.alive
        assert server.ops == ["a", "y", "x", "x", "after"]
    finally:
        server.close()


def test_an_interrupt_as_a_call_takes_the_writing_role_does_not_keep_it(socket_path: str) -> None:
    """Ctrl-C lands as a call lets go of the lock it took the writing role under, before it
    sends: the role is given up (the connection closed: what was out is not known), not kept
    for good with every later frame queued behind nobody."""

    class LetGoInterrupted:
        """Stands for the connection's lock: once armed, the next block of _write to let it go raises there."""

        def __init__(self, lock: Any) -> None:
            self._lock, self.armed = lock, False

        def __enter__(self) -> bool:
            return bool(self._lock.acquire())

        def __exit__(self, *exc: object) -> None:
            self._lock.release()
            if self.armed and sys._getframe(1).f_code.co_name == "_write":
                self.armed = False
                raise KeyboardInterrupt

    with Client(socket_path, failure_mode="raise", timeout=2.0) as c:
        assert c.hello().protocol
        conn = c._conn
        assert conn is not None
        lock = LetGoInterrupted(conn._lock)
        conn._lock = lock  # type: ignore[assignment]
        lock.armed = True
        with pytest.raises(KeyboardInterrupt):
            c.hello()
        t0 = time.monotonic()
        assert c.hello().protocol
        assert time.monotonic() - t0 < 1.0
        assert not conn._writing
