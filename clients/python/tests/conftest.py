from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import REPO, Quotad, Redis, quotad_bin

_tenants = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def _binary() -> None:
    try:
        quotad_bin()
    except RuntimeError as e:
        pytest.exit(str(e), returncode=2)


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    r = Redis(tmp_path_factory.mktemp("redis"))
    yield r
    r.stop()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory, redis: Redis) -> Iterator[Quotad]:
    """The shared quotad (with Redis). Tests keep apart by using their own tenant."""
    q = Quotad(tmp_path_factory.mktemp("quotad"), redis)
    yield q
    q.close()


@pytest.fixture
def own_daemon(tmp_path: Path, redis: Redis) -> Iterator[Quotad]:
    """A quotad for one test, which may kill, pause or restart it."""
    q = Quotad(tmp_path, redis)
    yield q
    q.close()


@pytest.fixture
def socket_path(daemon: Quotad) -> str:
    return str(daemon.socket)


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    """A tenant no other test (or earlier run against the same Redis) uses."""
    return f"t{next(_tenants)}-{request.node.name[:40]}"


@pytest.fixture(scope="session")
def golden_frames() -> list[dict[str, object]]:
    data = json.loads((REPO / "tests" / "fixtures" / "frames.json").read_text())
    frames: list[dict[str, object]] = data["frames"]
    return frames
