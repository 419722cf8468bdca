"""A lease a request holds, given back exactly once however the request ends.

Shared by the ASGI middleware and the FastAPI dependency: each takes a
lease with its check (a policy with a ``concurrency`` rule) and releases it
when the response is done, streamed bodies included, or when the handler
raised, or when the client went away. The release runs to its end even if
the request is being cancelled, and its errors are logged, never raised (a
lease that could not be released frees itself after the rule's
``lease_ms``).
"""

from __future__ import annotations

from ._fill import finish_shielded
from .aio import AsyncClient


class HeldLease:
    __slots__ = ("_client", "_tenant", "_key", "_policy", "_lease")

    def __init__(self, client: AsyncClient, tenant: str, key: str, policy: str | None, lease: str | None) -> None:
        self._client = client
        self._tenant = tenant
        self._key = key
        self._policy = policy
        self._lease = lease

    async def release(self) -> None:
        """Gives the lease back; does nothing the second time (or without a lease)."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        client, tenant, key, policy = self._client, self._tenant, self._key, self._policy
        await finish_shielded(
            lambda: client.release(tenant, key, lease, policy), f"release a lease of tenant {tenant!r} key {key!r}"
        )
