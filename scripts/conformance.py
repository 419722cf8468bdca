#!/usr/bin/env python3
"""Checks a running quotad (or any server claiming to speak it) against docs/protocol.md.

Usage: conformance.py --socket PATH [--require-leases] [--forbidden-tenant TENANT] [--admin-forbidden]

Needs only the standard library and `msgpack`. It assumes the server's
default limits (`max_frame_bytes` 1 MiB, `[cache] max_value_bytes` 512 KiB)
and a `default` policy; it uses tenants named `conformance-<random>-…`, so it
can run against a live server without touching anyone else's state. Admin
ops are checked only if the socket's user may use them; otherwise the
`forbidden` answer is (`--admin-forbidden`: must be). With
`--forbidden-tenant`, a tenant the server's `[[access]]` rules do not grant
this user, every tenant op on it must get `forbidden` with its request's
`id`, and the connection must stay open. Not provoked: `overloaded`, `shutting_down`,
`unavailable` and `internal` (they need load, a stop, an outage or a bug).
Prints one line per check and `N passed, M failed` last; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time
import traceback
from typing import Any, Callable

import msgpack

RUN = os.urandom(4).hex()
CHECKS: list[Callable[[str], None]] = []
# What a check could not exercise on this server, and why: printed at the end.
SKIPPED: list[str] = []
# Set by --require-leases: a server without the LEASED policy fails.
REQUIRE_LEASES = False


def check(fn: Callable[[str], None]) -> Callable[[str], None]:
    CHECKS.append(fn)
    return fn


def tenant(name: str) -> str:
    return f"conformance-{RUN}-{name}"


class Conn:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.send_bytes(struct.pack(">I", len(body)) + body)

    def send(self, *requests: dict[str, Any]) -> None:
        self.send_bytes(b"".join(frame(r) for r in requests))

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv(self) -> dict[str, Any] | None:
        """The next reply, or None once the server has closed the connection."""
        if not self._fill(4):
            assert not self.buf, f"connection closed mid-frame: {self.buf!r}"
            return None
        (n,) = struct.unpack(">I", self.buf[:4])
        assert self._fill(4 + n), "connection closed mid-frame"
        body, self.buf = self.buf[4 : 4 + n], self.buf[4 + n :]
        reply = msgpack.unpackb(body, raw=False)
        assert isinstance(reply, dict), f"a reply must be a map: {reply!r}"
        return reply

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        reply = self.recv()
        assert reply is not None, f"closed instead of answering {request}"
        assert reply.get("id") == request["id"], f"{request} -> {reply}"
        return reply

    def ok(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self.ask(request)
        assert reply.get("ok") is True and "error" not in reply, f"{request} -> {reply}"
        return reply

    def close(self) -> None:
        self.sock.close()


def frame(request: dict[str, Any]) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def error_code(reply: dict[str, Any]) -> str:
    assert reply.get("ok") is False, f"expected an error: {reply}"
    err = reply.get("error")
    assert isinstance(err, dict), f"`error` must be a map: {reply}"
    assert isinstance(err.get("code"), str) and isinstance(err.get("message"), str), reply
    return err["code"]


def expect_error(c: Conn, request: dict[str, Any], code: str) -> None:
    got = error_code(c.ask(request))
    assert got == code, f"{request}: code {got!r}, want {code!r}"


def assert_decision(r: dict[str, Any]) -> None:
    assert isinstance(r.get("allowed"), bool), r
    for f in ("limit", "remaining", "reset_ms", "retry_after_ms"):
        assert is_uint(r.get(f)), f"`{f}` must be an unsigned integer: {r}"
    assert isinstance(r.get("degraded"), bool) and isinstance(r.get("rule"), str), r
    assert r["degraded"] is False, f"the server answered degraded (is its Redis up?): {r}"
    assert isinstance(r.get("kind"), str) and r["kind"], f"`kind` must be a string: {r}"
    assert is_uint(r.get("window_ms")), f"`window_ms` must be an unsigned integer: {r}"
    if r["kind"] == "daily_quota":
        assert r["window_ms"] == 86_400_000, r
    if "shadow_denied" in r:
        assert r["shadow_denied"] is True and r["allowed"] is True, r
        assert isinstance(r.get("shadow_rule"), str), r
    if r["allowed"]:
        assert r["retry_after_ms"] == 0, r
    else:
        assert r["retry_after_ms"] > 0, r


def ping(c: Conn, id: int = 999) -> None:
    """The connection is still open and served."""
    c.ok({"id": id, "op": "hello"})


# --- hello, stats ----------------------------------------------------------


@check
def hello_reports_protocol_server_backend_ops(path: str) -> None:
    c = Conn(path)
    r = c.ok({"id": 1, "op": "hello"})
    assert r["protocol"] == 1, r
    assert isinstance(r["server"], str) and r["server"].startswith("quotad/"), r
    assert r["backend"] in ("redis", "memory"), r
    ops = r["ops"]
    assert isinstance(ops, list) and all(isinstance(o, str) for o in ops), r
    for op in ("hello", "check", "check_get", "cache_get", "cache_set", "cache_del", "stats", "usage"):
        assert op in ops, f"`{op}` missing from ops {ops}"


@check
def ids_up_to_2_64_minus_1_are_echoed(path: str) -> None:
    c = Conn(path)
    for id in (0, 1, 2**32, 2**64 - 1):
        c.ok({"id": id, "op": "hello"})


@check
def stats_reports_counters(path: str) -> None:
    c = Conn(path)
    backend = c.ok({"id": 1, "op": "hello"})["backend"]
    r = c.ok({"id": 2, "op": "stats"})
    assert is_uint(r["uptime_ms"]) and is_uint(r["shards"]), r
    assert r["backend"] == backend, r
    counters = r["counters"]
    assert isinstance(counters, dict) and counters, r
    assert all(isinstance(k, str) and is_uint(v) for k, v in counters.items()), counters
    assert counters.get("requests_hello", 0) >= 1, counters
    shadow = r["shadow_denials"]
    assert isinstance(shadow, dict) and all(isinstance(k, str) and is_uint(v) and v > 0 for k, v in shadow.items()), r


@check
def unknown_fields_and_nil_optionals_are_ignored(path: str) -> None:
    c = Conn(path)
    c.ok({"id": 1, "op": "hello", "future_field": [1, {"a": 2}]})
    t = tenant("nil")
    r = c.ok({"id": 2, "op": "check", "tenant": t, "key": "k", "policy": None, "cost": None})
    assert_decision(r)
    assert r["allowed"], r


# --- check ------------------------------------------------------------------


@check
def check_peek_charges_nothing_then_exhausting_denies(path: str) -> None:
    c = Conn(path)
    req = {"op": "check", "tenant": tenant("check"), "key": "user:1"}
    a = c.ok({**req, "id": 1, "cost": 0})
    b = c.ok({**req, "id": 2, "cost": 0})
    assert_decision(a)
    assert a["allowed"] and b["allowed"], (a, b)
    assert a["remaining"] == b["remaining"] <= a["limit"], f"a peek charged: {a} {b}"
    assert a["remaining"] > 0, a
    # The deciding rule has the fewest units left, so every rule allows this.
    spent = c.ok({**req, "id": 3, "cost": a["remaining"]})
    assert_decision(spent)
    assert spent["allowed"] and spent["remaining"] == 0, spent
    denied = c.ok({**req, "id": 4})
    assert_decision(denied)
    assert not denied["allowed"], denied
    # Another key of the same tenant is untouched.
    other = c.ok({**req, "id": 5, "key": "user:2", "cost": 0})
    assert other["remaining"] == a["remaining"], other


@check
def check_without_policy_uses_default(path: str) -> None:
    c = Conn(path)
    r = c.ask({"id": 1, "op": "check", "tenant": tenant("dflt"), "key": "k"})
    assert r.get("ok") is True, f"needs a `default` policy: {r}"
    assert_decision(r)


@check
def check_unknown_policy(path: str) -> None:
    c = Conn(path)
    req = {"id": 1, "op": "check", "tenant": tenant("p"), "key": "k", "policy": f"no-such-{RUN}"}
    expect_error(c, req, "unknown_policy")


@check
def check_cost_no_rule_allows_is_bad_request(path: str) -> None:
    expect_error(Conn(path), {"id": 1, "op": "check", "tenant": tenant("c"), "key": "k", "cost": 2**64 - 1}, "bad_request")


# --- leases -----------------------------------------------------------------

# A policy of one `concurrency` rule the server may have (scripts/
# test-conformance.sh configures it); without it, only the answers that
# need no lease are checked.
LEASED = "conformance_concurrency"


def release(t: str, lease: Any, **extra: Any) -> dict[str, Any]:
    return {"op": "release", "tenant": t, "key": "k", "lease": lease, **extra}


@check
def release_of_no_lease_is_harmless_and_a_bad_lease_is_bad_request(path: str) -> None:
    c = Conn(path)
    hello = c.ok({"id": 1, "op": "hello"})
    assert "release" in hello["ops"], f"`release` is not among the ops: {hello}"
    t = tenant("release")
    # Well formed, but nothing holds it: released false, an answer, not an error.
    r = c.ok({**release(t, os.urandom(16).hex()), "id": 2})
    assert r.get("released") is False and r.get("degraded") is False, r
    for i, lease in enumerate(["", "zz", "A" * 32, "0" * 33, 7, None], start=3):
        expect_error(c, {**release(t, lease), "id": i}, "bad_request")
    ping(c)


@check
def a_lease_is_taken_by_an_allowed_check_and_released_exactly_once(path: str) -> None:
    c = Conn(path)
    t = tenant("lease")
    req = {"op": "check", "tenant": t, "key": "k", "policy": LEASED}
    first = c.ask({**req, "id": 1})
    if first.get("ok") is False and error_code(first) == "unknown_policy":
        assert not REQUIRE_LEASES, f"--require-leases, but the server has no `{LEASED}` policy"
        SKIPPED.append(f"leases: the server has no `{LEASED}` policy (a concurrency rule)")
        return
    assert_decision(first)
    assert first["allowed"] and isinstance(first.get("lease"), str), f"no lease: {first}"
    limit = first["limit"]
    assert first["remaining"] == limit - 1, first
    peek = c.ok({**req, "id": 2, "cost": 0})
    assert "lease" not in peek and peek["remaining"] == limit - 1, f"a peek took a lease: {peek}"
    held = [first["lease"]] + [c.ok({**req, "id": 10 + i})["lease"] for i in range(limit - 1)]
    assert len(set(held)) == limit, held
    full = c.ok({**req, "id": 3})
    assert_decision(full)
    assert not full["allowed"] and full["remaining"] == 0 and "lease" not in full, full
    assert full["kind"] == "concurrency" and full["window_ms"] == 0, full
    # usage counts the leases outstanding, and takes none.
    u = assert_usage(c.ok({"id": 7, "op": "usage", "tenant": t, "key": "k", "policy": LEASED}))[0]
    assert (u["kind"], u["used"], u["remaining"], u["window_ms"]) == ("concurrency", limit, 0, 0), u
    assert 0 < u["reset_ms"] <= full["reset_ms"], (u, full)
    r = c.ok({**release(t, held[0], policy=LEASED), "id": 4})
    assert r["released"] is True, r
    again = c.ok({**release(t, held[0], policy=LEASED), "id": 5})
    assert again["released"] is False, f"released twice: {again}"
    # The freed slot is free at once (a denial of a concurrency rule is not remembered).
    now = c.ok({**req, "id": 6})
    assert now["allowed"] and "lease" in now, now
    for i, lease in enumerate(held[1:] + [now["lease"]], start=20):
        assert c.ok({**release(t, lease, policy=LEASED), "id": i})["released"] is True
# --- usage ------------------------------------------------------------------

USAGE_FIELDS = ("limit", "used", "remaining", "reset_ms", "window_ms")


def assert_usage(r: dict[str, Any]) -> list[dict[str, Any]]:
    rules = r.get("rules")
    assert isinstance(rules, list) and rules, f"`rules` must be a non-empty list: {r}"
    for u in rules:
        assert isinstance(u.get("rule"), str) and isinstance(u.get("kind"), str), u
        for f in USAGE_FIELDS:
            assert is_uint(u.get(f)), f"`{f}` must be an unsigned integer: {u}"
        assert u["used"] + u["remaining"] == u["limit"], u
    names = [u["rule"] for u in rules]
    assert len(set(names)) == len(names), f"a rule named twice: {names}"
    return rules


@check
def usage_reports_every_rule_and_charges_nothing(path: str) -> None:
    c = Conn(path)
    req = {"op": "usage", "tenant": tenant("usage"), "key": "user:1"}
    first = assert_usage(c.ok({**req, "id": 1}))
    again = assert_usage(c.ok({**req, "id": 2}))
    assert [u["used"] for u in first] == [u["used"] for u in again] == [0] * len(first), (first, again)
    checked = c.ok({"id": 3, "op": "check", "tenant": req["tenant"], "key": "user:1", "cost": 2})
    assert_decision(checked)
    after = assert_usage(c.ok({**req, "id": 4}))
    assert checked["rule"] in [u["rule"] for u in after], (checked, after)
    for u in after:
        # A token bucket may have refilled a little; a daily quota is exact.
        assert 0 <= u["used"] <= 2, u
        if u["kind"] == "daily_quota":
            assert u["used"] == 2 and 0 < u["reset_ms"] <= 86_400_000, u
    decided = next(u for u in after if u["rule"] == checked["rule"])
    assert decided["kind"] == checked["kind"] and decided["window_ms"] == checked["window_ms"], (decided, checked)
    assert decided["limit"] == checked["limit"] and decided["remaining"] >= checked["remaining"], (decided, checked)


@check
def usage_unknown_policy_and_missing_key(path: str) -> None:
    c = Conn(path)
    expect_error(c, {"id": 1, "op": "usage", "tenant": tenant("u"), "key": "k", "policy": f"no-such-{RUN}"}, "unknown_policy")
    expect_error(c, {"id": 2, "op": "usage", "tenant": tenant("u")}, "bad_request")


# --- the response cache -----------------------------------------------------


def cache_set(t: str, key: str, value: bytes, ttl_ms: int = 60000, **extra: Any) -> dict[str, Any]:
    return {"op": "cache_set", "tenant": t, "key": key, "value": value, "ttl_ms": ttl_ms, **extra}


@check
def cache_set_then_get_hits_within_the_tenant_only(path: str) -> None:
    c = Conn(path)
    t = tenant("cache")
    r = c.ok({**cache_set(t, "page:1", b"\x00value\xff"), "id": 1})
    assert r["degraded"] is False, r
    hit = c.ok({"id": 2, "op": "cache_get", "tenant": t, "key": "page:1"})
    assert hit["hit"] is True and hit["value"] == b"\x00value\xff", hit
    assert isinstance(hit["value"], bytes), "`value` must be bin"
    assert 0 < hit["ttl_ms"] <= 60000 and hit["stale"] is False and hit["refresh"] is False, hit
    assert hit["degraded"] is False, hit
    miss = c.ok({"id": 3, "op": "cache_get", "tenant": tenant("cache-other"), "key": "page:1"})
    assert miss["hit"] is False and miss["fill"] is False and miss["degraded"] is False, miss
    assert "value" not in miss, miss


@check
def cache_stale_entry_is_refreshed_by_exactly_one_caller(path: str) -> None:
    c = Conn(path)
    t = tenant("stale")
    c.ok({**cache_set(t, "k", b"old", ttl_ms=1, stale_ms=60000), "id": 1})
    time.sleep(0.05)
    first = c.ok({"id": 2, "op": "cache_get", "tenant": t, "key": "k"})
    second = c.ok({"id": 3, "op": "cache_get", "tenant": t, "key": "k"})
    for r in (first, second):
        assert r["hit"] and r["stale"] and r["ttl_ms"] == 0 and r["value"] == b"old", r
    assert first["refresh"] is True and second["refresh"] is False, (first, second)


@check
def cache_del_by_keys_and_tags_counts_what_existed(path: str) -> None:
    c = Conn(path)
    t = tenant("del")
    c.ok({**cache_set(t, "a", b"1", tags=["red"]), "id": 1})
    c.ok({**cache_set(t, "b", b"2", tags=["red", "blue"]), "id": 2})
    c.ok({**cache_set(t, "c", b"3"), "id": 3})
    r = c.ok({"id": 4, "op": "cache_del", "tenant": t, "keys": ["c", "missing"]})
    assert r["deleted"] == 1 and r["degraded"] is False, r
    r = c.ok({"id": 5, "op": "cache_del", "tenant": t, "tags": ["red"]})
    assert r["deleted"] == 2, r
    for i, key in enumerate("abc"):
        assert c.ok({"id": 6 + i, "op": "cache_get", "tenant": t, "key": key})["hit"] is False


@check
def cache_fill_single_flight_holds_other_callers_out_of_order(path: str) -> None:
    filler, waiter = Conn(path), Conn(path)
    t = tenant("fill")
    get = {"op": "cache_get", "tenant": t, "key": "k"}
    r = filler.ok({**get, "id": 1, "fill_ms": 5000})
    assert r["hit"] is False and r["fill"] is True, r
    # The held request (id 10) must not hold up the hello behind it (id 11).
    waiter.send({**get, "id": 10, "fill_ms": 4000}, {"id": 11, "op": "hello"})
    first = waiter.recv()
    assert first is not None and first["id"] == 11, f"the hello waited for the held get: {first}"
    filler.ok({**cache_set(t, "k", b"filled"), "id": 2})
    held = waiter.recv()
    assert held is not None and held["id"] == 10 and held["hit"] and held["value"] == b"filled", held


@check
def cache_fill_wait_times_out_and_fill_only_releases_the_lock(path: str) -> None:
    c = Conn(path)
    t = tenant("fill-only")
    get = {"op": "cache_get", "tenant": t, "key": "k"}
    assert c.ok({**get, "id": 1, "fill_ms": 5000})["fill"] is True
    start = time.monotonic()
    r = c.ok({**get, "id": 2, "fill_ms": 100})
    assert r["hit"] is False and r["fill"] is False, r
    assert time.monotonic() - start >= 0.09, "a caller was not held for the fill"
    r = c.ok({"id": 3, "op": "cache_del", "tenant": t, "keys": ["k"], "fill_only": True})
    assert r["deleted"] == 1, r
    assert c.ok({**get, "id": 4, "fill_ms": 1000})["fill"] is True, "the lock was not released"


@check
def check_get_reads_the_cache_only_when_allowed(path: str) -> None:
    c = Conn(path)
    t = tenant("cg")
    c.ok({**cache_set(t, "page", b"body"), "id": 1})
    req = {"op": "check_get", "tenant": t, "key": "user", "cache_key": "page"}
    r = c.ok({**req, "id": 2})
    assert_decision(r)
    assert r["allowed"] and r["hit"] and r["value"] == b"body", r
    left = r["remaining"]
    if left:
        c.ok({"id": 3, "op": "check", "tenant": t, "key": "user", "cost": left})
    r = c.ok({**req, "id": 4})
    assert_decision(r)
    assert not r["allowed"] and "hit" not in r and "value" not in r, r


@check
def cache_value_over_max_is_too_large_and_keeps_the_connection(path: str) -> None:
    c = Conn(path)
    expect_error(c, {**cache_set(tenant("big"), "k", b"x" * (600 * 1024)), "id": 7}, "too_large")
    ping(c)


# --- errors that keep the connection open ---------------------------------

T = "conformance-bad"
BAD_REQUESTS: list[dict[str, Any]] = [
    {"op": "check", "key": "k"},
    {"op": "check", "tenant": 7, "key": "k"},
    {"op": "check", "tenant": T},
    {"op": "check", "tenant": "", "key": "k"},
    {"op": "check", "tenant": "t" * 5000, "key": "k"},
    {"op": "check", "tenant": T, "key": "k" * 70000},
    {"op": "check", "tenant": T, "key": "k", "cost": -1},
    {"op": "check", "tenant": T, "key": "k", "cost": 1.5},
    {"op": "check", "tenant": T, "key": "k", "cost": "1"},
    {"op": "check", "tenant": T, "key": "k", "policy": 3},
    {"op": 5},
    {"op": "cache_get", "tenant": T},
    {"op": "cache_get", "tenant": T, "key": ""},
    {"op": "cache_get", "tenant": T, "key": "k", "fill_ms": 2**40},
    {"op": "cache_set", "tenant": T, "key": "k", "value": "text", "ttl_ms": 5},
    {"op": "cache_set", "tenant": T, "key": "k", "ttl_ms": 5},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 0},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": -5},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v"},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 2**60},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 5, "stale_ms": 2**60},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 5, "tags": [f"t{i}" for i in range(5000)]},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 5, "tags": "t"},
    {"op": "cache_set", "tenant": T, "key": "k", "value": b"v", "ttl_ms": 5, "tags": [""]},
    {"op": "cache_del", "tenant": T},
    {"op": "cache_del", "tenant": T, "keys": [], "tags": []},
    {"op": "cache_del", "tenant": T, "keys": "k"},
    {"op": "cache_del", "tenant": T, "keys": ["k", 5]},
    {"op": "cache_del", "tenant": T, "tags": [""]},
    {"op": "cache_del", "tenant": T, "keys": [f"k{i}" for i in range(100000)]},
    {"op": "cache_del", "tenant": T, "keys": ["k"], "tags": ["x"], "fill_only": True},
    {"op": "cache_del", "tenant": T, "keys": ["k"], "fill_only": 1},
    {"op": "check_get", "tenant": T, "key": "k"},
    {"op": "check_get", "tenant": T, "key": "k", "cache_key": ""},
    {"op": "check_get", "tenant": T, "key": "k", "cache_key": "c", "fill_ms": 2**40},
    {"op": "release", "tenant": T, "key": "k"},
    {"op": "release", "tenant": T, "lease": "0" * 32},
    {"op": "release", "tenant": T, "key": "k", "lease": b"0" * 32},
]


@check
def each_kind_of_bad_field_is_bad_request_with_the_requests_id(path: str) -> None:
    c = Conn(path)
    for i, req in enumerate(BAD_REQUESTS, start=100):
        expect_error(c, {**req, "id": i}, "bad_request")
    ping(c)


@check
def missing_op_is_bad_request(path: str) -> None:
    c = Conn(path)
    expect_error(c, {"id": 3}, "bad_request")
    ping(c)


@check
def unknown_op(path: str) -> None:
    c = Conn(path)
    expect_error(c, {"id": 4, "op": "launch"}, "unknown_op")
    ping(c)


@check
def bad_id_gets_id_0_and_keeps_the_connection(path: str) -> None:
    c = Conn(path)
    for bad in ({"op": "hello"}, {"id": "14", "op": "hello"}, {"id": -15, "op": "hello"}, {"id": 1.5, "op": "hello"}):
        c.send(bad)
        r = c.recv()
        assert r is not None and r.get("id") == 0 and error_code(r) == "bad_request", f"{bad} -> {r}"
    ping(c)


@check
def duplicate_field_and_non_string_key_are_bad_request(path: str) -> None:
    c = Conn(path)
    hello = b"\xa2id\x10\xa2op\xa5hello"
    for body in (b"\x83" + hello + b"\xa2op\xa5stats", b"\x83" + hello + b"\x01\x02"):
        c.send_body(body)
        r = c.recv()
        assert r is not None and error_code(r) == "bad_request" and r["id"] in (0, 0x10), r
    ping(c)


# --- frames that cannot be read: id 0, then the connection closes ----------


def nested(depth: int) -> bytes:
    """A request map whose `x` field nests maps `depth` levels deep in all."""
    inner = b"\x80"
    for _ in range(depth - 2):
        inner = b"\x81\xa1x" + inner
    return b"\x83\xa2id\x01\xa2op\xa5hello\xa1x" + inner


FATAL: list[tuple[str, bytes, str]] = [
    ("length over max_frame_bytes", struct.pack(">I", 0xFFFFFFFF), "too_large"),
    ("an array", struct.pack(">I", 3) + b"\x92\x01\x02", "bad_request"),
    ("a string", struct.pack(">I", 3) + b"\xa2hi", "bad_request"),
    ("the reserved byte 0xc1", struct.pack(">I", 1) + b"\xc1", "bad_request"),
    ("a truncated map", struct.pack(">I", 4) + b"\x82\xa2id\x01", "bad_request"),
    ("trailing bytes", struct.pack(">I", 15) + b"\x82\xa2id\x01\xa2op\xa5hello\xc0", "bad_request"),
    ("nesting deeper than 16", struct.pack(">I", len(nested(17))) + nested(17), "bad_request"),
]


@check
def unreadable_frames_get_id_0_and_close_only_their_connection(path: str) -> None:
    bystander = Conn(path)
    for what, data, code in FATAL:
        c = Conn(path)
        c.send_bytes(data)
        r = c.recv()
        assert r is not None, f"{what}: closed without a reply"
        assert r.get("id") == 0 and error_code(r) == code, f"{what}: {r}"
        assert c.recv() is None, f"{what}: the connection stayed open"
        ping(bystander)
    # Nesting of exactly 16 is still a request.
    ok = Conn(path)
    ok.send_body(nested(16))
    r = ok.recv()
    assert r is not None and r.get("ok") is True, f"nesting 16: {r}"


@check
def requests_in_flight_are_answered_before_a_fatal_close(path: str) -> None:
    c = Conn(path)
    c.send_bytes(frame({"id": 5, "op": "hello"}) + struct.pack(">I", 1) + b"\xc1")
    replies = []
    while (r := c.recv()) is not None:
        replies.append(r)
    ids = sorted(r["id"] for r in replies)
    assert ids == [0, 5], replies


# --- pipelining -------------------------------------------------------------


@check
def pipelined_requests_are_all_answered_by_id(path: str) -> None:
    c = Conn(path)
    t = tenant("pipe")
    requests = []
    for i in range(1, 301):
        kind = i % 3
        if kind == 0:
            requests.append({"id": i, "op": "hello"})
        elif kind == 1:
            requests.append({"id": i, "op": "check", "tenant": t, "key": f"k{i}", "cost": 0})
        else:
            requests.append({"id": i, "op": "cache_get", "tenant": t, "key": f"k{i}"})
    c.send(*requests)
    got = {}
    for _ in requests:
        r = c.recv()
        assert r is not None and r.get("ok") is True, r
        assert r["id"] not in got, f"id {r['id']} answered twice"
        got[r["id"]] = r
    assert sorted(got) == list(range(1, 301))
    for i, r in got.items():
        assert ("protocol" in r, "allowed" in r, "hit" in r) == (i % 3 == 0, i % 3 == 1, i % 3 == 2), r


# --- access rules --------------------------------------------------------------

#: `--forbidden-tenant`: a tenant this socket's user may not use (None: not checked).
FORBIDDEN_TENANT: str | None = None
#: `--admin-forbidden`: this socket's user may not use the admin ops.
ADMIN_FORBIDDEN = False


@check
def a_tenant_the_peer_may_not_use_is_forbidden_per_request(path: str) -> None:
    t = FORBIDDEN_TENANT
    if t is None:
        SKIPPED.append("a tenant this user may not use: none named (--forbidden-tenant)")
        return
    c = Conn(path)
    requests: list[dict[str, Any]] = [
        {"op": "check", "tenant": t, "key": "k"},
        {"op": "check", "tenant": t, "key": "k", "cost": 0},
        {"op": "check_get", "tenant": t, "key": "k", "cache_key": "c"},
        {"op": "usage", "tenant": t, "key": "k"},
        {"op": "cache_get", "tenant": t, "key": "k"},
        {"op": "cache_set", "tenant": t, "key": "k", "value": b"v", "ttl_ms": 60000},
        {"op": "cache_del", "tenant": t, "keys": ["k"]},
    ]
    for i, r in enumerate(requests, start=1):
        got = c.ask({"id": i, **r})
        assert error_code(got) == "forbidden", f"{r}: {got}"
    ping(c)  # a refused tenant keeps the connection open
    # Its own tenants are still served on the same connection.
    assert_decision(c.ok({"id": 100, "op": "check", "tenant": tenant("access"), "key": "k"}))


# --- admin ops ---------------------------------------------------------------



@check
def admin_ops_answer_or_are_forbidden(path: str) -> None:
    c = Conn(path)
    t = tenant("admin")
    r = c.ask({"id": 1, "op": "tenant_get", "tenant": t})
    if ADMIN_FORBIDDEN:
        assert r.get("ok") is False and error_code(r) == "forbidden", f"--admin-forbidden, yet: {r}"
    if r.get("ok") is False:
        assert error_code(r) == "forbidden", r
        expect_error(c, {"id": 2, "op": "tenant_list"}, "forbidden")
        SKIPPED.append("admin ops: this socket's user may not use them (got `forbidden`, as specified)")
        return
    assert r["source"] in ("file", "redis", "postgres", "none") and isinstance(r["known"], bool), r
    assert r["known"] is False, f"a fresh tenant is unknown: {r}"
    expect_error(c, {"id": 3, "op": "tenant_get"}, "bad_request")
    if r["source"] in ("file", "redis"):
        listed = c.ok({"id": 4, "op": "tenant_list"})
        assert isinstance(listed["tenants"], list), listed
    if r["source"] != "redis":
        expect_error(c, {"id": 5, "op": "tenant_set", "tenant": t, "plan": "default"}, "bad_request")
        SKIPPED.append(f"tenant_set/tenant_delete success: source is `{r['source']}`, not `redis`")
        return
    expect_error(c, {"id": 6, "op": "tenant_set", "tenant": t, "plan": f"no-such-{RUN}"}, "bad_request")
    c.ok({"id": 7, "op": "tenant_set", "tenant": t, "plan": "default"})
    got = c.ok({"id": 8, "op": "tenant_get", "tenant": t})
    assert got["known"] is True and got["plan"] == "default", got
    assert c.ok({"id": 9, "op": "tenant_delete", "tenant": t})["deleted"] == 1
    assert c.ok({"id": 10, "op": "tenant_delete", "tenant": t})["deleted"] == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the server's Unix socket")
    parser.add_argument(
        "--require-leases",
        action="store_true",
        help=f"fail, not skip, the lease checks if the server has no `{LEASED}` policy",
    )
    parser.add_argument(
        "--forbidden-tenant",
        metavar="TENANT",
        help="a tenant the server's [[access]] rules do not grant this user: every op on it must get `forbidden`",
    )
    parser.add_argument(
        "--admin-forbidden",
        action="store_true",
        help="this user has no admin grant: the admin ops must get `forbidden` (else either outcome passes)",
    )
    args = parser.parse_args()
    global REQUIRE_LEASES, FORBIDDEN_TENANT, ADMIN_FORBIDDEN
    REQUIRE_LEASES = args.require_leases
    FORBIDDEN_TENANT, ADMIN_FORBIDDEN = args.forbidden_tenant, args.admin_forbidden
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn(args.socket)
        except Exception as e:  # an assertion, a timeout, a refused connection: all failures
            failed += 1
            detail = str(e) if isinstance(e, AssertionError) else traceback.format_exc(limit=2)
            print(f"FAIL {fn.__name__}: {detail}")
        else:
            passed += 1
            print(f"ok   {fn.__name__}")
    for s in SKIPPED:
        print(f"skipped: {s}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
