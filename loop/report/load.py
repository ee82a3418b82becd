"""Loading one loop (or an experiment's loops) from MLflow for the report: the parent run's metric histories and
each evaluated round's eval_per_prompt.jsonl / eval_samples.jsonl artifacts, as a LoopData."""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from loop.evaluation.metrics import normalize_answer
from loop.run.tracking import GIT_COMMIT_TAG, RUN_ID_TAG, ROUND_TAG, TrackingConfig, download_artifact, resolve_uri


@dataclass
class LoopData:
    tracking_uri: str
    experiment: str
    parent_run_id: str  # the MLflow run id of the loop's parent run
    ratchet_run_id: str  # the loop's own run id (tag ratchet.run_id)
    round_run_ids: dict[int, str]  # round -> MLflow run id of its nested run
    metrics: pd.DataFrame  # index: round; columns: metric keys as logged ("eval/pass_at_1", ...)
    per_prompt: pd.DataFrame  # every round's eval_per_prompt.jsonl rows, plus a 'round' column
    samples: pd.DataFrame  # one row per evaluation sample: round, task_id, sample, status, answer, model_tokens
    git_commit: str = "unknown"  # the project's commit the loop ran at (its parent run's tag)
    started: str = ""  # the loop's start date (UTC, YYYY-MM-DD)

    @property
    def stamp(self) -> str:
        """What a figure drawn from this loop says in its corner (loop.report.plots.save_figure): which run, at
        which commit, from when."""
        return f"run {self.ratchet_run_id or self.parent_run_id} · commit {self.git_commit} · {self.started}"

    @property
    def rounds(self) -> list[int]:
        return sorted(self.round_run_ids)


def find_loop_run(client: MlflowClient, experiment_id: str, run_id: str | None) -> mlflow.entities.Run:
    """The loop's parent run: by ratchet run id, else by MLflow run id; None: the latest loop run."""
    loop = "tags.`kind` = 'loop'"
    if run_id is None:
        found = client.search_runs([experiment_id], loop, order_by=["attributes.start_time DESC"], max_results=1)
    else:
        found = (client.search_runs([experiment_id], f"{loop} and tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
                 or client.search_runs([experiment_id], f"{loop} and attributes.run_id = '{run_id}'", max_results=1))
    if not found:
        what = "no loop run" if run_id is None else f"no loop run with ratchet or MLflow run id {run_id!r}"
        raise ValueError(f"{what} in experiment {experiment_id}")
    return found[0]


def _metric_histories(client: MlflowClient, run: mlflow.entities.Run) -> pd.DataFrame:
    """Round x metric table from the parent run's histories (step = round). A round logged twice (a
    resumed loop) keeps its latest value."""
    cols: dict[str, dict[int, float]] = {}
    for key in run.data.metrics:
        hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.step, m.timestamp))
        cols[key] = {m.step: m.value for m in hist}  # later timestamps overwrite earlier ones
    df = pd.DataFrame(cols).sort_index()
    df.index.name = "round"
    return df


def _read_samples(path: Path, round_: int, verifiers: dict[str, str]) -> list[dict]:
    """The fields of eval_samples.jsonl the report uses; token ids are dropped as lines are read, so
    a large evaluation does not sit in memory. `verifiers`: task id -> its verifier (from eval_per_prompt)."""
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            g = json.loads(line)
            t = g["trajectory"]
            answer = (normalize_answer(g["extracted"])
                      if g["extracted"] is not None and g["status"] != "no_answer" else None)
            rows.append({"round": round_, "task_id": t["task_id"], "sample": t["sample"], "status": g["status"],
                         "answer": answer, "extracted": g["extracted"], "verifier": verifiers.get(t["task_id"]),
                         "finish_reason": t["finish_reason"],
                         "model_tokens": sum(len(s["token_ids"]) for s in t["segments"] if s["kind"] == "model")})
    return rows


