"""Identity extractors, on hand-built ASGI scopes."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from quotad import identity
from quotad.starlette import cache_key_for, path_tag, path_tags


def request(path: str = "/", headers: dict[str, str] | None = None, query: str = "", **extra: object) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("10.1.2.3", 5555),
        "server": ("test", 80),
        "scheme": "http",
        **extra,
    }
    return Request(scope)


def jwt(claims: dict[str, object]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"


async def test_extractors() -> None:
    r = request(headers={"x-tenant": "acme", "x-api-key": "k1", "authorization": f"Bearer {jwt({'tid': 7})}",
                         "x-forwarded-for": "1.1.1.1, 10.0.0.1"})
    assert await identity.resolve(identity.header("X-Tenant"), r) == "acme"
    assert await identity.resolve(identity.api_key(), r) == "k1"
    assert await identity.resolve(identity.jwt_claim("tid"), r) == "7"
    assert await identity.resolve(identity.jwt_claim("missing"), r) is None
    assert await identity.resolve(identity.client_ip(), r) == "10.1.2.3"
    assert await identity.resolve(identity.client_ip(trust_forwarded=True), r) == "1.1.1.1"
    assert await identity.resolve(identity.constant("c"), r) == "c"
    r.state.user = "u9"
    assert await identity.resolve(identity.state("user"), r) == "u9"
    assert await identity.resolve(identity.state("nobody"), r) is None
    assert await identity.resolve(identity.first(identity.header("x-none"), identity.api_key()), r) == "k1"


async def test_jwt_with_verifier_and_garbage() -> None:
    def reject(token: str) -> dict[str, object]:
        raise ValueError("bad signature")

    r = request(headers={"authorization": f"Bearer {jwt({'tid': 'x'})}"})
    assert await identity.resolve(identity.jwt_claim("tid", decode=reject), r) is None
    for value in ("Bearer not-a-jwt", "Basic abc", "Bearer a.!!!.c", f"Bearer {jwt(['list'])}"):  # type: ignore[arg-type]
        assert await identity.resolve(identity.jwt_claim("tid"), request(headers={"authorization": value})) is None


async def test_route_template() -> None:
    async def ep(request: Request) -> PlainTextResponse:
        return PlainTextResponse("")

    app = Starlette(routes=[Route("/items/{item_id}", ep)])
    assert await identity.resolve(identity.route(), request("/items/42", app=app)) == "GET /items/{item_id}"
    assert await identity.resolve(identity.route(), request("/other", app=app)) == "GET /other"


VECTORS = json.loads((Path(__file__).parents[2] / "cache-keys.json").read_text("utf-8"))


@pytest.mark.parametrize("v", VECTORS["keys"], ids=[v["target"] for v in VECTORS["keys"]])
def test_cache_keys_and_tags_match_the_shared_vectors(v: dict[str, Any]) -> None:
    """The keys and tags of clients/cache-keys.json, which the Node suite checks too."""
    path, _, query = v["target"].partition("?")
    # As uvicorn builds the scope: raw_path as sent, path percent-decoded.
    r = request(unquote(path), query=query, raw_path=path.encode())
    assert cache_key_for(r, v["user"]) == v["key"]
    assert path_tags(r) == v["tags"]


@pytest.mark.parametrize("v", VECTORS["path_tags"], ids=[v["path"] for v in VECTORS["path_tags"]])
def test_invalidated_path_tags_match_the_shared_vectors(v: dict[str, str]) -> None:
    assert path_tag(v["path"]) == v["tag"]


def test_cache_key_without_raw_path() -> None:
    """A server that gives no raw_path: the decoded path, re-encoded."""
    assert cache_key_for(request("/café/a b", query="b=1&a=2"), None) == "GET /caf%C3%A9/a%20b?a=2&b=1"
