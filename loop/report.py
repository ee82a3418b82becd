"""The diversity-collapse report: load one loop from MLflow and draw the figures of
notebooks/diversity_collapse.ipynb.

RL-style self-improvement tends to sharpen the policy around answers it already finds: pass@1 goes up
while pass@k at large k, the set of problems the model can solve at all, stays flat or shrinks
(Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond
the Base Model?"). The figures here show that from what the loop logs: the parent run's metric
histories (one step per round) and each round's eval_per_prompt.jsonl / eval_samples.jsonl artifacts.

Each plot function takes a LoopData and returns a matplotlib Figure; `save_figure` writes it as PNG.
"""
from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from loop.metrics import normalize_answer
from loop.tracking import RUN_ID_TAG, ROUND_TAG, TrackingConfig, resolve_uri

_PASS_KEY = re.compile(r"^eval/pass_at_(\d+)$")
_MAJ_KEY = re.compile(r"^eval/maj_at_(\d+)$")


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

    @property
    def rounds(self) -> list[int]:
        return sorted(self.round_run_ids)


# --- loading --------------------------------------------------------------------------------------


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


def _download(uri: str, run_id: str, path: str, dst: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=uri))


def _read_samples(path: Path, round_: int) -> list[dict]:
    """The fields of eval_samples.jsonl the report uses; token ids are dropped as lines are read, so
    a large evaluation does not sit in memory."""
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
                         "answer": answer, "finish_reason": t["finish_reason"],
                         "model_tokens": sum(len(s["token_ids"]) for s in t["segments"] if s["kind"] == "model")})
    return rows


def load_loop(tracking_uri: str | None = None, experiment: str = "ratchet", run_id: str | None = None) -> LoopData:
    """Everything the report needs about one loop, read from MLflow.

    `tracking_uri` None: $MLFLOW_TRACKING_URI or ./mlflow.db, as the loop itself resolves it.
    `run_id`: the loop's ratchet run id or its parent's MLflow run id; None: the most recent loop run.
    Rounds whose nested run has not finished (a loop still logging) are left out with a warning.
    """
    uri = resolve_uri(TrackingConfig(uri=tracking_uri))
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would silently create an empty store there.
        raise FileNotFoundError(f"no MLflow store at {uri}; set the tracking URI to the loop's store")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}")
    parent = find_loop_run(client, exp.experiment_id, run_id)
    pid = parent.info.run_id
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}' and tags.`kind` = 'round'")
    round_runs: dict[int, str] = {}
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

    per_prompt, samples = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd, rid in sorted(round_runs.items()):
            dst = Path(tmp) / str(rnd)
            dst.mkdir()
            with open(_download(uri, rid, "eval_per_prompt.jsonl", dst)) as f:
                per_prompt += [{"round": rnd, **json.loads(line)} for line in f if line.strip()]
            samples += _read_samples(_download(uri, rid, "eval_samples.jsonl", dst), rnd)
    metrics = _metric_histories(client, parent)
    return LoopData(tracking_uri=uri, experiment=experiment, parent_run_id=pid,
                    ratchet_run_id=parent.data.tags.get(RUN_ID_TAG, ""), round_run_ids=round_runs,
                    metrics=metrics.loc[metrics.index.isin(round_runs)], per_prompt=pd.DataFrame(per_prompt),
                    samples=pd.DataFrame(samples))


# --- tables ---------------------------------------------------------------------------------------


