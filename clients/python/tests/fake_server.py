"""Fake daemons for the sync client's tests: a listener that records what
clients send (to prove nothing was sent), and the base of the servers that
answer in their own ways."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class Recorder:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self.received = bytearray()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conns: list[socket.socket] = []
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
                conn.settimeout(0.01)
                conns.append(conn)
                self.connections += 1
            except socket.timeout:
                pass
            for c in conns:
                try:
                    self.received += c.recv(65536)
                except (socket.timeout, OSError):
                    pass
        for c in conns:
            c.close()
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class ThreadedServer:
    """A Unix socket listener served by ``_serve`` on a daemon thread; ``close``
    stops it (``_serve`` loops until ``_stop`` is set, or until its listener closes)."""

    def __init__(self, path: Path, backlog: int = 4) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(backlog)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        raise NotImplementedError

    def _connections(self) -> Iterator[socket.socket]:
        """Connection after connection, until ``close``."""
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            yield conn

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        self._listener.close()


def run_catching(call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Runs ``call`` on a thread; the dict gets its result or exception (a KeyboardInterrupt
    too) and how long it took."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = call()
        except BaseException as e:
            out["error"] = e
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out
