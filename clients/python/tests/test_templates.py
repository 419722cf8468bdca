"""The template frames of the hot ops are the general encoder's bytes, and refuse the same values."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from quotad import _requests, _templates
from quotad._codec import request_frame
from quotad.errors import InvalidArgument

HOSTILE = [
    "a",
    "acme",
    "x" * 31,  # the longest fixstr
    "x" * 32,
    "é" * 15,  # 30 bytes
    "é" * 16,  # 32 bytes: str8
    "y" * 255,
    "y" * 256,  # str16
    "z" * 70_000,  # str32
    "ü" * 40_000,  # str32 from 40,000 code points
    "mixed ascii then ü",
    "nul\0inside",
    "\0",
    "日本語のキー",
    "😀 emoji 𝄞 astral",
    "GET /items?page=2&q=%00",
]
IDS = [1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
COSTS = [0, 1, 300, 2**40, 2**64 - 1]
MAX = 1 << 30


def general(req: dict[str, Any], req_id: int) -> bytes:
    return request_frame(req, req_id, MAX)


def test_check_frames_are_the_general_bytes() -> None:
    for n, (tenant, key) in enumerate(itertools.product(HOSTILE, HOSTILE)):
        policy = [None, "api", HOSTILE[n % len(HOSTILE)]][n % 3]
        req_id, cost = IDS[n % len(IDS)], COSTS[n % len(COSTS)]
        want = general(_requests.check(tenant, key, policy, cost), req_id)
        assert _templates.check(req_id, tenant, key, policy, cost, MAX) == want, (tenant[:20], key[:20], policy)


def test_check_get_and_cache_get_frames_are_the_general_bytes() -> None:
    for n, (tenant, key) in enumerate(itertools.product(HOSTILE, HOSTILE)):
        cache_key = HOSTILE[(n * 7) % len(HOSTILE)]
        fill_ms = [None, 0, 2000, 2**33][n % 4]
        policy = "api" if n % 2 else None
        req_id, cost = IDS[n % len(IDS)], COSTS[n % len(COSTS)]
        want = general(_requests.check_get(tenant, key, cache_key, policy, cost, fill_ms), req_id)
        assert _templates.check_get(req_id, tenant, key, cache_key, policy, cost, fill_ms, MAX) == want, n
        want = general(_requests.cache_get(tenant, key, fill_ms), req_id)
        assert _templates.cache_get(req_id, tenant, key, fill_ms, MAX) == want, n


def test_golden_request_frames_come_out_of_the_templates(golden_frames: list[dict[str, Any]]) -> None:
    hexes = {f["name"]: f["hex"] for f in golden_frames}
    assert _templates.check(2, "acme", "user:42", "api", 1, MAX).hex() == hexes["check_request"]
    assert _templates.check(3, "acme", "user:42", None, 0, MAX).hex() == hexes["check_request_default_policy_peek"]
    assert _templates.check(2**64 - 1, "acme", "user:42", "api", 300, MAX).hex() == hexes["check_request_large_id"]
    assert _templates.cache_get(5, "acme", "GET /items?page=2", None, MAX).hex() == hexes["cache_get_request"]
    assert _templates.cache_get(6, "acme", "GET /items?page=2", 2000, MAX).hex() == hexes["cache_get_request_fill"]
    frame = _templates.check_get(9, "acme", "user:42", "GET /items?page=2", "api", 1, 2000, MAX)
    assert frame.hex() == hexes["check_get_request"]


BAD: list[tuple[Any, Any, Any, Any]] = [
    ("", "k", None, 1),
    ("t", "", None, 1),
    ("t", "k", "", 1),
    ("\udc80", "k", None, 1),  # a lone surrogate
    ("t", "k\ud800", None, 1),
    ("t", "k", "p\udfff", 1),
    (b"t", "k", None, 1),
    ("t", None, None, 1),
    ("t", "k", 7, 1),
    ("t", "k", None, -1),
    ("t", "k", None, 1.5),
    ("t", "k", None, True),
    ("t", "k", None, 2**64),
]


@pytest.mark.parametrize(("tenant", "key", "policy", "cost"), BAD)
def test_templates_refuse_what_the_general_path_refuses(tenant: Any, key: Any, policy: Any, cost: Any) -> None:
    with pytest.raises(InvalidArgument):
        general(_requests.check(tenant, key, policy, cost), 1)
    with pytest.raises(InvalidArgument):
        _templates.check(1, tenant, key, policy, cost, MAX)
    with pytest.raises(InvalidArgument):
        _templates.check_get(1, tenant, key, "c", policy, cost, None, MAX)


def test_other_refusals() -> None:
    with pytest.raises(InvalidArgument):
        _templates.check_get(1, "t", "k", "", None, 1, None, MAX)
    with pytest.raises(InvalidArgument):
        _templates.cache_get(1, "t", "k", -1, MAX)
    with pytest.raises(InvalidArgument):
        _templates.cache_get(1, "t", "", None, MAX)
    with pytest.raises(InvalidArgument, match="max_frame_bytes"):
        _templates.check(1, "t", "k" * 100, None, 1, 64)
