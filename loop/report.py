"""The diversity-collapse report: load one loop from MLflow and draw the figures of
notebooks/diversity_collapse.ipynb.

RL-style self-improvement tends to sharpen the policy around answers it already finds: pass@1 goes up
while pass@k at large k, the set of problems the model can solve at all, stays flat or shrinks
(Yue et al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs Beyond
the Base Model?"). The figures here show that from what the loop logs: the parent run's metric
histories (one step per round) and each round's eval_per_prompt.jsonl / eval_samples.jsonl artifacts.

Each plot function takes a LoopData and returns a matplotlib Figure; `save_figure` writes it as PNG. Every
accuracy drawn carries its 95% interval (bands or error bars), and every difference to round 0 its paired 95%
interval, recomputed with loop/evaluation/stats.py from the per-problem rows (so loops logged before the statistics
existed get them too; `cross_check` compares them with the logged ones where those exist).
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

from loop.evaluation import stats
from loop.evaluation.metrics import normalize_answer, votes_of
from loop.run.tracking import RUN_ID_TAG, ROUND_TAG, TrackingConfig, download_artifact, resolve_uri

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


def _read_samples(path: Path, round_: int, verifiers: dict[str, str]) -> list[dict]:
    """The fields of eval_samples.jsonl the report uses; token ids are dropped as lines are read, so
    a large evaluation does not sit in memory. `verifiers`: task id -> its verifier (from eval_per_prompt)."""
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
                         "answer": answer, "extracted": g["extracted"], "verifier": verifiers.get(t["task_id"]),
                         "finish_reason": t["finish_reason"],
                         "model_tokens": sum(len(s["token_ids"]) for s in t["segments"] if s["kind"] == "model")})
    return rows


def _open_experiment(tracking_uri: str | None, experiment: str, base: Path | None):
    """(resolved URI, client, experiment) of an existing store and experiment."""
    uri = resolve_uri(TrackingConfig(uri=tracking_uri), base)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MLflow would silently create an empty store there.
        raise FileNotFoundError(f"no MLflow store at {uri}; set the tracking URI to the loop's store")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no experiment {experiment!r} at {uri}")
    return uri, client, exp


def load_loop(tracking_uri: str | None = None, experiment: str = "ratchet", run_id: str | None = None,
              base: Path | None = None) -> LoopData:
    """Everything the report needs about one loop, read from MLflow.

    `tracking_uri` None: $MLFLOW_TRACKING_URI or mlflow.db, as the loop itself resolves it; a relative SQLite path is
    relative to `base` (None: the working directory; the notebook passes the repository root).
    `run_id`: the loop's ratchet run id or its parent's MLflow run id; None: the most recent loop run.
    Rounds whose nested run has not finished (a loop still logging) are left out with a warning, and rounds the
    evaluation schedule did not evaluate are left out.
    """
    uri, client, exp = _open_experiment(tracking_uri, experiment, base)
    parent = find_loop_run(client, exp.experiment_id, run_id)
    pid = parent.info.run_id
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}' and tags.`kind` = 'round'")
    round_runs: dict[int, str] = {}
    runs = {r.info.run_id: r for r in nested}
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
    # Rounds the evaluation schedule skipped (eval.every) have no held-out figures: the report is about those.
    round_runs = {rnd: rid for rnd, rid in round_runs.items()
                  if any(k.startswith("eval/pass_at_") for k in runs[rid].data.metrics)}

    per_prompt, samples = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd, rid in sorted(round_runs.items()):
            dst = Path(tmp) / str(rnd)
            dst.mkdir()
            with open(download_artifact(uri, runs[rid].info.artifact_uri, "eval_per_prompt.jsonl", dst)) as f:
                rows = [{"round": rnd, **json.loads(line)} for line in f if line.strip()]
            per_prompt += rows
            samples += _read_samples(download_artifact(uri, runs[rid].info.artifact_uri, "eval_samples.jsonl", dst), rnd,
                                     {r["task_id"]: r.get("verifier") for r in rows})
    metrics = _metric_histories(client, parent)
    return LoopData(tracking_uri=uri, experiment=experiment, parent_run_id=pid,
                    ratchet_run_id=parent.data.tags.get(RUN_ID_TAG, ""), round_run_ids=round_runs,
                    metrics=metrics.loc[metrics.index.isin(round_runs)], per_prompt=pd.DataFrame(per_prompt),
                    samples=pd.DataFrame(samples))



def load_loops(tracking_uri: str | None = None, experiment: str = "ablation",
               base: Path | None = None) -> dict[str, LoopData]:
    """Every loop of an experiment (e.g. bench/diversity.py's option runs), keyed by ratchet run id, in the order
    they started; a run id logged twice (a restarted loop) gives its latest run."""
    uri, client, exp = _open_experiment(tracking_uri, experiment, base)
    ids = [r.data.tags.get(RUN_ID_TAG) for r in client.search_runs(
        [exp.experiment_id], "tags.`kind` = 'loop'", order_by=["attributes.start_time ASC"], max_results=1000)]
    return {i: load_loop(uri, experiment, i) for i in dict.fromkeys(i for i in ids if i)}

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
    """For each later round that crosses from above the base round to below it, the smallest k from which it stays
    below (at that k and every larger one) after being above it at some smaller k: the collapse signature. None
    for a round that never crosses so: above or below the base at every k, or not below it at the largest k."""
    if base not in table.index:
        raise ValueError(f"round {base} is not among the rounds in the table ({table.index.tolist()})")
    out: dict[int, int | None] = {}
    for rnd in table.index:
        if rnd == base:
            continue
        below = (table.loc[rnd] < table.loc[base]).to_numpy()
        above = (table.loc[rnd] > table.loc[base]).to_numpy()
        i = len(below)
        while i > 0 and below[i - 1]:  # walk down from the largest k while still below
            i -= 1
        out[int(rnd)] = int(table.columns[i]) if i < len(below) and above[:i].any() else None
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
    without an answer count in the denominator only). 1.0 means every sample says the same thing. Math answers
    are the same answer as maj@k and distinct_answers count them (loop.evaluation.metrics.answer_votes: by the verifier's
    equivalence and verdicts); code answers by normalised text."""
    def share(group: pd.DataFrame) -> float:
        if (group["verifier"] == "math").all():
            votes = votes_of(tuple(zip(group["status"], group["extracted"])))
            top = max([votes.gold, *votes.wrong])
        else:
            top = max(Counter(a for a in group["answer"] if a is not None).values(), default=0)
        return top / len(group)
    return (samples.groupby(["round", "task_id"])[["status", "extracted", "answer", "verifier"]].apply(share)
            .rename("top_answer_share").reset_index())


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
    for col, field in (("pass_at_1", "pass@1"), ("pass_at_max", f"pass@{kmax}"), ("solved", "solved")):
        bounds = {key: _group_interval(sub, field) for key, sub in df.groupby(["group", "round"])}
        out[f"{col}_low"] = [bounds[key][0] for key in out.index]
        out[f"{col}_high"] = [bounds[key][1] for key in out.index]
    out.attrs["kmax"] = kmax
    return out


def _group_interval(sub: pd.DataFrame, field: str) -> tuple[float, float]:
    """95% interval of a group's mean of `field` (loop.evaluation.stats.estimate, clustered as the loop clusters)."""
    clusters = stats.problem_clusters(sub[[c for c in ("task_id", "cluster") if c in sub]].to_dict("records"))
    e = stats.estimate(sub[field].astype(float).to_numpy(), [clusters[t] for t in sub["task_id"]])
    return e.low, e.high


def _round_rows(per_prompt: pd.DataFrame, rnd: int) -> list[dict]:
    """One round's per-prompt rows as the loop wrote them (NaN back to None)."""
    sub = per_prompt[per_prompt["round"] == rnd]
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
            for r in sub.drop(columns="round").to_dict("records")]


