"""The RateLimit header vectors of clients/ratelimit-headers.json, which the Node suite checks too."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from quotad import Decision
from quotad.ratelimit_headers import Bare, sf_list, sf_string

VECTORS = json.loads((Path(__file__).parents[2] / "ratelimit-headers.json").read_text("utf-8"))


def bare(v: Any) -> Bare:
    if isinstance(v, dict):
        return base64.b64decode(v["bytes"])
    assert isinstance(v, (int, str))
    return v


@pytest.mark.parametrize("v", VECTORS["structured"], ids=lambda v: v["name"])
def test_structured_fields_serialize_as_pinned(v: dict[str, Any]) -> None:
    items = [(value, [(k, bare(p)) for k, p in params]) for value, params in v["items"]]
    assert sf_list(items) == v["serialized"]
    if "draft" in v and "base64" not in v["name"]:
        # The draft writes lists without the optional space after the comma.
        assert v["serialized"].replace(", ", ",") == v["draft"]


@pytest.mark.parametrize("v", VECTORS["decisions"], ids=lambda v: v["name"])
def test_each_decision_gets_the_pinned_headers(v: dict[str, Any]) -> None:
    d = Decision.from_reply({"id": 1, "ok": True, **v["decision"]})
    assert d.headers(legacy=v["legacy"]) == v["headers"]


def test_the_vectors_cover_the_draft_and_every_kind() -> None:
    assert sum("draft" in v for v in VECTORS["structured"]) >= 8
    kinds = {v["decision"]["kind"] for v in VECTORS["decisions"]}
    assert {"token_bucket", "fixed_window", "sliding_window", "daily_quota", "concurrency"} <= kinds


def test_a_string_outside_printable_ascii_is_refused() -> None:
    for bad in ("é", "a\nb", "\x7f"):
        with pytest.raises(ValueError):
            sf_string(bad)
