"""Where the time of one loop round goes: the flow's real stages, timed, against the overhead targets.

Runs the flow's own round (flows.self_improve.open_loop + run_round, the Prefect tasks inside a Prefect flow, a
run directory and an MLflow SQLite store in a temporary folder) on a small config: configs/demo.yaml by default,
with fewer prompts via the flags. Round 0 (the base model's evaluation, which the flow always runs first) goes
first and also warms vLLM up; then one full round is timed. By default that round samples with a previous
adapter, as every round after the first does: a fresh peft LoRA of the training config's shape (B = 0, so the
samples are the base model's and pairs still form, but vLLM runs its LoRA kernels) that training continues from.

Stage times are the flow's per-stage wall times (Prefect and file overhead included); inside them the benchmark
times rollout.generate and grade_trajectories calls and reads trainer.train()'s time from the training metrics.

  compute      = rollout.generate on the train prompts + trainer.train() + rollout generation in the evaluation
  overhead     = round wall time - compute (verification, pairs, model loading, adapter check, logging, Prefect,
                 files ...)                                                            target: < 10% of the round
  verification = the verify stage + grading the evaluation samples                    target: < 5% of the round

    .venv/bin/python bench/round.py --train-prompts 8 --eval-prompts 8
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OVERHEAD_TARGET = 0.10
VERIFY_TARGET = 0.05


def build_config(args, tmp: Path) -> dict[str, Any]:
    raw = yaml.safe_load(Path(args.config).read_text())
    raw.update(name="bench-round", rounds=2, run_dir=str(tmp / "runs"))
    raw["tracking"] = {**raw.get("tracking", {}), "uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench-round"}
    if args.train_prompts:
        raw["train_tasks"] = {**raw["train_tasks"], "limit": args.train_prompts}
    if args.eval_prompts:
        raw["eval"] = {**raw["eval"], "tasks": {**raw["eval"]["tasks"], "limit": args.eval_prompts}}
    if args.n:
        raw["sampling"] = {**raw.get("sampling", {}), "n": args.n}
    if args.eval_n:
        raw["eval"] = {**raw["eval"], "sampling": {**raw["eval"].get("sampling", {}), "n": args.eval_n}}
    if args.max_tokens:
        raw["sampling"] = {**raw.get("sampling", {}), "max_tokens": args.max_tokens}
        raw["eval"] = {**raw["eval"], "sampling": {**raw["eval"].get("sampling", {}), "max_tokens": args.max_tokens}}
    if args.epochs:
        raw["train"] = {**raw.get("train", {}), "epochs": args.epochs}
    return raw


def zero_adapter(model_path: str, train_cfg, out: Path) -> Path:
    """A peft LoRA adapter as TRL starts one (B = 0): applied by vLLM, the base model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha,
                                            lora_dropout=train_cfg.lora_dropout,
                                            target_modules=train_cfg.target_modules, task_type="CAUSAL_LM"))
    peft.save_pretrained(out)
    return out


class Probe:
    """Times calls of loop.generation.rollout.generate (train vs evaluation prompts) and of grade_trajectories (by
    caller)."""

    def __init__(self):
        self.calls: list[dict[str, Any]] = []

    def wrap(self, fn, kind: str, where):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            seconds = time.perf_counter() - t0
            rec = {"kind": kind, "where": where(args, kwargs), "seconds": seconds, "items": len(out)}
            if kind == "generate":
                rec["tokens"] = sum(t.num_model_tokens for t in out)
            self.calls.append(rec)
            return out
        return timed


