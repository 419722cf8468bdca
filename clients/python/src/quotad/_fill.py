"""The cache half of a request, shared by the ASGI middleware and ``@cached``."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable

from .aio import AsyncClient
from .errors import QuotadError
from .models import Lookup


async def serve_or_fill(
    client: AsyncClient,
    tenant: str,
    key: str,
    lookup: Lookup,
    serve: Callable[[Lookup], Awaitable[bool]],
    compute: Callable[[], Awaitable[bytes | None]],
    *,
    ttl_ms: int,
    stale_ms: int | None,
    tags: Callable[[], Iterable[str]],
) -> None:
    """Serves a cache hit, or computes the answer and stores it.

    ``serve(lookup)`` answers from a hit; False if the entry is not usable
    (it is then recomputed and overwritten). ``compute()`` answers by itself
    and returns the bytes to store, or None when this answer must not be
    stored. A caller told to fill the entry (``lookup.fill``) that stores
    nothing, or fails, deletes the key instead: that drops the fill lock, so
    the callers quotad holds for this value are let go now, not when the lock
    lapses (``fill_ms``).
    """
    if lookup.hit and not lookup.refresh and await serve(lookup):
        return
    try:
        value = await compute()
    except BaseException:
        if lookup.fill:
            with contextlib.suppress(QuotadError):  # the error being raised matters more
                await client.cache_delete(tenant, keys=[key])
        raise
    if value is not None and not lookup.degraded:
        await client.cache_set(tenant, key, value, ttl_ms, tags(), stale_ms)
    elif lookup.fill:
        await client.cache_delete(tenant, keys=[key])
