"""Results of the ops, parsed from reply maps (unknown reply fields are ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolViolation
from .ratelimit_headers import ratelimit_headers


_new = object.__new__
_setattr = object.__setattr__


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
    #: The deciding rule's kind (``token_bucket``, ``fixed_window``,
    #: ``sliding_window``, ``daily_quota``, ``concurrency``, ...; "" when unknown).
    kind: str = ""
    #: The deciding rule's quota window in ms (the IETF ``w``; 0 when none,
    #: as for a ``concurrency`` rule).
    window_ms: int = 0
    #: The lease this check took (an allowed check of a policy with a
    #: ``concurrency`` rule, cost >= 1); give it back with ``release``.
    lease: str | None = None
    #: Allowed, but this shadow rule would have denied (None: no shadow denial).
    shadow_rule: str | None = None

    @property
    def shadow_denied(self) -> bool:
        """True when a shadow rule would have denied this allowed request."""
        return self.shadow_rule is not None

    @property
    def retry_after(self) -> float:
        """Seconds to wait before retrying (0.0 when allowed)."""
        return self.retry_after_ms / 1000.0

    @property
    def reset(self) -> float:
        """Seconds until the deciding rule is full again."""
        return self.reset_ms / 1000.0

    def headers(self, *, legacy: bool = False) -> dict[str, str]:
        """The rate-limit response headers for this decision.

        ``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-
        headers-11), ``Retry-After`` on a denial, and with ``legacy`` the
        older ``RateLimit-Limit``/``-Remaining``/``-Reset`` trio; seconds are
        rounded up. See :mod:`quotad.ratelimit_headers`.
        """
        return ratelimit_headers(self, legacy=legacy)

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
        try:
            kind, window_ms = r["kind"], r["window_ms"]
        except KeyError:  # an older quotad does not send them
            kind, window_ms = r.get("kind", ""), r.get("window_ms", 0)
        # Each only present on some replies: `in` costs less than a .get() call.
        lease = r["lease"] if "lease" in r else None
        shadow_rule = r["shadow_rule"] if "shadow_rule" in r else None
        if not (
            type(allowed) is bool
            and type(degraded) is bool
            and type(limit) is int
            and type(remaining) is int
            and type(reset_ms) is int
            and type(retry_after_ms) is int
            and type(rule) is str
            and type(kind) is str
            and type(window_ms) is int
            and (lease is None or type(lease) is str)
            and (shadow_rule is None or type(shadow_rule) is str)
        ):
            raise ProtocolViolation(f"a check reply with mistyped fields: {r!r}")
        d = _new(cls)
        _setattr(d, "__dict__", {
            "allowed": allowed, "limit": limit, "remaining": remaining, "reset_ms": reset_ms,
            "retry_after_ms": retry_after_ms, "degraded": degraded, "rule": rule,
            "kind": kind, "window_ms": window_ms, "lease": lease, "shadow_rule": shadow_rule,
        })
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
class RuleUsage:
    """One rule of a ``usage`` answer: how much of it is used for the key."""

    rule: str
    kind: str
    limit: int
    #: ``limit - remaining``: units taken and not yet back.
    used: int
    #: Units one check could take now.
    remaining: int
    #: ms until the rule is full again (a fixed window: until it ends; a
    #: daily quota: until the next 00:00 UTC).
    reset_ms: int
    #: The rule's quota window in ms (0: none).
    window_ms: int

    @classmethod
    def from_reply(cls, r: object) -> RuleUsage:
        if not isinstance(r, dict):
            raise TypeError("rule")
        return cls(
            rule=_str(r["rule"]),
            kind=_str(r["kind"]),
            limit=_uint(r["limit"]),
            used=_uint(r["used"]),
            remaining=_uint(r["remaining"]),
            reset_ms=_uint(r["reset_ms"]),
            window_ms=_uint(r.get("window_ms", 0)),
        )


def usage_from_reply(r: dict[str, Any]) -> list[RuleUsage]:
    """The rules of a ``usage`` reply, in the policy's order."""
    try:
        rules = r["rules"]
        if not isinstance(rules, list):
            raise TypeError("rules")
        return [RuleUsage.from_reply(u) for u in rules]
    except (KeyError, TypeError) as e:
        raise ProtocolViolation(f"a usage reply without a valid {e}") from e


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
    #: Checks a shadow rule would have denied, by ``<policy>.<rule>`` (those above 0).
    shadow_denials: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, r: dict[str, Any]) -> Stats:
        try:
            counters = r["counters"]
            shadow = r.get("shadow_denials", {})  # an older quotad has none
            if not isinstance(counters, dict) or not isinstance(shadow, dict):
                raise TypeError("counters")
            return cls(
                uptime_ms=_uint(r["uptime_ms"]),
                backend=_str(r["backend"]),
                shards=_uint(r["shards"]),
                counters={_str(k): _uint(v) for k, v in counters.items()},
                shadow_denials={_str(k): _uint(v) for k, v in shadow.items()},
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
