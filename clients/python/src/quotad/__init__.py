"""Python client for quotad, the rate-limiting and caching sidecar.

>>> from quotad import Client
>>> q = Client("/run/quotad/quotad.sock")
>>> d = q.check("acme", "user:42", policy="api")
>>> d.allowed, d.headers()

:class:`AsyncClient` is the asyncio twin. FastAPI/Starlette integration is
in :mod:`quotad.starlette` and :mod:`quotad.fastapi`; a caching decorator
for async functions in :mod:`quotad.cached`.
"""

from ._common import FailureMode, default_socket_path
from .aio import AsyncClient
from .client import Client
from .errors import (
    BadRequest,
    ConnectFailed,
    ConnectionLost,
    Forbidden,
    InvalidArgument,
    Overloaded,
    ProtocolViolation,
    QuotadError,
    QuotadUnavailable,
    RequestTimedOut,
    ServerError,
    ServerInternalError,
    ShuttingDown,
    SourceUnavailable,
    TooLarge,
    UnknownOp,
    UnknownPolicy,
)
from .models import CheckGet, Decision, Hello, Lookup, RuleUsage, Stats

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "CheckGet",
    "Client",
    "ConnectFailed",
    "ConnectionLost",
    "Decision",
    "FailureMode",
    "Forbidden",
    "Hello",
    "InvalidArgument",
    "Lookup",
    "Overloaded",
    "ProtocolViolation",
    "QuotadError",
    "QuotadUnavailable",
    "RequestTimedOut",
    "RuleUsage",
    "ServerError",
    "ServerInternalError",
    "ShuttingDown",
    "SourceUnavailable",
    "Stats",
    "TooLarge",
    "UnknownOp",
    "UnknownPolicy",
    "default_socket_path",
]
