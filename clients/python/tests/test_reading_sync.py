"""Who reads the sync Client's socket: a lone caller reads its own reply
(no thread hand-off, no reader thread); a connection quotad closed while
nothing was in flight is found closed before the next call is written, and
that call goes on a new connection; found-closed connections leave no
file descriptor behind."""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from daemons import Quotad
from fake_server import ThreadedServer, run_catching
from quotad import Client, ConnectionLost
from quotad._codec import FrameReader, decode_body, encode_frame


def readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "quotad-reader"]


def test_a_lone_caller_reads_its_own_replies(socket_path: str, tenant: str) -> None:
    with Client(socket_path, failure_mode="raise") as c:
        decisions = [c.check(tenant, f"k{i % 3}") for i in range(200)]
        assert all(d.rule for d in decisions)
        assert readers() == []


def test_a_connection_closed_while_idle_is_replaced_before_the_next_call(own_daemon: Quotad, tenant: str) -> None:
    with Client(str(own_daemon.socket), failure_mode="raise") as c:
        assert not c.check(tenant, "k").degraded
        first = c._conn
        own_daemon.kill()
        own_daemon.start()  # same socket path; the old connection was closed by the kill
        time.sleep(0.05)
        assert not c.check(tenant, "k").degraded  # raised (failure_mode="raise") had it gone on the old one
        assert c._conn is not first


class OneShotServer(ThreadedServer):
    """Answers one check per connection, then closes it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, backlog=8)
        self.connections = 0
        self.start()

    def _serve(self) -> None:
        for conn in self._connections():
            self.connections += 1
            with conn:
                frames = FrameReader()
                bodies: list[memoryview] = []
                while not bodies:
                    data = conn.recv(1 << 16)
                    if not data:
                        break
                    bodies = frames.feed(data)
                for body in bodies[:1]:
                    conn.sendall(encode_frame({
                        "id": decode_body(body)["id"], "ok": True, "allowed": True, "limit": 10, "remaining": 9,
                        "reset_ms": 0, "retry_after_ms": 0, "degraded": False, "rule": "burst",
                    }))


def test_connections_found_closed_leave_no_descriptor_behind(tmp_path: Path) -> None:
    server = OneShotServer(tmp_path / "oneshot.sock")
    try:
        gc.collect()  # other tests' garbage first
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)  # a socket left to the garbage collector to close
            with Client(str(tmp_path / "oneshot.sock"), failure_mode="raise", backoff_initial=0.001) as c:
                assert c.check("t", "k").rule == "burst"
                time.sleep(0.02)
                fds = len(os.listdir("/proc/self/fd"))
                for _ in range(30):
                    assert c.check("t", "k").rule == "burst"  # each on a new connection, the last one found closed
                    time.sleep(0.02)  # quotad's close arrives before the next call
                assert len(os.listdir("/proc/self/fd")) <= fds
            gc.collect()
        unclosed = [w for w in caught if issubclass(w.category, ResourceWarning) and "oneshot.sock" in str(w.message)]
        assert unclosed == []
        assert server.connections == 31
    finally:
        server.close()


class SequentialServer(ThreadedServer):
    """Reads one request at a time and answers it with a 600 KB reply before reading on
    (so it stops reading while nobody reads its replies), like a simple server would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.answered = 0
        self.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            frames = FrameReader(8 << 20)
            while data := conn.recv(64 << 10):
                for body in frames.feed(data):
                    req_id = decode_body(body)["id"]
                    conn.sendall(encode_frame({"id": req_id, "ok": True, "degraded": False, "pad": b"p" * (600 << 10)}))
                    self.answered += 1


def test_a_writer_holding_the_reading_role_reads_while_its_write_waits(tmp_path: Path) -> None:
    """Large requests and large replies both ways: the thread writing never waits on quotad without reading too."""
    server = SequentialServer(tmp_path / "seq.sock")
    try:
        with Client(str(tmp_path / "seq.sock"), timeout=5.0, failure_mode="raise") as c:

            def store(t: int) -> int:
                return sum(c.cache_set("t", f"k{t}:{n}", b"v" * (600 << 10), ttl_ms=1000) for n in range(4))

            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                assert sum(pool.map(store, range(4))) == 16
            assert time.monotonic() - t0 < 4, "a call waited for its timeout"
        deadline = time.monotonic() + 2  # the server counts a reply once its sendall returns, maybe after we read it
        while server.answered < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.answered == 16
    finally:
        server.close()


