"""Builds request maps, refusing bad values before anything is sent.

Each builder returns the map with a placeholder ``id`` first (the client
fills it in), then the fields in the order the daemon's own encoder uses.
Optional fields are left out rather than sent as nil.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import InvalidArgument

_U64_MAX = (1 << 64) - 1

Request = dict[str, Any]


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, not {type(value).__name__}")
    if not value:
        raise InvalidArgument(f"{name} must not be empty")
    # Text that is not valid UTF-8 (a lone surrogate) fails in the encoder, still before sending.
    return value


def _uint(name: str, value: object, *, minimum: int = 0) -> int:
    # bool is an int subclass; True as a cost is almost certainly a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")
    if not minimum <= value <= _U64_MAX:
        raise InvalidArgument(f"{name} must be between {minimum} and 2**64-1, not {value}")
    return value


def _texts(name: str, values: Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    # A bare string is iterable too; tags="items" would send five one-letter tags.
    if isinstance(values, (str, bytes)):
        raise InvalidArgument(f"{name} must be a list of str, not a single {type(values).__name__}")
    try:
        items = list(values)
    except TypeError:
        raise InvalidArgument(f"{name} must be a list of str") from None
    return [_text(f"{name}[{i}]", v) for i, v in enumerate(items)]


def _bytes(name: str, value: object) -> bytes | bytearray | memoryview:
    # msgpack writes all three as bin: no copy (but of a view with gaps, which it cannot read).
    if isinstance(value, (bytes, bytearray)):
        return value
    if isinstance(value, memoryview):
        return value if value.c_contiguous else value.tobytes()
    hint = " (encode it first, e.g. value.encode())" if isinstance(value, str) else ""
    raise InvalidArgument(f"{name} must be bytes, not {type(value).__name__}{hint}")


def _fill_ms(req: Request, fill_ms: int | None) -> None:
    # 0 (or None) is no single-flight: left out.
    if fill_ms is not None and _uint("fill_ms", fill_ms):
        req["fill_ms"] = fill_ms


def _check_fields(req: Request, tenant: str, key: str, policy: str | None, cost: int) -> None:
    req["tenant"] = _text("tenant", tenant)
    req["key"] = _text("key", key)
    if policy is not None:
        req["policy"] = _text("policy", policy)
    req["cost"] = _uint("cost", cost)


def hello() -> Request:
    return {"id": 0, "op": "hello"}


def stats() -> Request:
    return {"id": 0, "op": "stats"}


def check(tenant: str, key: str, policy: str | None, cost: int) -> Request:
    req: Request = {"id": 0, "op": "check"}
    _check_fields(req, tenant, key, policy, cost)
    return req


def usage(tenant: str, key: str, policy: str | None) -> Request:
    req: Request = {"id": 0, "op": "usage", "tenant": _text("tenant", tenant), "key": _text("key", key)}
    if policy is not None:
        req["policy"] = _text("policy", policy)
    return req


def cache_get(tenant: str, key: str, fill_ms: int | None) -> Request:
    req: Request = {"id": 0, "op": "cache_get", "tenant": _text("tenant", tenant), "key": _text("key", key)}
    _fill_ms(req, fill_ms)
    return req


def cache_set(
    tenant: str,
    key: str,
    value: bytes,
    ttl_ms: int,
    tags: Iterable[str] | None,
    stale_ms: int | None,
) -> Request:
    req: Request = {
        "id": 0,
        "op": "cache_set",
        "tenant": _text("tenant", tenant),
        "key": _text("key", key),
        "value": _bytes("value", value),
        "ttl_ms": _uint("ttl_ms", ttl_ms, minimum=1),
    }
    if stale_ms is not None:
        req["stale_ms"] = _uint("stale_ms", stale_ms)
    tag_list = _texts("tags", tags)
    if tag_list:
        req["tags"] = tag_list
    return req


def cache_del(
    tenant: str, keys: Iterable[str] | None, tags: Iterable[str] | None, fill_only: bool = False
) -> Request:
    req: Request = {"id": 0, "op": "cache_del", "tenant": _text("tenant", tenant)}
    key_list = _texts("keys", keys)
    tag_list = _texts("tags", tags)
    if not isinstance(fill_only, bool):
        raise InvalidArgument(f"fill_only must be a bool, not {type(fill_only).__name__}")
    if not key_list and not tag_list:
        raise InvalidArgument("cache_delete needs at least one key or tag")
    if fill_only and tag_list:
        raise InvalidArgument("fill_only drops the fill locks of keys: it takes no tags")
    if key_list:
        req["keys"] = key_list
    if tag_list:
        req["tags"] = tag_list
    if fill_only:
        req["fill_only"] = True
    return req


def release(tenant: str, key: str, lease: str, policy: str | None) -> Request:
    req: Request = {"id": 0, "op": "release", "tenant": _text("tenant", tenant), "key": _text("key", key)}
    if policy is not None:
        req["policy"] = _text("policy", policy)
    req["lease"] = _text("lease", lease)
    return req


def check_get(
    tenant: str,
    key: str,
    cache_key: str,
    policy: str | None,
    cost: int,
    fill_ms: int | None,
) -> Request:
    req: Request = {"id": 0, "op": "check_get"}
    _check_fields(req, tenant, key, policy, cost)
    req["cache_key"] = _text("cache_key", cache_key)
    _fill_ms(req, fill_ms)
    return req


def timeout(base: float, fill_ms: int | None) -> float:
    """A call's deadline: a held cache read may legitimately take ``fill_ms`` longer."""
    return base + (fill_ms or 0) / 1000.0
