"""What the sync and async clients share: options, socket path, backoff, failure mode."""

from __future__ import annotations

import logging
import os
import random
from typing import Literal

from .errors import QuotadError
from .models import Decision

log = logging.getLogger("quotad")

#: What a check answers when the daemon cannot: allow (``"open"``), deny
#: (``"closed"``), or raise the error (``"raise"``). Cache calls fail soft
#: (reads miss, writes do nothing) unless it is ``"raise"``.
FailureMode = Literal["open", "closed", "raise"]


def default_socket_path() -> str:
    """``$QUOTAD_SOCKET``, else the daemon's own default."""
    path = os.environ.get("QUOTAD_SOCKET")
    if path:
        return path
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "quotad.sock")
    return "./quotad.sock"


class Backoff:
    """Exponential reconnect delay with jitter, reset by a successful connect."""

    __slots__ = ("_initial", "_max", "_delay", "_next")

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._max = maximum
        self._delay = 0.0
        self._next = 0.0

    def ready(self, now: float) -> bool:
        return now >= self._next

    def failed(self, now: float) -> None:
        self._delay = min(self._max, self._delay * 2 or self._initial)
        # Jitter so that many workers do not reconnect in lockstep.
        self._next = now + self._delay * random.uniform(0.5, 1.0)

    def succeeded(self) -> None:
        self._delay = 0.0
        self._next = 0.0


class ClientOptions:
    """Options common to :class:`~quotad.Client` and :class:`~quotad.AsyncClient`."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None,
        *,
        timeout: float,
        connect_timeout: float,
        failure_mode: FailureMode,
        closed_retry_after_ms: int,
        max_pending: int,
        max_frame_bytes: int,
        max_reply_bytes: int,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        if failure_mode not in ("open", "closed", "raise"):
            raise ValueError(f"failure_mode must be 'open', 'closed' or 'raise', not {failure_mode!r}")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self.socket_path = os.fspath(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.failure_mode: FailureMode = failure_mode
        self.closed_retry_after_ms = closed_retry_after_ms
        self.max_pending = max_pending
        self.max_frame_bytes = max_frame_bytes
        self.max_reply_bytes = max_reply_bytes
        self.backoff = Backoff(backoff_initial, backoff_max)

    def unavailable_decision(self, err: QuotadError) -> Decision:
        """The check answer when the daemon could not give one."""
        if self.failure_mode == "raise":
            raise err
        log.debug("quotad unavailable, answering %s: %s", self.failure_mode, err)
        if self.failure_mode == "open":
            return Decision(True, 0, 0, 0, 0, True, "")
        return Decision(False, 0, 0, 0, self.closed_retry_after_ms, True, "")

    def soft_fail(self, err: QuotadError) -> None:
        """Cache calls: raise only in ``"raise"`` mode, else the caller degrades."""
        if self.failure_mode == "raise":
            raise err
        log.debug("quotad unavailable for a cache call: %s", err)


