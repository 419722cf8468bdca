"""Protocol v1 framing: a 4-byte big-endian length, then one MessagePack map.

Maps are encoded in insertion order, integers in their smallest form,
``str`` as MessagePack str and ``bytes`` as bin — exactly what the daemon
writes (the golden frames in ``tests/fixtures/frames.json`` check this).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Union

import msgpack

from .errors import InvalidArgument, ProtocolViolation

_LENGTH = struct.Struct(">I")

#: The daemon's default ``max_frame_bytes``.
DEFAULT_MAX_FRAME_BYTES = 1 << 20
#: Replies larger than this are treated as a broken stream.
DEFAULT_MAX_REPLY_BYTES = 64 << 20


#: A frame body: a view of the bytes received where possible.
Body = Union[bytes, bytearray, memoryview]


# msgpack >= 1.0's defaults are the protocol's: use_bin_type=True to pack,
# raw=False and strict_map_key=True to unpack. Keyword arguments cost more
# than the packing of a small map, so none are passed.


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message)
    return _LENGTH.pack(len(body)) + body


def request_frame(request: dict[str, Any], req_id: int, max_frame_bytes: int) -> bytes:
    """The frame of a request map, with its ``id`` set; InvalidArgument if it cannot be sent."""
    request["id"] = req_id
    try:
        frame = encode_frame(request)
    except UnicodeEncodeError as e:  # a lone surrogate in some string
        raise InvalidArgument(f"a string that is not valid UTF-8 text: {e}") from None
    if len(frame) - 4 > max_frame_bytes:
        raise InvalidArgument(f"a {len(frame) - 4}-byte request is over max_frame_bytes ({max_frame_bytes})")
    return frame


def decode_body(body: Body) -> dict[str, Any]:
    """One frame body as a dict; anything but a single map with str keys is a violation."""
    try:
        value = msgpack.unpackb(body)
    except (ValueError, TypeError, msgpack.UnpackException) as e:  # msgpack's (not all UnpackException)
        # Not Exception: a signal handler's exception raised as unpackb returns is the caller's.
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

    def feed(self, data: bytes) -> list[Body]:
        """Adds received bytes; returns the bodies of the frames now complete.

        The bodies are views of the bytes received (no copy); only a partial
        frame is kept (copied), until the rest arrives.
        """
        buffered = self._buf
        if buffered:
            buffered += data
            chunk: bytes | bytearray = buffered
        else:
            chunk = data
        bodies: list[Body] = []
        pos = 0
        end = len(chunk)
        with memoryview(chunk) as view:
            while end - pos >= 4:
                (n,) = _LENGTH.unpack_from(chunk, pos)
                if n > self._max:
                    raise ProtocolViolation(f"a {n}-byte frame (the limit is {self._max})")
                if end - pos - 4 < n:
                    break
                bodies.append(view[pos + 4 : pos + 4 + n])
                pos += 4 + n
            if pos == end:
                self._buf = bytearray()
            elif pos or chunk is not buffered:
                # A new buffer: the one the bodies view must not change under them.
                self._buf = bytearray(view[pos:])
            # else: a frame still incomplete, the buffer keeps growing (no body views it)
        return bodies
