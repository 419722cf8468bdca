"""A small notes service rate-limited and cached by quotad.

- Every request is rate-limited by the middleware: the tenant comes from the
  ``X-Tenant`` header (default ``demo``), the key from ``X-API-Key`` (else
  the client's IP). Over the limit: 429 with ``Retry-After``.
- ``GET /notes`` and ``GET /notes/{id}`` are cached by the middleware
  (``X-Cache: miss`` / ``hit``); ``POST /notes`` drops them with ``invalidate``.
- ``POST /notes`` also costs 5 units through a per-route dependency.
- ``GET /notes/{id}/summary`` caches an expensive function with ``@cached``.

quotad runs separately (``cargo run --release -- serve`` in the repo root);
set ``QUOTAD_SOCKET`` if its socket is not the default path.
"""

from __future__ import annotations

import asyncio
import itertools

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from quotad import AsyncClient, identity
from quotad.cached import cached
from quotad.fastapi import RateLimit
from quotad.starlette import QuotadMiddleware, ResponseCache, invalidate

quotad = AsyncClient()  # connects on first use; fails open if quotad is down
app = FastAPI(title="notes, with quotad")
app.add_middleware(
    QuotadMiddleware,
    client=quotad,
    tenant=identity.first(identity.header("x-tenant"), identity.constant("demo")),
    key=identity.first(identity.api_key(), identity.client_ip()),
    # Notes are shared by everyone in a tenant: one cache entry per URL, not per user.
    cache=ResponseCache(ttl_ms=30_000, stale_ms=10_000, per_user=False,
                        when=lambda req: req.url.path.startswith("/notes")),
    exempt=["/health"],
)

_notes: dict[str, dict[int, str]] = {}
_ids = itertools.count(1)


class Note(BaseModel):
    text: str


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/notes")
async def list_notes(request: Request) -> dict[str, object]:
    await asyncio.sleep(0.05)  # pretend this is a slow query: cache hits skip it
    tenant = request.state.quotad.tenant
    return {"notes": [{"id": i, "text": t} for i, t in _notes.get(tenant, {}).items()]}


@app.get("/notes/{note_id}")
async def get_note(note_id: int, request: Request) -> dict[str, object]:
    text = _notes.get(request.state.quotad.tenant, {}).get(note_id)
    if text is None:
        raise HTTPException(404, "no such note")  # a 404 is never cached
    return {"id": note_id, "text": text}


@app.post("/notes", status_code=201, dependencies=[Depends(RateLimit(quotad, cost=5))])
async def add_note(note: Note, request: Request) -> dict[str, object]:
    tenant = request.state.quotad.tenant
    note_id = next(_ids)
    _notes.setdefault(tenant, {})[note_id] = note.text
    dropped = await invalidate(request, paths=["/notes"])
    return {"id": note_id, "invalidated": dropped}


@cached(quotad, tenant="demo", ttl_ms=60_000)
async def summarize(text: str) -> dict[str, object]:
    await asyncio.sleep(0.2)  # an expensive computation, done once per text
    words = text.split()
    return {"words": len(words), "longest": max(words, key=len) if words else ""}


@app.get("/notes/{note_id}/summary")
async def note_summary(note_id: int, request: Request) -> dict[str, object]:
    text = _notes.get(request.state.quotad.tenant, {}).get(note_id)
    if text is None:
        raise HTTPException(404, "no such note")
    return await summarize(text)
