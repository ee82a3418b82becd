"""The MLflow layout a loop leaves, against a real SQLite store written by the real Tracker (issue 18).

Steps (round) on the nested and the parent runs, nested runs that span their round, the round's params, the loop's
description, the registry (a model per config, pass@1 on each version, aliases `last` and `best`), evaluation samples
that carry their problem's prompt and gold answer, and a store that still reads after being copied elsewhere, also
through the MLflow UI server `ratchet ui` starts.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from loop.grading import VerifyConfig, grade_trajectories
from loop.records import Segment, Trajectory
from loop.run.directory import write_jsonl
from loop.run.tracking import Tracker, TrackingConfig, artifact_repo, download_artifact, ui_command
from loop.tasks import TaskSetConfig, load_tasks

TAGS = {"config_name": "layout", "model": "smollm2-135m-instruct", "task": "arithmetic", "git_commit": "x"}
PASS_AT_1 = {0: 0.25, 1: 0.5, 2: 0.375, 3: 0.5}  # round 3 ties round 1: `best` stays on the earlier version
GAP_S = 1.0  # the work of a round, between start_round and log_round


def _params(r: int) -> dict:
    p = {"model": TAGS["model"], "adapter": "base" if r <= 1 else f"runs/layout/round-{r - 1:02d}/adapter", "eval.n": 4}
    return p | ({"train.lr": 1e-4, "train.beta": 0.1, "sampling.n": 6} if r else {})


def _eval_samples(tmp: Path, r: int) -> Path:
    """eval_samples.jsonl as the evaluation writes it: real arithmetic tasks graded by the real math verifier."""
    tasks = load_tasks(TaskSetConfig(family="arithmetic", split="eval", limit=3, difficulty=1))
    trajs = [Trajectory(task_id=t.id, sample=s, prompt_token_ids=[1, 2],
                        segments=[Segment("model", f"The answer is {t.answer if s == 0 else 'unknown'}.", [3, 4])])
             for t in tasks for s in range(2)]
    graded = grade_trajectories({t.id: t for t in tasks}, trajs, VerifyConfig(workers=1))
    path = tmp / f"round-{r:02d}" / "eval_samples.jsonl"
    path.parent.mkdir()
    write_jsonl(path, (g.to_dict() for g in graded))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Rounds 0-3 of one loop (round 2 interrupted after start_round and resumed by a new Tracker), and a round of
    a second config; then round 4 started and the loop failed."""
    tmp = tmp_path_factory.mktemp("layout")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp}/store/mlflow.db", experiment="exp")
    (tmp / "store").mkdir()
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16, "base_model_name_or_path": "/root/.cache/x/model"}')
    t = Tracker(cfg, "layout", TAGS)
    t.log_config({"model": TAGS["model"], "rounds": 4, "train": {"lr": 1e-4}}, {"sha256": "abc"})
    gaps, nested = {}, {}
    for r in range(4):
        nested[r] = t.start_round(r, _params(r))
        t0 = time.monotonic()
        if r == 2:  # the loop dies mid-round; a resumed loop opens the same nested run again
            t = Tracker(cfg, "layout", TAGS)
            assert t.start_round(r, _params(r)) == nested[r]
        samples = _eval_samples(tmp, r)
        time.sleep(GAP_S)
        gaps[r] = time.monotonic() - t0
        logged = t.log_round(r, {"eval/pass@1": PASS_AT_1[r], "eval/pass@1_low": PASS_AT_1[r] - 0.1,
                                 "eval/pass@1_high": PASS_AT_1[r] + 0.1, "train/loss": 0.6 if r else None},
                             {"eval_samples.jsonl": samples}, adapter if r else None)
        assert logged == nested[r]
    other = Tracker(cfg, "other", {**TAGS, "config_name": "other-config", "model": "qwen2.5-coder-0.5b-instruct"})
    other.start_round(1, _params(1))
    other.log_round(1, {"eval/pass@1": 0.1}, {}, adapter)
    other.finish()
    open_round = t.start_round(4, _params(4))
    t.finish("FAILED")
    return {"cfg": cfg, "tmp": tmp, "parent": t.parent_id, "nested": nested, "gaps": gaps, "open": open_round,
            "client": t.client}