def pass_at_k_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Round x k table of the aggregate pass@k (columns: the integer k values logged)."""
    ks = {int(m.group(1)): c for c in metrics.columns if (m := _PASS_KEY.match(c))}
    if not ks:
        raise ValueError("no eval/pass_at_<k> metrics in this loop")
    table = metrics[[ks[k] for k in sorted(ks)]]
    table.columns = sorted(ks)
    return table


def crossover_k(table: pd.DataFrame, base: int = 0) -> dict[int, int | None]:
    """For each later round, the smallest k from which the base round's pass@k stays above it (at that k
    and every larger one): the collapse signature. None when the round is not below base at the largest k."""
    if base not in table.index:
        raise ValueError(f"round {base} is not among the rounds in the table ({table.index.tolist()})")
    out: dict[int, int | None] = {}
    for rnd in table.index:
        if rnd == base:
            continue
        below = (table.loc[rnd] < table.loc[base]).to_numpy()
        k = None
        for i in range(len(below) - 1, -1, -1):  # walk down from the largest k while still below
            if not below[i]:
                break
            k = int(table.columns[i])
        out[int(rnd)] = k
    return out


def solved_matrix(per_prompt: pd.DataFrame) -> pd.DataFrame:
    """task_id x round table of booleans: at least one of the round's evaluation samples was correct."""
    m = per_prompt.pivot(index="task_id", columns="round", values="correct")
    if m.isna().any().any():
        missing = m.columns[m.isna().any()].tolist()
        raise ValueError(f"rounds {missing} were evaluated on a different set of problems than the others; "
                         f"coverage compares problems one by one and needs the same evaluation set every round")
    return m > 0


def coverage(per_prompt: pd.DataFrame, base: int = 0) -> pd.DataFrame:
    """Per round: problems solved (at least once in n samples), lost (solved by the base round, never by
    this one) and gained (the reverse), as counts; index round."""
    solved = solved_matrix(per_prompt)
    if base not in solved.columns:
        raise ValueError(f"round {base} is not among the rounds evaluated ({solved.columns.tolist()})")
    b = solved[base]
    rows = [{"round": r, "solved": int(solved[r].sum()), "lost": int((b & ~solved[r]).sum()),
             "gained": int((~b & solved[r]).sum()), "num_prompts": len(solved)} for r in solved.columns]
    return pd.DataFrame(rows).set_index("round")


def top_answer_share(samples: pd.DataFrame) -> pd.DataFrame:
    """Per round and prompt: the share of samples giving the prompt's most common final answer (samples
    without an answer count in the denominator only). 1.0 means every sample says the same thing."""
    def share(answers: pd.Series) -> float:
        counts = Counter(a for a in answers if a is not None)
        return max(counts.values()) / len(answers) if counts else 0.0
    return (samples.groupby(["round", "task_id"])["answer"].apply(share).rename("top_answer_share").reset_index())


def group_field(per_prompt: pd.DataFrame) -> str | None:
    """'difficulty' when the evaluation set spans several difficulties, else 'family' when it spans
    several families, else None (nothing to break down)."""
    for field in ("difficulty", "family"):
        if field in per_prompt and per_prompt[field].nunique(dropna=True) > 1:
            return field
    return None


