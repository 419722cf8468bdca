"""The sync Client's max_pending: calls beyond it wait for a slot (within
their timeout) and never reach the daemon meanwhile; a freed slot goes to a waiter."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fake_server import ThreadedServer
from quotad import Client, ConnectionLost, RequestTimedOut
from quotad._codec import FrameReader, decode_body, encode_frame


class HoldingServer(ThreadedServer):
    """Answers checks only while ``answering`` is set; counts the most requests it held unanswered at once."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.answering = threading.Event()
        self.requests = 0
        self.most_held = 0
        self.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.settimeout(0.002)
        frames = FrameReader()
        held: list[int] = []
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    for body in frames.feed(data):
                        held.append(decode_body(body)["id"])
                        self.requests += 1
                    self.most_held = max(self.most_held, len(held))
                except socket.timeout:
                    pass
                if held and self.answering.is_set():
                    conn.sendall(b"".join(
                        encode_frame({
                            "id": i, "ok": True, "allowed": True, "limit": 10, "remaining": 9,
                            "reset_ms": 0, "retry_after_ms": 0, "degraded": False, "rule": "burst",
                        })
                        for i in held
                    ))
                    held = []


@pytest.fixture
def server(tmp_path: Path) -> HoldingServer:
    s = HoldingServer(tmp_path / "hold.sock")
    yield s  # type: ignore[misc]
    s.close()


def test_a_call_beyond_max_pending_waits_then_times_out_unsent(server: HoldingServer) -> None:
    with Client(str(server.path), max_pending=2, timeout=2.0, failure_mode="raise") as c:
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(c.check, "t", f"k{i}") for i in range(2)]
            deadline = time.monotonic() + 2
            while server.requests < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert server.requests == 2
            c._opts.timeout = 0.2  # the third call's own deadline
            t0 = time.monotonic()
            with pytest.raises(RequestTimedOut, match="already in flight"):
                c.check("t", "k2")
            assert time.monotonic() - t0 >= 0.15
            assert server.requests == 2, "the call waiting for a slot was sent"
            server.answering.set()
            assert [f.result().rule for f in held] == ["burst", "burst"]
        assert c.check("t", "k3").allowed  # the slots are free again


def test_freed_slots_go_to_waiting_callers(server: HoldingServer) -> None:
    server.answering.set()
    with Client(str(server.path), max_pending=3, timeout=5.0, failure_mode="raise") as c:

        def run(t: int) -> int:
            return sum(c.check("t", f"k{t}:{n}").allowed for n in range(50))

        with ThreadPoolExecutor(12) as pool:
            assert sum(pool.map(run, range(12))) == 600
    assert server.requests == 600
    assert 1 <= server.most_held <= 3, server.most_held


def test_callers_waiting_for_a_slot_fail_when_the_connection_closes(server: HoldingServer) -> None:
    c = Client(str(server.path), max_pending=1, timeout=5.0, failure_mode="raise")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.check, "t", "k0")
        deadline = time.monotonic() + 2
        while server.requests < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        second = pool.submit(c.check, "t", "k1")
        time.sleep(0.05)  # waiting for the slot
        t0 = time.monotonic()
        c.close()
        for f in (first, second):
            with pytest.raises(ConnectionLost):
                f.result(timeout=2)
        assert time.monotonic() - t0 < 1, "the waiter was not woken by the close"
    assert server.requests == 1
