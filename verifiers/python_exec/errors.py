"""Errors raised to the caller (as opposed to statuses, which describe the sandboxed program)."""
from __future__ import annotations


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate executions, and weaker isolation was not explicitly accepted."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, broke its protocol): not the program's fault."""
