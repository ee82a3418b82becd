"""MLflow tracking: one parent run per loop, one nested run per round.

The parent run carries the full config as params, the model provenance as tags, a one-line description
(`mlflow.note.content`) and every round's metrics with `step=round`, so the UI plots curves over rounds. Each
round also gets its own nested run, opened when the round starts and closed when it is logged (so its duration is
the round's), with the round's key settings as params and its metrics at `step=round` too, so the compare view
and the chart view line rounds up. Runs are found again by our own run id (tag `ratchet.run_id`), which makes
resuming a loop log into the same MLflow runs instead of creating duplicates.

A SQLite store keeps its artifacts in `mlartifacts/` beside the database, addressed as `mlflow-artifacts:/...`
(relative to that folder, as `mlflow server --artifacts-destination` serves them), so a copied store, database
and folder together, is self-contained: see `artifact_repo` and `artifacts_destination`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# mlflow is imported where it is used, not here: loading a config (loop/config.py imports TrackingConfig) must not
# pay for importing it (~1.5 s).
from pydantic import BaseModel, ConfigDict

from loop.run.directory import flatten

RUN_ID_TAG = "ratchet.run_id"
ROUND_TAG = "round"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
GIT_COMMIT_TAG = "git_commit"  # the loop's parent run: the commit the run started from (figures are stamped with it)
PASS_AT_1_TAG = "pass_at_1"  # on each registered adapter version: its round's held-out pass@1


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI if set, else a SQLite file mlflow.db in the
    working directory (no server needed)."""
    experiment: str = "ratchet"
    """The MLflow experiment the loop's runs go to."""
    registered_model: str | None = "ratchet-{config_name}"
    """Each round's adapter is registered as a version of this model ({config_name}: the loop config's name, so
    each config's adapters, of one base model, are versions of one model; None: don't register)."""


def resolve_uri(cfg: TrackingConfig, base: Path | None = None) -> str:
    """The tracking URI to use, made absolute so that subprocesses and `ratchet ui` agree: a relative SQLite path
    is relative to `base` (None: the working directory)."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str((Path(base or ".") / uri[len("sqlite:///"):]).resolve())
    return uri


def artifacts_destination(uri: str) -> Path | None:
    """A SQLite store's artifact folder: mlartifacts/ beside the database (None for other stores)."""
    return Path(uri[len("sqlite:///"):]).parent / "mlartifacts" if uri.startswith("sqlite:///") else None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """A SQLite store's experiments keep their artifacts beside the database, under a path relative to it
    (MLflow's default is an absolute ./mlruns of whatever the working directory is); servers choose their own."""
    return f"mlflow-artifacts:/{experiment}" if uri.startswith("sqlite:///") else None


def artifact_repo(uri: str, artifact_uri: str):
    """The artifact repository of a run (`artifact_uri`) in the store at `uri`.

    Without a server nothing resolves `mlflow-artifacts:` paths, so under a SQLite store they are resolved here,
    against the store's own folder wherever it now is. An absolute file:// root of a store logged before that (or
    copied from elsewhere) that no longer exists is looked up in the store's folder too."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if (dest := artifacts_destination(uri)) is not None:
        parsed = urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":
            artifact_uri = (dest / parsed.path.lstrip("/")).as_uri()
        elif parsed.scheme == "file" and not Path(parsed.path).exists() and "/mlartifacts/" in parsed.path:
            artifact_uri = (dest / parsed.path.rsplit("/mlartifacts/", 1)[1]).as_uri()
    return get_artifact_repository(artifact_uri, tracking_uri=uri)


def download_artifact(uri: str, artifact_uri: str, path: str, dst: Path) -> Path:
    """Copy the artifact `path` of the run whose artifact root is `artifact_uri` into the folder `dst` (created), without
    MLflow's progress bars (one per file would fill a notebook); returns the local copy."""
    dst.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        return Path(artifact_repo(uri, artifact_uri).download_artifacts(path, str(dst)))
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = old


_MAJ_AT_1 = re.compile(r"maj@1(?!\d)")


def ui_command(uri: str, port: int) -> list[str]:
    """The MLflow UI server (`ratchet ui`) on the store at `uri`; a SQLite store's artifacts are served from its own
    folder, wherever the store now is (mlflow's default is ./mlartifacts of the working directory)."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # one process: a local UI for one user; the default starts several
    if (dest := artifacts_destination(uri)) is not None:
        cmd += ["--artifacts-destination", str(dest)]
    return cmd


def runs_url(base: str, uri: str, experiment: str) -> str:
    """The UI's address of `experiment`'s runs list in the classic (machine-learning) view; MLflow 3 opens an
    experiment in its GenAI view otherwise. The UI's root when the store has no such experiment yet."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    return f"{base}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" if exp else base


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


