"""Per-execution cgroups: the real cap on processes (and memory) for sandboxes run as root.

RLIMIT_NPROC is not enforced for root, and a pid namespace alone does not bound how many processes a fork
bomb makes, so each execution gets its own pids (and memory) cgroup, created before launch, entered by the
launcher before it execs the sandbox, and emptied (SIGKILL) and removed afterwards.
Works with cgroup v1 (one hierarchy per controller) and v2 (where our cgroup can delegate to children).
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SandboxError

log = logging.getLogger(__name__)

CONTROLLERS = ("pids", "memory")
HOME_NAME = "ratchet-sandbox"
_names = itertools.count()


@dataclass(frozen=True)
class CgroupHome:
    """A directory under which this process can create child cgroups limited by `controller`."""

    controller: str
    directory: Path
    version: int  # 1 or 2


def find_homes() -> tuple[dict[str, CgroupHome], list[str]]:
    """The usable home per controller, and one line per controller that is not usable (why, how to fix)."""
    homes: dict[str, CgroupHome] = {}
    problems: list[str] = []
    own = _own_cgroups()
    mounts = _cgroup_mounts()
    for controller in CONTROLLERS:
        try:
            homes[controller] = _home_for(controller, own, mounts)
        except OSError as exc:
            problems.append(f"no {controller} cgroup: {exc}")
    return homes, problems


def _own_cgroups() -> dict[str, str]:
    """Controller (or '' for the v2 hierarchy) -> this process's cgroup path, from /proc/self/cgroup."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = path
    return own


def _cgroup_mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount root, mount point, super options) of every cgroup mount, from /proc/self/mountinfo."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, tail = left.split(), right.split()
        if tail[0] in ("cgroup", "cgroup2"):
            mounts.append((tail[0], fields[3], fields[4], set(tail[2].split(","))))
    return mounts


def _home_for(controller: str, own: dict[str, str], mounts) -> CgroupHome:
    for fstype, root, point, options in mounts:
        if fstype == "cgroup" and controller in options and controller in own:
            base = Path(point) / os.path.relpath(own[controller], root)
            return _make_home(controller, base, 1)
    for fstype, root, point, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            base = Path(point) / os.path.relpath(own[""], root)
            if controller not in (base / "cgroup.controllers").read_text().split():
                raise OSError(errno.ENOENT, f"controller not enabled for {base} (cgroup v2)")
            try:
                _enable_for_children(base, controller)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot delegate {controller} to child cgroups of {base} ({exc.strerror});"
                              " run the loop in a delegated cgroup, e.g. `systemd-run --scope -p Delegate=yes`") from exc
            return _make_home(controller, base, 2)
    raise OSError(errno.ENOENT, "no cgroup hierarchy with this controller is mounted")


def _enable_for_children(base: Path, controller: str) -> None:
    """cgroup v2 only hands a controller to children that the parent enabled in cgroup.subtree_control."""
    control = base / "cgroup.subtree_control"
    if controller not in control.read_text().split():
        # Fails (EBUSY) when our cgroup holds processes and is not the root: run the loop in a delegated
        # cgroup (e.g. `systemd-run --scope -p Delegate=yes`) to get a process cap.
        control.write_text(f"+{controller}")
    home = base / HOME_NAME
    home.mkdir(exist_ok=True)
    home_control = home / "cgroup.subtree_control"
    if controller not in home_control.read_text().split():
        home_control.write_text(f"+{controller}")


def _make_home(controller: str, base: Path, version: int) -> CgroupHome:
    home = CgroupHome(controller, base / HOME_NAME, version)
    home.directory.mkdir(exist_ok=True)
    _sweep_stale(home.directory)
    probe = ExecCgroup({controller: home}, max_processes=64, memory_bytes=256 << 20)
    probe.remove()
    return home


def _sweep_stale(directory: Path) -> None:
    """Empty and remove groups left by a host process that died before cleaning up (named <pid>-<n>):
    whatever still runs in them is an orphaned sandbox."""
    for child in directory.iterdir():
        owner = child.name.split("-", 1)[0]
        if not (child.is_dir() and owner.isdigit()) or _alive(int(owner)):
            continue
        try:
            for pid in (child / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.05)  # let the kernel release the killed members before rmdir
            child.rmdir()
        except OSError as exc:  # another process may be sweeping the same group: not fatal, but say so
            log.warning("could not remove stale sandbox cgroup %s: %s", child, exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExecCgroup:
    """The cgroups of one execution: limits written before launch; members killed and groups removed after."""

    def __init__(self, homes: dict[str, CgroupHome], *, max_processes: int, memory_bytes: int):
        name = f"{os.getpid()}-{next(_names)}"
        self._dirs: dict[str, Path] = {c: h.directory / name for c, h in homes.items()}
        self._versions = {c: h.version for c, h in homes.items()}
        self._created: list[Path] = []
        try:
            for directory in dict.fromkeys(self._dirs.values()):  # v2: one directory for all controllers
                directory.mkdir()
                self._created.append(directory)
            if "pids" in self._dirs:
                (self._dirs["pids"] / "pids.max").write_text(str(max_processes))
            if "memory" in self._dirs:
                self._limit_memory(self._dirs["memory"], self._versions["memory"], memory_bytes)
        except OSError as exc:
            self.remove()
            raise SandboxError(f"could not set up the execution's cgroup under {list(homes.values())}: {exc}") from exc

    @staticmethod
    def _limit_memory(directory: Path, version: int, memory_bytes: int) -> None:
        if version == 2:
            (directory / "memory.max").write_text(str(memory_bytes))
            if (directory / "memory.swap.max").exists():
                (directory / "memory.swap.max").write_text("0")
            return
        (directory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        # Memory+swap at the same value: the limit cannot be dodged by swapping out.
        if (directory / "memory.memsw.limit_in_bytes").exists():
            (directory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))

    @property
    def procs_files(self) -> list[str]:
        """The files the launcher writes its pid into, to enter every group before it execs the sandbox."""
        return [str(d / "cgroup.procs") for d in self._created]

    @property
    def controllers(self) -> set[str]:
        return set(self._dirs)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a member for exceeding the memory limit."""
        if "memory" not in self._dirs:
            return False
        directory = self._dirs["memory"]
        events = directory / ("memory.events" if self._versions["memory"] == 2 else "memory.oom_control")
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def members(self) -> list[int]:
        pids: set[int] = set()
        for procs in self.procs_files:
            pids.update(int(p) for p in Path(procs).read_text().split())
        return sorted(pids)

    def kill_all(self, timeout_s: float = 5.0) -> None:
        """SIGKILL every member until the groups are empty (repeated: a member may fork meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while True:
            members = self.members()
            if not members:
                return
            if time.monotonic() > deadline:
                raise SandboxError(f"processes {members} survived SIGKILL in the execution's cgroup")
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # it exited between the listing and the kill: the goal is reached
            time.sleep(0.005)

    def remove(self, timeout_s: float = 5.0) -> None:
        """Delete the groups (they must be empty); retried because members take a moment to be released."""
        deadline = time.monotonic() + timeout_s
        for directory in reversed(self._created):
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise SandboxError(f"could not remove the execution's cgroup {directory}: {exc}") from exc
                    time.sleep(0.0005)  # members are released within a few ms of their death
        self._created.clear()
