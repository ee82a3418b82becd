"""What one execution produced: the record every caller (tool observations, code grading) consumes."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

# ok: ran to the end and exited 0.  error: the program failed on its own (exception, non-zero exit).
# timeout: stopped by the wall-clock (or CPU-time) limit.  killed: stopped by another limit (memory,
# output size, file size) or by a signal such as SIGSEGV.  blocked: refused before running (input
# over the size limits); nothing was executed.
Status = Literal["ok", "error", "timeout", "killed", "blocked"]


@dataclass(frozen=True)
class ExecResult:
    status: Status
    stdout: str
    stderr: str
    duration_s: float
    exit_code: int | None = None  # the program's exit code; -N when a signal N ended it; None when we stopped it
    truncated: bool = False  # stdout or stderr was cut at the output limit
    reason: str = ""  # one line saying why the status is not ok (empty when ok)
    reset: bool = False  # Session only: the interpreter died with this cell; earlier definitions are gone

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def with_reset(self, note: str) -> "ExecResult":
        """The same result, marked as having lost the session state, with a note the model can read."""
        stderr = self.stderr if self.stderr.endswith("\n") or not self.stderr else self.stderr + "\n"
        return replace(self, reset=True, stderr=stderr + note + "\n")
