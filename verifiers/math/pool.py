"""A pool of long-lived comparison worker processes, with a deadline per comparison.

Why processes and not SIGALRM (math-verify's own timeout): an alarm only works in the main thread,
and Prefect runs tasks in worker threads. A comparison that overruns its deadline, or a worker
that dies, costs only that process: it is killed (SIGKILL) and replaced at once, and the caller gets
WorkerTimeout / WorkerCrashed to report. Workers are plain subprocesses speaking JSON lines (see
worker.py), so grading works from threads, from asyncio (via to_thread) and from inside other
process pools, daemonic ones included (multiprocessing refuses children there).

The pool is per process: a forked child builds its own instead of sharing its parent's pipes.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_SIZE = max(1, min(4, os.cpu_count() or 1))
DEFAULT_MEMORY_LIMIT_MB = 1024  # address space per worker; SymPy needs ~100 MiB
STARTUP_TIMEOUT_S = 120.0  # importing SymPy on a loaded machine
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class WorkerTimeout(Exception):
    """The comparison overran its deadline; the worker was killed and replaced."""


class WorkerCrashed(Exception):
    """The worker died during the comparison; it was replaced."""


class WorkerStartupError(RuntimeError):
    """A worker process could not start (a broken environment, not a verdict)."""


class _Deadline(Exception):
    pass


class _Died(Exception):
    pass


class _Worker:
    def __init__(self, memory_limit_mb: int):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verifiers.math.worker", "--memory-limit-mb", str(memory_limit_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
            start_new_session=True)  # a Ctrl-C meant for the caller does not kill comparisons mid-way
        self._pending = b""
        self._ready = False  # the handshake is read on first use, so a replacement starts in the background

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ensure_ready(self) -> None:
        if not self._ready:
            try:
                hello = self._read(time.monotonic() + STARTUP_TIMEOUT_S)
            except (_Deadline, _Died) as e:
                raise WorkerStartupError(
                    f"a math worker did not start within {STARTUP_TIMEOUT_S:.0f}s ({type(e).__name__.strip('_')}, "
                    f"exit code {self.proc.poll()}); its stderr above says why "
                    f"(check that {sys.executable} can import sympy and math_verify)") from e
            if hello != {"ready": True}:
                raise WorkerStartupError(f"a math worker greeted with {hello!r} instead of {{'ready': true}}")
            self._ready = True

    def call(self, request: dict, timeout_s: float) -> dict:
        self.ensure_ready()
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise _Died() from e
        return self._read(time.monotonic() + timeout_s)

    def _read(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Deadline()
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _Died()
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # already broken: the process is gone, which is what we want

    def exit_description(self) -> str:
        try:
            code = self.proc.wait(timeout=2)  # its output closed; the exit status follows shortly
        except subprocess.TimeoutExpired:
            return "it closed its output but did not exit"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


class WorkerPool:
    """Up to `size` worker processes shared by any number of calling threads."""

    def __init__(self, size: int = DEFAULT_SIZE, *, memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB):
        if size < 1:
            raise ValueError(f"a worker pool needs at least 1 worker, got size={size}")
        self.pid = os.getpid()
        self.memory_limit_mb = memory_limit_mb
        self._size = size
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._live = 0  # idle + busy + starting
        self._cond = threading.Condition()
        self._closed = False

    @property
    def size(self) -> int:
        return self._size

    def ensure_size(self, size: int) -> None:
        with self._cond:
            self._size = max(self._size, size)
            self._cond.notify_all()

    def worker_pids(self) -> list[int]:
        """Pids of the live worker processes, idle and busy (for diagnostics and tests)."""
        with self._cond:
            return [w.proc.pid for w in [*self._idle, *self._busy]]

    def warm_up(self) -> None:
        """Start every worker process now and wait until all are ready, so that the first
        comparisons do not pay the start-up (about a second of imports each)."""
        with self._cond:
            missing = max(0, self._size - self._live)
            self._live += missing
        fresh = []
        try:
            for _ in range(missing):
                fresh.append(_Worker(self.memory_limit_mb))
            for worker in fresh:
                worker.ensure_ready()
        except BaseException:
            for worker in fresh:
                worker.kill()
            with self._cond:
                self._live -= missing
                self._cond.notify_all()
            raise
        for worker in fresh:
            self._release(worker)

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the math worker pool is closed")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        self._busy.add(worker)
                        return worker
                    worker.kill()  # died while idle: no request was lost, replace it quietly
                    self._live -= 1
                if self._live < self._size:
                    self._live += 1
                    break
                self._cond.wait()
        try:
            worker = _Worker(self.memory_limit_mb)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._busy.add(worker)
        return worker

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            self._busy.discard(worker)
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
        worker.kill()

    def _replace(self, worker: _Worker) -> None:
        with self._cond:
            self._busy.discard(worker)
        worker.kill()
        try:
            fresh = _Worker(self.memory_limit_mb)
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise
        self._release(fresh)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._cond:
            self._busy.discard(worker)
            self._live -= 1
            self._cond.notify()

    def call(self, request: dict, timeout_s: float) -> dict:
        """Send one request to a worker; its reply, or WorkerTimeout / WorkerCrashed."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        worker = self._acquire()
        try:
            reply = worker.call(request, timeout_s)
        except _Deadline:
            self._replace(worker)
            raise WorkerTimeout(f"no result within {timeout_s:g}s; the worker was killed and replaced") from None
        except _Died:
            description = worker.exit_description()
            self._replace(worker)
            raise WorkerCrashed(f"the worker died ({description}); it was replaced") from None
        except WorkerStartupError:
            self._discard(worker)
            raise
        except BaseException:
            self._replace(worker)  # interrupted mid-request: its state is unknown
            raise
        if reply.get("recycle"):
            self._replace(worker)
        else:
            self._release(worker)
        return reply

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.kill()


_default: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """This process's shared pool (created on first use, with DEFAULT_SIZE workers at most)."""
    global _default
    with _default_lock:
        if _default is None or _default.pid != os.getpid():
            _default = WorkerPool()
        return _default


@atexit.register
def _close_default_pool() -> None:
    if _default is not None and _default.pid == os.getpid():
        _default.close()
