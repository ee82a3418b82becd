"""Per-execution resource limits, validated once so bad settings fail before anything is launched."""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_CODE_BYTES = 1 << 20  # a tool call or a solution larger than this is not a program we want to run
MAX_STDIN_BYTES = 16 << 20


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, per execution (per cell in a Session)
    memory_mb: int = 1024  # all processes of the execution together where a memory cgroup exists
    max_output_bytes: int = 1 << 20  # per stream; past it the execution is killed and the output truncated
    max_processes: int = 64  # processes *and threads* (a pids cgroup counts both)
    disk_mb: int = 64  # the private working directory (tmpfs) and the largest file the program may write
    max_open_files: int = 512

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s)
             and 0 < self.timeout_s <= 3600, "timeout_s", "a number of seconds in (0, 3600]"),
            (_is_int(self.memory_mb) and 64 <= self.memory_mb <= 1 << 20, "memory_mb",
             "an integer number of MiB >= 64 (the interpreter with numpy needs ~40 MiB)"),
            (_is_int(self.max_output_bytes) and self.max_output_bytes >= 1024, "max_output_bytes",
             "an integer >= 1024"),
            (_is_int(self.max_processes) and 8 <= self.max_processes <= 4096, "max_processes",
             "an integer in [8, 4096] (the sandbox's own init and interpreter count)"),
            (_is_int(self.disk_mb) and 1 <= self.disk_mb <= 1 << 16, "disk_mb", "an integer number of MiB >= 1"),
            (_is_int(self.max_open_files) and 64 <= self.max_open_files <= 65536, "max_open_files",
             "an integer in [64, 65536]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"Limits.{name}={getattr(self, name)!r} is invalid: expected {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
