"""Evaluate a policy (the base model, or an adapter on it, served by the engine) on held-out tasks: n samples
for pass@k and diversity, plus a greedy decode."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from loop.evaluation import metrics
from loop.generation import rollout
from loop.generation.engine import Engine
from loop.grading import VerifyConfig, grade_trajectories
from loop.records import Graded
from loop.run.directory import write_json, write_jsonl
from loop.tasks.base import Task


CHECKPOINT = "eval_samples.partial.jsonl"
"""Trajectories finished so far (loop.generation.rollout.generate_many's checkpoint): an evaluation that fails or is
stopped partway keeps them, and the next attempt generates only the rest. Deleted once the evaluation's files are
written."""


PREVIEW = "eval_preview.jsonl"
"""A few samples to read in MLflow's artifact viewer: prompt, gold, verdict, answer and text, no token ids."""
PREVIEW_SAMPLES = 20


def preview(graded: list[Graded]) -> list[dict]:
    """The first sample of each of the first PREVIEW_SAMPLES problems, as a reader wants them."""
    first = {}
    for g in graded:
        first.setdefault(g.trajectory.task_id, g)
    return [{"task_id": g.trajectory.task_id, "prompt": g.prompt, "gold": g.gold, "status": g.status,
             "extracted": g.extracted, "reason": g.reason, "finish_reason": g.trajectory.finish_reason,
             "text": g.trajectory.text} for g in list(first.values())[:PREVIEW_SAMPLES]]


def evaluate_policy(engine: Engine, tasks: list[Task], eval_cfg, verify_cfg: VerifyConfig, out_dir: Path, *,
                    seed_round: int = 0, adapter: Path | None = None, adapter_id: int | None = None,
                    grade: Callable | None = None) -> dict[str, float]:
    """Sample, grade and score `tasks`; write eval_*.jsonl and eval_summary.json to `out_dir`. `seed_round` enters
    the sampling seeds (loop.generation.rollout.sample_seed): the loop passes 0 in every round (common random numbers,
    eval.common_seeds) unless told otherwise; a standalone evaluation (`ratchet eval`) is 0.

    Returns the aggregate metrics with keys prefixed `eval/` (pass@k, maj@k, greedy_acc, diversity). `grade`
    grades the samples (None: `grade_trajectories`, e.g. loop.cluster.grading.grade_on_ray on a cluster).
    """
    t0 = time.perf_counter()
    grade = grade or grade_trajectories
    by_id = {t.id: t for t in tasks}
    # The greedy decode goes through the engine with the samples, not after them (rollout.generate_many).
    jobs = [(tasks, eval_cfg.sampling)] + ([(tasks, eval_cfg.sampling.greedy())] if eval_cfg.greedy else [])
    checkpoint = out_dir / CHECKPOINT
    sampled, *greedy_run = rollout.generate_many(engine, jobs, round=seed_round, adapter=adapter,
                                                 adapter_id=adapter_id, checkpoint=checkpoint)
    graded = grade(by_id, sampled, verify_cfg)
    write_jsonl(out_dir / "eval_samples.jsonl", (g.to_dict() for g in graded))
    write_jsonl(out_dir / PREVIEW, preview(graded))
    greedy = None
    if greedy_run:
        greedy = grade(by_id, greedy_run[0], verify_cfg)
        write_jsonl(out_dir / "eval_greedy.jsonl", (g.to_dict() for g in greedy))
    per_prompt, summary = metrics.summarise(tasks, graded, greedy)
    write_jsonl(out_dir / "eval_per_prompt.jsonl", per_prompt)
    out = {f"eval/{k}": v for k, v in summary.items()}
    out["time/evaluate_s"] = time.perf_counter() - t0
    write_json(out_dir / "eval_summary.json", out)
    checkpoint.unlink(missing_ok=True)
    return out
