"""``@cached``: cache an async function's results in quotad.

.. code-block:: python

    @cached(q, tenant="acme", ttl_ms=60_000, tags=["prices"])
    async def price(sku: str, currency: str = "EUR") -> dict: ...

    await price("A1")            # computed, stored
    await price(sku="A1")        # same key: served from the cache
    await price.invalidate("A1")

The cache key is ``<module>.<qualname>:<sha256 of the bound arguments>``:
arguments are bound to the signature (defaults applied, so ``f(1)`` and
``f(x=1)`` share an entry) and written as canonical JSON. It is stable
across processes and hosts; Python's ``hash()`` (randomized per process)
is never used. Arguments must be JSON-like (str, int, float, bool, None,
bytes, lists, tuples, dicts with str keys); pass ``key=`` for anything else.
Results are stored with ``dumps`` (JSON by default).

A response that called a ``@cached`` function is not stored by the ASGI
middleware's ``ResponseCache``: ``invalidate`` drops the function's entry,
which would not drop a page built from it. The function's entry still
saves the work.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, ParamSpec, TypeVar

from ._fill import cached_calls, serve_or_fill
from .aio import AsyncClient
from .models import Lookup

P = ParamSpec("P")
R = TypeVar("R")


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("@cached: dict arguments need str keys")
        return {k: _canonical(v) for k, v in value.items()}
    raise TypeError(
        f"@cached: cannot build a stable cache key from a {type(value).__name__} argument; pass key="
    )


def stable_key(name: str, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any],
               ignore: Iterable[str] = ("self", "cls")) -> str:
    """``name:<hex digest>`` of the bound arguments, identical in every process."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    skip = set(ignore)
    canon = {k: _canonical(v) for k, v in bound.arguments.items() if k not in skip}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return f"{name}:{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def _json_dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class CachedFunction(Generic[P, R]):
    """The decorated function: call it, or ask for/invalidate its entry for some arguments."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]],
        client: AsyncClient,
        tenant: str,
        ttl_ms: int,
        stale_ms: int | None,
        fill_ms: int | None,
        tags: list[str],
        key: Callable[..., str] | None,
        dumps: Callable[[R], bytes],
        loads: Callable[[bytes], R],
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("@cached decorates async functions")
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._client = client
        self._tenant = tenant
        self._ttl_ms = ttl_ms
        self._stale_ms = stale_ms
        self._fill_ms = fill_ms
        self._tags = tags
        self._key = key
        self._dumps = dumps
        self._loads = loads
        self._name = f"{fn.__module__}.{fn.__qualname__}"
        self._signature = inspect.signature(fn)

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> str:
        if self._key is not None:
            return f"{self._name}:{self._key(*args, **kwargs)}"
        return stable_key(self._name, self._signature, args, kwargs)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        key = self.cache_key(*args, **kwargs)
        calls = cached_calls.get()
        if calls is not None:  # within a response the middleware would cache: it won't
            calls.seen = True
        lookup = await self._client.cache_lookup(self._tenant, key, self._fill_ms)
        result: R

        async def serve(hit: Lookup) -> bool:
            nonlocal result
            assert hit.value is not None
            try:
                result = self._loads(hit.value)
            except Exception:  # an entry we cannot read is recomputed and overwritten
                return False
            return True

        async def compute() -> bytes:
            nonlocal result
            result = await self._fn(*args, **kwargs)
            return self._dumps(result)

        await serve_or_fill(
            self._client, self._tenant, key, lookup, serve, compute,
            ttl_ms=self._ttl_ms, stale_ms=self._stale_ms, tags=lambda: self._tags,
        )
        return result

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> bool:
        """Drops the entry for these arguments; True if there was one."""
        return await self._client.cache_delete(self._tenant, keys=[self.cache_key(*args, **kwargs)]) > 0


def cached(
    client: AsyncClient,
    *,
    tenant: str,
    ttl_ms: int,
    stale_ms: int | None = None,
    fill_ms: int | None = None,
    tags: Iterable[str] = (),
    key: Callable[..., str] | None = None,
    dumps: Callable[[Any], bytes] = _json_dumps,
    loads: Callable[[bytes], Any] = json.loads,
) -> Callable[[Callable[P, Awaitable[R]]], CachedFunction[P, R]]:
    """Decorator; see the module docs. Invalid settings raise at decoration time."""
    if isinstance(tags, str):
        raise TypeError("tags must be a list of str, not a str")
    tag_list = list(tags)
    if not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise ValueError("ttl_ms must be a positive int")

    def decorate(fn: Callable[P, Awaitable[R]]) -> CachedFunction[P, R]:
        return CachedFunction(fn, client, tenant, ttl_ms, stale_ms, fill_ms, tag_list, key, dumps, loads)

    return decorate


__all__ = ["CachedFunction", "cached", "stable_key"]