def _open_experiment(tracking_uri: str | None, experiment: str, base: Path | None):
    """(resolved URI, client, experiment) of an existing store and experiment."""
    uri = resolve_uri(TrackingConfig(uri=tracking_uri), base)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would silently create an empty store there.
        raise FileNotFoundError(f"no MLflow store at {uri}; set the tracking URI to the loop's store")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}")
    return uri, client, exp


def load_loop(tracking_uri: str | None = None, experiment: str = "ratchet", run_id: str | None = None,
              base: Path | None = None) -> LoopData:
    """Everything the report needs about one loop, read from MLflow.

    `tracking_uri` None: $MLFLOW_TRACKING_URI or mlflow.db, as the loop itself resolves it; a relative SQLite path is
    relative to `base` (None: the working directory; the notebook passes the repository root).
    `run_id`: the loop's ratchet run id or its parent's MLflow run id; None: the most recent loop run.
    Rounds whose nested run has not finished (a loop still logging) are left out with a warning, and rounds the
    evaluation schedule did not evaluate are left out.
    """
    uri, client, exp = _open_experiment(tracking_uri, experiment, base)
    parent = find_loop_run(client, exp.experiment_id, run_id)
    pid = parent.info.run_id
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}' and tags.`kind` = 'round'")
    round_runs: dict[int, str] = {}
    runs = {r.info.run_id: r for r in nested}
    for r in nested:
        rnd = int(r.data.tags[ROUND_TAG])
        if rnd in round_runs:
            raise ValueError(f"loop {pid} has two nested runs for round {rnd}: {round_runs[rnd]}, {r.info.run_id}")
        if r.info.status != "FINISHED":
            warnings.warn(f"round {rnd} (run {r.info.run_id}) is {r.info.status}; leaving it out")
            continue
        round_runs[rnd] = r.info.run_id
    if not round_runs:
        raise ValueError(f"loop {pid} has no finished rounds yet")
    # Rounds the evaluation schedule skipped (eval.every) have no held-out figures: the report is about those.
    round_runs = {rnd: rid for rnd, rid in round_runs.items()
                  if any(k.startswith("eval/pass_at_") for k in runs[rid].data.metrics)}

    per_prompt, samples = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd, rid in sorted(round_runs.items()):
            dst = Path(tmp) / str(rnd)
            dst.mkdir()
            with open(download_artifact(uri, runs[rid].info.artifact_uri, "eval_per_prompt.jsonl", dst)) as f:
                rows = [{"round": rnd, **json.loads(line)} for line in f if line.strip()]
            per_prompt += rows
            samples += _read_samples(download_artifact(uri, runs[rid].info.artifact_uri, "eval_samples.jsonl", dst), rnd,
                                     {r["task_id"]: r.get("verifier") for r in rows})
    metrics = _metric_histories(client, parent)
    return LoopData(tracking_uri=uri, experiment=experiment, parent_run_id=pid,
                    ratchet_run_id=parent.data.tags.get(RUN_ID_TAG, ""), round_run_ids=round_runs,
                    metrics=metrics.loc[metrics.index.isin(round_runs)], per_prompt=pd.DataFrame(per_prompt),
                    samples=pd.DataFrame(samples), git_commit=parent.data.tags.get(GIT_COMMIT_TAG, "unknown"),
                    started=datetime.fromtimestamp(parent.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d"))


def load_loops(tracking_uri: str | None = None, experiment: str = "ablation",
               base: Path | None = None) -> dict[str, LoopData]:
    """Every loop of an experiment (e.g. bench/diversity.py's option runs), keyed by ratchet run id, in the order
    they started; a run id logged twice (a restarted loop) gives its latest run."""
    uri, client, exp = _open_experiment(tracking_uri, experiment, base)
    ids = [r.data.tags.get(RUN_ID_TAG) for r in client.search_runs(
        [exp.experiment_id], "tags.`kind` = 'loop'", order_by=["attributes.start_time ASC"], max_results=1000)]
    return {i: load_loop(uri, experiment, i) for i in dict.fromkeys(i for i in ids if i)}