class SlowServer(ThreadedServer):
    """Answers every request `delay` seconds after it came, each on its own timer."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self._delay = delay
        self.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        lock = threading.Lock()

        def answer(req_id: int) -> None:
            with lock:
                conn.sendall(encode_frame({"id": req_id, "ok": True, "backend": "memory", "version": 1}))

        frames = FrameReader(1 << 20)
        while data := conn.recv(64 << 10):
            for body in frames.feed(data):
                threading.Timer(self._delay, answer, (decode_body(body)["id"],)).start()


class Interrupted(Exception):
    pass


def interrupted_call(c: Client) -> None:
    """A call that SIGALRM's handler interrupts 50 ms in."""
    import signal

    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        c.call({"op": "hello"})
        raise AssertionError("the call was not interrupted")
    except Interrupted:
        pass


def test_a_call_interrupted_by_an_exception_leaves_the_connection_working(tmp_path: Path) -> None:
    """A call left by an exception (here from a signal handler, as a Ctrl-C or a
    signal-based timeout would) while it reads, or while another caller reads for
    it: the calls after it are answered, not left waiting for their timeout."""
    import signal

    server = SlowServer(tmp_path / "slow.sock", delay=0.2)
    previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Interrupted()))
    try:
        with Client(str(tmp_path / "slow.sock"), timeout=2.0, failure_mode="raise") as c:
            # The lone caller, holding the reading role, is interrupted.
            interrupted_call(c)
            t0 = time.monotonic()
            assert c.call({"op": "hello"})["ok"] is True
            assert time.monotonic() - t0 < 1.0, "the next call waited for its timeout"

            # A caller waiting on another's read is interrupted (the main thread,
            # where signals land), while a second thread holds the role.
            reader = threading.Thread(target=lambda: c.call({"op": "hello"}))
            reader.start()
            time.sleep(0.05)
            interrupted_call(c)
            reader.join()
            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                assert all(r["ok"] for r in pool.map(lambda _: c.call({"op": "hello"}), range(8)))
            assert time.monotonic() - t0 < 1.0, "later calls waited for their timeout"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        server.close()


def test_a_forked_child_closing_its_client_leaves_the_parents_connection(socket_path: str, tenant: str) -> None:
    with Client(socket_path, failure_mode="raise") as c:
        assert c.check(tenant, "k").allowed
        conn = c._conn
        pid = os.fork()
        if pid == 0:  # the child closes the client it inherited, and leaves
            c.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert c.check(tenant, "k").allowed
        assert c._conn is conn and conn.alive, "the parent's connection survived"


class BatchServer(ThreadedServer):
    """Serves connection after connection, each on a thread of its own. Holds requests until
    ``batch`` of them are in, then sends their replies (each echoing its request's op) in one
    send, ordered as ``order`` lists their ops (else as they came); with ``cut``, that send
    stops halfway through its last reply, and the rest follows once ``rest`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, backlog=8)
        self.batch, self.order, self.cut = 1, [], False
        self.sent = threading.Event()  # set after each batch's (first) send
        self.rest = threading.Event()
        self.start()

    def _serve(self) -> None:
        for conn in self._connections():
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        frames = FrameReader()
        held: list[dict[str, object]] = []
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    held += [decode_body(body) for body in frames.feed(data)]
                    if len(held) < self.batch:
                        continue
                    held.sort(key=lambda r: self.order.index(r["op"]) if r["op"] in self.order else 0)
                    replies = [encode_frame({"id": r["id"], "ok": True, "op": r["op"]}) for r in held]
                    out = b"".join(replies)
                    held = []
                    split = len(out) - len(replies[-1]) // 2 if self.cut else len(out)
                    conn.sendall(out[:split])
                    self.sent.set()
                    if split < len(out):
                        self.rest.wait(3)
                        conn.sendall(out[split:])
            except OSError:  # the client closed the connection
                pass


@pytest.fixture
def batching(tmp_path: Path) -> Iterator[BatchServer]:
    server = BatchServer(tmp_path / "batch.sock")
    yield server
    server.rest.set()
    server.close()


class RecvInterrupted:
    """Stands for a connection's socket: its next recv, once ``armed`` is set, waits for ``ready``,
    reads, and is interrupted (KeyboardInterrupt) as it returns, what it read lost with it."""

    def __init__(self, sock: socket.socket, ready: threading.Event) -> None:
        self._sock, self._ready = sock, ready
        self.armed = threading.Event()

    def recv(self, size: int, flags: int) -> bytes:
        if not self.armed.is_set():
            return self._sock.recv(size, flags)
        self.armed.clear()
        self._ready.wait(2)
        self._sock.recv(size, flags)
        raise KeyboardInterrupt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 2
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def reader_then_other(
    c: Client, conn: Any, between: Callable[[], object] = lambda: None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Call "a", which takes the reading role (nobody else reads), then call "b"; waits for
    "a", runs ``between``, waits for "b"; their outcomes, as ``run_catching`` records them."""
    reader, r = run_catching(lambda: c.call({"op": "a"}))
    wait_until(lambda: len(conn._pending) == 1, "the first call did not start")
    other, o = run_catching(lambda: c.call({"op": "b"}))
    reader.join(3)
    between()
    other.join(3)
    return r, o


