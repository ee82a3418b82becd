"""What isolation this machine allows, detected once, and the policy for when it is not enough.

Isolated means: bubblewrap can build the namespaces (see launch.py) *and* the number of processes can be
capped (a pids cgroup, or RLIMIT_NPROC when not running as root). Otherwise executions are refused unless
RATCHET_SANDBOX=unsafe-no-isolation accepts the weaker fallback: whatever of bwrap/cgroups works, else a
plain subprocess with setrlimit limits, its own process group, a scrubbed environment and a private
temporary directory -- which does NOT stop the program from reading or writing the host's files or using
the network.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from .cgroups import CgroupHome, find_homes
from .errors import SandboxUnavailable
from .launch import HOST_ENV, bwrap_command, host_interpreter
from .limits import Limits

log = logging.getLogger(__name__)

ENV_VAR = "RATCHET_SANDBOX"
REQUIRE = "require"
UNSAFE = "unsafe-no-isolation"
_PROBE_TIMEOUT_S = 30


@dataclass(frozen=True)
class Isolation:
    bwrap: str | None  # path of a bwrap that works here, None when namespaces cannot be created
    cgroups: tuple[CgroupHome, ...]
    problems: tuple[str, ...]  # what is missing and how to fix it, one line each

    def home(self, controller: str) -> CgroupHome | None:
        return next((h for h in self.cgroups if h.controller == controller), None)

    @property
    def process_cap(self) -> str | None:
        if self.home("pids"):
            return "cgroup pids"
        return "RLIMIT_NPROC" if os.geteuid() != 0 else None

    @property
    def sandboxed(self) -> bool:
        return self.bwrap is not None and self.process_cap is not None

    @property
    def description(self) -> str:
        fs = "bwrap namespaces" if self.bwrap else "no namespaces (plain subprocess)"
        memory = "cgroup memory" if self.home("memory") else "RLIMIT_AS"
        return f"{fs}; processes capped by {self.process_cap or 'nothing'}; memory capped by {memory}"


@functools.cache
def detect() -> Isolation:
    homes, problems = find_homes()
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        problems.append("bubblewrap is not installed (apt-get install bubblewrap)")
    else:
        failure = _probe_bwrap(bwrap)
        if failure:
            problems.append(f"bwrap cannot create its namespaces here ({failure}); user namespaces may be "
                            "disabled (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) "
                            "or blocked by the container's seccomp/AppArmor profile")
            bwrap = None
    if "pids" not in homes and os.geteuid() == 0:
        problems.append("no way to cap the number of processes: running as root (RLIMIT_NPROC is not "
                        "enforced for root) and no writable pids cgroup")
    return Isolation(bwrap, tuple(homes.values()), tuple(problems))


def _probe_bwrap(bwrap: str) -> str | None:
    """Start the real sandbox once with a trivial program; the error text when it does not work."""
    command = bwrap_command(bwrap, host_interpreter(), Limits()) + ["-I", "-S", "-c", "import sys"]
    try:
        done = subprocess.run(command, env=HOST_ENV, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish in {_PROBE_TIMEOUT_S}s"
    if done.returncode != 0:
        return done.stderr.strip() or f"exit code {done.returncode}"
    return None


def isolation_available() -> str | None:
    """A description of the isolation in force when executions are fully sandboxed here, else None."""
    isolation = detect()
    return isolation.description if isolation.sandboxed else None


def policy() -> str:
    value = os.environ.get(ENV_VAR, "").strip() or REQUIRE
    if value not in (REQUIRE, UNSAFE):
        raise ValueError(f"{ENV_VAR}={value!r} is not a valid setting: use {REQUIRE!r} (the default) or "
                         f"{UNSAFE!r} to accept weaker isolation")
    return value


@functools.cache
def _warn_unsafe(description: str) -> None:
    log.warning("%s=%s: running untrusted code WITHOUT full isolation (%s)", ENV_VAR, UNSAFE, description)


def require_isolation(isolation: Isolation | None = None) -> Isolation:
    """The isolation to use (this machine's by default); raises SandboxUnavailable when it is insufficient
    and weaker isolation was not explicitly accepted."""
    isolation = isolation or detect()
    if isolation.sandboxed:
        return isolation
    if policy() == UNSAFE:
        _warn_unsafe(isolation.description)
        return isolation
    raise SandboxUnavailable(
        "refusing to run untrusted code: this machine cannot sandbox it.\n  - " + "\n  - ".join(isolation.problems)
        + f"\nFix the above, or set {ENV_VAR}={UNSAFE} to accept weaker isolation (rlimits, process group, "
        "scrubbed environment; the code can then read/write the host's files and use the network).")
