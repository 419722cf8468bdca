"""The cache half of a request, shared by the ASGI middleware and ``@cached``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .aio import AsyncClient
from .errors import QuotadError
from .models import Lookup

log = logging.getLogger("quotad")

# The stores and releases under way: the event loop keeps only weak references to tasks.
_ending: set[asyncio.Task[None]] = set()


class CachedCalls:
    """Whether a ``@cached`` function ran while the middleware computed a response."""

    seen = False


#: Set by the middleware around the app while it computes a response it may
#: store; ``@cached`` marks it. Such a response is not stored: it would keep
#: the function's old value after ``fn.invalidate(...)`` dropped it (and the
#: function's entry, not the page, is then the cache). A task the app starts
#: copies the context, and so shares the same object.
cached_calls: contextvars.ContextVar[CachedCalls | None] = contextvars.ContextVar("quotad_cached_calls", default=None)


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
    nothing, or fails, or is cancelled, releases its fill lock instead
    (``cache_delete(fill_only=True)``): the callers quotad holds for this
    value are let go now, not when the lock lapses (``fill_ms``), and a value
    someone else stored meanwhile stays.

    Once ``compute()`` has run, the store or the release is carried out even
    if the request is being cancelled, and its errors are logged, never
    raised: the answer is out already (or the error being raised matters
    more).
    """
    if lookup.hit and not lookup.refresh and await serve(lookup):
        return

    def release() -> Awaitable[int]:
        return client.cache_delete(tenant, keys=[key], fill_only=True)

    try:
        value = await compute()
    except BaseException:
        if lookup.fill:
            await _end_fill(release, "release", tenant, key)
        raise
    if value is not None and not lookup.degraded:
        stored = value
        await _end_fill(
            lambda: client.cache_set(tenant, key, stored, ttl_ms, tags(), stale_ms), "store", tenant, key
        )
    elif lookup.fill:
        await _end_fill(release, "release", tenant, key)


async def _end_fill(step: Callable[[], Awaitable[object]], what: str, tenant: str, key: str) -> None:
    """Runs ``step`` (a store or a release of the fill lock) to its end, whatever happens to the request."""
    await finish_shielded(step, f"{what} the cache entry {key!r} of tenant {tenant!r}")


async def finish_shielded(step: Callable[[], Awaitable[object]], what: str) -> None:
    """Runs ``step`` to its end, shielded from the request's cancellation; logs its errors as "could not <what>".

    Under an anyio cancel scope (Starlette, FastAPI, ``anyio.fail_after``) a
    cancelled scope cancels every await in it again, this one included: a
    shielded scope lets it finish. Its own task also finishes it when the
    request is cancelled again by plain asyncio (``Task.cancel``).
    """

    async def run() -> None:
        try:
            await step()
        except Exception as e:
            log.warning("could not %s: %s", what, e, exc_info=not isinstance(e, QuotadError))

    task = asyncio.ensure_future(run())
    _ending.add(task)
    task.add_done_callback(_ending.discard)
    with _shielded():
        await asyncio.shield(task)


def _shielded() -> contextlib.AbstractContextManager[Any]:
    # anyio is not a dependency: its cancel scopes exist only where it is loaded.
    anyio = sys.modules.get("anyio")
    if anyio is None:
        return contextlib.nullcontext()
    scope: contextlib.AbstractContextManager[Any] = anyio.CancelScope(shield=True)
    return scope
