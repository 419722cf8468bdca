"""Client-side benchmark: quotad's AsyncClient.check against per-request baselines.

One process, one asyncio event loop (like one web worker), closed loop:
``concurrency`` tasks each issue a check, wait for it, and issue the next.
Against one redis-server on TCP loopback, started here, with a quotad
(release build) on a Unix socket in front of the same Redis:

  quotad   AsyncClient.check through the daemon (one pipelined connection)
  evalsha  redis-py asyncio, one EVALSHA of bench/gcra.lua per check
           (a correct atomic GCRA token bucket; a connection per in-flight call)
  limits   the `limits` library, MovingWindowRateLimiter on its async Redis
           storage (implementation="redispy")
  quotad-sync   the thread-safe sync Client, one thread per call in flight
  evalsha-sync  sync redis-py (hiredis), the same EVALSHA, one thread per call
                in flight (a pooled connection each)
  quotad-before, quotad-sync-before  with --before DIR: the same through
                another copy of the client (DIR/quotad is its package), against
                the same daemon

Run from the repo root after `cargo build --release`:

  clients/python/.venv/bin/pip install -e 'clients/python[bench]'
  clients/python/.venv/bin/python clients/python/bench/bench.py

Reports checks/s, latency p50/p99, and CPU per check of Redis and of this
process (``time.process_time``). Every key stays far from its limit, so every
check is allowed. With ``--repeat N`` every system runs in turn N times, and
the summary gives each ratio to quotad's (checks/s, client CPU per check) as
its median and range over the repeats: the systems of one repeat ran under
the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from statistics import quantiles

import redis
import redis.asyncio as aredis

from quotad import AsyncClient, Client

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

CAPACITY = 1_000_000  # tokens; refilled at CAPACITY per second: never denied
TENANTS, KEYS = 100, 100

Check = Callable[[str, str], Awaitable[bool]]
SyncCheck = Callable[[str, str], bool]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up")
        time.sleep(0.02)


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def run(check: Check, concurrency: int, seconds: float, warmup: float) -> tuple[int, list[float], float]:
    """Closed loop; returns (checks done, latencies in µs, wall seconds) of the measured part."""
    rng = random.Random(7)
    names = [(f"tenant{t}", f"user:{k}") for t in range(TENANTS) for k in range(KEYS)]
    latencies: list[float] = []
    done = 0
    measuring = False
    stop = False

    async def worker() -> None:
        nonlocal done
        while not stop:
            tenant, key = names[rng.randrange(len(names))]
            t0 = time.perf_counter()
            ok = await check(tenant, key)
            if not ok:
                raise RuntimeError("a check was denied: the benchmark keys should never be")
            if measuring:
                latencies.append((time.perf_counter() - t0) * 1e6)
                done += 1

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    wall = time.perf_counter() - t0
    stop = True
    await asyncio.gather(*tasks)
    return done, latencies, wall


def run_threads(check: SyncCheck, concurrency: int, seconds: float, warmup: float) -> tuple[int, list[float], float]:
    """As :func:`run`, with ``concurrency`` threads each calling a sync check in a loop."""
    names = [(f"tenant{t}", f"user:{k}") for t in range(TENANTS) for k in range(KEYS)]
    latencies: list[float] = []
    counts = [0] * concurrency
    state = {"measuring": False, "stop": False}

    def worker(w: int) -> None:
        rng = random.Random(w)
        while not state["stop"]:
            tenant, key = names[rng.randrange(len(names))]
            t0 = time.perf_counter()
            if not check(tenant, key):
                raise RuntimeError("a check was denied: the benchmark keys should never be")
            if state["measuring"]:
                latencies.append((time.perf_counter() - t0) * 1e6)
                counts[w] += 1

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    state["measuring"] = True
    t0 = time.perf_counter()
    time.sleep(seconds)
    state["measuring"] = False
    wall = time.perf_counter() - t0
    state["stop"] = True
    for t in threads:
        t.join()
    return sum(counts), latencies, wall


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--only", default="quotad,evalsha,limits")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quotad-bin", default=str(REPO / "target" / "release" / "quotad"))
    ap.add_argument("--before", default=None, help="a directory holding another copy of the quotad package")
    args = ap.parse_args()
    if not Path(args.quotad_bin).is_file():
        sys.exit(f"{args.quotad_bin} not found: run `cargo build --release`")
    if not shutil.which("redis-server"):
        sys.exit("redis-server not found")

    tmp = Path(tempfile.mkdtemp(prefix="quotad-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )
    sync_redis = redis.Redis(port=port)
    quotad_proc = None
    try:
        wait_for(lambda: _pings(sync_redis), "redis-server")
        sock = tmp / "quotad.sock"
        (tmp / "quotad.toml").write_text(
            f'[server]\nsocket = "{sock}"\n\n[redis]\nurl = "redis://127.0.0.1:{port}"\ntimeout_ms = 1000\n\n'
            f"[policies.bench]\nrules = [{{ name = \"burst\", kind = \"token_bucket\", capacity = {CAPACITY}, "
            f"refill_per_sec = {CAPACITY} }}]\n"
        )
        quotad_proc = subprocess.Popen(
            [args.quotad_bin, "serve", "--config", str(tmp / "quotad.toml")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(sock.exists, "quotad")

        q = AsyncClient(str(sock), timeout=5.0)
        ar = aredis.Redis(port=port, max_connections=256)
        sha = await ar.script_load((HERE / "gcra.lua").read_text())
        interval_us = 1_000_000 / CAPACITY

        async def quotad_check(tenant: str, key: str) -> bool:
            return (await q.check(tenant, key, "bench")).allowed

        async def evalsha_check(tenant: str, key: str) -> bool:
            res = await ar.evalsha(sha, 1, f"bench:{{{tenant}}}:{key}", CAPACITY, interval_us, 1)
            return res[0] == 1

        qs = Client(str(sock), timeout=5.0)
        sr = redis.Redis(port=port, max_connections=256)

        def quotad_sync_check(tenant: str, key: str) -> bool:
            return qs.check(tenant, key, "bench").allowed

        def evalsha_sync_check(tenant: str, key: str) -> bool:
            return bool(sr.evalsha(sha, 1, f"bench:{{{tenant}}}:{key}", CAPACITY, interval_us, 1)[0] == 1)

        systems: dict[str, Check] = {"quotad": quotad_check, "evalsha": evalsha_check}
        sync_systems: dict[str, SyncCheck] = {"quotad-sync": quotad_sync_check, "evalsha-sync": evalsha_sync_check}
        if args.before is not None:
            before = _load_before(Path(args.before))
            qb = before.AsyncClient(str(sock), timeout=5.0)
            qbs = before.Client(str(sock), timeout=5.0)

            async def before_check(tenant: str, key: str) -> bool:
                return bool((await qb.check(tenant, key, "bench")).allowed)

            def before_sync_check(tenant: str, key: str) -> bool:
                return bool(qbs.check(tenant, key, "bench").allowed)

            systems["quotad-before"] = before_check
            sync_systems["quotad-sync-before"] = before_sync_check
        if "limits" in args.only:
            from limits import RateLimitItemPerSecond
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter

            storage = RedisStorage(f"async+redis://127.0.0.1:{port}", implementation="redispy")
            limiter = MovingWindowRateLimiter(storage)
            # The moving window keeps one list entry per hit: a modest limit keeps
            # its lists (and Redis's work per hit) bounded, and still never denies here.
            item = RateLimitItemPerSecond(1000)

            async def limits_check(tenant: str, key: str) -> bool:
                return await limiter.hit(item, tenant, key)

            systems["limits"] = limits_check

        print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
              f"redis-server {sync_redis.info('server')['redis_version']}, {args.seconds:g} s per run")
        print("| system | in flight | checks/s | p50 µs | p99 µs | Redis CPU µs/check | client CPU µs/check | quotad CPU µs/check |")
        print("|---|---|---|---|---|---|---|---|")
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}  # -> (checks/s, client CPU s/check) per repeat
        levels = [int(x) for x in args.concurrency.split(",")]
        for _ in range(args.repeat):
            for c in levels:
                for name in args.only.split(","):
                    r0, p0, q0 = redis_cpu_seconds(sync_redis), time.process_time(), proc_cpu_seconds(quotad_proc.pid)
                    if name in sync_systems:
                        done, lat, wall = run_threads(sync_systems[name], c, args.seconds, args.warmup)
                    else:
                        done, lat, wall = await run(systems[name], c, args.seconds, args.warmup)
                    r1, p1, q1 = redis_cpu_seconds(sync_redis), time.process_time(), proc_cpu_seconds(quotad_proc.pid)
                    # CPU deltas include the warm-up: divide by every check done since r0, estimated by rate.
                    total = done * (args.seconds + args.warmup) / args.seconds
                    p50, p99 = _pct(lat, 50), _pct(lat, 99)
                    results.setdefault((name, c), []).append((done / wall, (p1 - p0) / total))
                    qcpu = f"{(q1 - q0) / total * 1e6:.1f}" if name.startswith("quotad") else "—"
                    print(f"| {name} | {c} | {done / wall:.0f} | {p50:.0f} | {p99:.0f} | "
                          f"{(r1 - r0) / total * 1e6:.1f} | {(p1 - p0) / total * 1e6:.2f} | {qcpu} |", flush=True)
        for c in levels:
            for ours, base in (("quotad", "evalsha"), ("quotad", "limits"), ("quotad-sync", "evalsha-sync"),
                               ("quotad-sync", "evalsha"), ("quotad", "quotad-before"),
                               ("quotad-sync", "quotad-sync-before")):
                if (ours, c) in results and (base, c) in results:
                    pairs = list(zip(results[(ours, c)], results[(base, c)]))
                    rate = _spread([o[0] / b[0] for o, b in pairs])
                    cpu = _spread([o[1] / b[1] for o, b in pairs])
                    print(f"# {c} in flight, {ours} / {base}, median (range) over {len(pairs)}: "
                          f"checks/s {rate}, client CPU per check {cpu}")
        await q.close()
        await ar.aclose()
        qs.close()
        if args.before is not None:
            await qb.close()
            qbs.close()
        sr.close()
    finally:
        if quotad_proc is not None:
            quotad_proc.send_signal(signal.SIGTERM)
            quotad_proc.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _load_before(root: Path) -> Any:
    """The quotad package in ``root/quotad``, imported as ``quotad_before`` (its relative imports stay within it)."""
    pkg = root / "quotad"
    spec = importlib.util.spec_from_file_location("quotad_before", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    if spec is None or spec.loader is None:
        sys.exit(f"no quotad package in {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quotad_before"] = module
    spec.loader.exec_module(module)
    return module


def _pings(r: redis.Redis) -> bool:
    try:
        return bool(r.ping())
    except redis.ConnectionError:
        return False


def _spread(ratios: list[float]) -> str:
    s = sorted(ratios)
    return f"{s[len(s) // 2]:.2f}x ({s[0]:.2f}–{s[-1]:.2f})"


def _pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return quantiles(values, n=100, method="inclusive")[p - 1]


if __name__ == "__main__":
    asyncio.run(main())
