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
from pydantic import BaseModel, ValidationError


# Settings a run may resume with changed, because they change memory use, speed or where results are registered but
# not what a round computes (e.g. to resume after running out of memory). `rounds` only adds or drops rounds not run
# yet; a changed tracking.registered_model registers the later rounds under the new name.
RESUMABLE_KEYS = frozenset({"rounds", "train.gradient_checkpointing", "train.precompute_ref_log_probs",
                            "engine.kv_cache_memory_bytes", "engine.gpu_memory_utilization", "engine.enforce_eager",
                            "engine.enable_sleep_mode", "engine.cpu_threads", "tracking.registered_model"})


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"train.lr": ..., ...}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same_dpo_batch(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Pairs per optimizer step unchanged under DPO (same loss, less memory per pass). Not for KTO, whose KL
    estimate depends on what else is in the forward batch."""
    def step(c: dict[str, Any]) -> int:
        return c.get("train.per_device_batch_size", 1) * c.get("train.grad_accumulation", 1)
    return (old.get("train.algorithm", "dpo") == new.get("train.algorithm", "dpo") == "dpo"
            and step(old) == step(new))


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
    def __init__(self, root: Path, run_id: str, create: bool = True):
        """`create=False`: only look (the start-up checks run before anything is written)."""
        self.run_id = run_id
        self.path = Path(root).resolve() / run_id
        if create:
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

    def check_config(self, config: dict[str, Any], schema: type[BaseModel] | None = None) -> bool:
        """Refuse a config that differs from the one this run started with, except in `RESUMABLE_KEYS` (and a
        DPO batch split differently, see `_same_dpo_batch`). True for a new run: no saved config, or a saved one
        that no stage ran with (a start that failed before any work, e.g. on a wrong model, does not burn the
        run id: the new config replaces it).

        `schema` (the config's pydantic model) reads the saved config with today's defaults first, so that a setting
        added to the project after the run started, left at its default (the old behaviour), is not a change.

        Nothing is written: `save_config` does that once the rest of the start-up checks have passed."""
        saved_path = self.path / "config.yaml"
        if not saved_path.exists():
            return True
        saved = yaml.safe_load(saved_path.read_text())
        if schema is not None:
            try:
                saved = schema.model_validate(saved).model_dump(mode="json")
            except ValidationError:
                pass  # a setting since removed or renamed: compared as saved, so it shows as changed
        old, new = flatten(saved), flatten(config)
        changed = {k for k in set(old) | set(new) if old.get(k) != new.get(k)} - RESUMABLE_KEYS
        if _same_dpo_batch(old, new):
            changed -= {"train.per_device_batch_size", "train.grad_accumulation"}
        if changed and not self.started():
            return True
        if changed:
            raise ValueError(
                f"run {self.run_id!r} was started with a different config (changed: {', '.join(sorted(changed))}). "
                f"Resume with the original config ({saved_path}) or start a new --run-id. Settings that only "
                f"change memory or speed may differ: {', '.join(sorted(RESUMABLE_KEYS))}, and the DPO batch split "
                f"(train.per_device_batch_size x train.grad_accumulation kept equal).")
        return False

    def save_config(self, config: dict[str, Any]) -> None:
        _atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def started(self) -> bool:
        """Whether any stage of any round is done (a saved config alone is not a start)."""
        return any(self.path.glob("round-*/*.done"))

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
