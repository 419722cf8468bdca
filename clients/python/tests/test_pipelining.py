"""Many threads share one sync Client (their frames batched into shared writes)
against a daemon that answers out of order: every reply reaches its caller."""

from __future__ import annotations

import random
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fake_server import ThreadedServer
from quotad import Client
from quotad._codec import FrameReader, decode_body, encode_frame

THREADS, CHECKS = 32, 300


class ShufflingServer(ThreadedServer):
    """Answers each check with its key as the rule, holding replies until 64 are in (or 5 ms pass), then shuffled."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.requests = 0
        self.out_of_order = 0
        self.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        conn.settimeout(0.005)
        frames = FrameReader()
        held: list[tuple[int, str]] = []
        rng = random.Random(7)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    for body in frames.feed(data):
                        req = decode_body(body)
                        held.append((req["id"], req["key"]))
                        self.requests += 1
                except socket.timeout:
                    pass
                if len(held) >= 64 or (held and not data):
                    rng.shuffle(held)
                    self.out_of_order += sum(1 for a, b in zip(held, held[1:]) if b[0] < a[0])
                    conn.sendall(b"".join(
                        encode_frame({
                            "id": i, "ok": True, "allowed": True, "limit": 10, "remaining": int(key[1:]),
                            "reset_ms": 0, "retry_after_ms": 0, "degraded": False, "rule": key,
                        })
                        for i, key in held
                    ))
                    held = []
                data = b""


def test_threads_sharing_a_client_each_get_their_own_replies(tmp_path: Path) -> None:
    server = ShufflingServer(tmp_path / "shuffle.sock")
    try:
        with Client(str(server.path), timeout=10.0, failure_mode="raise") as c:

            def run(t: int) -> list[str]:
                wrong = []
                for n in range(CHECKS):
                    i = t * CHECKS + n
                    d = c.check("acme", f"k{i}", "api")
                    if d.rule != f"k{i}" or d.remaining != i or d.degraded:
                        wrong.append(f"call {i} got {d}")
                return wrong

            with ThreadPoolExecutor(THREADS) as pool:
                wrong = [w for ws in pool.map(run, range(THREADS)) for w in ws]
        assert wrong == []
        assert server.requests == THREADS * CHECKS
        assert server.out_of_order > 0
    finally:
        server.close()