def promptly_answered_or_lost(out: dict[str, Any], op: str) -> None:
    """A call on the connection an interrupted reader left: its own reply, or ConnectionLost
    (the connection closed for the interrupt), well within its 2 s timeout."""
    assert out.get("result", {}).get("op") == op or (
        isinstance(out.get("error"), ConnectionLost) and "interrupted" in str(out["error"])
    ), out
    assert out["took"] < 1.0, f"a call waited {out['took']:.2f} s (its timeout) for the interrupted reader"


@pytest.mark.parametrize("cut", [False, True], ids=["whole-replies", "cut-mid-reply"])
def test_a_read_interrupted_as_its_recv_returns_ends_the_connection(batching: BatchServer, cut: bool) -> None:
    """The caller reading is interrupted (Ctrl-C) right after a recv that returned both callers'
    replies (or one and half the other's): it gets the KeyboardInterrupt; the other caller is not
    left waiting for its timeout (nor does it read the rest of a reply as a new frame), and the
    next call is answered, on a new connection."""
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        sock = RecvInterrupted(conn._sock, batching.sent)
        conn._sock = sock  # type: ignore[assignment]
        batching.batch, batching.cut = 2, cut
        sock.armed.set()
        r, o = reader_then_other(c, conn, between=batching.rest.set)  # the rest of a cut reply
        assert isinstance(r.get("error"), KeyboardInterrupt), r
        promptly_answered_or_lost(o, "b")
        batching.batch, batching.cut = 1, False
        assert c.call({"op": "after"})["op"] == "after"
        assert c._conn is not conn and conn._closed


