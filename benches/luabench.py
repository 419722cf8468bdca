"""What one batch-script call costs Redis, per check, measured inside Redis.

    python3 benches/luabench.py PORT N distinct|hot [CALLS] [LUA_FILES] [fcall|evalsha]

Loads the batch code (lua/limiter.lua, lua/cache.lua, lua/batch.lua, or
the comma-separated LUA_FILES, e.g. a variant under test) into the
redis-server on 127.0.0.1:PORT, as a function library called by FCALL (as
quotad does on Redis 7) or as a script called by EVALSHA, and sends CALLS
calls of N token-bucket checks each: `distinct` spreads them over 10,000
keys of 100 tenants, `hot` puts every check on one key. Prints the call's
own time per check (`INFO commandstats`) and Redis's whole CPU per check
(`INFO cpu`). Standard library only; speaks RESP itself.
"""

import os
import socket
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def resp(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class Conn:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            self.buf += self.s.recv(1 << 20)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self.s.recv(1 << 20)
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self):  # type: ignore[no-untyped-def]
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in b"+:":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            self._fill(n + 2)
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        return [self.read() for _ in range(int(rest))]

    def call(self, *args: bytes | str | int):  # type: ignore[no-untyped-def]
        self.s.sendall(resp(*args))
        return self.read()


def doubles(*v: float) -> bytes:
    return struct.pack("<%dd" % len(v), *v)


def info(c: Conn, section: str) -> dict[str, str]:
    text = c.call("INFO", section).decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def main() -> None:
    port, n, spread = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    calls = int(sys.argv[4]) if len(sys.argv) > 4 else max(20_000 // n, 50)
    files = sys.argv[5].split(",") if len(sys.argv) > 5 and sys.argv[5] else [
        os.path.join(ROOT, "lua", f) for f in ("limiter.lua", "cache.lua", "batch.lua")
    ]
    form = sys.argv[6] if len(sys.argv) > 6 else "fcall"
    c = Conn(port)
    body = "\n".join(open(f).read() for f in files)
    if form == "fcall":
        library = "#!lua name=quotad_bench\n" + body + "\nredis.register_function('quotad_bench', batch)\n"
        c.call("FUNCTION", "LOAD", "REPLACE", library)
        command: tuple[str, ...] = ("FCALL", "quotad_bench")
    else:
        sha = c.call("SCRIPT", "LOAD", body + "\nreturn batch(KEYS, ARGV)\n").decode()
        command = ("EVALSHA", sha)
    policy = doubles(1, 1, 1e9, 1)  # one token bucket: capacity 1e9, 1 µs per unit
    c.call("CONFIG", "RESETSTAT")
    cpu = lambda: sum(float(info(c, "cpu")[k]) for k in ("used_cpu_user", "used_cpu_sys"))
    cpu0, k, pending = cpu(), 0, []
    for _ in range(calls):
        keys: list[str] = []
        index: dict[str, int] = {}
        ops = []
        for _ in range(n):
            key = f"qd:{{t{k % 100}}}:l:p:r:k{k % 10_000}" if spread == "distinct" else "qd:{t}:l:p:r:hot"
            k += 1
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            ops.append(doubles(0, 1, index[key]))  # check: policy 0, cost 1, first state key
        pending.append(resp(*command, len(keys), *keys, "", len(keys), 1, policy, n, b"".join(ops)))
        if len(pending) == 16 or _ == calls - 1:
            c.s.sendall(b"".join(pending))
            for _r in pending:
                assert isinstance(c.read(), list)
            pending = []
    stats = dict(kv.split("=") for kv in info(c, "commandstats")["cmdstat_" + command[0].lower()].split(","))
    ncalls, usec = int(stats["calls"]), int(stats["usec"])
    total = (cpu() - cpu0) * 1e6
    print(
        f"n={n} {spread}: script {usec / ncalls / n:.2f} µs/check ({usec / ncalls:.1f} µs/call), "
        f"Redis CPU {total / (ncalls * n):.2f} µs/check"
    )


main()
