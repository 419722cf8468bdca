"""Which values quotad copies with a `memcpy` call, how big, and from where.

    python3 benches/moves.py QUOTAD_BIN [ROUNDS]

The compiler moves a value over 128 bytes with a call to `memcpy`; callgrind
shows how many instructions those take, not what is moved. This runs the
daemon behind a fresh redis-server, drives it as benches/instructions.py does
(rounds of 64 pipelined `check`s over 4 connections), attaches gdb with a
breakpoint on glibc's `memcpy` that prints the size and two callers, and
prints a histogram per check. gdb stops the daemon at every call, so keep
ROUNDS small (20, the default, takes about a minute). Needs gdb, redis-server
and the `msgpack` package (the Python client's venv has it).
"""

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import instructions  # noqa: E402  (its driver, policy and port helper)

GDB = """set pagination off
break __memcpy_avx_unaligned_erms
commands
silent
printf "SZ %lu\\n", $rdx
bt 3
continue
end
continue
"""


def census(log: str, checks: int) -> None:
    frame = re.compile(r"#\d+\s+(?:0x[0-9a-f]+ in )?(.*?)(?:::h[0-9a-f]{16})? \(")
    counts: collections.Counter = collections.Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("SZ "):
            continue
        callers = [m.group(1)[-80:] for m in map(frame.match, lines[i + 2 : i + 4]) if m]
        counts[(int(line[3:]), " < ".join(callers))] += 1
    total = sum(counts.values())
    print(f"{total / checks:.1f} memcpy calls per check ({total} for {checks} checks)")
    for (size, where), n in counts.most_common(30):
        print(f"{n / checks:6.2f}  {size:6d} B  {where}")


def main() -> None:
    binary = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as d:
        port = instructions.spare_port()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        with open(f"{d}/q.toml", "w") as f:
            f.write(
                f'[server]\nsocket = "{d}/q.sock"\n'
                f'[redis]\nurl = "redis://127.0.0.1:{port}"\ntimeout_ms = 60000\n' + instructions.POLICY
            )
        q = subprocess.Popen([binary, "serve", "--config", f"{d}/q.toml"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                if os.path.exists(f"{d}/q.sock"):
                    break
                time.sleep(0.1)
            instructions.drive(f"{d}/q.sock", 5, False)  # connections made, script loaded
            with open(f"{d}/gdb.cmd", "w") as f:
                f.write(GDB)
            with open(f"{d}/gdb.out", "w") as out:
                gdb = subprocess.Popen(
                    ["gdb", "-q", "-batch", "-x", f"{d}/gdb.cmd", "-p", str(q.pid)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
                time.sleep(5)  # attached, breakpoint set
                instructions.drive(f"{d}/q.sock", rounds, False)
                # Detach before the daemon stops, so shutdown's copies are not counted.
                gdb.send_signal(signal.SIGINT)
                try:
                    gdb.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    gdb.kill()
                    gdb.wait()
        finally:
            q.send_signal(signal.SIGINT)
            q.wait()
            redis.terminate()
            redis.wait()
        with open(f"{d}/gdb.out") as f:
            census(f.read(), rounds * 64)


if __name__ == "__main__":
    main()
