#!/usr/bin/env python3
"""Drives checks through a real quotad while injecting one fault at a time;
prints a table row per fault and exits 1 on any client-visible error or a
latency past the bound.

Usage: chaos.py [--seconds S] [--quotad BIN] [--full | --faults NAME,...]
(S: load per fault, default 2)

Starts its own redis-server (on a temporary Unix socket) and quotad (Redis
backend, `timeout_ms` 100). Faults: the Redis process killed and restarted,
Redis paused (SIGSTOP/SIGCONT for 0.5 s), `CLIENT KILL TYPE normal`,
`FUNCTION FLUSH`, `DEBUG SLEEP 0.5`, and quotad itself killed and restarted by
this script (the clients reconnect and resend what was lost). Only with
`--full` or when named in `--faults` (they take several seconds each to set
up and to fail over): `SENTINEL FAILOVER` of a master with one replica and
three Sentinels, and a Redis Cluster (3 masters, 3 replicas) whose master of
the load's slot is killed (SIGKILL) until its replica is promoted; each gets
its own Redis servers and quotad.

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
import socket
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
    """One redis-server on a Unix socket, and quotad in front of it."""

    def __init__(self, directory: Path, quotad: str) -> None:
        self.dir, self.quotad_bin = directory, quotad
        self.redis_sock = directory / "redis.sock"
        self.sock = directory / "quotad.sock"
        self.config = directory / "quotad.toml"
        self.redis: subprocess.Popen[bytes] | None = None  # the Unix-socket one, if any
        self.procs: list[subprocess.Popen[bytes]] = []  # the other Redis servers
        self.config.write_text(
            f'[server]\nsocket = "{self.sock}"\n'
            f'[redis]\n{self.start_backend()}timeout_ms = 100\n'
            '[policies.default]\nrules = [{ name = "burst", kind = "token_bucket", capacity = 1000000, refill_per_sec = 1000000 }]\n'
            f'[policies.exact]\nfailure_mode = "closed"\nrules = [{{ name = "w", kind = "fixed_window", limit = {EXACT_LIMIT}, window_ms = 3600000 }}]\n'
        )
        self.server: subprocess.Popen[bytes] | None = None
        self.start_quotad()

    def start_backend(self) -> str:
        """Starts the Redis servers; returns the `[redis]` lines that reach them."""
        self.start_redis()
        return f'url = "redis+unix://{self.redis_sock}"\n'

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
        for p in (self.server, self.redis, *self.procs):
            if p and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
                p.wait(10)


def free_port(bus: bool = False) -> int:
    """A free loopback TCP port; with `bus`, one below 45536 whose port + 10000
    (a Cluster node's bus) is free too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus:
            return port
        port = 20000 + port % 25000
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue


def cli(port: int, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def wait_for(what: str, cond, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class TcpWorld(World):
    """Redis servers on loopback TCP ports, each in its own directory."""

    def tcp_redis(self, port: int, *args: str) -> subprocess.Popen[bytes]:
        d = self.dir / f"redis-{port}"
        d.mkdir()
        p = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d), *args],
            stdout=subprocess.DEVNULL,
        )
        self.procs.append(p)
        wait_for(f"redis-server on {port}", lambda: cli(port, "PING") == "PONG", 10)
        return p


SENTINEL_MASTER = "quotad-chaos"


