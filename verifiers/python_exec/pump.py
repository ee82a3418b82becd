"""The host's I/O loop with one sandboxed process: feeds the request, collects output and replies.

One thread, one selector, no blocking call: the loop ends at the reply (or process exit), at the deadline,
or when output passes its cap -- whichever comes first. It never waits for EOF on stdout/stderr, because a
daemonised child of the program may hold those pipes open forever; once the process has exited or replied,
whatever is already in the pipes is drained without waiting for more.
"""
from __future__ import annotations

import os
import selectors
import time
from dataclasses import dataclass, field
from typing import Callable

from .framing import FrameReader, ProtocolViolation

_CHUNK = 1 << 16
_POLL_S = 0.02  # only without a pidfd: how often to check whether the process has exited


@dataclass
class Collected:
    """What one exchange gathered."""

    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    frames: list[dict] = field(default_factory=list)
    exited: bool = False
    timed_out: bool = False
    output_exceeded: bool = False
    violation: str = ""
    ended_before: bool = False  # the process had ended before this exchange began: nothing was sent
    room: tuple[int, int] | None = None  # bytes stdout and stderr may still hold (None: the pump's cap each)


class Pump:
    """I/O state with one process that outlives single exchanges (a Session's cells share the pipes)."""

    def __init__(self, *, stdout_fd: int, stderr_fd: int, reply_fd: int, request_fd: int, pidfd: int | None,
                 has_exited: Callable[[], bool], max_output_bytes: int, max_frame_bytes: int | None = None):
        self._streams = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self._reply_fd, self._request_fd, self._pidfd = reply_fd, request_fd, pidfd
        self._open = {stdout_fd, stderr_fd, reply_fd}
        self._has_exited = has_exited
        self._cap = max_output_bytes
        self._frames = FrameReader() if max_frame_bytes is None else FrameReader(max_frame_bytes)
        for fd in (stdout_fd, stderr_fd, reply_fd, request_fd):
            os.set_blocking(fd, False)

    def exchange(self, payload: bytes, done: Callable[[Collected], bool], deadline: float,
                 got: Collected | None = None, room: tuple[int, int] | None = None) -> Collected:
        """Send `payload`, then collect until done(collected) or the process exits; stops at the deadline.
        `got` continues an earlier exchange of the same cell (output caps count over both); `room` is
        what is left of a cap shared with earlier exchanges (stdout, stderr bytes)."""
        got = Collected(room=room) if got is None else got
        with selectors.DefaultSelector() as selector:
            for fd in self._open:
                selector.register(fd, selectors.EVENT_READ)
            if self._pidfd is not None:
                selector.register(self._pidfd, selectors.EVENT_READ)
            if payload:
                selector.register(self._request_fd, selectors.EVENT_WRITE)
            while not (got.exited or got.output_exceeded or got.violation or done(got)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got.timed_out = True
                    break
                wait = remaining if self._pidfd is not None else min(remaining, _POLL_S)
                for key, _ in selector.select(wait):
                    if key.fd == self._request_fd:
                        payload = self._write(payload, selector)
                    elif key.fd == self._pidfd:
                        got.exited = True
                    else:
                        self._read(key.fd, got, selector)
                if self._pidfd is None and self._has_exited():
                    got.exited = True
        if got.exited or done(got):
            self._drain(got)
        return got

    def _write(self, payload: bytes, selector: selectors.BaseSelector) -> bytes:
        try:
            payload = payload[os.write(self._request_fd, payload):]
        except BrokenPipeError:
            payload = b""  # the interpreter is gone; its exit is what the caller will see
        if not payload:
            selector.unregister(self._request_fd)
        return payload

    def _read(self, fd: int, got: Collected, selector: selectors.BaseSelector | None) -> bool:
        """Read one chunk; False when nothing is available right now."""
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self._open.discard(fd)
            if selector is not None:
                selector.unregister(fd)
            return False
        if fd == self._reply_fd:
            try:
                got.frames += self._frames.feed(data)
            except ProtocolViolation as exc:
                got.violation = str(exc)
            return True
        stream = self._streams[fd]
        buffer = got.stdout if stream == "stdout" else got.stderr
        cap = self._cap if got.room is None else got.room[stream == "stderr"]
        room = max(cap - len(buffer), 0)
        buffer += data[:room]
        if len(data) > room:
            got.output_exceeded = True
        return True

    def _drain(self, got: Collected) -> None:
        """Take what is already in the pipes (written before the reply/exit), without waiting for more."""
        for fd in list(self._open):
            while fd in self._open and not got.output_exceeded and self._read(fd, got, None):
                pass
