"""Single executions: a program run once (`run`), and a program graded by its tests (`run_tests`).

Code grading is adversarial: the policy is trained on these verdicts, so any way for a wrong program to pass
gets found and reinforced. Sharing a process with the tests cannot be made safe: the program can rebind the
builtins and modules the harness calls (exec, compile, print, __import__, sys, os, the reply pipe), return
objects whose __eq__ is always true (a subclass of int or str, a proxy), or patch the harness through gc
and frames. So `run_tests` uses two sandboxes that share nothing:

- the *solution* sandbox runs the program, then serves calls of its functions; every result leaves it
  encoded as a plain value, and the host decodes it itself (values.decode): only genuine None, bool, int,
  float, complex, str, bytes, list, tuple, dict, set and frozenset come out, so no rigged comparison
  reaches the tests (EvalPlus compares plain values for the same reason);
- the *checker* sandbox runs the tests, with the tested function (and, for tests that name them, the
  program's other top-level functions, never a builtin's name) bound to proxies whose calls go through
  the host. The tests' own helpers come with the tests (for HumanEval, the prompt's code precedes the test),
  so the program cannot replace them either.

The verdict is the checker's: ok only when its check cell ran to completion. Whatever the program does to
its own interpreter (exits, atexit, excepthooks, trace hooks, signals, threads, writes to any file
descriptor, forged reply frames) can only change the values it answers with, or end the grading as a
failure. Exceptions the function raises reach the tests as the nearest genuine builtin class they derive from
(a program's own class named ValueError is not ValueError), except control-flow ones (StopIteration would
silently end a test's map() or loop): those, and BaseException-only ones, fail the grading.

Arguments cross by value, and what the call did to them comes back: the checker's proxy writes the arguments
as the call left them into the tests' own objects, and a returned argument is the tests' own object, so
mutation and `is` checks hold (runner.make_proxy). What this gives up: results must be plain values (a
generator or a custom object fails, as in EvalPlus), and identity below the top level and aliasing between
arguments are not carried (docs/verifiers.md). Output is capped once per grading, over all calls. All 164
HumanEval canonical solutions pass (tests/test_code_grading.py).
"""
from __future__ import annotations

import builtins
import contextlib
import keyword
import threading
import time
from collections.abc import Iterator

from . import values
from .errors import SandboxError
from .inputs import refuse_oversize
from .interpreter import SandboxedInterpreter
from .isolation import detect
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
    """HumanEval-style grading: `tests` define check(candidate); check(entry_point) must run to completion.
    Tests that call check themselves (entry_point None) may name any function of the program.
    timeout_s covers the whole grading. See the module docstring for why a program cannot game it."""
    if entry_point is not None and not (isinstance(entry_point, str) and entry_point.isidentifier()
                                        and not keyword.iskeyword(entry_point)):
        raise ValueError(f"entry_point={entry_point!r} is not a Python identifier: pass the tested function's name")
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    blocked = refuse_oversize(program=program, tests=tests)
    if blocked is not None:
        return blocked
    deadline = time.monotonic() + timeout_s
    results: list[ExecResult] = []
    # One output cap per stream for the whole grading, not per call: a program whose many calls each print
    # just under the cap must not make the host hold hundreds of megabytes.
    used = [0, 0]

    def remaining() -> float:
        return max(deadline - time.monotonic(), 0.001)

    def room() -> tuple[int, int]:
        return max(limits.max_output_bytes - used[0], 0), max(limits.max_output_bytes - used[1], 0)

    def spent(report) -> None:
        used[0] += len(report.collected.stdout)
        used[1] += len(report.collected.stderr)

    with _CHECKERS.lend(limits) as checker, SandboxedInterpreter(limits, one_shot=False) as solution:
        report = solution.execute(program, stdin="", filename="solution.py", echo=False, final=False,
                                  timeout_s=remaining(), report_callables=True)
        spent(report)
        result = classify(report, limits, via_bwrap=solution.via_bwrap)
        results.append(result)
        if not (result.ok and report.reply is not None and report.reply["kind"] == "ok"):
            return _combine(results, _failure(result, "program"), limits)
        names = _function_names(report.reply)
        proxies = {name: name for name in names}
        if entry_point is not None:
            proxies[_CANDIDATE] = entry_point

        def on_call(frame: dict) -> dict:
            name, args, kwargs = _checked_call(frame, set(proxies.values()))
            report = solution.call(name, args, kwargs, timeout_s=remaining(), output_room=room())
            spent(report)
            answer, failure = _answer(report, limits, solution.via_bwrap, args, kwargs)
            if failure is not None:
                results.append(failure)
                raise _CandidateFailed(_failure(failure, "program"))
            results.append(ExecResult("ok", _text(report.collected.stdout), _text(report.collected.stderr),
                                      report.duration_s))
            return answer

        cells = [("tests.py", tests, proxies)]
        if entry_point is not None:
            # The tests may also name the tested function (HumanEval/33 compares with `sort_third(...)`): that
            # name means the solution's, not the prompt's stub that the tests' own code defined.
            cells.append(("check.py", f"{entry_point} = {_CANDIDATE}\ncheck({_CANDIDATE})", None))
        for filename, code, bind in cells:
            try:
                report = checker.execute(code, stdin="", filename=filename, echo=False, final=False,
                                         timeout_s=remaining(), proxies=bind, on_call=on_call,
                                         fresh=filename == "tests.py", output_room=room())
            except _CandidateFailed as failed:
                return _combine(results, failed.verdict, limits)
            spent(report)
            result = classify(report, limits, via_bwrap=checker.via_bwrap)
            results.append(result)
            if not (result.ok and report.reply is not None and report.reply["kind"] == "ok"):
                role = "check" if filename == "check.py" else "tests"
                return _combine(results, _failure(result, role), limits)
    return _combine(results, ("ok", ""), limits)


