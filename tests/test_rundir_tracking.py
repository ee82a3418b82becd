"""The run directory (resume state, lock) and the MLflow tracker, against a real SQLite MLflow store."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.run.directory import RunDir, RunLocked
from loop.run.tracking import Tracker, TrackingConfig, TrackingConflict, artifact_repo, download_artifact

TAGS = {"config_name": "t", "model": "m", "task": "arithmetic", "git_commit": "x"}


def test_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from loop.run.directory import RunDir; r = RunDir(sys.argv[1], 'r1'); r.lock(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match="in use by another process"):
            RunDir(tmp_path, "r1").lock()
    finally:
        holder.kill()  # a crash: no unlock, no cleanup
        holder.wait()
    run = RunDir(tmp_path, "r1")
    run.lock()  # the kernel released the dead holder's lock
    run.unlock()


def test_stage_markers_and_config_change_detection(tmp_path: Path):
    run = RunDir(tmp_path, "r")
    cfg = {"model": "a", "rounds": 2, "train": {"algorithm": "dpo", "lr": 1e-4, "per_device_batch_size": 4,
                                                "grad_accumulation": 1}, "engine": {"kv_cache_memory_bytes": 1 << 30}}
    assert run.check_config(cfg) is True  # a new run
    run.save_config(cfg)
    assert not run.done(1, "generate")
    run.mark_done(1, "generate")
    assert RunDir(tmp_path, "r").done(1, "generate")
    assert run.check_config({**cfg, "rounds": 5}) is False  # more rounds: a resume, allowed
    with pytest.raises(ValueError, match="changed: model"):
        run.check_config({**cfg, "model": "b"})
    with pytest.raises(ValueError, match=r"changed: train\.lr"):
        run.check_config({**cfg, "train": {**cfg["train"], "lr": 1e-3}})
    # What resuming after running out of memory needs: a smaller KV cache, the same DPO step split in two.
    smaller = {**cfg, "train": {**cfg["train"], "per_device_batch_size": 2, "grad_accumulation": 2},
               "engine": {"kv_cache_memory_bytes": 1 << 29}}
    assert run.check_config(smaller) is False
    with pytest.raises(ValueError, match=r"changed: train\.per_device_batch_size\)"):
        run.check_config({**cfg, "train": {**cfg["train"], "per_device_batch_size": 2}})  # half the step
    with pytest.raises(ValueError, match="per_device_batch_size"):  # KTO: the batch is part of its loss
        kto = {**cfg, "train": {**cfg["train"], "algorithm": "kto"}}
        RunDir(tmp_path, "k").save_config(kto)
        RunDir(tmp_path, "k").mark_done(0, "evaluate")
        RunDir(tmp_path, "k").check_config({**kto, "train": {**kto["train"], "per_device_batch_size": 2,
                                                             "grad_accumulation": 2}})


def test_a_run_whose_rounds_never_started_takes_a_changed_config(tmp_path: Path):
    """A start that failed before any stage ran (a wrong model, vLLM not starting) does not burn the run id: its
    saved config is replaced; once a stage is done, the same change is refused."""
    cfg = {"model": "nonexistent-org/typo", "rounds": 2, "train": {"lr": 1e-4}}
    run = RunDir(tmp_path, "r")
    run.save_config(cfg)
    run.round(0)  # an empty round folder is not a start
    fixed = {**cfg, "model": "smollm2-135m-instruct"}
    assert not run.started()
    assert run.check_config(fixed) is True  # a new run: the flow saves the new config over the old one
    run.save_config(fixed)
    run.mark_done(0, "evaluate")
    assert run.started()
    with pytest.raises(ValueError, match="changed: model"):
        run.check_config(cfg)
    assert RunDir(tmp_path / "absent", "x", create=False).check_config(cfg) is True
    assert not (tmp_path / "absent").exists()  # create=False only looks


def test_tracker_nests_rounds_resumes_and_registers_adapters(tmp_path: Path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp")
    (tmp_path / "samples.jsonl").write_text('{"x": 1}\n')
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    t = Tracker(cfg, "run-a", TAGS)
    t.log_config({"model": "m", "train": {"lr": 1e-5, "targets": ["q", "v"]}}, {"sha256": "abc"})
    r0 = t.log_round(0, {"eval/pass@1": 0.25, "eval/pass@4": 0.5}, {"samples.jsonl": tmp_path / "samples.jsonl"}, None)
    r1 = t.log_round(1, {"eval/pass@1": 0.5, "eval/pass@4": 0.5}, {}, adapter)

    resumed = Tracker(cfg, "run-a", TAGS)
    assert resumed.parent_id == t.parent_id
    assert resumed.log_round(1, {"eval/pass@1": 0.5}, {}, adapter) == r1
    other = Tracker(cfg, "run-b", TAGS)
    assert other.parent_id != t.parent_id
    resumed.finish()

    c = t.client
    assert [(m.step, m.value) for m in c.get_metric_history(t.parent_id, "eval/pass_at_1")][:2] == [(0, 0.25), (1, 0.5)]
    for rid, r in ((r0, 0), (r1, 1)):
        run = c.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == t.parent_id
        assert run.data.tags["round"] == str(r)
    assert c.get_run(t.parent_id).data.params["train.targets"] == '["q", "v"]'
    assert c.get_run(t.parent_id).data.tags["model.sha256"] == "abc"
    assert {a.path for a in artifact_repo(t.uri, c.get_run(r0).info.artifact_uri).list_artifacts()} == {"samples.jsonl"}
    assert {a.path for a in artifact_repo(t.uri, c.get_run(r1).info.artifact_uri).list_artifacts()} == {"adapter"}
    versions = c.search_model_versions("name = 'ratchet-t'")  # ratchet-<config name>
    assert [v.run_id for v in versions] == [r1]  # registered once, even though round 1 was logged twice


def test_a_round_logged_twice_has_one_point_per_metric_and_no_maj_at_1(tmp_path: Path):
    # A retried log stage (Prefect's retries, a resume) must not add a second point at the same step; maj@1 equals
    # pass@1 and is not logged as a metric of its own.
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp", registered_model=None)
    tracker = Tracker(cfg, "loop", TAGS)
    metrics = {"eval/pass@1": 0.25, "eval/maj@1": 0.25, "eval/maj@16": 0.3, "vs_round0/maj@1_p": 0.5}
    for _ in range(2):
        tracker.start_round(1, {})
        rid = tracker.log_round(1, metrics, {}, None)
    c = tracker.client
    assert [m.step for m in c.get_metric_history(tracker.parent_id, "eval/pass_at_1")] == [1]
    assert [m.step for m in c.get_metric_history(rid, "eval/pass_at_1")] == [1]
    assert set(c.get_run(rid).data.metrics) == {"eval/pass_at_1", "eval/maj_at_16"}


def test_tracker_refuses_a_new_run_directory_under_a_logged_run_id(tmp_path: Path):
    # A run directory deleted to start over: its run id must not resume the old MLflow loop (old params, old rounds).
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp")
    old = Tracker(cfg, "run-a", TAGS, new_loop=True)
    old.log_config({"train": {"lr": 1e-5}}, {})
    old.finish("FAILED")
    with pytest.raises(TrackingConflict, match=f"already has a loop with run id 'run-a'.*{old.parent_id}"):
        Tracker(cfg, "run-a", TAGS, new_loop=True)
    assert Tracker(cfg, "run-b", TAGS, new_loop=True).parent_id != old.parent_id
    resumed = Tracker(cfg, "run-a", TAGS)  # the same run directory resuming
    assert resumed.parent_id == old.parent_id
    resumed.log_config({"train": {"lr": 1e-5, "per_device_batch_size": 1}}, {})
    data = resumed.client.get_run(old.parent_id).data
    assert data.params["train.lr"] == "1e-05" and data.params["train.per_device_batch_size"] == "1"
    resumed.log_config({"train": {"lr": 1e-5, "per_device_batch_size": 2}}, {})
    data = resumed.client.get_run(old.parent_id).data
    assert data.params["train.per_device_batch_size"] == "1"  # MLflow params never change ...
    assert data.tags["resumed_with.train.per_device_batch_size"] == "2"  # ... so the new value is a tag


# --- a round's statistics, logged ----------------------------------------------------------------


def _per_prompt(correct: list[int], greedy: list[int], n: int = 4) -> list[dict]:
    """eval_per_prompt.jsonl rows as loop/evaluation/metrics.py writes them (the fields the statistics read)."""
    from loop.evaluation.metrics import k_values, pass_at_k

    return [{"task_id": f"arith/{i}", "family": "arithmetic", "difficulty": "L1", "verifier": "math", "n": n,
             "correct": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in k_values(n)},
             **{f"maj@{k}": pass_at_k(n, c, 1) for k in k_values(n)}, "greedy_correct": float(g)}
            for i, (c, g) in enumerate(zip(correct, greedy))]


# Correct samples (of 4) and greedy results of 40 held-out problems in rounds 0, 1, 2: round 2 solves more.
ROUNDS = {
    0: ([0, 1, 0, 0, 2, 0, 0, 1, 0, 0] * 4, [0, 1, 0, 0, 1, 0, 0, 0, 0, 0] * 4),
    1: ([0, 1, 1, 0, 2, 0, 0, 1, 0, 1] * 4, [0, 1, 0, 0, 1, 0, 0, 1, 0, 0] * 4),
    2: ([1, 2, 1, 0, 3, 1, 0, 2, 1, 1] * 4, [0, 1, 1, 0, 1, 0, 0, 1, 0, 1] * 4),
}


_LOG_ROUNDS = """
import json, sys
from pathlib import Path
from types import SimpleNamespace
from flows.self_improve import Loop, run_round
from flows.round_table import markdown
from loop.run.directory import RunDir
from loop.run.tracking import Tracker, TrackingConfig