def test_an_interrupt_while_a_read_is_handed_out_leaves_no_caller_waiting(
    batching: BatchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read brings three callers' replies; the reader is interrupted as it decodes the second:
    the first was handed to its caller, and the caller of the one not handed out is not left
    waiting for its timeout."""
    import quotad.client

    decoded, armed = [], threading.Event()

    def decode(body: Any) -> dict[str, Any]:
        if armed.is_set():
            decoded.append(body)
            if len(decoded) == 2:
                raise KeyboardInterrupt
        return decode_body(body)

    monkeypatch.setattr(quotad.client, "decode_body", decode)
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        batching.batch, batching.order = 3, ["b", "c", "a"]
        armed.set()
        reader, r = run_catching(lambda: c.call({"op": "a"}))
        wait_until(lambda: len(conn._pending) == 1, "the first call did not start")
        calls = [run_catching(lambda op=op: c.call({"op": op})) for op in ("b", "c")]  # type: ignore[misc]
        for t, _ in [(reader, r), *calls]:
            t.join(3)
        assert isinstance(r.get("error"), KeyboardInterrupt), r
        assert calls[0][1].get("result", {}).get("op") == "b", calls[0][1]
        promptly_answered_or_lost(calls[1][1], "c")
        batching.batch = 1
        assert c.call({"op": "after"})["op"] == "after"


def test_an_interrupt_as_a_reply_is_handed_to_its_caller_leaves_it_not_waiting(
    batching: BatchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader is interrupted as it wakes the caller whose reply it read (the call into
    _Waiter.answer): that caller is not left waiting for its timeout."""
    from quotad.client import _Waiter

    answer, armed = _Waiter.answer, threading.Event()

    def interrupted_answer(w: _Waiter) -> None:
        if armed.is_set() and sys._getframe(1).f_code.co_name == "_deliver":
            armed.clear()
            raise KeyboardInterrupt
        answer(w)

    monkeypatch.setattr(_Waiter, "answer", interrupted_answer)
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        batching.batch, batching.order = 2, ["b", "a"]
        armed.set()
        r, o = reader_then_other(c, conn)
        assert isinstance(r.get("error"), KeyboardInterrupt), r
        promptly_answered_or_lost(o, "b")
        batching.batch = 1
        assert c.call({"op": "after"})["op"] == "after"


class Interrupting(Exception):
    """What a signal handler raises (an Exception, unlike KeyboardInterrupt)."""


def test_a_signal_handlers_exception_as_a_reply_is_decoded_is_raised_as_itself(
    batching: BatchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler's exception landing as msgpack returns a reply is the caller's to see,
    not a broken frame (ProtocolViolation); the next call is answered."""
    import quotad._codec

    unpackb, armed = quotad._codec.msgpack.unpackb, threading.Event()

    def interrupted_unpackb(body: Any) -> Any:
        value = unpackb(body)
        if armed.is_set() and threading.current_thread() is threading.main_thread():  # not the server's
            armed.clear()
            raise Interrupting
        return value

    monkeypatch.setattr(quotad._codec.msgpack, "unpackb", interrupted_unpackb)
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        armed.set()
        with pytest.raises(Interrupting):
            c.call({"op": "a"})
        assert c.call({"op": "after"})["op"] == "after"


class LetGoInterrupted:
    """Stands for a connection's lock: once ``armed``, as a block of ``function`` next lets it go,
    KeyboardInterrupt is raised there (the lock let go first), as a signal's handler would."""

    def __init__(self, lock: Any, function: str) -> None:
        self._lock, self._function = lock, function
        self.armed = False

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self.armed and sys._getframe(1).f_code.co_name == self._function:
            self.armed = False
            raise KeyboardInterrupt


def test_an_interrupt_as_a_call_takes_the_reading_role_does_not_keep_it(batching: BatchServer) -> None:
    """Ctrl-C lands as a call lets go of the lock it took the reading role (and its slot) under:
    the role and the slot are given up, not kept for good (every later call, believing someone
    reads, would wait for its timeout)."""
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        lock = LetGoInterrupted(conn._lock, "request")
        conn._lock = lock  # type: ignore[assignment]
        lock.armed = True
        with pytest.raises(KeyboardInterrupt):
            c.call({"op": "a"})
        t0 = time.monotonic()
        assert c.call({"op": "after"})["op"] == "after"
        assert time.monotonic() - t0 < 1.0
        assert c._conn is conn and not conn._reading and conn._in_flight == 0 and conn._pending == {}


def test_an_interrupt_as_the_reading_role_is_passed_on_still_passes_it(
    batching: BatchServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader has its reply, and half the other caller's; Ctrl-C lands as it hands the
    reading role on (the call into _pass_role): the other caller still gets the role, and reads
    the rest of its reply (the half read is kept: the connection goes on)."""
    from quotad.client import _Connection

    pass_role, armed = _Connection._pass_role, threading.Event()

    def interrupted(conn: _Connection, *args: Any) -> None:
        if armed.is_set():
            armed.clear()
            raise KeyboardInterrupt
        pass_role(conn, *args)

    monkeypatch.setattr(_Connection, "_pass_role", interrupted)
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        batching.batch, batching.order, batching.cut = 2, ["a", "b"], True
        armed.set()
        r, o = reader_then_other(c, conn, between=batching.rest.set)
        assert isinstance(r.get("error"), KeyboardInterrupt), r
        assert o.get("result", {}).get("op") == "b", o
        assert o["took"] < 1.0
        batching.batch, batching.cut = 1, False
        assert c.call({"op": "after"})["op"] == "after"
        assert c._conn is conn and not conn._reading and conn._in_flight == 0


class PollInterrupted:
    """Stands for a connection's poll object: once ``armed``, its next wait (a timeout not 0)
    is interrupted once ``go`` is set, before anything is read."""

    def __init__(self, poll: Any, go: Callable[[], bool]) -> None:
        self._poll, self._go = poll, go
        self.armed = False

    def poll(self, timeout: float) -> Any:
        if self.armed and timeout:
            self.armed = False
            wait_until(self._go, "the second call did not start")
            raise KeyboardInterrupt
        return self._poll.poll(timeout)


def test_an_interrupt_while_the_reader_waits_passes_the_role_and_keeps_the_connection(batching: BatchServer) -> None:
    """Ctrl-C lands while the reader waits for replies, before any came: nothing was read, so
    the connection goes on; the other caller takes the role and gets its reply."""
    with Client(str(batching.path), timeout=2.0, failure_mode="raise") as c:
        assert c.call({"op": "warm"})["op"] == "warm"
        conn = c._conn
        assert conn is not None
        poll = PollInterrupted(conn._readable, lambda: len(conn._pending) == 2)
        conn._readable = poll  # type: ignore[assignment]
        batching.batch = 2
        poll.armed = True
        r, o = reader_then_other(c, conn)
        assert isinstance(r.get("error"), KeyboardInterrupt), r
        assert o.get("result", {}).get("op") == "b", o
        assert o["took"] < 1.0
        batching.batch = 1
        assert c.call({"op": "after"})["op"] == "after"
        assert c._conn is conn and conn.alive