class _CheckerPool:
    """Idle checker sandboxes, reused across gradings: a checker only ever runs the tests (trusted) and
    receives plain values, so no program can leave anything in it; each grading starts in a fresh
    namespace. Saves one sandbox start-up per grading. A checker that was killed (timeout, output flood,
    the solution failing mid-call) is not reused."""

    MAX_IDLE = 16

    def __init__(self) -> None:
        self._idle: dict[Limits, list[SandboxedInterpreter]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self, limits: Limits) -> Iterator[SandboxedInterpreter]:
        checker = self.take(limits)
        try:
            yield checker
        finally:
            self.give_back(checker)

    def take(self, limits: Limits) -> SandboxedInterpreter:
        with self._lock:
            idle = self._idle.get(limits, [])
            while idle:
                checker = idle.pop()
                if checker.alive:
                    return checker
                checker.close()
        return SandboxedInterpreter(limits, one_shot=False)

    def give_back(self, checker: SandboxedInterpreter) -> None:
        with self._lock:
            idle = self._idle.setdefault(checker.limits, [])
            if checker.alive and checker.isolation is detect() and len(idle) < self.MAX_IDLE:
                idle.append(checker)
                return
        checker.close()

    def close_idle(self) -> None:
        with self._lock:
            idle = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for checker in idle:
            checker.close()


_CHECKERS = _CheckerPool()


def close_idle_checkers() -> None:
    """Stop the checker sandboxes kept for reuse by run_tests (they also stop when this process exits)."""
    _CHECKERS.close_idle()


_CANDIDATE = "__ratchet_candidate__"


class _CandidateFailed(Exception):
    def __init__(self, verdict: tuple[str, str]):
        super().__init__(verdict[1])
        self.verdict = verdict


def _function_names(reply: dict) -> list[str]:
    """The program's top-level functions that the tests may call by name (as reported from inside the
    solution's sandbox, so checked): identifiers only, and never a builtin's name, which the tests must keep."""
    names = reply.get("callables")
    if type(names) is not list:
        raise SandboxError(f"the solution's sandbox did not report its functions: {reply!r:.200}")
    return [n for n in names[:10_000] if type(n) is str and n.isidentifier() and not keyword.iskeyword(n)
            and not n.startswith("__") and not hasattr(builtins, n)]


