#!/usr/bin/env python3
"""A long run of mixed load through a real quotad: fails if its memory, open
fds, threads or tokio tasks keep growing.

Usage: soak.py [--minutes M] [--warmup W] [--quotad BIN]   (default 10 and 2)

Starts its own redis-server (temporary Unix socket) and quotad (Redis
backend), then runs, all at once: checks on all four rule kinds (a bounded
key space, so live state plateaus), cache get/set/del with tags and
single-flight fills, connects and disconnects, and malformed frames (garbage
bodies, oversized length prefixes, frames cut short). Redis is killed and
restarted once, midway; quotad gets a SIGHUP every minute (its config
alternates between two limits, so each reload changes something).

Every 5 s it samples quotad's RSS (VmRSS), open fds (/proc/PID/fd), OS
threads (/proc/PID/status: with `threads = 1` these only grow if blocking
work leaks) and, from `stats`, its live tokio tasks (`tasks`: per connection,
per shard, timers; the series a task leak shows in), with `connections_open`
beside them. After the warm-up it fits a least-squares slope to each series
and fails if one grows faster than its bound (BOUNDS, per minute), if quotad
exits, or if a well-formed request gets an error reply other than
`overloaded`.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from chaos import wait_socket
from conformance import Conn

# Growth per minute past the warm-up that fails the run. A leak of one object
# per request, connection or reload would pass these within a minute.
BOUNDS = {"rss_kib": 256.0, "fds": 0.5, "threads": 0.1, "tasks": 1.0}
SAMPLE_S = 5
KEYS = 2000

CONFIG = """[server]
socket = "{sock}"
[redis]
url = "redis+unix://{redis}"
timeout_ms = 100
[policies.default]
rules = [{{ name = "tb", kind = "token_bucket", capacity = {cap}, refill_per_sec = 50 }}]
[policies.sw]
rules = [{{ name = "sw", kind = "sliding_window", limit = 100, window_ms = 10000 }}]
[policies.fw]
rules = [{{ name = "fw", kind = "fixed_window", limit = 100, window_ms = 10000 }}]
[policies.dq]
failure_mode = "local"
rules = [{{ name = "dq", kind = "daily_quota", limit = 100000 }}]
"""


class Soak:
    def __init__(self, directory: Path, quotad: str) -> None:
        self.dir, self.quotad_bin = directory, quotad
        self.redis_sock, self.sock = directory / "redis.sock", directory / "quotad.sock"
        self.config = directory / "quotad.toml"
        self.write_config(100)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.bad: list[str] = []
        self.start_redis()
        log = open(directory / "quotad.log", "ab")
        self.server = subprocess.Popen([quotad, "serve", "--config", str(self.config)], stdout=log, stderr=log)
        wait_socket(self.sock, self.server, "quotad")

    def write_config(self, cap: int) -> None:
        self.config.write_text(CONFIG.format(sock=self.sock, redis=self.redis_sock, cap=cap))

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.redis_sock), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
        )
        wait_socket(self.redis_sock, self.redis, "redis-server")

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def judge(self, req: dict, reply: dict | None) -> dict | None:
        """Counts a reply to a well-formed request; notes an unexpected one."""
        self.count(req["op"])
        if reply is not None and reply.get("ok") is True and reply.get("id") == req["id"]:
            if reply.get("degraded"):
                self.count("degraded")
            return reply
        if reply is not None and reply.get("error", {}).get("code") == "overloaded":
            self.count("overloaded")
            return None
        with self.lock:
            self.bad.append(f"{req} -> {reply!r}")
        return None

    def worker(self, body) -> None:
        """Runs `body(conn, rng)` in a loop on one connection, reconnecting after a loss."""
        rng = random.Random(threading.get_ident())
        conn: Conn | None = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = Conn(str(self.sock), timeout=5)
                body(conn, rng)
            except (OSError, AssertionError) as e:  # a lost connection; judged by the next request
                self.count("reconnects")
                if isinstance(e, TimeoutError):
                    with self.lock:
                        self.bad.append(f"timeout: {e}")
                conn = None
                time.sleep(0.05)

    def ask(self, conn: Conn, req: dict) -> dict | None:
        conn.send(req)
        return self.judge(req, conn.recv())

    def checks(self, conn: Conn, rng: random.Random) -> None:
        policy = rng.choice([None, "sw", "fw", "dq"])
        req = {"id": rng.randrange(1, 2**32), "op": "check", "tenant": f"t{rng.randrange(8)}",
               "key": f"k{rng.randrange(KEYS)}", "cost": rng.choice([0, 1, 1, 2])}
        if policy:
            req["policy"] = policy
        self.ask(conn, req)

    def cache(self, conn: Conn, rng: random.Random) -> None:
        tenant, key = f"t{rng.randrange(4)}", f"c{rng.randrange(KEYS)}"
        tags = [f"tag{rng.randrange(20)}" for _ in range(rng.randrange(3))]
        rid = rng.randrange(1, 2**32)
        r = rng.random()
        if r < 0.5:
            got = self.ask(conn, {"id": rid, "op": "cache_get", "tenant": tenant, "key": key, "fill_ms": 200})
            if got and got.get("fill"):  # our turn to fill it, or to let go
                if rng.random() < 0.9:
                    self.ask(conn, {"id": rid + 1, "op": "cache_set", "tenant": tenant, "key": key,
                                    "value": rng.randbytes(rng.randrange(2000)), "ttl_ms": 5000,
                                    "stale_ms": 2000, "tags": tags})
                else:
                    self.ask(conn, {"id": rid + 1, "op": "cache_del", "tenant": tenant, "keys": [key],
                                    "fill_only": True})
        elif r < 0.8:
            self.ask(conn, {"id": rid, "op": "cache_set", "tenant": tenant, "key": key,
                            "value": rng.randbytes(rng.randrange(2000)), "ttl_ms": rng.randrange(100, 20000),
                            "tags": tags})
        elif r < 0.9:
            self.ask(conn, {"id": rid, "op": "cache_del", "tenant": tenant, "keys": [key]})
        else:
            self.ask(conn, {"id": rid, "op": "cache_del", "tenant": tenant, "tags": [f"tag{rng.randrange(20)}"]})

    def churn(self, conn: Conn, rng: random.Random) -> None:
        """One request per connection, then a close (half of them without reading the reply)."""
        conn.send({"id": 1, "op": "hello"})
        if rng.random() < 0.5:
            self.judge({"id": 1, "op": "hello"}, conn.recv())
        conn.close()
        raise ConnectionResetError  # the worker reconnects

    def malformed(self, conn: Conn, rng: random.Random) -> None:
        """A frame the server must refuse: a reply or a clean close, then reconnect."""
        kind = rng.randrange(4)
        if kind == 0:
            conn.send_body(rng.randbytes(rng.randrange(1, 64)))  # garbage body
        elif kind == 1:
            conn.send_bytes(struct.pack(">I", 0xFFFFFFF0))  # over max_frame_bytes
        elif kind == 2:
            conn.send_bytes(struct.pack(">I", 100) + b"\x81\xa2id")  # cut short, then closed
            conn.close()
            self.count("malformed")
            raise ConnectionResetError
        else:
            conn.send_body(b"\x82\xa2id\x07\xa2op\xa4nope")  # a well-formed unknown op
            reply = conn.recv()
            assert reply is not None and reply["error"]["code"] == "unknown_op", reply
            self.count("malformed")
            return
        self.count("malformed")
        reply = conn.recv()  # an error (a random body may even be a map), or a close
        assert reply is None or reply.get("ok") is False, reply
        conn.close()
        raise ConnectionResetError

    def sample(self) -> dict[str, float]:
        pid = self.server.pid
        status = Path(f"/proc/{pid}/status").read_text()
        field = dict(line.split(":", 1) for line in status.splitlines())
        conn = Conn(str(self.sock), timeout=5)
        stats = conn.ok({"id": 1, "op": "stats"})["counters"]
        conn.close()
        return {"rss_kib": float(field["VmRSS"].split()[0]), "fds": float(len(os.listdir(f"/proc/{pid}/fd"))),
                "threads": float(field["Threads"]), "tasks": float(stats["tasks"]),
                "connections_open": float(stats["connections_open"])}


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes not fitted")
    parser.add_argument("--quotad", default=os.environ.get("QUOTAD_BIN", "target/debug/quotad"))
    args = parser.parse_args()
    total, warmup = args.minutes * 60, args.warmup * 60
    with tempfile.TemporaryDirectory() as d:
        s = Soak(Path(d), args.quotad)
        bodies = [s.checks, s.checks, s.cache, s.cache, s.churn, s.malformed]
        threads = [threading.Thread(target=s.worker, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
        samples: list[tuple[float, dict[str, float]]] = []
        start = time.monotonic()
        restarted, hups = False, 0
        try:
            print(f"{'t s':>5} {'rss KiB':>8} {'fds':>4} {'threads':>7} {'tasks':>5} {'conns':>5}  requests", flush=True)
            while (now := time.monotonic() - start) < total:
                if s.server.poll() is not None:
                    print(f"soak: FAILED: quotad exited with {s.server.returncode}")
                    return 1
                if not restarted and now >= total / 2:
                    restarted = True
                    s.redis.kill()
                    s.redis.wait()
                    s.redis_sock.unlink(missing_ok=True)
                    time.sleep(1)
                    s.start_redis()
                    print(f"{now:5.0f} redis killed and restarted", flush=True)
                if now >= (hups + 1) * 60:
                    hups += 1
                    s.write_config(100 + hups % 2)
                    s.server.send_signal(signal.SIGHUP)
                sample = s.sample()
                samples.append((now, sample))
                with s.lock:
                    done = sum(v for k, v in s.counts.items() if k not in ("degraded", "reconnects", "overloaded"))
                print(f"{now:5.0f} {sample['rss_kib']:8.0f} {sample['fds']:4.0f} {sample['threads']:7.0f} "
                      f"{sample['tasks']:5.0f} {sample['connections_open']:5.0f}  {done}", flush=True)
                time.sleep(SAMPLE_S - (time.monotonic() - start) % SAMPLE_S)
        finally:
            s.stop.set()
            for t in threads:
                t.join()
            s.server.terminate()
            s.server.wait(10)
            s.redis.terminate()
            s.redis.wait(10)
        failed = False
        print(f"requests: {dict(sorted(s.counts.items()))}; SIGHUPs {hups}")
        if s.bad:
            failed = True
            print(f"unexpected replies: {len(s.bad)}, e.g. {s.bad[:3]}")
        fitted = [(t, v) for t, v in samples if t >= warmup]
        for series in ("rss_kib", "fds", "threads", "tasks", "connections_open"):
            points = [(t, v[series]) for t, v in fitted]
            slope = slope_per_min(points)
            bound = BOUNDS.get(series)
            verdict = "" if bound is None else ("ok" if slope <= bound else "FAIL")
            if verdict == "FAIL":
                failed = True
            print(f"{series:16} warm {points[0][1]:8.0f}  end {points[-1][1]:8.0f}  "
                  f"slope {slope:+9.2f}/min  bound {bound if bound is not None else '-'}  {verdict}")
        print("soak: FAILED" if failed else "soak: ok")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
