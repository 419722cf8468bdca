"""Real redis-server and quotad processes for the tests, on temporary Unix sockets."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

POLICIES = """
[policies.default]
rules = [{ name = "burst", kind = "token_bucket", capacity = 5, refill_per_sec = 0.01 }]

[policies.api]
rules = [{ name = "burst", kind = "token_bucket", capacity = 10, refill_per_sec = 5 }, { name = "daily", kind = "daily_quota", limit = 1000 }]

[policies.fifty]
rules = [{ name = "burst", kind = "token_bucket", capacity = 50, refill_per_sec = 0.001 }]

[policies.tiny]
rules = [{ name = "per_minute", kind = "fixed_window", limit = 2, window_ms = 60000 }]
"""


def quotad_bin() -> Path:
    path = Path(os.environ.get("QUOTAD_BIN") or REPO / "target" / "debug" / "quotad")
    if not path.is_file():
        raise RuntimeError(
            f"quotad binary not found at {path}: run `cargo build` in {REPO} or set QUOTAD_BIN"
        )
    return path


def _wait_for(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    """Waits until ``what`` accepts connections on the Unix socket ``path``.

    Not just until the file exists: it appears at ``bind``, a moment before
    ``listen``, and a connect in between is refused (a first call failed so
    under load, answered by the client's failure mode).
    """
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(path))
                return
            except OSError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {path} within {timeout}s")
        time.sleep(0.01)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(10)
    return proc.returncode


class Redis:
    def __init__(self, directory: Path) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.socket = directory / "redis.sock"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket), "--save", "",
             "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL,
        )
        _wait_for(self.socket, self.proc, "redis-server")

    def stop(self) -> None:
        _stop(self.proc)


class Quotad:
    """One quotad process; ``kill``/``start`` again reuse the same socket path and config."""

    def __init__(self, directory: Path, redis: Redis | None, server_extra: str = "", tables: str = "") -> None:
        self.socket = directory / "quotad.sock"
        self.config = directory / "quotad.toml"
        self.log = directory / "quotad.log"
        self.redis = redis
        redis_table = f'[redis]\nurl = "redis+unix://{redis.socket}"\ntimeout_ms = 100\n' if redis else ""
        self.config.write_text(
            f'[server]\nsocket = "{self.socket}"\n{server_extra}\n{redis_table}{tables}\n{POLICIES}'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        if self.socket.exists():
            self.socket.unlink()  # left by kill -9; quotad would replace it too
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(quotad_bin()), "serve", "--config", str(self.config)], stdout=log, stderr=log
            )
        _wait_for(self.socket, self.proc, "quotad")
        self._warm_up()

    def _warm_up(self, timeout: float = 5.0) -> None:
        """Waits until quotad decides from Redis (its first round trip also loads the script)."""
        if not self.redis:
            return
        from quotad import Client

        with Client(str(self.socket), timeout=1.0) as c:
            deadline = time.monotonic() + timeout
            while c.check("warm-up", "warm-up", policy="api", cost=0).degraded:
                if time.monotonic() > deadline:
                    raise RuntimeError("quotad did not reach Redis in time")
                time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM: quotad answers what is in flight and exits 0."""
        assert self.proc is not None
        return _stop(self.proc)

    def kill(self) -> None:
        assert self.proc is not None
        _stop(self.proc, signal.SIGKILL)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.stop()
