"""Single executions: a program run once (`run`), and a program graded by its tests (`run_tests`)."""
from __future__ import annotations

import keyword
import time

from .inputs import refuse_oversize
from .interpreter import SandboxedInterpreter
from .limits import Limits
from .outcome import classify
from .result import ExecResult


def run(code: str, *, timeout_s: float = 10, memory_mb: int = 1024, stdin: str = "",
        max_output_bytes: int = 1 << 20) -> ExecResult:
    """Run `code` like `python main.py` in a fresh sandbox, with `stdin` as its standard input.
    duration_s is the program's wall time (sandbox start-up excluded)."""
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    blocked = refuse_oversize(code=code, stdin=stdin)
    if blocked is not None:
        return blocked
    with SandboxedInterpreter(limits, one_shot=True) as interpreter:
        report = interpreter.execute(code, stdin=stdin, filename="main.py", echo=False, final=True,
                                     timeout_s=timeout_s)
        return classify(report, limits, via_bwrap=interpreter.via_bwrap)


def run_tests(program: str, tests: str, *, entry_point: str | None = None, timeout_s: float = 10,
              memory_mb: int = 1024, max_output_bytes: int = 1 << 20) -> ExecResult:
    """HumanEval-style grading in one sandbox: the program, then the tests (which define check(candidate)),
    then check(entry_point). Status ok only if all of them ran to completion: a program that exits early
    (sys.exit(0), os._exit(0)) or prints a fake success does not pass. timeout_s covers all three."""
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()
                                        and not keyword.iskeyword(entry_point)):
        raise ValueError(f"entry_point={entry_point!r} is not a Python identifier: pass the tested function's name")
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    blocked = refuse_oversize(program=program, tests=tests)
    if blocked is not None:
        return blocked
    cells = [("solution.py", program, "program"), ("tests.py", tests, "tests")]
    if entry_point is not None:
        cells.append(("check.py", f"check({entry_point})", "check"))
    deadline = time.monotonic() + timeout_s
    results: list[ExecResult] = []
    with SandboxedInterpreter(limits, one_shot=False) as interpreter:
        for filename, code, role in cells:
            report = interpreter.execute(code, stdin="", filename=filename, echo=False, final=False,
                                         timeout_s=max(deadline - time.monotonic(), 0.001))
            result = classify(report, limits, via_bwrap=interpreter.via_bwrap)
            results.append(result)
            completed = report.reply is not None and report.reply["kind"] == "ok"
            if not (result.ok and completed):
                return _combine(results, _failure(result, role))
    return _combine(results, ("ok", ""))


def _failure(result: ExecResult, role: str) -> tuple[str, str]:
    if result.ok:  # finished with exit code 0, but by sys.exit()/os._exit() instead of running to the end
        return "error", f"the {role} exited before the tests completed"
    last_line = result.stderr.strip().splitlines()[-1:] or [result.reason]
    return result.status, f"{role} failed: {last_line[0][:200]}" if result.status == "error" else f"{role}: {result.reason}"


def _combine(results: list[ExecResult], verdict: tuple[str, str]) -> ExecResult:
    status, reason = verdict
    last = results[-1]
    return ExecResult(status, "".join(r.stdout for r in results), "".join(r.stderr for r in results),
                      sum(r.duration_s for r in results), last.exit_code if status != "ok" else 0,
                      any(r.truncated for r in results), reason)
