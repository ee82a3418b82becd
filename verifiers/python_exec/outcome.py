"""Turn the raw facts of one cell (CellReport) into the ExecResult callers see."""
from __future__ import annotations

import signal

from .errors import SandboxError
from .interpreter import CellReport
from .limits import Limits
from .result import ExecResult


def classify(report: CellReport, limits: Limits, *, via_bwrap: bool) -> ExecResult:
    got = report.collected
    stdout = bytes(got.stdout).decode("utf-8", "replace")
    stderr = bytes(got.stderr).decode("utf-8", "replace")

    def result(status, exit_code, reason="", truncated=False) -> ExecResult:
        return ExecResult(status, stdout, stderr, report.duration_s, exit_code, truncated, reason)

    if got.ended_before:
        return result("error", report.returncode, "the interpreter had ended before this request "
                      "(the program's earlier code ended its own process)")
    if got.timed_out:
        return result("timeout", None, f"timed out after {limits.timeout_s:g}s")
    if got.output_exceeded:
        return result("killed", None, f"output exceeded {limits.max_output_bytes} bytes", truncated=True)
    if got.violation:
        return result("error", None, f"the program tampered with the sandbox's control pipe ({got.violation})")
    if report.reply is not None:
        kind, code = report.reply["kind"], report.reply["exit_code"]
        if kind == "memory":
            return result("killed", code, f"memory limit ({limits.memory_mb} MiB) exceeded: MemoryError")
        if kind == "exception":
            return result("error", code, "uncaught exception")
        if code != 0:
            return result("error", code, f"exited with code {code}")
        if report.returncode is not None and report.returncode != 0:
            # The program's code had finished, but its exit (atexit handlers, threads) failed.
            return _from_returncode(result, report, limits, via_bwrap)
        return result("ok", 0)
    if report.returncode is None:  # the pump only returns on reply, exit, timeout, flood or violation
        raise SandboxError("internal error: a cell ended without reply, exit or timeout")
    return _from_returncode(result, report, limits, via_bwrap)


def _from_returncode(result, report: CellReport, limits: Limits, via_bwrap: bool) -> ExecResult:
    """The process ended without (or after) replying: a signal, a resource limit or os._exit()."""
    if report.oom_killed:
        return result("killed", None, f"memory limit ({limits.memory_mb} MiB) exceeded")
    returncode = report.returncode
    signum = _signal_of(returncode, via_bwrap)
    if signum is None:
        return result("ok" if returncode == 0 else "error", returncode,
                      "" if returncode == 0 else f"exited with code {returncode}")
    if signum == signal.SIGXCPU:
        return result("timeout", -signum, f"CPU time limit ({limits.timeout_s:g}s) exceeded")
    if signum == signal.SIGXFSZ:
        return result("killed", -signum, f"file size limit ({limits.disk_mb} MiB) exceeded")
    return result("killed", -signum, f"killed by {signal.Signals(signum).name}")


def _signal_of(returncode: int, via_bwrap: bool) -> int | None:
    # Popen reports a signal as -N; bwrap (the process we launch) turns its child's signal N into 128+N.
    signum = -returncode if returncode < 0 else returncode - 128 if via_bwrap and returncode > 128 else None
    if signum is None:
        return None
    try:
        return int(signal.Signals(signum))
    except ValueError:
        return None
