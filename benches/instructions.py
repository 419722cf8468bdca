"""quotad's own instructions per check, counted by callgrind (repeatable to
~±3% on a busy host, where wall-clock CPU drifts by far more).

    python3 benches/instructions.py QUOTAD_BIN [redis|memory] [64|1]

Runs the daemon under `valgrind --tool=callgrind` twice, behind a fresh
redis-server on a spare port (or on its memory backend), and drives it with
rounds of 64 pipelined `check`s over 4 connections (16 each, 100 tenants x
100 keys, one token bucket that never denies); the difference between a
50- and a 150-round run, divided by the 6,400 checks between them, is the
cost of a check with start-up and shutdown taken out. With `1`, the same
checks go one at a time over one connection (1 in flight): every check is
a round trip of its own, so this counts what a round trip costs. Also prints the
checks per Redis round trip (batches are timed by the daemon, so under
valgrind they are not those of a real run). Needs valgrind, redis-server
and the `msgpack` package (the Python client's venv has it).
"""

import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import msgpack

POLICY = """[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 1000000000, refill_per_sec = 1000000 }]
"""


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame(body: dict) -> bytes:
    b = msgpack.packb(body)
    return struct.pack(">I", len(b)) + b


def replies(c: socket.socket, n: int, buf: bytes = b"") -> list:
    out = []
    while len(out) < n:
        while len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            size = struct.unpack(">I", buf[:4])[0]
            out.append(msgpack.unpackb(buf[4 : 4 + size]))
            buf = buf[4 + size :]
        if len(out) < n:
            data = c.recv(1 << 16)
            if not data:
                raise SystemExit("quotad closed the connection")
            buf += data
    return out


def drive(path: str, rounds: int, serial: bool) -> dict:
    conns = [socket.socket(socket.AF_UNIX) for _ in range(1 if serial else 4)]
    for c in conns:
        c.connect(path)
    rnd, i = random.Random(7), 0
    for _ in range(rounds if not serial else 0):
        for c in conns:
            c.sendall(
                b"".join(
                    frame({"id": i + j, "op": "check", "tenant": f"t{rnd.randrange(100)}", "key": f"k{rnd.randrange(100)}"})
                    for j in range(16)
                )
            )
            i += 16
        for c in conns:
            for r in replies(c, 16):
                assert r.get("allowed") is True, r
    for _ in range(rounds * 64 if serial else 0):
        conns[0].sendall(frame({"id": i, "op": "check", "tenant": f"t{rnd.randrange(100)}", "key": f"k{rnd.randrange(100)}"}))
        i += 1
        assert replies(conns[0], 1)[0].get("allowed") is True
    conns[0].sendall(frame({"id": 0, "op": "stats"}))
    stats = replies(conns[0], 1)[0]
    for c in conns:
        c.close()
    return stats.get("counters", {})


def run(binary: str, backend: str, rounds: int, serial: bool) -> tuple[int, dict]:
    with tempfile.TemporaryDirectory() as d:
        config = f'[server]\nsocket = "{d}/q.sock"\n'
        redis = None
        if backend == "redis":
            port = spare_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
            config += f'[redis]\nurl = "redis://127.0.0.1:{port}"\ntimeout_ms = 20000\n'
        with open(f"{d}/q.toml", "w") as f:
            f.write(config + POLICY)
        out = f"{d}/cg.out"
        q = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", binary, "serve", "--config", f"{d}/q.toml"],
            env={**os.environ, "RUST_LOG": "warn"},
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(f"{d}/q.sock")
                    break
                except OSError:
                    time.sleep(0.1)
            counters = drive(f"{d}/q.sock", rounds, serial)
        finally:
            q.send_signal(signal.SIGINT)
            q.wait()
            if redis:
                redis.terminate()
                redis.wait()
        with open(out) as f:
            total = next(int(l.split()[1]) for l in f if l.startswith(("summary:", "totals:")))
        return total, counters


def main() -> None:
    binary, backend = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "redis")
    serial = len(sys.argv) > 3 and sys.argv[3] == "1"
    (a, _), (b, counters) = run(binary, backend, 50, serial), run(binary, backend, 150, serial)
    per_batch = ""
    if counters.get("batches"):
        per_batch = f", {counters['batched_checks'] / counters['batches']:.1f} checks per round trip"
    inflight = "1 in flight" if serial else "64 in flight"
    print(f"{backend}, {inflight}: {(b - a) / 6400:.0f} instructions per check{per_batch}")


if __name__ == "__main__":
    main()
