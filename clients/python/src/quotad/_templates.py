"""The hot requests (check, check_get, cache_get) as frames built from pre-encoded parts.

The map keys and the constant op/policy parts are MessagePack bytes
computed once; per call only ``id``, ``tenant``, ``key``, ``cost`` (and
``cache_key``, ``fill_ms``) are packed. The bytes are exactly those of the
general path (``_requests`` + ``_codec.request_frame``), which
``tests/test_templates.py`` checks; the arguments are refused just as the
general builders refuse them.
"""

from __future__ import annotations

import struct

import msgpack

from ._requests import _U64_MAX, _text, _uint
from .errors import InvalidArgument

# One Packer for every call: a pack() runs in C under the GIL, so threads cannot interleave in it.
_pack = msgpack.Packer().pack
_LENGTH = struct.Struct(">I").pack

_MAX_POLICIES = 256  # policy names whose bytes are kept; others are packed per call


def _parts(*values: object) -> bytes:
    return b"".join(_pack(v) for v in values)


_ID = _parts("id")
_KEY = _parts("key")
_COST = _parts("cost")
_POLICY = _parts("policy")
_CACHE_KEY = _parts("cache_key")
_FILL_MS = _parts("fill_ms")
_CHECK = _parts("op", "check", "tenant")
_CHECK_GET = _parts("op", "check_get", "tenant")
_CACHE_GET = _parts("op", "cache_get", "tenant")

_policies: dict[str, bytes] = {}


def _policy_part(policy: str | None) -> bytes:
    """The bytes between ``key``'s value and ``cost``'s: the policy (if any) and the ``cost`` key."""
    if policy is None:
        return _COST
    part = _policies.get(policy)
    if part is None:
        part = _POLICY + _str(_text("policy", policy)) + _COST
        if len(_policies) < _MAX_POLICIES:
            _policies[policy] = part
    return part


def _texts(tenant: object, key: object) -> None:
    # The common case in two type tests; _text says what is wrong otherwise.
    if type(tenant) is not str or not tenant:
        _text("tenant", tenant)
    if type(key) is not str or not key:
        _text("key", key)


def _cost(cost: object) -> int:
    if type(cost) is int and 0 <= cost <= _U64_MAX:  # type(): bool is refused by _uint
        return cost
    return _uint("cost", cost)


def _frame(parts: tuple[bytes, ...], max_frame_bytes: int) -> bytes:
    body = b"".join(parts)
    if len(body) > max_frame_bytes:
        raise InvalidArgument(f"a {len(body)}-byte request is over max_frame_bytes ({max_frame_bytes})")
    return _LENGTH(len(body)) + body


def _str(value: str) -> bytes:
    try:
        return _pack(value)  # type: ignore[no-any-return]
    except UnicodeEncodeError as e:  # a lone surrogate
        raise InvalidArgument(f"a string that is not valid UTF-8 text: {e}") from None


def check(req_id: int, tenant: str, key: str, policy: str | None, cost: int, max_frame_bytes: int) -> bytes:
    _texts(tenant, key)
    part = _policy_part(policy)
    cost = _cost(cost)
    head = b"\x85" if policy is None else b"\x86"
    return _frame((head, _ID, _pack(req_id), _CHECK, _str(tenant), _KEY, _str(key), part, _pack(cost)), max_frame_bytes)


def _fill_ms(fill_ms: int | None) -> int:
    return 0 if fill_ms is None else _uint("fill_ms", fill_ms)


def check_get(
    req_id: int,
    tenant: str,
    key: str,
    cache_key: str,
    policy: str | None,
    cost: int,
    fill_ms: int | None,
    max_frame_bytes: int,
) -> bytes:
    _texts(tenant, key)
    part = _policy_part(policy)
    cost = _cost(cost)
    _text("cache_key", cache_key)
    fill = _fill_ms(fill_ms)
    head = 0x86 + (policy is not None) + (fill > 0)
    parts: tuple[bytes, ...] = (
        bytes((head,)), _ID, _pack(req_id), _CHECK_GET, _str(tenant), _KEY, _str(key), part, _pack(cost),
        _CACHE_KEY, _str(cache_key),
    )
    if fill:
        parts += (_FILL_MS, _pack(fill))
    return _frame(parts, max_frame_bytes)


def cache_get(req_id: int, tenant: str, key: str, fill_ms: int | None, max_frame_bytes: int) -> bytes:
    _texts(tenant, key)
    fill = _fill_ms(fill_ms)
    parts: tuple[bytes, ...] = (b"\x85" if fill else b"\x84", _ID, _pack(req_id), _CACHE_GET, _str(tenant), _KEY, _str(key))
    if fill:
        parts += (_FILL_MS, _pack(fill))
    return _frame(parts, max_frame_bytes)