def _natural(label: str) -> list:
    """Sort key that puts L2 before L10 and steps-3 before steps-12."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(label))]


def breakdown(per_prompt: pd.DataFrame, by: str) -> pd.DataFrame:
    """Per (round, group): prompts, mean pass@1, mean pass@<largest k> and the fraction solved at least once."""
    kmax = max(int(c[len("pass@"):]) for c in per_prompt.columns if re.fullmatch(r"pass@\d+", c))
    df = per_prompt.assign(group=per_prompt[by].fillna("(none)").astype(str), solved=per_prompt["correct"] > 0)
    out = df.groupby(["group", "round"]).agg(prompts=("task_id", "size"), pass_at_1=("pass@1", "mean"),
                                             pass_at_max=(f"pass@{kmax}", "mean"), solved=("solved", "mean"))
    out.attrs["kmax"] = kmax
    return out


def summary_table(data: LoopData) -> pd.DataFrame:
    """The headline numbers per round, for a quick look."""
    table = pass_at_k_table(data.metrics)
    kmax = int(table.columns[-1])
    out = pd.DataFrame({"pass@1": table[1], f"pass@{kmax}": table[kmax]})
    for key, name in (("eval/greedy_acc", "greedy_acc"), ("eval/distinct_answers", "distinct_answers"),
                      ("eval/nll_per_token", "nll_per_token"), ("eval/response_tokens", "response_tokens"),
                      ("pairs/pairs", "pairs")):
        if key in data.metrics:
            out[name] = data.metrics[key]
    return out.join(coverage(data.per_prompt)[["solved", "lost", "gained"]])


# --- figures --------------------------------------------------------------------------------------


def _round_colors(rounds: list[int]) -> dict[int, tuple]:
    """Round 0 (the base model) in black, later rounds along viridis from dark to light."""
    later = [r for r in rounds if r != 0]
    cmap = plt.get_cmap("viridis")
    colors = {r: cmap(0.15 + 0.7 * i / max(len(later) - 1, 1)) for i, r in enumerate(later)}
    colors[0] = (0.0, 0.0, 0.0, 1.0)
    return colors


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0 = base model)")
    ax.grid(alpha=0.3)


def _missing(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}\nnot logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_pass_at_k(data: LoopData) -> Figure:
    """pass@k against k (log2) per round, and each round's difference to round 0."""
    table = pass_at_k_table(data.metrics)
    colors = _round_colors(data.rounds)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = table.columns.to_numpy()
    for rnd in table.index:
        style = dict(color=colors[rnd], marker="o", lw=2 if rnd == 0 else 1.5, ls="--" if rnd == 0 else "-")
        ax.plot(ks, table.loc[rnd], label=f"round {rnd}", **style)
        if rnd != 0 and 0 in table.index:
            dx.plot(ks, table.loc[rnd] - table.loc[0], label=f"round {rnd}", **style)
    crossings = crossover_k(table) if 0 in table.index else {}
    for rnd, k in crossings.items():
        if k is not None:
            dx.plot([k], [table.loc[rnd, k] - table.loc[0, k]], "x", color="red", ms=10, mew=2)
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xticks(ks, [str(k) for k in ks])
        a.set_xlabel("k (samples per problem)")
        a.grid(alpha=0.3)
    ax.set_ylabel("pass@k")
    ax.set_title("pass@k per round")
    ax.legend()
    dx.axhline(0, color="black", lw=1)
    dx.set_ylabel("pass@k(round) − pass@k(round 0)")
    dx.set_title("difference to the base model (× : below it from here on)")
    if 0 not in table.index:
        _missing(dx, "round 0")
    fig.tight_layout()
    return fig


def plot_headline(data: LoopData) -> Figure:
    """pass@1, pass@max, maj@max and greedy accuracy over rounds."""
    table = pass_at_k_table(data.metrics)
    kmax = int(table.columns[-1])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(table.index, table[1], "o-", label="pass@1")
    ax.plot(table.index, table[kmax], "s-", label=f"pass@{kmax} (pass@max)")
    majs = sorted(int(m.group(1)) for c in data.metrics.columns if (m := _MAJ_KEY.match(c)))
    if majs:
        ax.plot(data.metrics.index, data.metrics[f"eval/maj_at_{majs[-1]}"], "^--", label=f"maj@{majs[-1]}")
    if "eval/greedy_acc" in data.metrics:
        ax.plot(data.metrics.index, data.metrics["eval/greedy_acc"], "d:", label="greedy")
    ax.set_ylabel("accuracy over evaluation problems")
    ax.set_title("pass@1 against pass@max: sharpening or new capability?")
    _round_axis(ax, data.rounds)
    ax.legend()
    fig.tight_layout()
    return fig


def _boxplot_by_round(ax, frame: pd.DataFrame, column: str, rounds: list[int]) -> None:
    values = [frame.loc[frame["round"] == r, column].dropna().to_numpy() for r in rounds]
    ax.boxplot(values, positions=rounds, widths=0.5, showmeans=True, meanprops=dict(marker="D", markersize=5))


