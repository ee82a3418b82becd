"""The run directory: every stage's output on disk, written atomically, so a loop can resume.

Layout: runs/<run_id>/config.yaml, round-00/ (base model evaluation), round-01/ ... with one file per
stage output and a `<stage>.done` marker written after the output. A stage whose marker exists is
never recomputed; a stage without one is redone from scratch (its partial output is overwritten), so a
process killed mid-round resumes cleanly and loses nothing completed.

An exclusive `flock` on runs/<run_id>/.lock keeps two processes from writing the same run at once.
The kernel drops the lock when its holder dies, so a crashed run can never leave it stuck.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml


class RunLocked(RuntimeError):
    """Another live process holds this run directory."""


def _atomic_write(path: Path, data: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_json(path: Path, obj: Any) -> Path:
    _atomic_write(path, json.dumps(obj, indent=2, default=str))
    return path


class RunDir:
    def __init__(self, root: Path, run_id: str):
        self.run_id = run_id
        self.path = Path(root).resolve() / run_id
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    def lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"run {self.run_id!r} is in use by another process ({self.path}); wait for it to finish "
                "or pick another --run-id") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_config(self, config: dict[str, Any], resumable_keys: set[str] = frozenset({"rounds"})) -> None:
        """Save the config on first use; on resume, refuse a config that changed (besides `rounds`)."""
        saved_path = self.path / "config.yaml"
        if saved_path.exists():
            saved = yaml.safe_load(saved_path.read_text())
            changed = sorted(k for k in set(saved) | set(config)
                             if k not in resumable_keys and saved.get(k) != config.get(k))
            if changed:
                raise ValueError(
                    f"run {self.run_id!r} was started with a different config (changed: {', '.join(changed)}). "
                    f"Resume with the original config ({saved_path}) or start a new --run-id.")
        _atomic_write(saved_path, yaml.safe_dump(config, sort_keys=False))

    def round(self, r: int) -> Path:
        d = self.path / f"round-{r:02d}"
        d.mkdir(exist_ok=True)
        return d

    def done(self, r: int, stage: str) -> bool:
        return (self.round(r) / f"{stage}.done").exists()

    def mark_done(self, r: int, stage: str) -> None:
        _atomic_write(self.round(r) / f"{stage}.done", "")

    def completed_rounds(self) -> list[int]:
        return sorted(int(p.parent.name.split("-")[1]) for p in self.path.glob("round-*/round.done"))
