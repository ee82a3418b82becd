"""The report's tables, computed from a LoopData: pass@k per round, coverage (problems solved, lost and gained), answer
concentration, breakdowns, and every accuracy's interval and paired change recomputed with loop/evaluation/stats.py
from the per-problem rows; `cross_check` compares those with what the loop logged."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd

from loop.evaluation import stats
from loop.evaluation.metrics import votes_of
from loop.report.load import LoopData

_PASS_KEY = re.compile(r"^eval/pass_at_(\d+)$")


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
    """Per round and prompt: the share of samples giving the prompt's most common final answer (samples without an
    answer count in the denominator only). 1.0 means every sample says the same thing. Math answers are the same answer
    as maj@k and distinct_answers count them (loop.evaluation.metrics.answer_votes: by the verifier's equivalence and
    verdicts); code answers by normalised text."""
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
    """Per round (index): for every accuracy M, 'eval/M' (mean over problems) and
    loop.evaluation.stats.round_statistics' 'eval/M_se', 'eval/M_low', 'eval/M_high', 'vs_round0/M[_low|_high|_p]'
    (against `base`) and 'vs_prev/M[...]', recomputed from the per-prompt rows; plus 'solved' (the share of problems
    solved at least once) with 'solved_se', 'solved_low', 'solved_high', and its change 'vs_round0/solved[...]'."""
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
                row[f"p ({label})"] = stats.format_p(st.loc[rnd, f"{vs}/{m}_p"])
            if len(row) > 3:
                rows.append(row)
    return pd.DataFrame(rows).set_index(["round", "metric"]) if rows else pd.DataFrame()


# Below this many samples per problem pass@k is known only for small k, where sharpening and collapse look alike:
# the collapse studies (Yue et al. 2025) see pass@k curves cross at k of 16 to 256.
MIN_SAMPLES_FOR_COLLAPSE = 16


def pass_at_k_verdicts(data: LoopData, base: int = 0) -> list[str]:
    """One sentence per evaluated round after `base` saying what its pass@k curve shows against the base round, by
    the paired 95% intervals of pass@1 and of pass@k at the largest k: sharpening without collapse, collapse at
    large k (pass@kmax below the base with its interval below zero), or within noise; then, with fewer than
    MIN_SAMPLES_FOR_COLLAPSE samples per problem, a warning that collapse at large k cannot be judged."""
    st = round_stats(data.per_prompt, base=base)
    kmax = int(pass_at_k_table(data.metrics).columns[-1])
    out = []

    def change(rnd: int, name: str) -> tuple[str, int]:  # the change as text, and its sign where it is a result
        d, lo, hi = (st.loc[rnd].get(f"vs_round0/{name}{x}") for x in ("", "_low", "_high"))
        if d is None or pd.isna(d):
            return "", 0
        return stats.format_change(d, lo, hi), (1 if lo > 0 else -1 if hi < 0 else 0)

    for rnd in st.index:
        if rnd == base:
            continue
        (t1, s1), (tk, sk) = change(rnd, "pass@1"), change(rnd, f"pass@{kmax}")
        if not t1:
            continue
        head = f"round {rnd} against round {base}: pass@1 {t1}, pass@{kmax} {tk}. "
        if sk < 0:
            verdict = ("collapse at large k: pass@1 rose while pass@{k} fell" if s1 > 0 else
                       "pass@{k} fell below the base model" + (" and pass@1 with it" if s1 < 0 else "")).format(k=kmax)
        elif s1 > 0:
            verdict = ("sharpening without collapse: pass@1 rose and pass@{k} " + ("rose too" if sk > 0 else
                       "is within noise of the base model")).format(k=kmax)
        elif s1 < 0:
            verdict = "pass@1 fell; pass@{k} ".format(k=kmax) + ("rose" if sk > 0 else "is within noise")
        elif sk > 0:
            verdict = f"pass@{kmax} rose while pass@1 is within noise: more problems solved at least once"
        else:
            verdict = "within noise: no change this evaluation can tell from chance"
        out.append(head + verdict[0].upper() + verdict[1:] + ".")
    n = int(data.per_prompt["n"].min())
    if n < MIN_SAMPLES_FOR_COLLAPSE:
        out.append(f"With {n} samples per problem, pass@k is known only up to k = {n}; collapse at large k (where "
                   f"pass@k curves of RL-trained models cross the base model's, k of {MIN_SAMPLES_FOR_COLLAPSE} and "
                   f"more) cannot be judged here: raise eval.sampling.n to {MIN_SAMPLES_FOR_COLLAPSE} or more.")
    return out


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