def test_rounds_are_steps_and_nested_runs_span_their_round(store):
    c, nested = store["client"], store["nested"]
    for key in ("eval/pass_at_1",):
        assert {m.step: m.value for m in c.get_metric_history(store["parent"], key)} == PASS_AT_1
    for r, rid in nested.items():
        run = c.get_run(rid)
        assert [(m.step, m.value) for m in c.get_metric_history(rid, "eval/pass_at_1")] == [(r, PASS_AT_1[r])]
        assert run.data.tags["mlflow.parentRunId"] == store["parent"] and run.data.tags["round"] == str(r)
        assert run.info.status == "FINISHED"
        # Opened by start_round, closed by log_round: at least the round's work long (not the ms of logging).
        assert (run.info.end_time - run.info.start_time) / 1000 >= store["gaps"][r] - 0.01, r
    assert "train/loss" not in c.get_run(nested[0]).data.metrics  # None: not logged as a number
    # A failure mid-round closes the open nested run with the loop's status.
    assert c.get_run(store["open"]).info.status == "FAILED"
    assert c.get_run(store["parent"]).info.status == "FAILED"


def test_nested_runs_carry_the_round_params_and_the_loop_its_description(store):
    c, nested = store["client"], store["nested"]
    assert c.get_run(nested[0]).data.params == {"model": TAGS["model"], "adapter": "base", "eval.n": "4"}
    p2 = c.get_run(nested[2]).data.params
    assert p2["adapter"] == "runs/layout/round-01/adapter" and p2["train.lr"] == "0.0001" and p2["sampling.n"] == "6"
    note = c.get_run(store["parent"]).data.tags["mlflow.note.content"]
    assert TAGS["model"] in note and "arithmetic" in note and "4 rounds" in note and "layout" in note


def test_registry_is_per_config_with_pass_at_1_and_aliases(store):
    c = store["client"]
    versions = {int(v.version): v for v in c.search_model_versions("name = 'ratchet-layout'")}
    assert sorted(versions) == [1, 2, 3]  # rounds 1-3, each once (round 2 resumed)
    for version, r in zip((1, 2, 3), (1, 2, 3)):
        v = versions[version]
        assert v.run_id == store["nested"][r]
        assert v.tags["round"] == str(r) and v.tags["base_model"] == TAGS["model"] and v.tags["config_name"] == "layout"
        assert float(v.tags["pass_at_1"]) == PASS_AT_1[r]
    assert str(c.get_model_version_by_alias("ratchet-layout", "last").version) == "3"
    assert str(c.get_model_version_by_alias("ratchet-layout", "best").version) == "1"  # 0.5, before round 3's tie
    model = c.get_registered_model("ratchet-layout")
    assert model.tags == {"base_model": TAGS["model"], "config_name": "layout"}
    # Another config registers into its own model.
    [v] = c.search_model_versions("name = 'ratchet-other-config'")
    assert v.tags["base_model"] == "qwen2.5-coder-0.5b-instruct"
    assert str(c.get_model_version_by_alias("ratchet-other-config", "best").version) == "1"


