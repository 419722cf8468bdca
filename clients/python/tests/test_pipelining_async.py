"""100k checks pipelined on one AsyncClient connection to a daemon that
answers out of order: every reply reaches the call it answers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from quotad import AsyncClient
from quotad._codec import FrameReader, decode_body, encode_frame

CALLS = 100_000


class ShufflingServer:
    """Answers each check with its key as the rule and the key's number as
    ``remaining``: requests are held until 1,000 are in (or 5 ms pass), then
    answered shuffled."""

    def __init__(self) -> None:
        self.requests = 0
        self.out_of_order = 0
        self.max_held = 0
        self._rng = random.Random(12345)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader()
        held: list[tuple[int, str]] = []
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def answer() -> None:
            nonlocal held, timer
            if timer is not None:
                timer.cancel()
                timer = None
            self._rng.shuffle(held)
            self.out_of_order += sum(1 for a, b in zip(held, held[1:]) if b[0] < a[0])
            writer.write(b"".join(
                encode_frame({
                    "id": i, "ok": True, "allowed": True, "limit": CALLS, "remaining": int(key[1:]),
                    "reset_ms": 0, "retry_after_ms": 0, "degraded": False, "rule": key,
                })
                for i, key in held
            ))
            held = []

        while data := await reader.read(1 << 16):
            for body in frames.feed(data):
                req = decode_body(body)
                held.append((req["id"], req["key"]))
                self.requests += 1
            self.max_held = max(self.max_held, len(held))
            if len(held) >= 1000:
                answer()
            elif held and timer is None:
                timer = loop.call_later(0.005, answer)
            await writer.drain()
        writer.close()


async def test_100k_pipelined_checks_answered_out_of_order_each_get_their_own_reply(tmp_path: Path) -> None:
    fake = ShufflingServer()
    sock = tmp_path / "shuffle.sock"
    server = await asyncio.start_unix_server(fake.serve, path=str(sock))
    try:
        async with AsyncClient(str(sock), timeout=120.0, max_pending=CALLS, failure_mode="raise") as c:
            assert (await c.check("acme", "k0")).rule == "k0"  # connected: the rest are pipelined
            decisions = await asyncio.gather(*(c.check("acme", f"k{i}", "api") for i in range(CALLS)))
        assert fake.requests == CALLS + 1
        assert fake.out_of_order > CALLS // 4, fake.out_of_order
        assert fake.max_held >= 1000, "the calls were pipelined"
        wrong = [
            f"call {i} got {d}" for i, d in enumerate(decisions) if d.rule != f"k{i}" or d.remaining != i or d.degraded
        ]
        assert wrong == [], wrong[:5]
    finally:
        server.close()
        await server.wait_closed()