class SentinelWorld(TcpWorld):
    """A master, one replica and three Sentinels; quotad finds the master through them."""

    def start_backend(self) -> str:
        self.master, self.replica = free_port(), free_port()
        self.tcp_redis(self.master)
        self.tcp_redis(self.replica, "--replicaof", "127.0.0.1", str(self.master))
        wait_for("the replica to sync", lambda: "master_link_status:up" in cli(self.replica, "INFO", "replication"))
        self.sentinels = [free_port() for _ in range(3)]
        for port in self.sentinels:
            d = self.dir / f"sentinel-{port}"
            d.mkdir()
            conf = d / "sentinel.conf"  # Sentinel rewrites it: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\n"
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.master} 2\n"
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n"
                f"sentinel failover-timeout {SENTINEL_MASTER} 5000\n"
            )
            self.procs.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"], stdout=subprocess.DEVNULL))
        for port in self.sentinels:
            wait_for("the sentinels to see the replica",
                     lambda: str(self.replica) in cli(port, "SENTINEL", "REPLICAS", SENTINEL_MASTER))
        urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in self.sentinels)
        return f'sentinels = [{urls}]\nmaster_name = "{SENTINEL_MASTER}"\n'

    def master_port(self) -> str:
        return cli(self.sentinels[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER).splitlines()[-1]


def fcalls(port: int) -> int:
    """The FCALLs a Redis has run (a replica runs none: it replicates the effects)."""
    for line in cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_fcall:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def sentinel_failover(w: World) -> str:
    """`SENTINEL FAILOVER`, until quotad runs its checks on the promoted
    replica. The old master stays a master until Sentinel demotes it (some
    8 s later); quotad asks Sentinel again only when it answers READONLY, so
    the checks it decided meanwhile are lost when it resyncs."""
    assert isinstance(w, SentinelWorld)
    assert cli(w.sentinels[0], "SENTINEL", "FAILOVER", SENTINEL_MASTER) == "OK"
    wait_for("the failover", lambda: w.master_port() == str(w.replica))
    promoted, before = time.monotonic(), fcalls(w.master)
    wait_for("quotad on the new master", lambda: fcalls(w.replica) > 0, 30)
    return (f"quotad on the promoted replica {(time.monotonic() - promoted) * 1000:.0f} ms after Sentinel named it; "
            f"{fcalls(w.master) - before} batches decided by the old master meanwhile")


class ClusterWorld(TcpWorld):
    """A Redis Cluster of 3 masters with a replica each."""

    def start_backend(self) -> str:
        self.ports: list[int] = []
        while len(self.ports) < 6:
            p = free_port(bus=True)
            if not any(p in (q, q + 10000, q - 10000) for q in self.ports):
                self.ports.append(p)
        self.nodes = {
            p: self.tcp_redis(p, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000") for p in self.ports
        }
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL,
        )
        for p in self.ports:
            wait_for("the cluster to be ok", lambda: "cluster_state:ok" in cli(p, "CLUSTER", "INFO"))
        for p in self.ports:
            wait_for("the replicas to sync", lambda: "master_link_status:down" not in cli(p, "INFO", "replication"))
        urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in self.ports)
        return f"cluster = [{urls}]\n"

    def master_of(self, key: str, via: int) -> int:
        """The port of the master serving `key`'s slot, as node `via` sees it."""
        slot = int(cli(via, "CLUSTER", "KEYSLOT", key))
        for line in cli(via, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for r in fields[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    return int(fields[1].split(":")[1].split("@")[0])
        return 0


def kill_cluster_master(w: World, tenant: str) -> str:
    """SIGKILLs the master of `tenant`'s slot; the fault ends when another
    node reports the slot served by the promoted replica, cluster_state ok."""
    assert isinstance(w, ClusterWorld)
    key = "{" + tenant + "}"  # every key of a tenant carries it as the hash tag
    old = w.master_of(key, w.ports[0])
    other = next(p for p in w.ports if p != old)
    w.nodes[old].kill()
    w.nodes[old].wait()
    killed = time.monotonic()
    wait_for("the replica's promotion", lambda: w.master_of(key, other) not in (0, old)
             and "cluster_state:ok" in cli(other, "CLUSTER", "INFO"))
    return f"replica promoted {(time.monotonic() - killed) * 1000:.0f} ms after the kill"


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


# (name for --faults, row title, the World it needs, whether the reduced form
# runs it, the fault: called with the World and the load's tenant; it may
# return a note, printed under its row)
FAULTS = [
    ("redis-kill", "redis killed + restarted", World, True, lambda w, t: kill_restart_redis(w)),
    ("redis-stop", "redis SIGSTOP 0.5 s", World, True, lambda w, t: pause_redis(w)),
    ("client-kill", "CLIENT KILL TYPE normal", World, True,
     lambda w, t: w.redis_cli("CLIENT", "KILL", "TYPE", "normal")),
    ("function-flush", "FUNCTION FLUSH", World, True, lambda w, t: w.redis_cli("FUNCTION", "FLUSH")),
    ("debug-sleep", "DEBUG SLEEP 0.5", World, True, lambda w, t: w.redis_cli("DEBUG", "SLEEP", "0.5")),
    ("quotad-kill", "quotad killed + restarted", World, True, lambda w, t: kill_restart_quotad(w)),
    ("sentinel-failover", "SENTINEL FAILOVER", SentinelWorld, False, lambda w, t: sentinel_failover(w)),
    ("cluster-master-kill", "cluster master killed", ClusterWorld, False, kill_cluster_master),
]


class Load:
    """CLIENTS threads of checks, one at a time each, reconnecting when quotad goes away."""

    def __init__(self, w: World, tag: str) -> None:
        self.w, self.tenant = w, f"chaos-{tag}"
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
            req = {"id": i, "op": "check", "tenant": self.tenant, "key": f"k{n}"}
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
    parser.add_argument("--full", action="store_true", help="every fault, the Sentinel and Cluster ones too")
    parser.add_argument("--faults", help="comma-separated: " + ",".join(f[0] for f in FAULTS))
    args = parser.parse_args()
    if args.faults:
        chosen = args.faults.split(",")
        if unknown := set(chosen) - {f[0] for f in FAULTS}:
            parser.error(f"unknown faults: {sorted(unknown)}")
        faults = [f for f in FAULTS if f[0] in chosen]
    else:
        faults = [f for f in FAULTS if args.full or f[3]]
    failed = False
    worlds: dict[type, World] = {}
    with tempfile.TemporaryDirectory() as d:
        try:
            print(f"{'fault':28} {'sent':>6} {'answered':>8} {'errors':>6} {'degraded':>8} "
                  f"{'p99 ms':>7} {'max ms':>7} {'over-adm':>8} {'recover ms':>10}")
            for key, name, kind, _, inject in faults:
                if kind not in worlds:
                    directory = Path(d) / key
                    directory.mkdir()
                    worlds[kind] = kind(directory, args.quotad)
                w = worlds[kind]
                with Load(w, key) as load:
                    time.sleep(args.seconds / 3)
                    note = inject(w, load.tenant)
                    fault_end = time.monotonic()
                    time.sleep(args.seconds * 2 / 3)
                lat = sorted(load.latencies)
                p99, worst = lat[int(len(lat) * 0.99)] * 1000, lat[-1] * 1000
                recover = max(0.0, load.last_degraded_at - fault_end) * 1000
                over = max(0, load.exact_allowed - EXACT_LIMIT)
                print(f"{name:28} {load.sent:6} {load.sent - load.errors:8} {load.errors:6} {load.degraded:8} "
                      f"{p99:7.1f} {worst:7.1f} {over:8} {recover:10.0f}")
                if note:
                    print(f"  {note}")
                if load.errors or worst > LATENCY_BOUND_S * 1000:
                    failed = True
                    print(f"  FAIL: {load.errors} errors {load.errors_seen[:3]}, max {worst:.0f} ms")
        finally:
            for w in worlds.values():
                w.stop()
    print("chaos: FAILED" if failed else "chaos: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
