"""Host side of the control-pipe protocol with runner.py: length-prefixed frames, marshal to the sandbox
(the same interpreter reads it, without importing json), JSON back (parsed safely: the program can write it)."""
from __future__ import annotations

import json
import marshal
import struct

from .errors import SandboxError


class ProtocolViolation(SandboxError):
    """The reply pipe carried something runner.py never sends: the program wrote to it."""

HEADER = struct.Struct(">I")
# Replies are a few dozen bytes (a call's result in code grading may be larger: its limit is the output
# cap); the program can write to the reply pipe too, so never trust a length header enough to buffer gigabytes.
MAX_REPLY_BYTES = 64 << 10


def encode(obj: dict) -> bytes:
    body = marshal.dumps(obj)
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes from the reply pipe and yields complete frames."""

    def __init__(self, max_bytes: int = MAX_REPLY_BYTES) -> None:
        self._buffer = bytearray()
        self.max_bytes = max_bytes

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self.max_bytes:
                raise ProtocolViolation(f"the sandbox sent a {size}-byte reply frame (limit {self.max_bytes}): "
                                        "the program wrote to the control pipe")
            if len(self._buffer) < HEADER.size + size:
                break
            body = bytes(self._buffer[HEADER.size:HEADER.size + size])
            del self._buffer[:HEADER.size + size]
            try:
                frame = json.loads(body.decode("utf-8"))
            # ValueError: also an integer literal past Python's digit limit; RecursionError: deep nesting.
            except (ValueError, RecursionError) as exc:
                raise ProtocolViolation(f"the sandbox sent an unreadable reply frame: {exc}") from exc
            if not isinstance(frame, dict):
                raise ProtocolViolation(f"the sandbox sent a reply that is not an object: {frame!r:.100}")
            frames.append(frame)
        return frames
