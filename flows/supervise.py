"""Run a long command (`ratchet run`, `ratchet eval`) in a child process and clean up after it.

vLLM's engine processes and Prefect's temporary server outlive a parent that is killed outright: an
out-of-memory-killed loop left vLLM's EngineCore and Worker running here, holding 5 GB and a core. So the
command's own process only supervises: it is a Linux child subreaper (orphans of the loop become its
children), and once the loop process has exited, whatever is left is stopped. When the loop was killed by
SIGKILL, the usual reason (the OOM killer) and how to resume are printed.

Given a log file, the loop process's stdout and stderr go to it, and the terminal is passed on as one more
descriptor for the progress lines (flows/console.py); `--verbose` keeps everything on the terminal.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from pathlib import Path

import psutil

from flows.console import CONSOLE_FD_ENV, LOG_ENV, VERBOSE_ENV, flag

SUPERVISED_ENV = "RATCHET_SUPERVISED"
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the loop process, before exec: SIGTERM when the supervisor dies (killed outright, say), so the loop, in its
    own session and out of reach of a signal to the supervisor's process group, still shuts down, in order."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

KILLED_HINT = (
    "the loop process was killed by SIGKILL; on Linux that is usually the out-of-memory killer (`dmesg | grep -i "
    "oom` shows it). Completed stages are kept: rerun the same command to resume. To use less memory, halve "
    "train.per_device_batch_size and double train.grad_accumulation, or lower engine.kv_cache_memory_bytes (a run "
    "may resume with these changed).")

INTERRUPTED = "interrupted: completed work is kept; rerun the same command to resume"


def is_supervised() -> bool:
    return os.environ.get(SUPERVISED_ENV) == "1"


def run_supervised(argv: list[str], log: Path | None = None) -> int:
    """Run `argv` (which must see `is_supervised()`), forward SIGINT and SIGTERM to it, stop what it leaves; its
    exit code (130 after Ctrl-C).
    With `log`, the child's output goes to that file (appended) unless RATCHET_VERBOSE is set."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    env, out, keep = {**os.environ, SUPERVISED_ENV: "1"}, None, ()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        env[LOG_ENV] = str(log)
        if not flag(VERBOSE_ENV):
            sys.stdout.flush()
            keep = (os.dup(sys.stdout.fileno()),)  # the terminal, for the loop's progress lines
            env[CONSOLE_FD_ENV] = str(keep[0])
            out = open(log, "ab")
    # Its own session: Ctrl-C in the terminal reaches this process only, which passes it to the loop process
    # alone. Were the loop in the terminal's process group, vLLM's engine processes and Prefect's temporary server
    # would get the same SIGINT and die under it, and the loop's cleanup would then hang on the dead server
    # (a minute, then a misleading ConnectError) instead of shutting them down in order.
    child = subprocess.Popen(argv, env=env, stdout=out, stderr=out, pass_fds=keep, start_new_session=True,
                             preexec_fn=_stop_with_parent)
    if out is not None:
        out.close()
    interrupts = 0

    def forward(signum, frame):
        nonlocal interrupts
        interrupts += signum == signal.SIGINT
        # A third Ctrl-C: the user wants out now, cleanup or not (stop_descendants below takes the rest).
        # The terminal closing (SIGHUP) stops the loop as a SIGTERM does: in order, completed work kept.
        child.send_signal(signal.SIGKILL if interrupts >= 3 else signal.SIGTERM if signum == signal.SIGHUP else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    rc = child.wait()
    stop_descendants()
    if interrupts and rc != 0:
        # Here rather than in the loop process: a Ctrl-C while it still imports never reaches its handler, and one
        # that lands in native code (a nanobind callback while vLLM starts) aborts the process instead of raising.
        print(INTERRUPTED, flush=True)
        return 128 + signal.SIGINT
    if rc == -signal.SIGKILL:
        print(f"error: {KILLED_HINT}" + (f" The loop's output is in {log}." if log else ""), file=sys.stderr)
    return 128 - rc if rc < 0 else rc


def stop_descendants(grace_s: float = 10.0) -> None:
    left = psutil.Process().children(recursive=True)
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
