"""Regular expressions on model text, under a per-sample deadline.

The policy writes the text the grader's regexes scan, so it can find the input on which one backtracks
(a long whitespace run before one character, thousands of unclosed "\\[", deep nesting) and stall a whole
round on one sample. Every pattern of the in-process grading steps (extraction, normalisation, the fast
paths) is compiled here, with the `regex` engine, whose matching takes a timeout: inside `within(seconds)`
each call gets what is left of the sample's budget, and running out raises GradingTimeout, which the
grader reports as a "timeout" verdict. Outside `within` (the worker process, which is killed from outside)
there is no deadline.

This module mirrors the parts of `re` the grading modules use (`import ... deadline as re`), so patterns
keep their `re` syntax (the `regex` engine's version 0 is `re`-compatible).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import regex

S, I, M = regex.S, regex.I, regex.M
Match = regex.Match


class _Deadline(threading.local):
    until: float | None = None  # per thread: graders run samples on several threads


_local = _Deadline()


class GradingTimeout(Exception):
    """The in-process grading of one sample ran past its deadline."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Every pattern call in this block (this thread) shares one budget of `seconds`."""
    outer = _local.until
    _local.until = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.until = outer


def _remaining() -> float | None:
    until = _local.until
    if until is None:
        return None
    left = until - time.monotonic()
    if left <= 0:
        raise GradingTimeout("the grading of this sample ran past its deadline")
    return left


def _timed(fn, *args, **kwargs):
    try:
        return fn(*args, timeout=_remaining(), **kwargs)
    except TimeoutError:
        raise GradingTimeout("a pattern on the sample's text ran past the deadline") from None


class Pattern:
    """A compiled pattern whose calls take the current deadline (same methods as re.Pattern)."""

    def __init__(self, pattern: str, flags: int = 0):
        self._p = regex.compile(pattern, flags | regex.VERSION0)
        self.pattern = pattern

    def search(self, string: str, pos: int = 0):
        return _timed(self._p.search, string, pos)

    def match(self, string: str, pos: int = 0):
        return _timed(self._p.match, string, pos)

    def fullmatch(self, string: str, pos: int = 0):
        return _timed(self._p.fullmatch, string, pos)

    def finditer(self, string: str) -> list:
        # materialised here, so that the whole scan is under the deadline
        return _timed(lambda timeout: list(self._p.finditer(string, timeout=timeout)))

    def findall(self, string: str) -> list:
        return _timed(self._p.findall, string)

    def sub(self, repl, string: str, count: int = 0) -> str:
        return _timed(self._p.sub, repl, string, count)


def compile(pattern: str, flags: int = 0) -> Pattern:  # noqa: A001 - mirrors re.compile
    return Pattern(pattern, flags)


def match(pattern: str, string: str, flags: int = 0):
    return _cached(pattern, flags).match(string)


def fullmatch(pattern: str, string: str, flags: int = 0):
    return _cached(pattern, flags).fullmatch(string)


def search(pattern: str, string: str, flags: int = 0):
    return _cached(pattern, flags).search(string)


def findall(pattern: str, string: str, flags: int = 0) -> list:
    return _cached(pattern, flags).findall(string)


def sub(pattern: str, repl, string: str, count: int = 0, flags: int = 0) -> str:
    return _cached(pattern, flags).sub(repl, string, count)


_patterns: dict[tuple[str, int], Pattern] = {}


def _cached(pattern: str, flags: int) -> Pattern:
    key = (pattern, flags)
    if key not in _patterns:
        _patterns[key] = Pattern(pattern, flags)
    return _patterns[key]
