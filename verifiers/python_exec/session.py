"""Notebook-style execution for the tool calls of one trajectory.

Design: one long-lived sandboxed interpreter per session. Cells run in one namespace, so variables,
functions and imports persist, and a trajectory pays the sandbox start-up (~30 ms) and `import sympy`
(0.4-1 s here) once instead of at every tool call. The alternative -- replaying all earlier cells in a fresh
process at each call, as M-DPO does -- costs quadratic execution over a trajectory and repeats side effects
(output, files, randomness), so it was rejected.

Each cell has its own wall-clock limit. When a cell ends the interpreter (timeout, crash, memory or
output limit, os._exit), the result says so (reset=True, plus a note in stderr that the model reads) and
a fresh interpreter is started for the next cell: earlier definitions are lost, not silently replayed.
"""
from __future__ import annotations

import threading
from dataclasses import replace

from .errors import SandboxError
from .inputs import refuse_oversize
from .interpreter import SandboxedInterpreter
from .limits import Limits
from .outcome import classify
from .result import ExecResult

RESET_NOTE = ("[sandbox] The Python interpreter was restarted after this cell: variables, functions and "
              "imports from earlier cells are gone.")
LOST_NOTE = ("[sandbox] The Python interpreter had stopped between cells and was restarted before this one: "
             "variables, functions and imports from earlier cells are gone.")


class Session:
    def __init__(self, *, timeout_s: float = 10, memory_mb: int = 1024, max_output_bytes: int = 1 << 20,
                 echo: bool = True):
        """timeout_s applies to each cell; echo prints the repr of a cell's trailing expression."""
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self.echo = echo
        self.cells = 0
        self.restarts = 0
        self._lock = threading.Lock()  # one cell at a time: they share one interpreter
        self._closed = False
        self._interpreter: SandboxedInterpreter | None = SandboxedInterpreter(self.limits, one_shot=False)
        self._cells_here = 0  # cells run in the current interpreter (its state)

    def run(self, code: str, *, stdin: str = "", timeout_s: float | None = None) -> ExecResult:
        """Execute one cell; its stdout (plus the trailing expression's repr), stderr and status."""
        limits = self.limits if timeout_s is None else replace(self.limits, timeout_s=timeout_s)
        blocked = refuse_oversize(code=code, stdin=stdin)
        if blocked is not None:
            return blocked
        with self._lock:
            if self._closed:
                raise SandboxError("Session.run() after close(): start a new Session")
            lost = False  # the interpreter died while idle (killed from outside) with state in it: the cell says so
            if self._interpreter is None or not self._interpreter.alive:  # e.g. its start-up failed last time
                if self._interpreter is not None:
                    lost = self._cells_here > 0
                    self._interpreter.close()
                self._interpreter = SandboxedInterpreter(self.limits, one_shot=False)
                self._cells_here = 0
                self.restarts += lost
            self.cells += 1
            self._cells_here += 1
            interpreter = self._interpreter
            report = interpreter.execute(code, stdin=stdin, filename=f"<cell {self.cells}>", echo=self.echo,
                                         final=False, timeout_s=limits.timeout_s)
            result = classify(report, limits, via_bwrap=interpreter.via_bwrap)
            if lost:
                result = result.with_reset(LOST_NOTE)
            if not interpreter.alive:
                self.restarts += 1
                self._interpreter = None
                interpreter.close()
                # Start the replacement now, so its start-up overlaps whatever the caller does next.
                self._interpreter = SandboxedInterpreter(self.limits, one_shot=False)
                self._cells_here = 0
                result = result.with_reset(RESET_NOTE)
            return result

    def close(self) -> None:
        """Kill the interpreter and free its resources. Idempotent."""
        with self._lock:
            self._closed = True
            interpreter, self._interpreter = self._interpreter, None
        if interpreter is not None:
            interpreter.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
