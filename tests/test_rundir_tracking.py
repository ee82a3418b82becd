"""The run directory (resume state, lock) and the MLflow tracker, against a real SQLite MLflow store."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from loop.rundir import RunDir, RunLocked
from loop.tracking import Tracker, TrackingConfig, TrackingConflict

TAGS = {"config_name": "t", "model": "m", "task": "arithmetic", "git_commit": "x"}


def test_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path: Path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from loop.rundir import RunDir; r = RunDir(sys.argv[1], 'r1'); r.lock(); "
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
        RunDir(tmp_path, "k").check_config({**kto, "train": {**kto["train"], "per_device_batch_size": 2,
                                                             "grad_accumulation": 2}})


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
    assert {a.path for a in c.list_artifacts(r0)} == {"samples.jsonl"}
    assert {a.path for a in c.list_artifacts(r1)} == {"adapter"}
    versions = c.search_model_versions("name = 'ratchet-adapter'")
    assert [v.run_id for v in versions] == [r1]  # registered once, even though round 1 was logged twice


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