def model_card(base: str, provenance: dict[str, str], *, run_id: str, config_name: str, round_: int,
               metrics: dict[str, Any]) -> str:
    """The model card of a logged adapter: what it is, what it was measured at, and how `best` was chosen."""
    p1, low, high = (metrics.get(f"eval/pass@1{s}") for s in ("", "_low", "_high"))
    if p1 is None:
        measured = "not evaluated this round (eval.every)"
    else:
        measured = f"held-out pass@1 {p1:.3f}" + (f" [{low:.3f}, {high:.3f}] (95% interval, problems as the unit)"
                                                 if None not in (low, high) else "")
    weights = [f"- {k}: `{v}`" for k, v in sorted(provenance.items()) if k in ("upstream", "sha256", "packages",
                                                                                  "version", "source", "id")]
    return "\n".join([
        "---", f"base_model: {provenance.get('upstream', base).split(' ')[0] or base}", "library_name: peft",
        "tags: [lora, dpo, ratchet-loop]", "---", "",
        f"# LoRA adapter: {config_name}, round {round_}", "",
        f"A LoRA adapter of `{base}` trained by ratchet-loop (run `{run_id}`, loop config `{config_name}`), "
        f"after round {round_}: {measured}.", "",
        "Load it on the base model named in `adapter_config.json` (`base_model_name_or_path`: the loop's `model:`, "
        "a ratchet-loop built-in name or a hub id). The base weights:", "", *weights, "",
        "The registry alias `best` points at the version with the highest held-out pass@1, chosen on the same "
        "evaluation set these figures come from: the chosen version's figure is optimistic; judge it on other "
        "problems.", ""])


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
        self._open_round: str | None = None  # a nested round run start_round opened and log_round has not closed
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

    def _round_run(self, round_: int) -> str:
        return self._find_or_create(round_, {RUN_ID_TAG: self.run_id, **self.tags}, name=f"{self.run_id}/round-{round_}")

    def log_loop_artifact(self, path: Path) -> None:
        """A file on the loop's parent run (replacing one of the same name: a figure redrawn each round)."""
        self._repo(self.parent_id).log_artifact(str(path))

    def _repo(self, rid: str):
        return artifact_repo(self.uri, self.client.get_run(rid).info.artifact_uri)

    def _log_params(self, rid: str, params: dict[str, str]) -> None:
        """Log the params `rid` does not have yet. Params are immutable in MLflow: on resume a setting the run may
        resume with changed (RESUMABLE_KEYS) is logged as a tag resumed_with.<key> instead."""
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(rid).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(rid, params=new[i:i + 100])
        changed = [RunTag(f"resumed_with.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
        if changed:
            self.client.log_batch(rid, tags=changed)

    def set_tag(self, key: str, value: str) -> None:
        """A tag on the loop's parent run (tags, unlike params, may change when a resumed loop goes further)."""
        self.client.set_tag(self.parent_id, key, value)

    def log_params(self, params: dict[str, Any]) -> None:
        """Params of the loop's run beside its config (nested dicts flattened with dots, as the config's)."""
        self._log_params(self.parent_id, _params(params))

    def log_config(self, config: dict[str, Any], provenance: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._log_params(self.parent_id, _params(config))
        tags = [RunTag(f"model.{k}", str(v)[:5000]) for k, v in provenance.items()]
        # The runs table and the run page show this description (set again on resume: rounds may have changed).
        tags.append(RunTag(NOTE_TAG, f"{self.tags.get('model', config.get('model'))} on {self.tags.get('task', '?')}, "
                                     f"{config.get('rounds', '?')} rounds (config {self.tags.get('config_name', '?')}, "
                                     f"run {self.run_id})"))
        self.client.log_batch(self.parent_id, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, default=str))
            self._repo(self.parent_id).log_artifact(str(Path(tmp) / "config.json"))

    def start_round(self, round_: int, params: dict[str, Any]) -> str:
        """Open round `round_`'s nested run (resume: the same one again) with its key settings as params; log_round
        closes it, so the run's duration is the round's. Returns its run id."""
        rid = self._round_run(round_)
        self._log_params(rid, {k: str(v)[:6000] for k, v in params.items()})
        self._open_round = rid
        return rid

    def log_round(self, round_: int, metrics: dict[str, float], artifacts: dict[str, Path],
                  adapter: Path | None, note: str | None = None) -> str:
        """Log a round's metrics (nested run and parent, both at step=round) and artifacts, close its nested run
        (opened by start_round, or now) and return its run id.

        `artifacts` maps names to files (logged at the run's artifact root) or folders (logged under the name);
        `note` becomes the round run's description (e.g. "round 2/3 done · pass@1 0.497 [0.410, 0.585] · 100 pairs").
        """
        from mlflow.entities import Metric

        rid = self._round_run(round_)
        ts = int(time.time() * 1000)
        # maj@1 is pass@1 (both count a sample's verdict): one of them in MLflow. A retried log stage logs nothing a
        # first attempt already logged, so every metric has one point per round.
        ms = [Metric(metric_key(k), float(v), ts, round_) for k, v in metrics.items()
              if v is not None and not _MAJ_AT_1.search(k)]
        nested_has = set(self.client.get_run(rid).data.metrics)
        for i in range(0, len(ms), 200):
            batch = ms[i:i + 200]
            self.client.log_batch(rid, metrics=[m for m in batch if m.key not in nested_has])
            parent = [m for m in batch if not nested_has or not any(
                h.step == round_ for h in self.client.get_metric_history(self.parent_id, m.key))]
            self.client.log_batch(self.parent_id, metrics=parent)
        repo = self._repo(rid)
        for name, path in artifacts.items():
            if path.is_dir():
                repo.log_artifacts(str(path), name)
            else:
                repo.log_artifact(str(path))
        if adapter is not None:
            with tempfile.TemporaryDirectory() as tmp:
                repo.log_artifacts(str(self._portable_adapter(adapter, round_, metrics, Path(tmp))), "adapter")
            if self.cfg.registered_model:
                self._register(rid, round_, metrics.get("eval/pass@1"))
        if note:
            self.client.set_tag(rid, "mlflow.note.content", note)
        self.client.set_terminated(rid, "FINISHED")
        self._open_round = None
        return rid

    def _portable_adapter(self, adapter: Path, round_: int, metrics: dict[str, Any], tmp: Path) -> Path:
        """The adapter as logged: a copy that names its base model as the config does (a built-in name or a hub id;
        peft wrote this machine's cache path) and carries a model card (README.md) with the run, the round, its
        held-out pass@1 with the interval and the base weights' checksum. The run directory keeps the original."""
        out = tmp / "adapter"
        shutil.copytree(adapter, out)
        base = self.tags.get("model", "")
        config = out / "adapter_config.json"
        if base and config.is_file():
            cfg = json.loads(config.read_text())
            cfg["base_model_name_or_path"] = base
            config.write_text(json.dumps(cfg, indent=2))
        (out / "README.md").write_text(model_card(
            base, {k[len("model."):]: v for k, v in self.client.get_run(self.parent_id).data.tags.items()
                   if k.startswith("model.")},
            run_id=self.run_id, config_name=self.tags.get("config_name", ""), round_=round_, metrics=metrics))
        return out

    @property
    def registered_model(self) -> str | None:
        """The registry name of this loop's adapters (tracking.registered_model with {config_name} filled in)."""
        name = self.cfg.registered_model
        return name.format(config_name=self.tags.get("config_name", self.run_id)) if name else None

    def _register(self, rid: str, round_: int, pass_at_1: float | None) -> None:
        """Register the round's adapter once (a resumed round keeps its version), tagged with the base model, the
        config and the round's pass@1; point the aliases `last` (the newest version: MLflow reserves `latest`, and
        models:/<name>/latest means the same) and `best` (the highest pass@1; on a tie the earlier version) at them."""
        from mlflow.exceptions import MlflowException

        name, base, config_name = self.registered_model, self.tags.get("model", ""), self.tags.get("config_name", "")
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(
                name, tags={"base_model": base, "config_name": config_name},
                description=f"LoRA adapters of {base} (loop config {config_name}), one version per loop round. "
                            f"Aliases: last (the newest), best (by held-out pass@1, version tag {PASS_AT_1_TAG}).")
        tags = {RUN_ID_TAG: self.run_id, ROUND_TAG: str(round_), "base_model": base, "config_name": config_name}
        if pass_at_1 is not None:
            tags[PASS_AT_1_TAG] = repr(float(pass_at_1))
        if not self.client.search_model_versions(f"name = '{name}' and run_id = '{rid}'"):
            self.client.create_model_version(name, f"{self.client.get_run(rid).info.artifact_uri}/adapter",
                                             run_id=rid, tags=tags)
        versions = self.client.search_model_versions(f"name = '{name}'")
        latest = max(versions, key=lambda v: int(v.version))
        self.client.set_registered_model_alias(name, "last", latest.version)
        scored = [v for v in versions if PASS_AT_1_TAG in v.tags]
        if scored:
            best = max(scored, key=lambda v: (float(v.tags[PASS_AT_1_TAG]), -int(v.version)))
            self.client.set_registered_model_alias(name, "best", best.version)

    def finish(self, status: str = "FINISHED") -> None:
        """Close the loop run, and a round's nested run left open by a failure, with `status`."""
        # Only while still RUNNING: log_round may have closed it through another Tracker object (a task's copy), and
        # terminating it again would move its end time.
        if self._open_round is not None and self.client.get_run(self._open_round).info.status == "RUNNING":
            self.client.set_terminated(self._open_round, status)
            self._open_round = None
        self.client.set_terminated(self.parent_id, status)