def test_a_registered_adapter_is_portable_and_has_a_model_card(store, tmp_path: Path):
    """The logged adapter names its base model as the config does, not this machine's cache path, and its card
    gives the round, pass@1 with its interval, the base weights' checksum and how `best` was chosen."""
    c, uri = store["client"], store["cfg"].uri
    best = c.get_model_version_by_alias("ratchet-layout", "best")
    dst = download_artifact(uri, c.get_run(best.run_id).info.artifact_uri, "adapter", tmp_path)
    config = json.loads((dst / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == TAGS["model"] and config["r"] == 16
    card = (dst / "README.md").read_text()
    assert "round 1" in card and "pass@1 0.500 [0.400, 0.600]" in card and "`abc`" in card
    assert "chosen on the same evaluation set" in card.replace("\n", " ")
    assert "/root/.cache" not in card
    # The run directory's adapter is untouched.
    assert json.loads((store["tmp"] / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "/root/.cache/x/model"


def _read_samples(uri: str, run, dst: Path) -> list[dict]:
    path = download_artifact(uri, run.info.artifact_uri, "eval_samples.jsonl", dst)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_carry_prompt_and_gold_and_a_copied_store_reads(store, tmp_path):
    tasks = {t.id: t for t in load_tasks(TaskSetConfig(family="arithmetic", split="eval", limit=3, difficulty=1))}
    uri, c = store["cfg"].uri, store["client"]
    rows = _read_samples(uri, c.get_run(store["nested"][1]), tmp_path / "orig")
    assert len(rows) == 6
    for row in rows:
        task = tasks[row["trajectory"]["task_id"]]
        assert row["prompt"] == task.prompt and row["gold"] == task.answer
        assert row["status"] == ("correct" if row["trajectory"]["sample"] == 0 else "incorrect")
    # Nothing in the store names its folder: copied elsewhere (and the original gone) it reads the same.
    exp = c.get_experiment_by_name("exp")
    assert exp.artifact_location == "mlflow-artifacts:/exp"
    copy = tmp_path / "elsewhere" / "store"
    shutil.copytree(store["tmp"] / "store", copy)
    shutil.move(store["tmp"] / "store", store["tmp"] / "moved-away")
    try:
        copy_uri = f"sqlite:///{copy}/mlflow.db"
        cc = MlflowClient(copy_uri)
        run = cc.get_run(store["nested"][1])
        assert _read_samples(copy_uri, run, tmp_path / "copy") == rows
        assert {a.path for a in artifact_repo(copy_uri, run.info.artifact_uri).list_artifacts()} == {
            "eval_samples.jsonl", "adapter"}
        source = cc.get_model_version_by_alias("ratchet-layout", "best").source
        assert source == f"{run.info.artifact_uri}/adapter" and source.startswith("mlflow-artifacts:/")
        _check_ui_serves(copy_uri, run.info.run_id, rows)
    finally:
        shutil.move(store["tmp"] / "moved-away", store["tmp"] / "store")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_ui_serves(uri: str, run_id: str, rows: list[dict]) -> None:
    """The server `ratchet ui` starts serves the copied store's artifacts (what the UI's artifact view fetches) and
    its registered adapter."""
    port = _free_port()
    proc = subprocess.Popen(ui_command(uri, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the MLflow UI server did not start"
                time.sleep(1)
        got = urllib.request.urlopen(f"{base}/get-artifact?path=eval_samples.jsonl&run_uuid={run_id}").read()
        assert [json.loads(line) for line in got.decode().splitlines()] == rows
        listed = json.loads(urllib.request.urlopen(
            f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}&path=adapter").read())
        assert sorted(f["path"] for f in listed["files"]) == ["adapter/README.md", "adapter/adapter_config.json"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_copied_store_of_the_old_absolute_layout_reads_from_its_own_folder(tmp_path):
    """Stores logged before the relative layout name their artifacts by absolute file:// paths; copied elsewhere
    (the original gone), the artifacts are found in the copy's mlartifacts/."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    store = tmp_path / "old"
    store.mkdir()
    uri = f"sqlite:///{store}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("exp", artifact_location=(store / "mlartifacts" / "exp").as_uri())
    run = c.create_run(exp)
    (tmp_path / "metrics.json").write_text('{"eval/pass@1": 0.5}')
    LocalArtifactRepository(run.info.artifact_uri).log_artifact(str(tmp_path / "metrics.json"))
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    shutil.rmtree(store)
    copy_uri = f"sqlite:///{copy}/mlflow.db"
    got = download_artifact(copy_uri, MlflowClient(copy_uri).get_run(run.info.run_id).info.artifact_uri,
                            "metrics.json", tmp_path / "dl")
    assert json.loads(got.read_text()) == {"eval/pass@1": 0.5}


def test_ratchet_ui_prints_the_runs_list_once_the_server_answers(tmp_path):
    """`ratchet ui` waits for the server, then prints the URL that opens the experiment's runs list in the
    machine-learning view (MLflow 3 opens an experiment in its GenAI view otherwise); Ctrl-C stops it."""
    import os
    import signal
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = MlflowClient(uri).create_experiment("ratchet")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--tracking-uri", uri],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning"
        seen = []
        for line in proc.stdout:  # the server's own lines come first
            seen.append(line)
            if "MLflow UI for" in line:
                break
        assert url in seen[-1], seen
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)  # answering when the URL is printed
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