tmp = Path(sys.argv[1])
evaluated = json.loads(sys.argv[3])
tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", experiment="exp", registered_model=None),
                  "loop", json.loads(sys.argv[2]))
# What run_round reads of a round whose stages are done: the settings it logs on the round's nested run.
sampling = SimpleNamespace(n=4, temperature=1.0, max_tokens=16)
cfg = SimpleNamespace(name="c", model="m", rounds=2, sampling=sampling, train_tasks=SimpleNamespace(family="f"),
                      tracking=SimpleNamespace(experiment="exp"),
                      eval=SimpleNamespace(sampling=sampling, primary="pass@1", evaluates=lambda r, n: r in evaluated),
                      train=SimpleNamespace(continue_adapter=True, algorithm="dpo", lr=1e-4, beta=0.1, epochs=1, lora_r=8))
loop = Loop(cfg=cfg, run=RunDir(tmp / "runs", "loop"), model=SimpleNamespace(path=None), eval_tasks=[],
            tracker=tracker, engine=None)
rows = [{"round": r, **run_round(loop, r, None, None)[0]} for r in range(3)]
tracker.finish()
(tmp / "table.md").write_text(markdown(rows, "pass@1"))
"""


def _log_rounds(tmp_path: Path, evaluated: list[int]) -> None:
    """Write the rounds' per-problem files (of the `evaluated` rounds) as done stages, then run the flow's run_round
    over them in a process of its own (Prefect's tasks and artifacts, with its own temporary server and home)."""
    import json
    import os

    from loop.run.directory import write_json, write_jsonl

    run = RunDir(tmp_path / "runs", "loop")
    for r, (correct, greedy) in ROUNDS.items():
        rd = run.round(r)
        if r in evaluated:
            write_jsonl(rd / "eval_per_prompt.jsonl", _per_prompt(correct, greedy))
            write_jsonl(rd / "eval_samples.jsonl", [])
            write_json(rd / "metrics.json", {"eval/pass@1": sum(correct) / 4 / len(correct),
                                             "eval/greedy_acc": sum(greedy) / len(greedy)})
        for stage in ("generate", "verify", "pairs", "train", "evaluate"):
            run.mark_done(r, stage)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    done = subprocess.run([sys.executable, "-c", _LOG_ROUNDS, str(tmp_path), json.dumps(TAGS), json.dumps(evaluated)],
                          env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_round_log_stage_logs_intervals_and_paired_changes(tmp_path: Path):
    """The flow's log stage (flows/self_improve.run_round with the evaluations done): every accuracy's SE and
    95% interval, and its paired change against round 0 and the previous round, land in metrics.json, on the
    nested round run and on the parent at step=round, and in the Prefect round table; the per-problem artifact
    recomputes them."""
    import json

    from loop.evaluation.stats import paired_difference, pass_at_k_interval

    run = RunDir(tmp_path / "runs", "loop")
    _log_rounds(tmp_path, [0, 1, 2])
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp",
                                     registered_model=None), "loop", TAGS)

    c0, c1, c2 = (ROUNDS[r][0] for r in range(3))
    m2 = json.loads((run.round(2) / "metrics.json").read_text())
    mean, low, high = pass_at_k_interval(c2, 4, 1)
    assert (m2["eval/pass@1_low"], m2["eval/pass@1_high"]) == pytest.approx((low, high))
    delta, low, high, p = paired_difference(c0, c2, 4, 1)
    assert (m2["vs_round0/pass@1"], m2["vs_round0/pass@1_low"], m2["vs_round0/pass@1_high"],
            m2["vs_round0/pass@1_p"]) == pytest.approx((delta, low, high, p))
    assert low > 0 and p < 0.05  # round 2's gain is more than noise
    assert m2["vs_prev/pass@4"] == pytest.approx(paired_difference(c1, c2, 4, 4)[0])
    for name in ("pass@1", "pass@2", "pass@4", "maj@1", "maj@4", "greedy_acc"):
        assert {f"eval/{name}_se", f"vs_round0/{name}", f"vs_prev/{name}_p"} <= set(m2), name
    assert not any(k.startswith("vs_") for k in json.loads((run.round(0) / "metrics.json").read_text()))

    c = tracker.client
    history = {m.step: m.value for m in c.get_metric_history(tracker.parent_id, "vs_round0/pass_at_1")}
    assert history == pytest.approx({1: paired_difference(c0, c1, 4, 1)[0], 2: delta})
    lows = {m.step: m.value for m in c.get_metric_history(tracker.parent_id, "eval/pass_at_1_low")}
    assert sorted(lows) == [0, 1, 2] and lows[2] == pytest.approx(pass_at_k_interval(c2, 4, 1)[1])
    assert {m.step for m in c.get_metric_history(tracker.parent_id, "vs_prev/greedy_acc_p")} == {1, 2}
    [nested] = c.search_runs([tracker.experiment_id], "tags.`round` = '2'")
    assert nested.data.metrics["vs_round0/pass_at_1_p"] == pytest.approx(p)
    assert nested.data.metrics["eval/maj_at_4_high"] == pytest.approx(m2["eval/maj@4_high"])
    # run_round opened each round's nested run with the round's settings (round 0 only evaluates).
    assert nested.data.params == {"model": "m", "adapter": "base", "eval.n": "4", "eval.temperature": "1.0",
                                  "eval.max_tokens": "16", "sampling.n": "4", "sampling.temperature": "1.0",
                                  "sampling.max_tokens": "16", "train.algorithm": "dpo", "train.lr": "0.0001",
                                  "train.beta": "0.1", "train.epochs": "1", "train.lora_r": "8"}
    [nested0] = c.search_runs([tracker.experiment_id], "tags.`round` = '0'")
    assert set(nested0.data.params) == {"model", "adapter", "eval.n", "eval.temperature", "eval.max_tokens"}
    # The per-problem artifact (problem id, n, correct count) is enough to recompute the change.
    base_rows, rows2 = ([json.loads(line) for line in download_artifact(
        tracker.uri, run.info.artifact_uri, "eval_per_prompt.jsonl", tmp_path / run.info.run_id).read_text().splitlines()]
        for run in (c.search_runs([tracker.experiment_id], "tags.`round` = '0'")[0], nested))
    assert [r["task_id"] for r in base_rows] == [r["task_id"] for r in rows2]
    assert paired_difference([r["correct"] for r in base_rows], [r["correct"] for r in rows2],
                             [r["n"] for r in rows2], 1) == pytest.approx((delta, low, high, p))
    # The Prefect markdown artifact's table carries the intervals and the changes.
    md = (tmp_path / "table.md").read_text()
    assert f"{m2['eval/pass@1']:.3f} ± {m2['eval/pass@1_se']:.3f}" in md
    assert f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]" in md and "vs round 0" in md
    assert "| 2 | pass@1 (primary) |" in md and "| 1 | pass@1 |" in md and "descriptive" in md
    # Descriptions in the UI: each round run's one line, the parent's round table with its changes.
    assert nested.data.tags["mlflow.note.content"].startswith("round 2/2 done · pass@1 ")
    parent_note = c.get_run(tracker.parent_id).data.tags["mlflow.note.content"]
    assert f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]" in parent_note and "| 2 | pass@1 (primary) |" in parent_note