def round_stats(per_prompt: pd.DataFrame, base: int = 0) -> pd.DataFrame:
    """Per round (index): for every accuracy M, 'eval/M' (mean over problems) and loop.evaluation.stats.round_statistics'
    'eval/M_se', 'eval/M_low', 'eval/M_high', 'vs_round0/M[_low|_high|_p]' (against `base`) and
    'vs_prev/M[...]', recomputed from the per-prompt rows; plus 'solved' (the share of problems solved at
    least once) with 'solved_se', 'solved_low', 'solved_high', and its change 'vs_round0/solved[...]'."""
    rounds = sorted(int(r) for r in per_prompt["round"].unique())
    rows = {r: _round_rows(per_prompt, r) for r in rounds}
    out: dict[int, dict[str, float]] = {}
    for i, r in enumerate(rounds):
        st = stats.round_statistics(rows[r], base=rows[base] if r != base and base in rows else None,
                                    prev=rows[rounds[i - 1]] if i > 0 else None)
        for name in stats.accuracy_names(rows[r]):
            field = "greedy_correct" if name == "greedy_acc" else name
            st[f"eval/{name}"] = float(np.mean([x[field] for x in rows[r] if x.get(field) is not None]))
        clusters = stats.problem_clusters(rows[r])
        solved = {x["task_id"]: float(x["correct"] > 0) for x in rows[r]}
        e = stats.estimate(list(solved.values()), [clusters[t] for t in solved])
        st.update({"solved": e.mean, "solved_se": e.se, "solved_low": e.low, "solved_high": e.high})
        if r != base and base in rows:
            before = {x["task_id"]: float(x["correct"] > 0) for x in rows[base]}
            common = [t for t in solved if t in before]
            if common:
                ch = stats.paired_change([before[t] for t in common], [solved[t] for t in common],
                                         [clusters[t] for t in common])
                st.update({"vs_round0/solved": ch.delta, "vs_round0/solved_low": ch.low,
                           "vs_round0/solved_high": ch.high, "vs_round0/solved_p": ch.p_value})
        out[r] = st
    df = pd.DataFrame.from_dict(out, orient="index").sort_index()
    df.index.name = "round"
    return df


