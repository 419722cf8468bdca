"""A Unix socket listener that records what clients send (to prove nothing was sent)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path


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
