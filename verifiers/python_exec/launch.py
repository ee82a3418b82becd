"""The command line and environment that start one sandboxed interpreter.

With bubblewrap: every namespace unshared (no network, private pid/ipc/uts), no capabilities, no nested
user namespaces; the root is an empty read-only tmpfs in which only the OS libraries (/usr, /lib*) and the
host interpreter's own directories (its installation and site-packages, so numpy and sympy import) are
bound read-only; the only writable places are a size-capped tmpfs working directory (/tmp) and /dev/shm.
Nothing else of the host (/root, /work, /etc, the project's files) exists in there.
"""
from __future__ import annotations

import functools
import marshal
import math
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .limits import Limits

WORKDIR = "/tmp"  # inside the sandbox: cwd, HOME and TMPDIR, a private tmpfs
SHM_BYTES = 16 << 20
# -I: ignore PYTHON* variables and user site; -S: skip site (and every .pth file: ~80 ms with this venv);
# -B: never write .pyc (the unsafe mode runs on the host's real files); utf8 mode: stable encodings.
PYTHON_FLAGS = ("-I", "-S", "-B", "-X", "utf8")
# The launcher's (and bwrap's) own environment: readable inside via /proc/1/environ, so it holds nothing.
HOST_ENV = {"PATH": "/usr/bin:/bin"}
# One BLAS/OpenMP thread: executions run side by side, and threads count against the process cap.
SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1",
}
# The launcher enters the execution's cgroups (it writes its own pid), then execs the sandbox: every process
# the sandbox will ever make is born inside the cgroups, with no window to escape them.
_ENTER_CGROUPS = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
RUNNER_SOURCE = (Path(__file__).with_name("runner.py")).read_text()


@dataclass(frozen=True)
class Interpreter:
    """The host interpreter the sandbox runs, and what of the host it needs to see."""

    executable: str  # real path of the binary
    mounts: tuple[str, ...]  # host directories bound read-only at the same path
    sys_path: tuple[str, ...]  # package directories appended to sys.path inside (site is skipped)


@functools.cache
def host_interpreter() -> Interpreter:
    """This process's interpreter: its base installation plus its (venv's) site-packages."""
    executable = os.path.realpath(sys.executable)
    paths = sysconfig.get_paths()
    sites = [os.path.realpath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])]
    sites = list(dict.fromkeys(sites))
    candidates = [os.path.realpath(sys.base_prefix), os.path.dirname(executable), *sites]
    mounts: list[str] = []
    for path in candidates:
        if not any(_under(path, m) for m in mounts + ["/usr"]):
            mounts.append(path)
    return Interpreter(executable, tuple(mounts), tuple(sites))


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def system_binds() -> list[str]:
    """/usr read-only, and /bin, /lib* as on the host (symlinks into /usr on merged-/usr systems)."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(name):
            args += ["--symlink", os.readlink(name), name]
        elif os.path.isdir(name):
            args += ["--ro-bind", name, name]
    return args


def bwrap_command(bwrap: str, interpreter: Interpreter, limits: Limits) -> list[str]:
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", "--hostname", "sandbox", *system_binds()]
    args += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
             "--size", str(limits.disk_mb << 20), "--tmpfs", WORKDIR]
    # After the tmpfs: an interpreter or venv that lives under /tmp on the host (a CI checkout, say) would
    # otherwise be hidden by the private /tmp mounted over it.
    for path in interpreter.mounts:
        args += ["--ro-bind", path, path]
    args += ["--remount-ro", "/dev", "--remount-ro", "/",  # last: everything above is set up by now
             "--chdir", WORKDIR, "--clearenv"]
    for key, value in {**SANDBOX_ENV, "HOME": WORKDIR, "TMPDIR": WORKDIR}.items():
        args += ["--setenv", key, value]
    return args + ["--", interpreter.executable]


def runner_args(*, request_fd: int, reply_fd: int, workdir: str, interpreter: Interpreter,
                rlimits: dict[str, int]) -> list[str]:
    config = {"request_fd": request_fd, "reply_fd": reply_fd, "workdir": workdir,
              "sys_path": list(interpreter.sys_path), "rlimits": rlimits}
    return [*PYTHON_FLAGS, "-c", RUNNER_SOURCE, marshal.dumps(config).hex()]


def rlimits_for(limits: Limits, *, one_shot: bool, memory_cgroup: bool, process_cgroup: bool) -> dict[str, int]:
    """setrlimit values the runner applies to itself before any program code runs."""
    rlimits = {"RLIMIT_CORE": 0, "RLIMIT_FSIZE": limits.disk_mb << 20, "RLIMIT_NOFILE": limits.max_open_files}
    if not process_cgroup:
        rlimits["RLIMIT_NPROC"] = limits.max_processes  # per uid, and not enforced for root: a fallback only
    if not memory_cgroup:
        rlimits["RLIMIT_AS"] = limits.memory_mb << 20  # per process: a weaker stand-in for the cgroup
    if one_shot:
        # CPU time backs up the wall clock (threads can burn CPU faster than wall time passes). Not for
        # sessions: it would accumulate over cells.
        rlimits["RLIMIT_CPU"] = math.ceil(limits.timeout_s) + 1
    return rlimits


def enter_cgroups(procs_files: list[str], command: list[str]) -> list[str]:
    if not procs_files:
        return command
    return ["/bin/sh", "-c", _ENTER_CGROUPS, "sh", str(len(procs_files)), *procs_files, *command]