def change_table(data: LoopData, metrics: list[str] | None = None) -> pd.DataFrame:
    """Per later round and accuracy (default: pass@1, pass@max, the largest maj@k, greedy): the paired change
    against round 0 and the previous round, with 95% intervals, p-values and 'up' / 'down' / 'within noise'."""
    st = round_stats(data.per_prompt)
    if metrics is None:
        names = stats.accuracy_names(_round_rows(data.per_prompt, data.rounds[0]))
        passes = [n for n in names if n.startswith("pass@")]
        majs = [n for n in names if n.startswith("maj@")]
        metrics = passes[:1] + passes[-1:] + majs[-1:] + [n for n in names if n == "greedy_acc"]
        metrics = list(dict.fromkeys(metrics))
    rows = []
    for rnd in st.index:
        for m in metrics:
            row = {"round": rnd, "metric": m, "value": st.loc[rnd].get(f"eval/{m}")}
            for vs, label in (("vs_round0", "vs round 0"), ("vs_prev", "vs previous")):
                delta = st.loc[rnd].get(f"{vs}/{m}")
                if delta is None or pd.isna(delta):
                    continue
                low, high = st.loc[rnd, f"{vs}/{m}_low"], st.loc[rnd, f"{vs}/{m}_high"]
                row[label] = stats.format_change(delta, low, high)
                row[f"p ({label})"] = st.loc[rnd, f"{vs}/{m}_p"]
            if len(row) > 3:
                rows.append(row)
    return pd.DataFrame(rows).set_index(["round", "metric"]) if rows else pd.DataFrame()