def test_rounds_the_schedule_skips_leave_the_tables_mlflow_and_the_report_consistent(tmp_path: Path):
    """eval.every: round 1 not evaluated. It has no held-out figures anywhere (metrics.json, MLflow, the table shows
    '-'), round 2 is compared with round 0 both as 'vs round 0' and as 'vs previous evaluated round', and the
    notebook's loader reads the evaluated rounds only."""
    import json

    from loop.evaluation.stats import paired_difference
    from loop.report import load_loop

    run = RunDir(tmp_path / "runs", "loop")
    _log_rounds(tmp_path, [0, 2])
    m1 = json.loads((run.round(1) / "metrics.json").read_text())
    m2 = json.loads((run.round(2) / "metrics.json").read_text())
    assert not any(k.startswith(("eval/", "vs_")) for k in m1)
    c0, c2 = ROUNDS[0][0], ROUNDS[2][0]
    assert m2["vs_round0/pass@1"] == m2["vs_prev/pass@1"] == pytest.approx(paired_difference(c0, c2, 4, 1)[0])
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="exp",
                                     registered_model=None), "loop", TAGS)
    steps = {m.step for m in tracker.client.get_metric_history(tracker.parent_id, "eval/pass_at_1")}
    assert steps == {0, 2}
    md = (tmp_path / "table.md").read_text()
    assert "| 1 | - |" in md and "| 2 | pass@1 (primary) |" in md
    data = load_loop(f"sqlite:///{tmp_path}/mlflow.db", "exp", "loop")
    assert sorted(data.round_run_ids) == [0, 2] and sorted(data.per_prompt["round"].unique()) == [0, 2]


def test_a_setting_added_since_the_run_started_at_its_default_is_no_change(tmp_path: Path):
    """A run started before a setting existed resumes under today's config schema when the setting is at its
    default (what the run did then); set to anything else, it is a change like any other."""
    from loop.config import RunConfig, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    saved = cfg.model_dump(mode="json")
    del saved["train"]["divergence"], saved["pairs"]["prompt_weight"]  # as a run saved before they existed
    run = RunDir(tmp_path, "r")
    run.save_config(saved)
    run.mark_done(0, "evaluate")
    assert run.check_config(cfg.model_dump(mode="json"), RunConfig) is False  # a resume
    with pytest.raises(ValueError, match=r"changed: pairs\.prompt_weight, train\.divergence\)"):
        run.check_config(cfg.model_dump(mode="json"))  # without the schema the missing keys read as changes
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"divergence": "js_divergence"})})
    with pytest.raises(ValueError, match=r"changed: train\.divergence\)"):
        run.check_config(changed.model_dump(mode="json"), RunConfig)
