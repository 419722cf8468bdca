"""RateLimit response headers, per draft-ietf-httpapi-ratelimit-headers-11.

``RateLimit-Policy`` and ``RateLimit`` are Structured Fields (RFC 8941):
Lists of Items, each a String naming a policy with Parameters. For a check,
the item is the deciding rule:

- ``RateLimit-Policy: "<rule>";q=<limit>;w=<window, s>`` (a concurrency
  rule: ``;qu="concurrent-requests"`` and no ``w``; no ``w`` either when
  the daemon did not say the window, i.e. an older quotad);
- ``RateLimit: "<rule>";r=<remaining>;t=<s>``, where ``t`` is the seconds
  until the rule is full again, except on a denial: then the seconds until
  the request would pass (``Retry-After``), which the draft (§6) asks
  ``Retry-After`` not to precede.

Seconds are rounded up. ``Retry-After`` comes with every denial; the older
``RateLimit-Limit``/``-Remaining``/``-Reset`` trio only when asked for
(``legacy=True``). ``clients/ratelimit-headers.json`` holds the vectors
that this module and the Node client's both pass.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from .models import Decision

#: A parameter's value: an Integer, a String or a Byte Sequence.
Bare = Union[int, str, bytes]
#: An Item: its String value and its Parameters, in order.
Item = tuple[str, Sequence[tuple[str, Bare]]]

_MAX_INTEGER = 999_999_999_999_999


def sf_string(s: str) -> str:
    """A Structured Field String: printable ASCII, with ``"`` and ``\\`` escaped."""
    for ch in s:
        if not " " <= ch <= "~":
            raise ValueError(f"a Structured Field String holds printable ASCII only, not {ch!r}")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bare(v: Bare) -> str:
    if isinstance(v, bool):
        return "?1" if v else "?0"
    if isinstance(v, int):
        if not -_MAX_INTEGER <= v <= _MAX_INTEGER:
            raise ValueError(f"{v} is out of a Structured Field Integer's range")
        return str(v)
    if isinstance(v, str):
        return sf_string(v)
    return ":" + base64.b64encode(v).decode("ascii") + ":"


def sf_item(value: str, params: Iterable[tuple[str, Bare]]) -> str:
    return sf_string(value) + "".join(f";{k}={_bare(v)}" for k, v in params)


def sf_list(items: Iterable[Item]) -> str:
    return ", ".join(sf_item(value, params) for value, params in items)


def _seconds(ms: int) -> int:
    return -(-ms // 1000)


def ratelimit_headers(decision: Decision, *, legacy: bool = False) -> dict[str, str]:
    """The headers of a response to a request that ``decision`` decided.

    When this client answered by itself (the daemon unavailable: degraded,
    no rule), no limit is known: only ``Retry-After``, on a denial.
    """
    d = decision
    denied = not d.allowed
    if d.degraded and not d.rule:
        return {"Retry-After": str(_seconds(d.retry_after_ms))} if denied else {}
    policy: list[tuple[str, Bare]] = [("q", d.limit)]
    if d.kind == "concurrency":
        policy.append(("qu", "concurrent-requests"))
    elif d.window_ms > 0:
        policy.append(("w", _seconds(d.window_ms)))
    t = _seconds(d.retry_after_ms if denied else d.reset_ms)
    headers = {
        "RateLimit-Policy": sf_item(d.rule, policy),
        "RateLimit": sf_item(d.rule, (("r", d.remaining), ("t", t))),
    }
    if denied:
        headers["Retry-After"] = str(t)
    if legacy:
        headers["RateLimit-Limit"] = str(d.limit)
        headers["RateLimit-Remaining"] = str(d.remaining)
        headers["RateLimit-Reset"] = str(_seconds(d.reset_ms))
    return headers


#: Every header name ``ratelimit_headers`` may send, lower case: never
#: stored with a cached response, never replayed from one (the draft's §7.3).
NAMES = frozenset({"ratelimit-policy", "ratelimit", "retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"})

__all__ = ["NAMES", "ratelimit_headers", "sf_item", "sf_list", "sf_string"]
