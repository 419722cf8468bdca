"""FastAPI: a dependency for per-route rate limits.

.. code-block:: python

    from fastapi import Depends, FastAPI
    from quotad.fastapi import RateLimit

    login_limit = RateLimit(q, policy="login", key=identity.client_ip())

    @app.post("/login", dependencies=[Depends(login_limit)])
    async def login(): ...

A denial raises ``HTTPException(429)`` with the ``RateLimit-Policy``,
``RateLimit`` and ``Retry-After`` headers; an allowed request gets
``RateLimit-Policy`` and ``RateLimit`` on its response (and with
``legacy_headers=True`` the older ``RateLimit-Limit``/``-Remaining``/
``-Reset`` trio too: :mod:`quotad.ratelimit_headers`). Under a policy with
a ``concurrency`` rule the dependency holds the check's lease for the
request and releases it exactly once when the request is done: it is a
dependency with ``yield``, closed after the response is sent (a streamed
body too), the handler raised, or the client went away; except with
FastAPI 0.106 to 0.117, which close it before the response is sent.
Without explicit ``tenant``/``key``, the
dependency uses the ones :class:`~quotad.starlette.QuotadMiddleware`
resolved for the request, if it is installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from fastapi import HTTPException, Request, Response

from . import identity
from .aio import AsyncClient
from ._leases import HeldLease
from .identity import Extractor
from .models import Decision
from .starlette import ANONYMOUS_KEY, DEFAULT_TENANT, QuotadContext


class RateLimit:
    """``Depends(RateLimit(client, policy="login"))``: returns the :class:`~quotad.Decision`."""

    def __init__(
        self,
        client: AsyncClient,
        policy: str | None = None,
        *,
        tenant: Extractor | None = None,
        key: Extractor | None = None,
        cost: int | Callable[[Request], int] = 1,
        scope_to_route: bool = False,
        legacy_headers: bool = False,
    ) -> None:
        self.client = client
        self.policy = policy
        self.tenant = tenant
        self.key = key
        self.cost = cost
        self.legacy_headers = legacy_headers
        # Per-route buckets within one policy: the key gets the route template.
        self._route = identity.route() if scope_to_route else None

    async def __call__(self, request: Request, response: Response) -> AsyncIterator[Decision]:
        ctx = request.scope.get("state", {}).get("quotad")
        ctx = ctx if isinstance(ctx, QuotadContext) else None
        # Like QuotadMiddleware's defaults: the default tenant, keyed by client IP.
        tenant = await self._resolve(self.tenant, request, ctx.tenant if ctx else None, None) or DEFAULT_TENANT
        key = await self._resolve(self.key, request, ctx.key if ctx else None, identity.client_ip()) or ANONYMOUS_KEY
        if self._route is not None:
            key = f"{await identity.resolve(self._route, request)} {key}"
        cost = self.cost(request) if callable(self.cost) else self.cost
        decision = await self.client.check(tenant, key, self.policy, cost)
        headers = decision.headers(legacy=self.legacy_headers)
        if not decision.allowed:
            raise HTTPException(
                status_code=429,
                detail={"error": "rate_limited", "retry_after": decision.retry_after, "rule": decision.rule},
                headers=headers,
            )
        response.headers.update(headers)
        held = HeldLease(self.client, tenant, key, self.policy, decision.lease)
        try:
            yield decision
        finally:
            await held.release()

    @staticmethod
    async def _resolve(
        extractor: Extractor | None, request: Request, found: str | None, default: Extractor | None
    ) -> str | None:
        """The route's own extractor, else what the middleware found, else the default."""
        if extractor is not None:
            return await identity.resolve(extractor, request)
        if found is not None or default is None:
            return found
        return await identity.resolve(default, request)


__all__ = ["RateLimit"]
