"""One sandboxed Python process that executes cells sent by the host, one at a time (see runner.py)."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from .cgroups import ExecCgroup
from .errors import SandboxError
from .framing import MAX_REPLY_BYTES, encode, malformed_reply
from .isolation import Isolation, require_isolation
from .launch import (HOST_ENV, SANDBOX_ENV, WORKDIR, bwrap_command, enter_cgroups, host_interpreter,
                     rlimits_for, runner_args)
from .limits import Limits
from .pump import Collected, Pump

STARTUP_TIMEOUT_S = 60.0  # generous: under load, many sandboxes start at once; not charged to the program


@dataclass
class CellReport:
    """Raw facts about one cell; outcome.classify turns them into an ExecResult."""

    collected: Collected
    reply: dict | None  # the runner's verdict; None when the process died or was stopped first
    returncode: int | None  # set once the process has ended
    oom_killed: bool
    duration_s: float


class SandboxedInterpreter:
    """Starts at construction (so start-up overlaps the caller's work); close() kills it and frees everything."""

    def __init__(self, limits: Limits, *, one_shot: bool, isolation: Isolation | None = None):
        self.isolation = require_isolation(isolation)
        self.limits = limits
        self.via_bwrap = self.isolation.bwrap is not None
        self._ready = False
        self._closed = False
        self._tmpdir: str | None = None
        self._cgroup: ExecCgroup | None = None
        self._pidfd: int | None = None
        homes = {h.controller: h for h in self.isolation.cgroups}
        if homes:
            self._cgroup = ExecCgroup(homes, max_processes=limits.max_processes, memory_bytes=limits.memory_mb << 20)
        request_read, self._request_fd = os.pipe()
        self._reply_fd, reply_write = os.pipe()
        try:
            self._proc = _spawn(self._launch, one_shot, request_read, reply_write)
        except BaseException:
            os.close(self._request_fd)
            os.close(self._reply_fd)
            _cleanup_host_state(self._cgroup, self._tmpdir)
            raise
        finally:
            os.close(request_read)  # the child has its own copies now
            os.close(reply_write)
        try:
            self._pidfd = os.pidfd_open(self._proc.pid)
        except (AttributeError, OSError):
            self._pidfd = None  # old kernel or Python: the pump polls the process instead
        # Also runs if the owner forgets close() (garbage collection, interpreter exit): no orphaned sandbox.
        self._finalizer = weakref.finalize(self, _release, self._proc, self._cgroup, self._tmpdir,
                                           [self._request_fd, self._reply_fd, self._pidfd])
        self._pump = Pump(stdout_fd=self._proc.stdout.fileno(), stderr_fd=self._proc.stderr.fileno(),
                          reply_fd=self._reply_fd, request_fd=self._request_fd, pidfd=self._pidfd,
                          has_exited=lambda: self._proc.poll() is not None, max_output_bytes=limits.max_output_bytes,
                          max_frame_bytes=max(limits.max_output_bytes, MAX_REPLY_BYTES))

    def _launch(self, one_shot: bool, request_fd: int, reply_fd: int) -> subprocess.Popen:
        interpreter = host_interpreter()
        controllers = self._cgroup.controllers if self._cgroup else set()
        rlimits = rlimits_for(self.limits, one_shot=one_shot, memory_cgroup="memory" in controllers,
                              process_cgroup="pids" in controllers)
        if self.via_bwrap:
            workdir, cwd, env = WORKDIR, None, HOST_ENV
            command = bwrap_command(self.isolation.bwrap, interpreter, self.limits)
        else:
            self._tmpdir = workdir = cwd = tempfile.mkdtemp(prefix="ratchet-exec-")
            env = {**SANDBOX_ENV, "HOME": workdir, "TMPDIR": workdir}
            command = [interpreter.executable]
        command += runner_args(request_fd=request_fd, reply_fd=reply_fd, workdir=workdir,
                               interpreter=interpreter, rlimits=rlimits)
        command = enter_cgroups(self._cgroup.procs_files if self._cgroup else [], command)
        # Own session and process group: the whole tree can be SIGKILLed at once.
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(request_fd, reply_fd), env=env, cwd=cwd, start_new_session=True)

    @property
    def alive(self) -> bool:
        # poll(): a process that died while nobody waited on it (a kill, a limit) reads as dead at once.
        return not self._closed and self._proc.poll() is None

    def execute(self, code: str, *, stdin: str, filename: str, echo: bool, final: bool, timeout_s: float,
                proxies: dict[str, str] | None = None, report_callables: bool = False,
                on_call: Callable[[dict], dict] | None = None, fresh: bool = False,
                output_room: tuple[int, int] | None = None) -> CellReport:
        """Run one cell under a wall-clock limit. The process is killed if it times out, floods its output
        or breaks the protocol; check `alive` afterwards.

        Code grading only: `proxies` binds names in the cell's namespace to proxies of another sandbox's
        functions, whose call frames `on_call` answers (a dict: {"value": v} or {"raised": name,
        "message": m}) while the cell runs; `report_callables` asks for the namespace's function names;
        `fresh` starts the cell in a new, empty namespace; `output_room` (stdout, stderr bytes) replaces the
        per-stream output cap, so that one grading's many cells and calls share one cap."""
        request = {"code": code, "stdin": stdin, "filename": filename, "echo": echo, "final": final}
        if fresh:
            request["fresh"] = True
        if proxies:
            request["proxies"] = proxies
        if report_callables:
            request["report_callables"] = True
        return self._request(request, final=final, timeout_s=timeout_s, on_call=on_call, output_room=output_room)

    def call(self, name: str, args: tuple, kwargs: dict, *, timeout_s: float,
             output_room: tuple[int, int] | None = None) -> CellReport:
        """Call the function `name` of the namespace; the reply carries its result (runner.call_function)."""
        return self._request({"call": name, "args": args, "kwargs": kwargs}, final=False, timeout_s=timeout_s,
                             output_room=output_room)

    def _request(self, request: dict, *, final: bool, timeout_s: float,
                 on_call: Callable[[dict], dict] | None = None,
                 output_room: tuple[int, int] | None = None) -> CellReport:
        if self._closed:
            raise SandboxError("this sandboxed interpreter was closed; start a new one")
        if self._proc.poll() is not None:
            # The program ended its own process after an earlier reply (os._exit from a thread, a signal
            # handler): that is the program's failure, reported like any exit, not an error of the host.
            got = Collected(exited=True, ended_before=True)
            oom = self._cgroup is not None and self._cgroup.oom_killed()
            return CellReport(got, None, self._proc.returncode, oom, 0.0)
        if not self._ready:
            self._wait_until_ready()
        start = time.monotonic()
        deadline = start + timeout_s
        request_id = secrets.token_hex(8)
        request = {"id": request_id, **request}

        def replied(got: Collected) -> bool:
            return any(f.get("id") == request_id for f in got.frames)

        def answered(got: Collected) -> bool:
            return replied(got) or (on_call is not None and any("call" in f for f in got.frames))

        # A final cell also waits for the process to end (atexit handlers, non-daemon threads), like python.
        done = (lambda got: False) if final else answered
        got = self._pump.exchange(encode(request), done, deadline, room=output_room)
        while on_call is not None and not (got.timed_out or got.output_exceeded or got.violation or got.exited):
            calls = [f for f in got.frames if "call" in f]
            if not calls or replied(got):
                break
            got.frames.remove(calls[0])
            try:
                answer = on_call(calls[0])
            except BaseException:
                self._kill()
                raise
            got = self._pump.exchange(encode(answer), done, deadline, got)
        reply = next((f for f in got.frames if f.get("id") == request_id), None)
        if reply is None and got.frames and not got.violation:
            got.violation = f"unexpected reply frames {got.frames!r:.200}"
        if reply is not None and not got.violation:
            why = malformed_reply(reply, call="call" in request, callables=bool(request.get("report_callables")))
            if why is not None:
                got.violation, reply = f"a forged reply frame ({why})", None
        if got.timed_out or got.output_exceeded or got.violation:
            self._kill()
        elif got.exited:
            self._proc.wait()
        oom = got.exited and self._cgroup is not None and self._cgroup.oom_killed()
        return CellReport(got, reply, self._proc.returncode, oom, time.monotonic() - start)

    def _wait_until_ready(self) -> None:
        got = self._pump.exchange(b"", lambda g: bool(g.frames), time.monotonic() + STARTUP_TIMEOUT_S)
        if got.frames == [{"ready": True}]:
            self._ready = True
            return
        self._kill()
        detail = (bytes(got.stderr) or bytes(got.stdout)).decode("utf-8", "replace").strip()
        what = "did not start in time" if got.timed_out else f"failed to start (exit code {self._proc.returncode})"
        raise SandboxError(f"the sandboxed interpreter {what}: {detail or got.frames or 'no output'}")

    def _kill(self) -> None:
        _kill_tree(self._proc, self._cgroup)

    def close(self) -> None:
        """Kill whatever still runs and release the pipes, cgroups and temporary directory. Idempotent."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> "SandboxedInterpreter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# bwrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started the sandbox ends, not the
# process. Sandboxes started from short-lived worker threads (a rollout's tool calls, a grading pool) were
# SIGKILLed as soon as that thread finished: a session's interpreter died between two cells, and a replacement
# started in one turn's thread was dead before it ever reported ready. So every launch goes through one thread
# that lives as long as the process.
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn(launch: Callable, *args) -> subprocess.Popen:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawner")
        spawner = _spawner
    return spawner.submit(launch, *args).result()


def _forget_spawner() -> None:
    """In a forked child the parent's spawner thread does not exist: start a new one on first use."""
    global _spawner, _spawner_lock
    _spawner, _spawner_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _kill_tree(proc: subprocess.Popen, cgroup: ExecCgroup | None) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id cannot have been reused
        proc.wait()
    if cgroup is not None:
        cgroup.kill_all()  # whatever left the process group (setsid daemons in the unsafe mode)


def _release(proc: subprocess.Popen, cgroup: ExecCgroup | None, tmpdir: str | None, fds: list[int | None]) -> None:
    try:
        _kill_tree(proc, cgroup)
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)
        proc.stdout.close()
        proc.stderr.close()
        _cleanup_host_state(cgroup, tmpdir)


def _cleanup_host_state(cgroup: ExecCgroup | None, tmpdir: str | None) -> None:
    if cgroup is not None:
        cgroup.remove()
    if tmpdir is not None:
        shutil.rmtree(tmpdir)