def _checked_call(frame: dict, allowed: set[str]) -> tuple[str, tuple, dict]:
    """The checker's call frame (trusted code, but parsed as strictly as any frame)."""
    try:
        name = frame["call"]
        args, kwargs = values.decode(frame["args"]), values.decode(frame["kwargs"])
    except (KeyError, values.NotPlainValue) as exc:
        raise SandboxError(f"the checker sent a malformed call frame: {exc}") from None
    if name not in allowed or type(args) is not tuple or type(kwargs) is not dict:
        raise SandboxError(f"the checker sent a malformed call frame: {frame!r:.200}")
    return name, args, kwargs


def _answer(report, limits: Limits, via_bwrap: bool, args: tuple = (), kwargs: dict | None = None
            ) -> tuple[dict | None, ExecResult | None]:
    """The checker's answer to one call, or the result that ends the grading (the solution died, timed out,
    sent something that is not a plain value, or raised something the tests must not see). With it go the
    arguments as the call left them and which argument the function returned, if it returned one: the
    checker's proxy applies both to the tests' own objects (runner.make_proxy)."""
    kwargs = {} if kwargs is None else kwargs
    reply, got = report.reply, report.collected
    if reply is None or got.timed_out or got.output_exceeded or got.violation:  # a reply, but the process was killed
        return None, classify(report, limits, via_bwrap=via_bwrap)
    stdout, stderr = _text(report.collected.stdout), _text(report.collected.stderr)

    def fail(reason: str) -> tuple[None, ExecResult]:
        return None, ExecResult("error", stdout, stderr, report.duration_s, None, False, reason)

    if reply.get("kind") == "value":
        try:
            answer = {"value": values.decode(reply.get("value"))}
            if "args_after" in reply:
                after, kw_after = values.decode(reply.get("args_after")), values.decode(reply.get("kwargs_after"))
                if not (type(after) is tuple and len(after) == len(args) and type(kw_after) is dict
                        and kw_after.keys() == kwargs.keys()):
                    raise values.NotPlainValue("the arguments after the call do not match the call")
                answer.update(args_after=after, kwargs_after=kw_after)
            same = reply.get("same_as")
            if same is not None:
                target = (args[same] if type(same) is int and 0 <= same < len(args)
                          else kwargs.get(same) if type(same) is str else None)
                if type(target) not in (list, dict, set):
                    raise values.NotPlainValue(f"the returned argument {same!r:.40} is not a mutable argument")
                answer["same_as"] = same
            return answer, None
        except values.NotPlainValue as exc:
            return fail(f"the program's reply is not a plain value: {exc}")
    if reply.get("kind") == "raised" and type(reply.get("message")) is str:
        if reply.get("type") in values.RERAISABLE:
            return {"raised": reply["type"], "message": reply["message"]}, None
        return fail(f"the tested function raised {str(reply.get('type'))[:100]}")
    if reply.get("kind") == "invalid":
        return fail(f"the tested function returned a value that is not a plain builtin value "
                    f"({str(reply.get('message'))[:200]})")
    return fail(f"the program's reply is malformed: {reply!r:.200}")


def _text(data: bytearray) -> str:
    return bytes(data).decode("utf-8", "replace")


def _failure(result: ExecResult, role: str) -> tuple[str, str]:
    if result.ok:  # finished with exit code 0, but by sys.exit()/os._exit() instead of running to the end
        return "error", f"the {role} exited before the tests completed"
    last_line = result.stderr.strip().splitlines()[-1:] or [result.reason]
    return result.status, f"{role} failed: {last_line[0][:200]}" if result.status == "error" else f"{role}: {result.reason}"


def _combine(results: list[ExecResult], verdict: tuple[str, str], limits: Limits) -> ExecResult:
    status, reason = verdict
    last = results[-1]
    stdout, stderr = ("".join(getattr(r, stream) for r in results) for stream in ("stdout", "stderr"))
    cap = limits.max_output_bytes
    truncated = any(r.truncated for r in results) or len(stdout) > cap or len(stderr) > cap
    return ExecResult(status, stdout[:cap], stderr[:cap], sum(r.duration_s for r in results),
                      last.exit_code if status != "ok" else 0, truncated, reason)