def run(args) -> dict[str, Any]:
    import flows.self_improve as fsi
    import loop.evaluation.evaluate
    import loop.generation.rollout
    from prefect import flow, get_run_logger

    from loop.config import RunConfig
    from loop.run.directory import RunDir

    tmp = Path(tempfile.mkdtemp(prefix="bench-round-"))
    cfg = RunConfig.model_validate(build_config(args, tmp))
    probe = Probe()
    # grade_trajectories is looked up in these modules' namespaces when the stages run.
    fsi.grade_trajectories = probe.wrap(fsi.grade_trajectories, "grade", lambda a, k: "verify")
    loop.evaluation.evaluate.grade_trajectories = probe.wrap(loop.evaluation.evaluate.grade_trajectories, "grade",
                                                             lambda a, k: "evaluate")

    @flow(name="bench-round", log_prints=True)
    def bench_round() -> dict[str, Any]:
        logger = get_run_logger()
        run = RunDir(cfg.run_dir, cfg.name)
        run.lock()
        t0 = time.perf_counter()
        lp = fsi.open_loop(cfg, run, logger)
        setup_s = time.perf_counter() - t0
        eval_ids = {t.id for t in lp.eval_tasks}  # every other generate call samples a round's training tasks
        # looked up when the stage runs
        loop.generation.rollout.generate = probe.wrap(loop.generation.rollout.generate, "generate",
                                                      lambda a, k: "evaluate" if a[1][0].id in eval_ids else "train")
        try:
            t0 = time.perf_counter()
            round0_timings: dict[str, float] = {}
            fsi.run_round(lp, 0, None, None, round0_timings)
            round0_s = time.perf_counter() - t0
            probe.calls.clear()
            r, adapter, adapter_id = 1, None, None
            if args.previous_adapter == "zero":
                r, adapter, adapter_id = 2, zero_adapter(lp.model.path, cfg.train, tmp / "previous-adapter"), 1
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            m, _, _ = fsi.run_round(lp, r, adapter, adapter_id, timings)
            total_s = time.perf_counter() - t0
            lp.tracker.finish()
        except BaseException:
            lp.tracker.finish("FAILED")
            raise
        finally:
            lp.engine.close()
            run.unlock()
        return {"round": r, "metrics": m, "timings": timings, "total_s": total_s, "setup_s": setup_s,
                "round0_s": round0_s, "round0_timings": round0_timings}

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    res = bench_round()
    res["flow_s"] = time.perf_counter() - t0
    res.update(load_before=load_before, load_after=os.getloadavg(), calls=list(probe.calls), tmp=str(tmp),
               config=cfg.model_dump(mode="json"))
    return res


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    m, tm, total = res["metrics"], res["timings"], res["total_s"]
    calls = res["calls"]

    def calls_sum(kind, where, key="seconds"):
        return sum(c[key] for c in calls if c["kind"] == kind and c["where"] == where)

    gen_s, gen_tokens = calls_sum("generate", "train"), calls_sum("generate", "train", "tokens")
    eval_gen_s, eval_tokens = calls_sum("generate", "evaluate"), calls_sum("generate", "evaluate", "tokens")
    grade_s, grade_n = calls_sum("grade", "verify"), calls_sum("grade", "verify", "items")
    eval_grade_s, eval_grade_n = calls_sum("grade", "evaluate"), calls_sum("grade", "evaluate", "items")
    train_s = m.get("train/time_s", 0.0)
    pairs_n = m.get("pairs/pairs", 0)
    stages = {k: tm.get(k, 0.0) for k in ("generate", "verify", "pairs", "train", "check_adapter", "evaluate", "log")}
    other = total - sum(stages.values())
    compute = gen_s + train_s + eval_gen_s
    overhead = total - compute
    verification = stages["verify"] + eval_grade_s
    epochs = res["config"]["train"]["epochs"]
    return {
        "stages_s": {**stages, "other": other, "total": total},
        "compute_s": {"generate": gen_s, "train": train_s, "evaluate_generate": eval_gen_s, "total": compute},
        "within_stages_s": {"verify_grading": grade_s, "train_setup_and_save": stages["train"] - train_s,
                            "evaluate_grading": eval_grade_s,
                            "evaluate_rest": stages["evaluate"] - eval_gen_s - eval_grade_s},
        "rates": {"generate_tokens_per_s": gen_tokens / gen_s if gen_s else 0.0, "generate_tokens": gen_tokens,
                  "eval_tokens_per_s": eval_tokens / eval_gen_s if eval_gen_s else 0.0, "eval_tokens": eval_tokens,
                  "verify_samples_per_s": (grade_n + eval_grade_n) / (grade_s + eval_grade_s)
                  if grade_s + eval_grade_s else 0.0, "graded_samples": grade_n + eval_grade_n,
                  "train_pairs_per_s": pairs_n * epochs / train_s if train_s else 0.0, "pairs": pairs_n,
                  "pair_building_pairs_per_s": pairs_n / stages["pairs"] if stages["pairs"] else 0.0},
        "overhead_share": overhead / total, "verification_share": verification / total,
        "targets": {"overhead_share": OVERHEAD_TARGET, "verification_share": VERIFY_TARGET},
        "pass": {"overhead": overhead / total < OVERHEAD_TARGET, "verification": verification / total < VERIFY_TARGET},
        "train_skipped": bool(m.get("train/skipped", 0.0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--train-prompts", type=int, default=8, help="train_tasks.limit (0: the config's)")
    ap.add_argument("--eval-prompts", type=int, default=8, help="eval.tasks.limit (0: the config's)")
    ap.add_argument("--n", type=int, default=None, help="samples per train prompt (default: the config's)")
    ap.add_argument("--eval-n", type=int, default=None, help="samples per eval prompt (default: the config's)")
    ap.add_argument("--max-tokens", type=int, default=None, help="per turn, train and eval (default: the config's)")
    ap.add_argument("--epochs", type=float, default=None, help="train.epochs (default: the config's)")
    ap.add_argument("--previous-adapter", choices=["zero", "none"], default="zero",
                    help="zero: the timed round samples with a (zero-effect) previous adapter, as rounds >= 2 do; "
                         "none: it is round 1, sampling from the base model")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory and MLflow store")
    ap.add_argument("--out", type=Path, default=Path("bench/results/round.json"))
    args = ap.parse_args()

    res = run(args)
    if args.keep:
        print(f"run directory and MLflow store kept in {res['tmp']}")
    else:
        shutil.rmtree(res["tmp"], ignore_errors=True)
    s = summarise(res)
    import torch
    import transformers
    import trl
    import vllm

    cfg = res["config"]
    meta = {"config": args.config, "round": res["round"], "previous_adapter": args.previous_adapter,
            "train_prompts": cfg["train_tasks"]["limit"], "n": cfg["sampling"]["n"],
            "max_tokens": cfg["sampling"]["max_tokens"], "eval_prompts": cfg["eval"]["tasks"]["limit"],
            "eval_n": cfg["eval"]["sampling"]["n"], "greedy": cfg["eval"]["greedy"], "epochs": cfg["train"]["epochs"],
            "nproc": os.cpu_count(), "setup_s": res["setup_s"], "round0_s": res["round0_s"],
            "round0_timings": res["round0_timings"], "flow_s": res["flow_s"], "loadavg_before": res["load_before"],
            "loadavg_after": res["load_after"], "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "versions": {"torch": torch.__version__, "vllm": vllm.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__}}
    out = {"meta": meta, "summary": s, "timings": res["timings"], "calls": res["calls"],
           "metrics": {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float))}, "config": cfg}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))

    st, c, w, rt = s["stages_s"], s["compute_s"], s["within_stages_s"], s["rates"]
    total = st["total"]
    print(f"one loop round (round {res['round']}, previous adapter: {args.previous_adapter}) of {args.config}: "
          f"{meta['train_prompts']} train prompts x n={meta['n']}, {meta['eval_prompts']} eval prompts x "
          f"n={meta['eval_n']}{' + greedy' if meta['greedy'] else ''}, max_tokens {meta['max_tokens']}, "
          f"{meta['epochs']:g} epoch(s); {meta['nproc']} CPUs, load average {res['load_before'][0]:.2f} before, "
          f"{res['load_after'][0]:.2f} after")
    print(f"(not in the round: flow setup incl. vLLM start {res['setup_s']:.1f} s, round 0 {res['round0_s']:.1f} s)")
    detail = {
        "generate": f"rollout.generate {c['generate']:.2f} s: {rt['generate_tokens']} tokens, "
                    f"{rt['generate_tokens_per_s']:.1f} tokens/s",
        "verify": f"grading {w['verify_grading']:.2f} s",
        "pairs": f"{rt['pairs']:.0f} pairs, {rt['pair_building_pairs_per_s']:.0f} pairs/s",
        "train": f"trainer.train() {c['train']:.2f} s ({rt['train_pairs_per_s']:.2f} pairs/s); "
                 f"load/setup/save {w['train_setup_and_save']:.2f} s",
        "check_adapter": "vLLM log-prob check of the new adapter",
        "evaluate": f"generation {c['evaluate_generate']:.2f} s ({rt['eval_tokens_per_s']:.1f} tokens/s), "
                    f"grading {w['evaluate_grading']:.2f} s, rest {w['evaluate_rest']:.2f} s",
        "log": "MLflow (SQLite) metrics, artifacts, adapter registration; Prefect artifact",
        "other": "round wall time minus the stages (Prefect task runs are inside the stages)",
        "total": "",
    }
    print(f"{'stage':<14} | {'seconds':>8} | {'share':>6} | detail")
    for k, v in st.items():
        print(f"{k:<14} | {v:8.2f} | {100 * v / total:5.1f}% | {detail[k]}")
    print(f"tokens/s (train generation): {rt['generate_tokens_per_s']:.1f}; samples/s (grading, train + eval): "
          f"{rt['verify_samples_per_s']:.1f}; pairs/s (training): {rt['train_pairs_per_s']:.2f}")
    mark = lambda ok: "PASS" if ok else "MISS"  # noqa: E731
    print(f"overhead (round - compute {c['total']:.1f} s): {100 * s['overhead_share']:.1f}% of the round, target "
          f"< {100 * OVERHEAD_TARGET:.0f}%: {mark(s['pass']['overhead'])}")
    print(f"verification: {100 * s['verification_share']:.1f}% of the round, target < {100 * VERIFY_TARGET:.0f}%: "
          f"{mark(s['pass']['verification'])}")
    if s["train_skipped"]:
        print("NOTE: the round had no preference pairs, so training was skipped; the figures lack a training stage")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
