"""quotad's /metrics, scraped live, parses with prometheus_client's OpenMetrics parser,
and the values read through it are exactly what the checks and cache ops did.

OpenMetrics is the format quotad declares (its Content-Type), so it is the parser
Prometheus uses on it; the classic text parser is not: it expects a counter's
`# TYPE` to name the `_total` sample, which OpenMetrics does not."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from daemons import Quotad, Redis
from quotad import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _value(families: dict, family: str, sample: str, **labels: str) -> float:
    """The one sample named `sample` of `family` with exactly `labels`."""
    found = [s.value for s in families[family].samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels, families[family].samples)
    return float(found[0])


def test_a_live_scrape_parses_with_prometheus_client(tmp_path: Path, redis: Redis, tenant: str) -> None:
    port = _free_port()
    q = Quotad(tmp_path, redis, tables=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    try:
        with Client(str(q.socket)) as c:
            # `tiny` allows 2 a minute: 2 allowed, 1 denied.
            assert [c.check(tenant, "k", policy="tiny").allowed for _ in range(3)] == [True, True, False]
            assert c.cache_set(tenant, "entry", b"v", ttl_ms=60_000)
            assert c.cache_get(tenant, "entry") == b"v"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            kind = reply.headers["Content-Type"]
            text = reply.read().decode()
    finally:
        q.close()
    assert kind.startswith("application/openmetrics-text; version=1.0.0"), kind

    families = {f.name: f for f in openmetrics_families(text)}
    assert families["quotad_checks"].type == "counter"
    assert families["quotad_request_duration_seconds"].type == "histogram"
    assert families["quotad_datastore_partitioned"].type == "gauge"
    checks = "quotad_checks_total"
    allowed = sum(
        _value(families, "quotad_checks", checks, policy="tiny", outcome=o)
        for o in ("within_limit", "near_limit")
    )
    assert allowed == 2
    assert _value(families, "quotad_checks", checks, policy="tiny", outcome="over_limit") == 1
    rejections = "quotad_rate_limiter_rejections_total"
    assert _value(families, "quotad_rate_limiter_rejections", rejections, policy="tiny", rule="per_minute") == 1
    assert _value(families, "quotad_cache_hits", "quotad_cache_hits_total") == 1
    count = "quotad_request_duration_seconds_count"
    # Three checks, plus the warm-up check of the `api` policy.
    assert _value(families, "quotad_request_duration_seconds", count, op="check") == 4
    assert _value(families, "quotad_request_duration_seconds", count, op="cache_set") == 1
