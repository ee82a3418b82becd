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


# What runner.serve answers to a cell. The program shares the runner's process, so it can find the request's
# id and write a frame of its own: every field is checked here, and a frame that runner.py would never send
# is a protocol violation (the grading fails), never a KeyError or TypeError in the host.
CELL_KINDS = frozenset({"ok", "exit", "exception", "memory"})
CALL_KINDS = frozenset({"value", "raised", "invalid"})


def malformed_reply(frame: dict, *, call: bool, callables: bool) -> str | None:
    """Why `frame` (a reply carrying the request's id) is not one runner.py sends, or None when it is."""
    kind = frame.get("kind")
    if call:
        return None if type(kind) is str and kind in CALL_KINDS else f"a call reply of kind {kind!r:.40}"
    if not (type(kind) is str and kind in CELL_KINDS):
        return f"a cell reply of kind {kind!r:.40}"
    code = frame.get("exit_code")
    if type(code) is not int or not -(1 << 31) <= code < 1 << 31:
        return f"a cell reply with exit code {code!r:.40}"
    if callables and type(frame.get("callables")) is not list:
        return "a cell reply without the list of the program's functions"
    return None
