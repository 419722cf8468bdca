"""Protocol v1 framing: a 4-byte big-endian length, then one MessagePack map.

Maps are encoded in insertion order, integers in their smallest form,
``str`` as MessagePack str and ``bytes`` as bin — exactly what the daemon
writes (the golden frames in ``tests/fixtures/frames.json`` check this).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from .errors import ProtocolViolation

_LENGTH = struct.Struct(">I")

#: The daemon's default ``max_frame_bytes``.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
#: Replies larger than this are treated as a broken stream.
DEFAULT_MAX_REPLY_BYTES = 64 << 20


def encode_body(message: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return body


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = encode_body(message)
    return _LENGTH.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    """One frame body as a dict; anything but a single map with str keys is a violation."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolViolation(f"undecodable frame: {e}") from e
    # strict_map_key admits only str (and bin) keys.
    if type(value) is not dict:
        raise ProtocolViolation("a frame that is not a map")
    return value


class FrameReader:
    """Cuts a byte stream into frame bodies, holding at most one partial frame."""

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Adds received bytes; returns the bodies of the frames now complete."""
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (n,) = _LENGTH.unpack_from(buf, pos)
            if n > self._max:
                raise ProtocolViolation(f"a {n}-byte frame (the limit is {self._max})")
            if end - pos - 4 < n:
                break
            bodies.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return bodies
