"""Evaluation's greedy decode: a second engine call after the samples, or one call with them (generate_many).

loop.evaluation.evaluate.evaluate_policy sends the held-out samples and the greedy decodes through one
rollout.generate_many call. This measures that choice against two rollout.generate calls, on a config's real
evaluation tasks and settings (configs/demo.yaml by default), base model, real EOS (the tail of long answers is
what one batch is meant to hide). Repeats alternate the two ways; each repeat prints wall time and generated
tokens, then the ratio of the best times.

    .venv/bin/python bench/eval_batching.py --config configs/demo.yaml --repeats 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--limit", type=int, default=None, help="evaluation tasks (default: the config's)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from loop.config import load_config
    from loop.generation import rollout
    from loop.generation.engine import VLLMEngine
    from loop.models.resolve import resolve_model
    from loop.tasks import load_tasks

    cfg = load_config(args.config)
    task_cfg = cfg.eval.tasks if args.limit is None else cfg.eval.tasks.model_copy(update={"limit": args.limit})
    tasks = load_tasks(task_cfg)
    sampled, greedy = cfg.eval.sampling, cfg.eval.sampling.greedy()
    engine = VLLMEngine(resolve_model(cfg.model).path, cfg.engine)
    try:
        rollout.generate(engine, tasks[:2], greedy.model_copy(update={"max_tokens": 8}), round=0)  # warm-up

        def two_calls():
            return [rollout.generate(engine, tasks, sampled, round=0), rollout.generate(engine, tasks, greedy, round=0)]

        def one_call():
            return rollout.generate_many(engine, [(tasks, sampled), (tasks, greedy)], round=0)

        best = {}
        print(f"{len(tasks)} tasks x (n={sampled.n} sampled + 1 greedy), max_tokens {sampled.max_tokens}, {cfg.model}")
        for rep in range(args.repeats):
            for name, fn in (("two calls", two_calls), ("generate_many", one_call)):
                t0 = time.perf_counter()
                sets = fn()
                dt = time.perf_counter() - t0
                tokens = sum(t.num_model_tokens for s in sets for t in s)
                best[name] = min(best.get(name, dt), dt)
                print(f"  repeat {rep}  {name:14s} {dt:7.1f} s  {tokens:6d} tokens  {tokens / dt:6.1f} tok/s")
        print(f"best: two calls {best['two calls']:.1f} s, generate_many {best['generate_many']:.1f} s "
              f"-> generate_many / two calls = {best['generate_many'] / best['two calls']:.2f}x time")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
