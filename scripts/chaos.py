#!/usr/bin/env python3
"""Drives checks through a real quotad while injecting one fault at a time;
prints a table row per fault and exits 1 on any client-visible error or a
latency past the bound.

Usage: chaos.py [--seconds S] [--quotad BIN]   (S: load per fault, default 2)

Starts its own redis-server (on a temporary Unix socket) and quotad (Redis
backend, `timeout_ms` 100). Faults: the Redis process killed and restarted,
Redis paused (SIGSTOP/SIGCONT for 0.5 s), `CLIENT KILL TYPE normal`,
`FUNCTION FLUSH`, `DEBUG SLEEP 0.5`, and quotad itself killed and restarted by
this script (the clients reconnect and resend what was lost). Not covered:
a Sentinel failover (tests/sentinel.rs tests one) and a Cluster failover.

Columns: checks sent and answered, client-visible errors, degraded
answers, p99 and max latency, over-admissions of a key whose exact limit is
exhausted before the fault (its policy fails closed, so only a decision
Redis made wrongly can admit it; a Redis restart without persistence
forgets the window, which would show here), and the time from the fault's
end to the last degraded answer (after it, Redis decides again; a quotad
restart shows in the latencies instead, as the clients reconnect).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from conformance import Conn

LATENCY_BOUND_S = 1.0  # well past timeout_ms (100) plus a reconnect
EXACT_LIMIT = 20
CLIENTS = 4


def wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.01)


class World:
    def __init__(self, directory: Path, quotad: str) -> None:
        self.dir, self.quotad_bin = directory, quotad
        self.redis_sock = directory / "redis.sock"
        self.sock = directory / "quotad.sock"
        self.config = directory / "quotad.toml"
        self.config.write_text(
            f'[server]\nsocket = "{self.sock}"\n'
            f'[redis]\nurl = "redis+unix://{self.redis_sock}"\ntimeout_ms = 100\n'
            '[policies.default]\nrules = [{ name = "burst", kind = "token_bucket", capacity = 1000000, refill_per_sec = 1000000 }]\n'
            f'[policies.exact]\nfailure_mode = "closed"\nrules = [{{ name = "w", kind = "fixed_window", limit = {EXACT_LIMIT}, window_ms = 3600000 }}]\n'
        )
        self.redis: subprocess.Popen[bytes] | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.start_redis()
        self.start_quotad()

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.redis_sock), "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--enable-debug-command", "local"],
            stdout=subprocess.DEVNULL,
        )
        wait_socket(self.redis_sock, self.redis, "redis-server")

    def start_quotad(self) -> None:
        log = open(self.dir / "quotad.log", "ab")
        self.server = subprocess.Popen([self.quotad_bin, "serve", "--config", str(self.config)], stdout=log, stderr=log)
        wait_socket(self.sock, self.server, "quotad")

    def redis_cli(self, *args: str) -> None:
        subprocess.run(["redis-cli", "-s", str(self.redis_sock), *args], check=True, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in (self.server, self.redis):
            if p and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                p.wait(10)


def kill_restart_redis(w: World) -> None:
    assert w.redis
    w.redis.kill()
    w.redis.wait()
    w.redis_sock.unlink(missing_ok=True)
    w.start_redis()


def pause_redis(w: World) -> None:
    assert w.redis
    w.redis.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    w.redis.send_signal(signal.SIGCONT)


def kill_restart_quotad(w: World) -> None:
    assert w.server
    w.server.kill()
    w.server.wait()
    time.sleep(0.1)  # a supervisor's restart delay
    w.start_quotad()


FAULTS = [
    ("redis killed + restarted", kill_restart_redis),
    ("redis SIGSTOP 0.5 s", pause_redis),
    ("CLIENT KILL TYPE normal", lambda w: w.redis_cli("CLIENT", "KILL", "TYPE", "normal")),
    ("FUNCTION FLUSH", lambda w: w.redis_cli("FUNCTION", "FLUSH")),
    ("DEBUG SLEEP 0.5", lambda w: w.redis_cli("DEBUG", "SLEEP", "0.5")),
    ("quotad killed + restarted", kill_restart_quotad),
]


class Load:
    """CLIENTS threads of checks, one at a time each, reconnecting when quotad goes away."""

    def __init__(self, w: World, tag: str) -> None:
        self.w, self.tag = w, tag
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.sent = self.errors = self.degraded = self.exact_allowed = 0
        self.errors_seen: list[str] = []
        self.last_degraded_at = 0.0
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(CLIENTS)]

    def request(self, conn: Conn | None, req: dict) -> tuple[Conn | None, dict | None]:
        """Sends `req`; after a lost connection, reconnects and resends (a client's retry)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                if conn is None:
                    conn = Conn(str(self.w.sock), timeout=LATENCY_BOUND_S * 2)
                conn.send(req)
                reply = conn.recv()
                if reply is not None:
                    return conn, reply
            except (ConnectionError, FileNotFoundError, AssertionError):  # quotad went away
                pass
            except TimeoutError:
                return None, None  # its late reply must not pass for the next one's
            conn = None
            if time.monotonic() > deadline:
                return None, None
            time.sleep(0.01)

    def run(self, n: int) -> None:
        conn: Conn | None = None
        i = 0
        while not self.stop.is_set():
            i += 1
            exact = n == 0 and i % 5 == 0  # one client also spends the exact key
            req = {"id": i, "op": "check", "tenant": f"chaos-{self.tag}", "key": f"k{n}"}
            if exact:
                req.update(key="exact", policy="exact")
            start = time.monotonic()
            conn, reply = self.request(conn, req)
            took = time.monotonic() - start
            with self.lock:
                self.sent += 1
                self.latencies.append(took)
                if reply is None or reply.get("ok") is not True or reply.get("id") != i:
                    self.errors += 1
                    self.errors_seen.append(repr(reply))
                    continue
                if reply["degraded"]:
                    self.degraded += 1
                    self.last_degraded_at = time.monotonic()
                elif exact and reply["allowed"]:
                    self.exact_allowed += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="load per fault")
    parser.add_argument("--quotad", default=os.environ.get("QUOTAD_BIN", "target/debug/quotad"))
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory() as d:
        w = World(Path(d), args.quotad)
        try:
            print(f"{'fault':28} {'sent':>6} {'answered':>8} {'errors':>6} {'degraded':>8} "
                  f"{'p99 ms':>7} {'max ms':>7} {'over-adm':>8} {'recover ms':>10}")
            for i, (name, inject) in enumerate(FAULTS):
                with Load(w, str(i)) as load:
                    time.sleep(args.seconds / 3)
                    inject(w)
                    fault_end = time.monotonic()
                    time.sleep(args.seconds * 2 / 3)
                lat = sorted(load.latencies)
                p99, worst = lat[int(len(lat) * 0.99)] * 1000, lat[-1] * 1000
                recover = max(0.0, load.last_degraded_at - fault_end) * 1000
                over = max(0, load.exact_allowed - EXACT_LIMIT)
                print(f"{name:28} {load.sent:6} {load.sent - load.errors:8} {load.errors:6} {load.degraded:8} "
                      f"{p99:7.1f} {worst:7.1f} {over:8} {recover:10.0f}")
                if load.errors or worst > LATENCY_BOUND_S * 1000:
                    failed = True
                    print(f"  FAIL: {load.errors} errors {load.errors_seen[:3]}, max {worst:.0f} ms")
        finally:
            w.stop()
    print("chaos: FAILED" if failed else "chaos: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
