"""Checks on what callers pass in: programming errors raise, oversized model output is refused (blocked)."""
from __future__ import annotations

from .limits import MAX_CODE_BYTES, MAX_STDIN_BYTES
from .result import ExecResult


def refuse_oversize(**texts: str) -> ExecResult | None:
    """A `blocked` result when any text is too large to run, else None. Raises TypeError for non-strings."""
    for name, text in texts.items():
        if not isinstance(text, str):
            raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    for name, text in texts.items():
        limit = MAX_STDIN_BYTES if name == "stdin" else MAX_CODE_BYTES
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            return ExecResult("blocked", "", "", 0.0, None, False, f"{name} is {size} bytes, over the {limit}-byte limit")
    return None