def plot_diversity(data: LoopData) -> Figure:
    """Distinct answers and top-answer share per prompt, the entropy proxy and response length per round."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rounds = data.rounds
    (a_dist, a_share), (a_nll, a_len) = axes
    _boxplot_by_round(a_dist, data.per_prompt, "distinct_answers", rounds)
    a_dist.set_ylabel("distinct final answers per problem")
    a_dist.set_title("answer diversity (box: problems, ◆: mean)")
    _boxplot_by_round(a_share, top_answer_share(data.samples), "top_answer_share", rounds)
    a_share.set_ylabel("share of samples giving the most common answer")
    a_share.set_ylim(-0.05, 1.05)
    a_share.set_title("answer concentration (1 = all samples agree)")
    for ax, key, label in ((a_nll, "eval/nll_per_token", "NLL per model token (entropy proxy)"),
                           (a_len, "eval/response_tokens", "model tokens per response")):
        if key in data.metrics:
            ax.plot(data.metrics.index, data.metrics[key], "o-")
        else:
            _missing(ax, key)
        ax.set_ylabel(label)
    a_nll.set_title("sampling entropy proxy")
    a_len.set_title("response length")
    if "eval/length_cutoff_frac" in data.metrics:  # long answers that hit max_tokens explain length jumps
        cut = data.metrics["eval/length_cutoff_frac"]
        for rnd, frac in cut.items():
            if frac > 0:
                a_len.annotate(f"{frac:.0%} cut off", (rnd, data.metrics.loc[rnd, "eval/response_tokens"]),
                               textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    for ax in axes.flat:
        _round_axis(ax, rounds)
    fig.tight_layout()
    return fig


def plot_coverage(data: LoopData) -> Figure:
    """Problems solved at least once per round, and those lost and gained against round 0."""
    cov = coverage(data.per_prompt)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot(cov.index, cov["solved"] / cov["num_prompts"], "o-", color="black")
    ax.set_ylabel("fraction of problems solved at least once")
    ax.set_title(f"coverage (n samples per problem, {cov['num_prompts'].iloc[0]} problems)")
    later = cov.drop(index=0, errors="ignore")
    bx.bar(later.index, later["gained"], color="tab:green", label="gained: never solved by round 0")
    bx.bar(later.index, -later["lost"], color="tab:red", label="lost: solved by round 0, not by this round")
    for rnd, row in later.iterrows():
        bx.annotate(f"+{row['gained']} / −{row['lost']}", (rnd, 0), textcoords="offset points",
                    xytext=(0, -14 if row["gained"] >= row["lost"] else 6), ha="center", fontsize=8)
    bx.axhline(0, color="black", lw=1)
    bx.set_ylabel("problems")
    bx.set_title("against the base model")
    bx.legend(fontsize=8)
    _round_axis(ax, data.rounds)
    _round_axis(bx, data.rounds)
    fig.tight_layout()
    return fig


def plot_breakdown(data: LoopData, by: str | None = None) -> Figure:
    """pass@1, pass@max and solved-at-least-once over rounds, one line per difficulty (or family)."""
    by = by or group_field(data.per_prompt)
    frame = data.per_prompt if by else data.per_prompt.assign(all="all problems")
    table = breakdown(frame, by or "all")
    kmax = table.attrs["kmax"]
    groups = sorted(table.index.get_level_values("group").unique(), key=_natural)
    cmap = plt.get_cmap("plasma")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, g in enumerate(groups):
        sub = table.loc[g]
        color = cmap(0.85 * i / max(len(groups) - 1, 1))
        label = f"{g} ({int(sub['prompts'].iloc[0])})"
        for ax, col in zip(axes, ("pass_at_1", "pass_at_max", "solved")):
            ax.plot(sub.index, sub[col], "o-", color=color, label=label)
    for ax, title in zip(axes, ("pass@1", f"pass@{kmax}", "solved at least once")):
        ax.set_title(f"{title} by {by or 'all problems'}")
        ax.set_ylim(-0.05, 1.05)
        _round_axis(ax, data.rounds)
    axes[0].legend(title=f"{by or ''} (problems)", fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, out_dir: str | Path, name: str) -> Path:
    """Write `fig` as out_dir/name.png (folders created) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def cross_check(data: LoopData) -> None:
    """Fail loudly when the artifacts and the logged metrics disagree (a report built from a mix of
    two runs, or a round re-evaluated without re-logging): pass@1 recomputed from the per-prompt rows
    must match the logged eval/pass_at_1."""
    recomputed = data.per_prompt.groupby("round")["pass@1"].mean()
    logged = pass_at_k_table(data.metrics)[1]
    bad = [r for r in recomputed.index if not np.isclose(recomputed[r], logged.get(r, np.nan))]
    if bad:
        raise ValueError(f"rounds {bad}: eval_per_prompt.jsonl gives pass@1 {recomputed[bad].tolist()}, "
                         f"the logged eval/pass_at_1 is {logged.reindex(bad).tolist()}")