def summary_table(data: LoopData) -> pd.DataFrame:
    """The headline numbers per round, for a quick look."""
    table = pass_at_k_table(data.metrics)
    kmax = int(table.columns[-1])
    st = round_stats(data.per_prompt)
    out = pd.DataFrame({"pass@1": table[1], "pass@1 low": st["eval/pass@1_low"], "pass@1 high": st["eval/pass@1_high"],
                        f"pass@{kmax}": table[kmax], f"pass@{kmax} low": st.get(f"eval/pass@{kmax}_low"),
                        f"pass@{kmax} high": st.get(f"eval/pass@{kmax}_high")})
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


def _bounds(st: pd.DataFrame, rounds, key: str, values) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of `key` in round_stats for `rounds`; the values themselves (no bar) where missing."""
    vals = np.asarray(values, dtype=float)
    def col(name: str) -> np.ndarray:
        return st[name].reindex(rounds).to_numpy(dtype=float) if name in st else np.full(len(vals), np.nan)
    low, high = col(f"{key}_low"), col(f"{key}_high")
    return np.where(np.isnan(low), vals, low), np.where(np.isnan(high), vals, high)


def _accuracy_axis(ax) -> None:
    """Accuracies on their whole range, so that a change is drawn at its true size."""
    ax.set_ylim(-0.02, 1.02)


def _difference_axis(ax, values) -> None:
    """Differences symmetric about 0, at least ±0.1: a change of 0.006 stays small instead of filling the panel."""
    vals = np.abs(np.asarray(values, dtype=float))
    half = max(0.1, 1.1 * float(np.nanmax(vals)) if np.isfinite(vals).any() else 0.1)
    ax.set_ylim(-half, half)


def _band(ax, xs, st: pd.DataFrame, rnd: int, keys: list[str], color) -> None:
    """A shaded 95% band over xs from round_stats' '<key>_low' / '<key>_high' of round `rnd`."""
    if rnd not in st.index or not all(f"{k}_low" in st for k in keys):
        return
    low = st.loc[rnd, [f"{k}_low" for k in keys]].to_numpy(dtype=float)
    high = st.loc[rnd, [f"{k}_high" for k in keys]].to_numpy(dtype=float)
    ax.fill_between(xs, low, high, color=color, alpha=0.12, lw=0)


def plot_pass_at_k(data: LoopData) -> Figure:
    """pass@k against k (log2) per round, and each round's difference to round 0."""
    table = pass_at_k_table(data.metrics)
    st = round_stats(data.per_prompt)
    colors = _round_colors(data.rounds)
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    ks = table.columns.to_numpy()
    drawn = [0.0]  # every difference and band end drawn, to size the difference axis
    for rnd in table.index:
        style = dict(color=colors[rnd], marker="o", lw=2 if rnd == 0 else 1.5, ls="--" if rnd == 0 else "-")
        ax.plot(ks, table.loc[rnd], label=f"round {rnd}", **style)
        _band(ax, ks, st, rnd, [f"eval/pass@{k}" for k in ks], colors[rnd])
        if rnd != 0 and 0 in table.index:
            dx.plot(ks, table.loc[rnd] - table.loc[0], label=f"round {rnd}", **style)
            _band(dx, ks, st, rnd, [f"vs_round0/pass@{k}" for k in ks], colors[rnd])
            drawn += list(table.loc[rnd] - table.loc[0])
            drawn += [st.loc[rnd].get(f"vs_round0/pass@{k}_{e}", np.nan) for k in ks for e in ("low", "high")
                      if rnd in st.index]
    crossings = crossover_k(table) if 0 in table.index else {}
    for rnd, k in crossings.items():
        if k is not None:
            dx.plot([k], [table.loc[rnd, k] - table.loc[0, k]], "x", color="red", ms=10, mew=2)
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xticks(ks, [str(k) for k in ks])
        a.set_xlabel("k (samples per problem)")
        a.grid(alpha=0.3)
    ax.set_ylabel("pass@k (band: 95% interval)")
    ax.set_title("pass@k per round")
    ax.legend()
    _accuracy_axis(ax)
    _difference_axis(dx, drawn)
    dx.axhline(0, color="black", lw=1)
    dx.set_ylabel("pass@k(round) − pass@k(round 0) (band: paired 95% interval)")
    dx.set_title("difference to the base model (×: crosses from above it to below it)")
    if 0 not in table.index:
        _missing(dx, "round 0")
    fig.tight_layout()
    return fig


