"""The codec agrees byte for byte with the daemon's (tests/fixtures/frames.json)."""

from __future__ import annotations

from typing import Any

import pytest

from quotad import _requests
from quotad._codec import FrameReader, decode_body, encode_frame, request_frame


def from_json(value: Any) -> Any:
    """The fixture's JSON form to Python: {"$bin": hex} is bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def test_fixture_is_not_empty(golden_frames: list[dict[str, Any]]) -> None:
    names = {f["name"] for f in golden_frames}
    assert {"hello_request", "check_get_reply_allowed_hit", "error_reply_fatal_frame"} <= names
    assert len(golden_frames) >= 20


def test_every_frame_decodes_and_reencodes(golden_frames: list[dict[str, Any]]) -> None:
    for frame in golden_frames:
        raw = bytes.fromhex(frame["hex"])
        bodies = FrameReader().feed(raw)
        assert len(bodies) == 1, frame["name"]
        decoded = decode_body(bodies[0])
        expected = from_json(frame["value"])
        assert decoded == expected, frame["name"]
        assert list(decoded) == list(expected), f"{frame['name']}: key order"
        assert encode_frame(decoded) == raw, frame["name"]


def test_fill_only_delete_is_sent_as_the_daemon_encodes_it(golden_frames: list[dict[str, Any]]) -> None:
    golden = next(f for f in golden_frames if f["name"] == "cache_del_fill_only_request")
    req = _requests.cache_del("acme", ["GET /items?page=2"], None, fill_only=True)
    assert request_frame(req, 8, 1 << 20) == bytes.fromhex(golden["hex"])
    assert "fill_only" not in _requests.cache_del("acme", ["GET /items?page=2"], None)  # sent only when true


def test_reader_handles_frames_split_anywhere(golden_frames: list[dict[str, Any]]) -> None:
    stream = b"".join(bytes.fromhex(f["hex"]) for f in golden_frames)
    for chunk in (1, 3, 7, 64):
        reader = FrameReader()
        bodies = []
        for i in range(0, len(stream), chunk):
            bodies += reader.feed(stream[i : i + chunk])
        assert [decode_body(b) for b in bodies] == [from_json(f["value"]) for f in golden_frames]


def test_reader_refuses_oversized_frame() -> None:
    from quotad import ProtocolViolation

    with pytest.raises(ProtocolViolation):
        FrameReader(max_frame_bytes=16).feed(b"\x00\x00\x00\x11")


def test_non_map_body_is_a_violation() -> None:
    from quotad import ProtocolViolation

    with pytest.raises(ProtocolViolation):
        decode_body(b"\x93\x01\x02\x03")  # an array
    with pytest.raises(ProtocolViolation):
        decode_body(b"\xc1")


def test_every_error_code_has_its_exception(golden_frames: list[dict[str, Any]]) -> None:
    from quotad import SourceUnavailable
    from quotad.errors import ServerError, server_error

    errors = [f["value"]["error"] for f in golden_frames if f["name"].startswith("error_reply_")]
    assert "unavailable" in {e["code"] for e in errors}
    for e in errors:
        exc = server_error(e)
        assert type(exc) is not ServerError and exc.code == e["code"], e
    assert isinstance(server_error({"code": "unavailable", "message": "Redis: down"}), SourceUnavailable)


def test_a_check_reply_with_a_lease_and_the_other_v1_additions_is_read(golden_frames: list[dict[str, Any]]) -> None:
    from quotad import Decision, ProtocolViolation

    golden = next(f for f in golden_frames if f["name"] == "check_reply_allowed_lease")
    d = Decision.from_reply(decode_body(FrameReader().feed(bytes.fromhex(golden["hex"]))[0]))
    assert d.allowed and d.lease == "0123456789abcdef0123456789abcdef" and d.rule == "inflight"
    assert (d.kind, d.window_ms, d.shadow_denied) == ("concurrency", 0, False)
    plain = next(f for f in golden_frames if f["name"] == "check_reply_allowed")
    p = Decision.from_reply(decode_body(FrameReader().feed(bytes.fromhex(plain["hex"]))[0]))
    assert (p.lease, p.kind, p.window_ms, p.shadow_denied, p.shadow_rule) == (None, "token_bucket", 2000, False, None)
    every = next(f for f in golden_frames if f["name"] == "check_reply_allowed_lease_shadow_denied")
    m = Decision.from_reply(decode_body(FrameReader().feed(bytes.fromhex(every["hex"]))[0]))
    assert (m.lease, m.kind, m.window_ms, m.shadow_denied, m.shadow_rule) == (d.lease, "concurrency", 0, True, "daily")
    assert list(every["value"])[9:] == ["kind", "window_ms", "lease", "shadow_denied", "shadow_rule"]
    for bad in ({"lease": 7}, {"window_ms": "0"}, {"shadow_rule": 1}, {"kind": b"x"}):
        with pytest.raises(ProtocolViolation):
            Decision.from_reply({**golden["value"], **bad})


def test_release_is_sent_as_the_daemon_encodes_it(golden_frames: list[dict[str, Any]]) -> None:
    golden = next(f for f in golden_frames if f["name"] == "release_request")
    req = _requests.release("acme", "user:42", "0123456789abcdef0123456789abcdef", "api")
    assert request_frame(req, 16, 1 << 20) == bytes.fromhex(golden["hex"])
