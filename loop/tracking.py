"""MLflow tracking: one parent run per loop, one nested run per round.

The parent run carries the full config as params, the model provenance as tags, and every round's
metrics with `step=round`, so the UI plots curves over rounds. Each round also gets its own nested run
(tags `round`, `config_name`, `model`, `task`, `git_commit`) so the compare view lines rounds up side
by side. Runs are found again by our own run id (tag `ratchet.run_id`), which makes resuming a loop
log into the same MLflow runs instead of creating duplicates.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

# mlflow is imported where it is used, not here: loading a config (loop/config.py imports TrackingConfig) must not
# pay for importing it (~1.5 s).
from pydantic import BaseModel, ConfigDict

from loop.rundir import flatten

RUN_ID_TAG = "ratchet.run_id"
ROUND_TAG = "round"


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI if set, else a SQLite file mlflow.db in the
    working directory (no server needed)."""
    experiment: str = "ratchet"
    registered_model: str | None = "ratchet-adapter"
    """Each round's adapter is registered as a version of this model (None: don't register)."""


def resolve_uri(cfg: TrackingConfig) -> str:
    """The tracking URI to use, made absolute so that subprocesses and `ratchet ui` agree."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside the database file (MLflow's default is ./mlruns of
    whatever the working directory is); servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None


def git_commit() -> str:
    """The project's git commit (with a +dirty mark), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _params(config: dict[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters.
    return {k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))[:6000] for k, v in flatten(config).items()}


def metric_key(name: str) -> str:
    """MLflow forbids '@' in metric names: pass@4 is logged as pass_at_4 (and maj@4 as maj_at_4)."""
    return name.replace("@", "_at_")


class TrackingConflict(RuntimeError):
    pass


class Tracker:
    """Logs one loop to MLflow. Idempotent per (run id, round): resuming reuses the runs."""

    def __init__(self, cfg: TrackingConfig, run_id: str, tags: dict[str, str], new_loop: bool = False):
        """`new_loop`: the run directory is new, so MLflow must not have this run id yet (a run directory deleted
        to start over would otherwise append its rounds to the old loop's runs, under the old params)."""
        self.cfg = cfg
        self.uri = resolve_uri(cfg)
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.experiment, artifact_location=_artifact_location(self.uri, cfg.experiment))
        self.run_id = run_id
        self.tags = tags
        if new_loop and (old := self._find(None)) is not None:
            raise TrackingConflict(
                f"the MLflow store {self.uri} (experiment {cfg.experiment!r}) already has a loop with run id "
                f"{run_id!r} (MLflow run {old.info.run_id}), but its run directory is new. Start with another "
                f"--run-id, or first delete the old MLflow run: MLFLOW_TRACKING_URI={self.uri} mlflow runs delete "
                f"--run-id {old.info.run_id}")
        self.parent_id = self._find_or_create(None, {RUN_ID_TAG: run_id, **tags}, name=run_id)

    def _find(self, round_: int | None):
        flt = f"tags.`{RUN_ID_TAG}` = '{self.run_id}'"
        flt += f" and tags.`{ROUND_TAG}` = '{round_}'" if round_ is not None else " and tags.`kind` = 'loop'"
        found = self.client.search_runs([self.experiment_id], flt, max_results=1)
        return found[0] if found else None

    def _find_or_create(self, round_: int | None, tags: dict[str, str], name: str) -> str:
        run = self._find(round_)
        if run is not None:
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        kind = {"kind": "loop"} if round_ is None else {"kind": "round", ROUND_TAG: str(round_)}
        if round_ is not None:
            tags = {**tags, "mlflow.parentRunId": self.parent_id}
        run = self.client.create_run(self.experiment_id, tags={**tags, **kind}, run_name=name)
        return run.info.run_id

    def log_config(self, config: dict[str, Any], provenance: dict[str, str]) -> None:
        import mlflow

        params = _params(config)
        existing = self.client.get_run(self.parent_id).data.params
        # Params are immutable in MLflow: on resume only log the ones not yet there, and a setting the run may
        # resume with changed (RESUMABLE_KEYS) as a tag resumed_with.<key>.
        new = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.parent_id, params=new[i:i + 100])
        tags = [mlflow.entities.RunTag(f"model.{k}", str(v)[:5000]) for k, v in provenance.items()]
        tags += [mlflow.entities.RunTag(f"resumed_with.{k}", v) for k, v in params.items()
                 if k in existing and existing[k] != v]
        self.client.log_batch(self.parent_id, tags=tags)
        self.client.log_text(self.parent_id, json.dumps(config, indent=2, default=str), "config.json")

    def log_round(self, round_: int, metrics: dict[str, float], artifacts: dict[str, Path],
                  adapter: Path | None) -> str:
        """Log a round's metrics (nested run + parent at step=round) and artifacts; return its run id.

        `artifacts` maps names to files (logged at the run's artifact root) or folders (logged under the name).
        """
        import mlflow

        rid = self._find_or_create(round_, {RUN_ID_TAG: self.run_id, **self.tags}, name=f"{self.run_id}/round-{round_}")
        finite = {metric_key(k): float(v) for k, v in metrics.items() if v is not None}
        ts = int(time.time() * 1000)
        ms_round = [mlflow.entities.Metric(k, v, ts, 0) for k, v in finite.items()]
        ms_parent = [mlflow.entities.Metric(k, v, ts, round_) for k, v in finite.items()]
        for i in range(0, len(finite), 200):
            self.client.log_batch(rid, metrics=ms_round[i:i + 200])
            self.client.log_batch(self.parent_id, metrics=ms_parent[i:i + 200])
        for name, path in artifacts.items():
            if path.is_dir():
                self.client.log_artifacts(rid, str(path), name)
            else:
                self.client.log_artifact(rid, str(path))
        if adapter is not None:
            self.client.log_artifacts(rid, str(adapter), "adapter")
            if self.cfg.registered_model:
                self._register(rid, round_)
        self.client.set_terminated(rid, "FINISHED")
        return rid

    def _register(self, rid: str, round_: int) -> None:
        import mlflow

        name = self.cfg.registered_model
        try:
            self.client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            self.client.create_registered_model(name, description="LoRA adapters, one version per loop round.")
        source = f"{self.client.get_run(rid).info.artifact_uri}/adapter"
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{rid}'")
        if not versions:
            self.client.create_model_version(name, source, run_id=rid,
                                             tags={RUN_ID_TAG: self.run_id, ROUND_TAG: str(round_)})

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status)