def plot_headline(data: LoopData) -> Figure:
    """pass@1, pass@max, maj@max and greedy accuracy over rounds."""
    table = pass_at_k_table(data.metrics)
    st = round_stats(data.per_prompt)
    kmax = int(table.columns[-1])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = [("pass@1", table[1], "o-", "pass@1"), (f"pass@{kmax}", table[kmax], "s-", f"pass@{kmax} (pass@max)")]
    majs = sorted(int(m.group(1)) for c in data.metrics.columns if (m := _MAJ_KEY.match(c)))
    if majs:
        lines.append((f"maj@{majs[-1]}", data.metrics[f"eval/maj_at_{majs[-1]}"], "^--", f"maj@{majs[-1]}"))
    if "eval/greedy_acc" in data.metrics:
        lines.append(("greedy_acc", data.metrics["eval/greedy_acc"], "d:", "greedy"))
    for i, (name, values, fmt, label) in enumerate(lines):
        x = values.index.to_numpy() + 0.04 * (i - (len(lines) - 1) / 2)  # side by side, bars not on top of each other
        low, high = _bounds(st, values.index, f"eval/{name}", values)
        ax.errorbar(x, values.to_numpy(), yerr=[values.to_numpy() - low, high - values.to_numpy()], fmt=fmt,
                    capsize=3, label=label)
    ax.set_ylabel("accuracy over evaluation problems (bars: 95% interval)")
    ax.set_title("pass@1 against pass@max: sharpening or new capability?")
    _accuracy_axis(ax)
    _round_axis(ax, data.rounds)
    ax.legend()
    fig.tight_layout()
    return fig


MIN_BOX = 8  # a box plot needs at least this many distinct values in every round


def _distribution_by_round(ax, frame: pd.DataFrame, column: str, rounds: list[int]) -> str:
    """Per round, `column` over the problems, with its mean (◆): a box plot when every round's values take at least
    MIN_BOX distinct values; else every value as a point, jittered sideways (a box over a few discrete levels, e.g.
    distinct answers out of 4 samples, collapses to a line). Returns what it drew."""
    values = [frame.loc[frame["round"] == r, column].dropna().to_numpy(dtype=float) for r in rounds]
    if values and min(len(np.unique(v)) for v in values) >= MIN_BOX:
        ax.boxplot(values, positions=rounds, widths=0.5)
        kind = "box"
    else:
        rng = np.random.default_rng(0)  # the same jitter every time the figure is drawn
        for r, v in zip(rounds, values):
            ax.scatter(r + rng.uniform(-0.2, 0.2, len(v)), v, s=12, alpha=0.35, color="tab:blue", lw=0)
        kind = "points"
    ax.plot(rounds, [v.mean() if len(v) else np.nan for v in values], "D", color="tab:red", ms=6, zorder=3)
    return kind


