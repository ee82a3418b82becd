"""Diversity-preserving options against the default, on the demo's loop (issue 17).

Each option is one real `ratchet run` of configs/demo.yaml with the option's overrides: the same training and
held-out prompts, the same seeds, the same number of rounds. Per round it reports pass@1 and pass@n (n: the held-out
samples per problem) with their 95% intervals, the paired change against the option's own round 0 (the base model,
the same for every option) and against the default at the same round (paired by problem: every option is
evaluated on the same problems with the same sampling seeds), and the distinct-answer rate (distinct answers among a
problem's n samples, over n; answers compared by the verifier's equivalence).

    .venv/bin/python bench/diversity.py                                  # the four main options, 3 rounds
    .venv/bin/python bench/diversity.py --options default js_divergence --rounds 2

Runs live in --work and are kept: rerunning resumes a cut-off run and leaves finished ones as they are. The table
goes to stdout and, with the figures, to --out (JSON) and its .md sibling; the notebook's options figure (pass@k per
option with bands, and the paired difference to the default) to its .png sibling. The notebook draws the same figure
with RATCHET_ABLATION_URI=sqlite:///<work>/mlflow.db.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loop.evaluation.stats import estimate, format_change, paired_change, problem_clusters  # noqa: E402
from loop.run.directory import read_jsonl  # noqa: E402

# Each option changes one thing against the demo's config; what each one is and where it comes from is in the
# docstrings of the config keys (loop/training/config.py TrainConfig.divergence, loop/pairs.py
# PairsConfig.prompt_weight and PairsConfig.rehearsal).
OPTIONS: dict[str, dict] = {
    "default": {},
    "js_divergence": {"train": {"divergence": "js_divergence"}},
    "forward_kl": {"train": {"divergence": "forward_kl"}},
    "rarity": {"pairs": {"prompt_weight": "rarity"}},
    "rehearsal": {"pairs": {"rehearsal": 0.25}},
}
DEFAULT_RUN = ["default", "js_divergence", "rarity", "rehearsal"]  # forward_kl: f-DPO finds it costs the most reward


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def run_option(name: str, over: dict, base_config: Path, rounds: int, work: Path) -> Path:
    """One `ratchet run` (resumed if it was cut off); the run's directory."""
    cfg = merged(yaml.safe_load(base_config.read_text()), over)
    cfg.update(name=f"ablation-{name}", rounds=rounds, run_dir=str(work / "runs"))
    cfg["tracking"] = {**cfg.get("tracking", {}), "uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "ablation"}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = work / "runs" / cfg["name"]
    if all((run / f"round-{r:02d}" / "round.done").exists() for r in range(1, rounds + 1)):
        print(f"{name}: done already ({run})", flush=True)
        return run
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "a") as log:
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(path)], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{name}: `ratchet run` failed (exit {done.returncode}); see {work / f'{name}.log'}")
    print(f"{name}: {rounds} rounds in {time.perf_counter() - t0:.0f} s", flush=True)
    return run


def rows(run: Path, r: int) -> dict[str, dict]:
    path = run / f"round-{r:02d}" / "eval_per_prompt.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} is missing: round {r} of {run.name} has no evaluation")
    return {row["task_id"]: row for row in read_jsonl(path)}


def value(row: dict, metric: str) -> float:
    # The distinct-answer rate: distinct answers among a problem's n samples, over n (1: every sample differs).
    return row["distinct_answers"] / row["n"] if metric == "distinct_rate" else row[metric]


def summarise(runs: dict[str, Path], rounds: int) -> tuple[list[dict], int]:
    base = rows(runs["default"], 0)
    n = min(row["n"] for row in base.values())
    ids = sorted(base)
    clusters = [problem_clusters(list(base.values()))[t] for t in ids]
    out = []
    for name, run in runs.items():
        r0 = rows(run, 0)
        # Round 0 is the base model with the same seeds in every run: the same samples, or the runs are not comparable.
        if any(r0[t]["correct"] != base[t]["correct"] for t in ids):
            raise SystemExit(f"{name}'s round 0 differs from the default's (the same base model and seeds should give "
                             "the same samples): the runs are not comparable")
        for r in range(rounds + 1):
            cur, ref = rows(run, r), rows(runs["default"], r)
            if sorted(cur) != ids:
                raise SystemExit(f"{name} round {r} was evaluated on other problems than the default's round 0")
            rec = {"option": name, "round": r}
            for metric in ("pass@1", f"pass@{n}", "distinct_rate"):
                e = estimate([value(cur[t], metric) for t in ids], clusters)
                rec[metric] = {"mean": e.mean, "low": e.low, "high": e.high}
                for label, other in (("vs_round0", r0), ("vs_default", ref)):
                    if (label == "vs_default" and name == "default") or (label == "vs_round0" and r == 0):
                        continue
                    ch = paired_change([value(other[t], metric) for t in ids], [value(cur[t], metric) for t in ids],
                                       clusters)
                    rec[f"{metric} {label}"] = {"delta": ch.delta, "low": ch.low, "high": ch.high, "p": ch.p_value}
            out.append(rec)
    return out, n


def table(records: list[dict], n: int) -> str:
    def est(v):
        return f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"

    def chg(rec, key):
        v = rec.get(key)
        return "-" if v is None else format_change(v["delta"], v["low"], v["high"])

    head = (f"| option | round | pass@1 | vs round 0 | vs default | pass@{n} | vs round 0 | vs default "
            "| distinct-answer rate | vs default |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rec in records:
        lines.append(f"| {rec['option']} | {rec['round']} | {est(rec['pass@1'])} | {chg(rec, 'pass@1 vs_round0')} "
                     f"| {chg(rec, 'pass@1 vs_default')} | {est(rec[f'pass@{n}'])} | {chg(rec, f'pass@{n} vs_round0')} "
                     f"| {chg(rec, f'pass@{n} vs_default')} | {est(rec['distinct_rate'])} "
                     f"| {chg(rec, 'distinct_rate vs_default')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--options", nargs="+", default=DEFAULT_RUN, choices=list(OPTIONS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ratchet-diversity"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "diversity.json")
    args = ap.parse_args()
    options = ["default"] + [o for o in args.options if o != "default"]  # every option is compared with it
    args.work.mkdir(parents=True, exist_ok=True)
    runs = {o: run_option(o, OPTIONS[o], args.config, args.rounds, args.work) for o in options}
    records, n = summarise(runs, args.rounds)
    text = table(records, n)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": str(args.config), "rounds": args.rounds, "options":
                                    {o: OPTIONS[o] for o in options}, "records": records}, indent=1))
    args.out.with_suffix(".md").write_text(text + "\n")
    # The notebook's options figure (section 6), from the runs' MLflow store.
    from loop import report

    loops = report.load_loops(f"sqlite:///{args.work / 'mlflow.db'}", "ablation")
    fig = report.plot_options({o: loops[f"ablation-{o}"] for o in options}, baseline="default")
    print("figure:", report.save_figure(fig, args.out.parent, args.out.stem))


if __name__ == "__main__":
    main()
