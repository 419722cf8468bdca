"""Results of the ops, parsed from reply maps (unknown reply fields are ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolViolation


_new = object.__new__
_setattr = object.__setattr__


def _ceil_seconds(ms: int) -> int:
    return -(-ms // 1000)


@dataclass(frozen=True)
class Decision:
    """The answer to ``check``: may this request go ahead?"""

    allowed: bool
    #: The deciding rule's limit (a token bucket's capacity, a window's limit).
    limit: int
    #: Units the deciding rule has left (if denied: units available now).
    remaining: int
    #: ms until the deciding rule is back to its full limit.
    reset_ms: int
    #: 0 when allowed; when denied, ms after which the same request will pass.
    retry_after_ms: int
    #: Decided by a failure mode (the daemon's when Redis is away, or this
    #: client's when the daemon is), not by the shared state.
    degraded: bool
    #: The deciding rule's name ("" when the client answered by itself).
    rule: str
    #: The lease this check took (an allowed check of a policy with a
    #: ``concurrency`` rule, cost >= 1); give it back with ``release``.
    lease: str | None = None
    #: The deciding rule's kind, when the daemon reports it.
    kind: str | None = None
    #: The deciding rule's quota window in ms, when the daemon reports it.
    window_ms: int | None = None
    #: A shadow rule would have denied this allowed check.
    shadow_denied: bool = False
    #: That shadow rule.
    shadow_rule: str | None = None

    @property
    def retry_after(self) -> float:
        """Seconds to wait before retrying (0.0 when allowed)."""
        return self.retry_after_ms / 1000.0

    @property
    def reset(self) -> float:
        """Seconds until the deciding rule is full again."""
        return self.reset_ms / 1000.0

    def headers(self) -> dict[str, str]:
        """The standard rate-limit response headers for this decision.

        ``RateLimit-Reset`` and ``Retry-After`` are whole seconds rounded up,
        so a client that waits that long is never early. ``Retry-After`` is
        only present on a denial. When this client answered by itself (the
        daemon unavailable: ``degraded`` with no rule), no limit is known, so
        only ``Retry-After`` (on a denial) is given.
        """
        if self.degraded and not self.rule:
            return {} if self.allowed else {"Retry-After": str(_ceil_seconds(self.retry_after_ms))}
        headers = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(_ceil_seconds(self.reset_ms)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(_ceil_seconds(self.retry_after_ms))
        return headers

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Decision:
        # The hot path of every check: one type test per field, no helpers,
        # and the frozen instance's fields set in one go (not one
        # object.__setattr__ each, as the generated __init__ does).
        try:
            allowed, limit, remaining = r["allowed"], r["limit"], r["remaining"]
            reset_ms, retry_after_ms, degraded, rule = r["reset_ms"], r["retry_after_ms"], r["degraded"], r["rule"]
        except KeyError as e:
            raise ProtocolViolation(f"a check reply without {e}") from None
        if not (
            type(allowed) is bool
            and type(degraded) is bool
            and type(limit) is int
            and type(remaining) is int
            and type(reset_ms) is int
            and type(retry_after_ms) is int
            and type(rule) is str
        ):
            raise ProtocolViolation(f"a check reply with mistyped fields: {r!r}")
        # More than id, ok and the seven above: fields added within protocol
        # v1 (or a check_get's lookup). Without them the instance keeps the
        # class defaults (lease None, ...), so a plain reply pays nothing.
        if len(r) <= 9:
            fields = {
                "allowed": allowed, "limit": limit, "remaining": remaining, "reset_ms": reset_ms,
                "retry_after_ms": retry_after_ms, "degraded": degraded, "rule": rule,
            }
        else:
            get = r.get
            lease, kind, window_ms = get("lease"), get("kind"), get("window_ms")
            shadow_denied, shadow_rule = get("shadow_denied", False), get("shadow_rule")
            if not (
                (lease is None or type(lease) is str)
                and (kind is None or type(kind) is str)
                and (window_ms is None or (type(window_ms) is int and window_ms >= 0))
                and type(shadow_denied) is bool
                and (shadow_rule is None or type(shadow_rule) is str)
            ):
                raise ProtocolViolation(f"a check reply with mistyped fields: {r!r}")
            fields = {
                "allowed": allowed, "limit": limit, "remaining": remaining, "reset_ms": reset_ms,
                "retry_after_ms": retry_after_ms, "degraded": degraded, "rule": rule, "lease": lease,
                "kind": kind, "window_ms": window_ms, "shadow_denied": shadow_denied, "shadow_rule": shadow_rule,
            }
        d = _new(cls)
        _setattr(d, "__dict__", fields)
        return d


@dataclass(frozen=True)
class Lookup:
    """The answer to a cache read."""

    hit: bool
    #: The entry's bytes (hits only).
    value: bytes | None = None
    #: ms the entry stays fresh; 0 when stale (hits only).
    ttl_ms: int = 0
    #: Past its ttl, served within its stale period (hits only).
    stale: bool = False
    #: Stale hits only: this caller should recompute and ``cache_set`` the value.
    refresh: bool = False
    #: Misses only: this caller should compute the value and ``cache_set`` it.
    fill: bool = False
    #: The backend (or the daemon, from this client's view) could not answer.
    degraded: bool = False

    @property
    def should_store(self) -> bool:
        """True when this caller is the one to (re)compute and store the value."""
        return self.fill or self.refresh or (not self.hit and not self.degraded)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Lookup:
        try:
            degraded = _bool(r.get("degraded", False))
            if _bool(r["hit"]):
                value = r["value"]
                if not isinstance(value, bytes):
                    raise TypeError("value")
                return cls(
                    hit=True,
                    value=value,
                    ttl_ms=_uint(r.get("ttl_ms", 0)),
                    stale=_bool(r.get("stale", False)),
                    refresh=_bool(r.get("refresh", False)),
                    degraded=degraded,
                )
            return cls(hit=False, fill=_bool(r.get("fill", False)), degraded=degraded)
        except (KeyError, TypeError) as e:
            raise ProtocolViolation(f"a cache reply without a valid {e}") from e


#: A miss reported when the daemon could not be asked.
UNAVAILABLE_MISS = Lookup(hit=False, degraded=True)


@dataclass(frozen=True)
class CheckGet:
    """The answer to ``check_get``: the decision and, only when allowed, the cache read."""

    decision: Decision
    lookup: Lookup | None

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> CheckGet:
        decision = Decision.from_reply(r)
        lookup = Lookup.from_reply(r) if decision.allowed and "hit" in r else None
        return cls(decision, lookup)


@dataclass(frozen=True)
class Hello:
    protocol: int
    server: str
    backend: str
    ops: tuple[str, ...]

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Hello:
        try:
            return cls(
                protocol=_uint(r["protocol"]),
                server=_str(r["server"]),
                backend=_str(r["backend"]),
                ops=tuple(_str(o) for o in r["ops"]),
            )
        except (KeyError, TypeError) as e:
            raise ProtocolViolation(f"a hello reply without a valid {e}") from e


@dataclass(frozen=True)
class Stats:
    uptime_ms: int
    backend: str
    shards: int
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Stats:
        try:
            counters = r["counters"]
            if not isinstance(counters, dict):
                raise TypeError("counters")
            return cls(
                uptime_ms=_uint(r["uptime_ms"]),
                backend=_str(r["backend"]),
                shards=_uint(r["shards"]),
                counters={_str(k): _uint(v) for k, v in counters.items()},
            )
        except (KeyError, TypeError) as e:
            raise ProtocolViolation(f"a stats reply without a valid {e}") from e


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError("bool field")
    return v


def _uint(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise TypeError("unsigned integer field")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("string field")
    return v