def plot_diversity(data: LoopData) -> Figure:
    """Distinct answers and top-answer share per prompt, the entropy proxy and response length per round."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    rounds = data.rounds
    (a_dist, a_share), (a_nll, a_len) = axes
    kind = _distribution_by_round(a_dist, data.per_prompt, "distinct_answers", rounds)
    a_dist.set_ylabel("distinct final answers per problem")
    a_dist.set_title(f"answer diversity ({kind}: problems, ◆: mean)")
    a_dist.set_ylim(0, int(data.per_prompt["n"].max()) + 0.5)  # from none to one per sample
    kind = _distribution_by_round(a_share, top_answer_share(data.samples), "top_answer_share", rounds)
    a_share.set_ylabel("share of samples giving the most common answer")
    a_share.set_ylim(-0.05, 1.05)
    a_share.set_title(f"answer concentration ({kind}: problems; 1 = all samples agree)")
    for ax, key, label in ((a_nll, "eval/nll_per_token", "NLL per model token (entropy proxy)"),
                           (a_len, "eval/response_tokens", "model tokens per response")):
        if key in data.metrics:
            ax.plot(data.metrics.index, data.metrics[key], "o-")
            top = float(data.metrics[key].max())
            ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)  # from 0, so a change shows at its relative size
        else:
            _missing(ax, key)
        ax.set_ylabel(label)
    a_nll.set_title("sampling entropy proxy")
    a_len.set_title("response length")
    if "eval/cutoff_frac" in data.metrics:  # long answers cut off by a budget explain length jumps
        cut = data.metrics["eval/cutoff_frac"]
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
    st = round_stats(data.per_prompt)
    frac = cov["solved"] / cov["num_prompts"]
    low, high = _bounds(st, cov.index, "solved", frac)
    ax.errorbar(cov.index, frac.to_numpy(), yerr=[frac.to_numpy() - low, high - frac.to_numpy()], fmt="o-",
                color="black", capsize=3)
    ax.set_ylabel("fraction of problems solved at least once (bars: 95% interval)")
    _accuracy_axis(ax)
    ax.set_title(f"coverage (n samples per problem, {cov['num_prompts'].iloc[0]} problems)")
    later = cov.drop(index=0, errors="ignore")
    bx.bar(later.index, later["gained"], color="tab:green", label="gained: never solved by round 0")
    bx.bar(later.index, -later["lost"], color="tab:red", label="lost: solved by round 0, not by this round")
    for rnd, row in later.iterrows():
        text = f"+{row['gained']} / −{row['lost']}"
        if "vs_round0/solved_p" in st and rnd in st.index and not pd.isna(st.loc[rnd, "vs_round0/solved_p"]):
            text += f"\np={st.loc[rnd, 'vs_round0/solved_p']:.2g}"  # paired test of the solved share
        bx.annotate(text, (rnd, 0), textcoords="offset points",
                    xytext=(0, -22 if row["gained"] >= row["lost"] else 6), ha="center", fontsize=8)
    bx.axhline(0, color="black", lw=1)
    bx.set_ylabel("problems")
    bx.set_title("against the base model (p: paired test of the solved share)")
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
        x = sub.index.to_numpy() + 0.05 * (i - (len(groups) - 1) / 2)
        for ax, col in zip(axes, ("pass_at_1", "pass_at_max", "solved")):
            lo, hi = sub[f"{col}_low"].to_numpy(), sub[f"{col}_high"].to_numpy()
            ax.errorbar(x, sub[col].to_numpy(), yerr=[sub[col].to_numpy() - lo, hi - sub[col].to_numpy()], fmt="o-",
                        color=color, capsize=2, label=label)
    for ax, title in zip(axes, ("pass@1", f"pass@{kmax}", "solved at least once")):
        ax.set_title(f"{title} by {by or 'all problems'} (bars: 95%)")
        ax.set_ylim(-0.05, 1.05)
        _round_axis(ax, data.rounds)
    axes[0].legend(title=f"{by or ''} (problems)", fontsize=8)
    fig.tight_layout()
    return fig


def _last_common_round(datas: dict[str, LoopData]) -> int:
    common = set.intersection(*(set(d.rounds) for d in datas.values()))
    if not common:
        raise ValueError(f"the loops {list(datas)} share no finished round")
    return max(common)


def plot_options(datas: dict[str, LoopData], baseline: str | None = None, rnd: int | None = None) -> Figure:
    """Training options side by side (bench/diversity.py): pass@k against k at round `rnd` (None: the last round
    every loop finished) for each loop, with its 95% band, and the base model (round 0 of the baseline) dashed;
    right, each option minus the baseline option at that round, with the paired 95% band (the loops are evaluated
    on the same problems, so the difference is paired by problem)."""
    if not datas:
        raise ValueError("no loops to compare")
    baseline = baseline or next(iter(datas))
    if baseline not in datas:
        raise ValueError(f"baseline {baseline!r} is not one of the loops {list(datas)}")
    rnd = _last_common_round(datas) if rnd is None else rnd
    base_rows = _round_rows(datas[baseline].per_prompt, rnd)
    ks = sorted(int(n.split("@")[1]) for n in stats.accuracy_names(base_rows) if n.startswith("pass@"))
    keys = [f"pass@{k}" for k in ks]
    cmap = plt.get_cmap("tab10")
    fig, (ax, dx) = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = [0.0]
    if 0 in datas[baseline].rounds:
        st0 = round_stats(datas[baseline].per_prompt).loc[0]
        ax.plot(ks, [st0[f"eval/{k}"] for k in keys], "o--", color="black", lw=2, label="base model (round 0)")
    for i, (name, data) in enumerate(datas.items()):
        if rnd not in data.rounds:
            raise ValueError(f"loop {name!r} has no finished round {rnd} (it has {data.rounds})")
        rows = _round_rows(data.per_prompt, rnd)
        st = pd.DataFrame([stats.round_statistics(rows, base=base_rows)])
        means = [float(np.mean([x[k] for x in rows if x.get(k) is not None])) for k in keys]
        color = cmap(i % 10)
        ax.plot(ks, means, "o-", color=color, label=name)
        ax.fill_between(ks, st[[f"eval/{k}_low" for k in keys]].iloc[0].to_numpy(dtype=float),
                        st[[f"eval/{k}_high" for k in keys]].iloc[0].to_numpy(dtype=float), color=color, alpha=0.12, lw=0)
        if name == baseline:
            dx.plot(ks, [0.0] * len(ks), "o-", color=color, label=f"{name} (baseline)")
            continue
        delta = st[[f"vs_round0/{k}" for k in keys]].iloc[0].to_numpy(dtype=float)
        low = st[[f"vs_round0/{k}_low" for k in keys]].iloc[0].to_numpy(dtype=float)
        high = st[[f"vs_round0/{k}_high" for k in keys]].iloc[0].to_numpy(dtype=float)
        dx.plot(ks, delta, "o-", color=color, label=name)
        dx.fill_between(ks, low, high, color=color, alpha=0.12, lw=0)
        drawn += list(delta) + list(low) + list(high)
    for a in (ax, dx):
        a.set_xscale("log", base=2)
        a.set_xticks(ks, [str(k) for k in ks])
        a.set_xlabel("k (samples per problem)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax.set_ylabel("pass@k (band: 95% interval)")
    ax.set_title(f"pass@k at round {rnd}, per option")
    _accuracy_axis(ax)
    _difference_axis(dx, drawn)
    dx.axhline(0, color="black", lw=1)
    dx.set_ylabel(f"pass@k(option) − pass@k({baseline}) (band: paired 95%)")
    dx.set_title(f"difference to {baseline} at round {rnd}")
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
    # The intervals the loop logged (loops from before the statistics have none) must be the ones the
    # per-prompt rows give.
    st = round_stats(data.per_prompt)
    for key in ("eval/pass@1_low", "eval/pass@1_high", "vs_round0/pass@1", "vs_round0/pass@1_p"):
        logged_key = key.replace("@", "_at_")
        if logged_key not in data.metrics or key not in st:
            continue
        both = pd.concat([st[key], data.metrics[logged_key]], axis=1, join="inner").dropna()
        off = both.index[~np.isclose(both.iloc[:, 0], both.iloc[:, 1], rtol=1e-6, atol=1e-9)].tolist()
        if off:
            raise ValueError(f"rounds {off}: the per-prompt rows give {key} {both.loc[off].iloc[:, 0].tolist()}, "
                             f"the logged {logged_key} is {both.loc[off].iloc[:, 1].tolist()}")
