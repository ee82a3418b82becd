"""The report's figures: each plot function takes a LoopData (or several, for `plot_options`) and returns a
matplotlib Figure, every accuracy with its 95% interval and every difference to round 0 with its paired 95% interval;
`save_figure` writes one as PNG."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from loop.evaluation import stats
from loop.report.load import LoopData
from loop.report.tables import (_natural, _round_rows, breakdown, coverage, crossover_k, group_field, pass_at_k_table,
                                round_stats, top_answer_share)

_MAJ_KEY = re.compile(r"^eval/maj_at_(\d+)$")


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


def save_figure(fig: Figure, out_dir: str | Path, name: str, stamp: str | None = None) -> Path:
    """Write `fig` as out_dir/name.png (folders created) and return the path. `stamp` (LoopData.stamp: run id,
    commit, date) goes in the bottom-right corner, so a figure copied into a doc still says what it was drawn from."""
    if stamp:
        fig.text(0.995, 0.005, stamp, ha="right", va="bottom", fontsize=7, color="0.4")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
