"""Uncertainty of evaluation results: intervals for accuracies and paired tests of changes between rounds.

The unit is the problem, not the sample (Miller 2024, "Adding Error Bars to Evals", arXiv 2411.00640): each
problem's n samples enter only through its per-problem score (the unbiased pass@k estimate of
`loop.evaluation.metrics.pass_at_k`, a maj@k value, a 0/1 greedy result), and the benchmark value is the mean over the
N problems, an estimate of the mean over the population of problems the evaluation set stands for. Its
standard error is sd(scores)/sqrt(N) or, when problems share a cluster (variants of one gsm-symbolic
template), the cluster-robust SE_cl^2 = G/(G-1) * sum_c (sum_{i in c} (s_i - mean))^2 / N^2 over the G clusters
(Miller 2024's clustered SE with the usual G/(G-1) small-sample factor, so that singleton clusters give
exactly sd/sqrt(N)), with G - 1 degrees of freedom.

Intervals (95% unless asked), chosen by simulation (tests/test_stats.py) for coverage close to nominal with
about 50 problems and accuracies from 0.05 to 0.95:

- A mean (`estimate`, `pass_at_k_interval`): a Wilson score interval on the effective number of problems
  N_eff = m(1-m)/SE^2, with the Korn-Graubard degrees-of-freedom factor (z/t_{G-1})^2 on N_eff (Korn & Graubard
  1998, Survey Methodology 24:193; Dean & Pagano 2015, J. Survey Stat. Methodol. 3:484, found this Wilson form
  among the best for clustered proportions). Scores live in [0, 1], so their variance is at most m(1-m): the
  design effect N SE^2 / (m(1-m)) carries the heterogeneity of the problems and the samples per problem, and
  the Wilson form keeps the interval inside [0, 1] and asymmetric near 0 and 1, where the t-interval
  m +- t SE undercovers (measured with 50 problems at accuracies 0.03-0.1: t 80-92%, this interval 92-98%;
  the regimes of the test, 0.05-0.9 and pass@1 to pass@4: 94.6-96.6%).
  When every score is equal (all 0, say) SE is 0 and N_eff is taken as N: [0, z^2/(N+z^2)] when no problem
  is ever solved, as for a plain Wilson interval over the problems.
- A paired change (`paired_change`, `paired_difference`): the per-problem differences d_i = s_i(B) - s_i(A)
  give the paired t-interval mean(d) +- t_{G-1} SE(d) (Miller 2024, paired analysis: the between-problem
  variance cancels). It has near-nominal coverage unless few problems differ at all (0/1 scores such as
  greedy or pass@n near 0 or 1), where it collapses towards [0, 0], the known failure of Wald intervals for
  matched proportions (Newcombe 1998, Stat. Med. 17:2635; Agresti & Min 2005, Stat. Med. 24:729). There the
  MOVER interval built from the two Wilson intervals above and the correlation of the two rounds' scores
  (Zou & Donner 2008, Stat. Med. 27:1693; for 0/1 scores it is Newcombe's method 10) keeps its coverage.
  So with fewer than MIN_DIFFERING = 3 problems whose scores differ, the interval is the union of the two;
  otherwise the t-interval (the threshold chosen by the simulation: always taking the union overcovers, up to
  98%, for 0/1 scores at low rates). The p-value matches the interval: the largest 1 - level at which it still
  excludes 0, so p < 0.05 exactly when the 95% interval excludes 0 (the paired t-test when t is used).

Arrays may carry leading batch dimensions (problems on the last axis): the coverage simulation evaluates
thousands of synthetic evaluations in one call. Cluster ids and per-problem n are shared by the batch.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize
from scipy import stats as _sp

from loop.evaluation.metrics import pass_at_k
from loop.run.directory import read_jsonl

PER_PROMPT = "eval_per_prompt.jsonl"
"""Each round's per-problem artifact (task_id, n, correct, greedy_correct, per-problem pass@k and maj@k),
written by loop/evaluation/evaluate.py and logged to MLflow: everything here can be recomputed from it."""

__all__ = ["Estimate", "Change", "estimate", "paired_change", "pass_at_k_values", "pass_at_k_interval",
           "paired_difference", "detectable_change", "detectable_change_note", "detectable_change_from_rates",
           "detectable_change_from_rates_note", "round_statistics",
           "round_statistics_from_dirs", "training_statistics",
           "accuracy_names", "problem_clusters", "format_estimate", "format_change"]


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its standard error and interval (floats; arrays for batched input)."""

    mean: float
    se: float
    low: float
    high: float
    problems: int
    clusters: int
    level: float


@dataclass(frozen=True)
class Change:
    """A paired change B - A over the same problems: mean difference, its SE, interval, two-sided p-value."""

    delta: float
    se: float
    low: float
    high: float
    p_value: float
    problems: int
    clusters: int
    level: float


# --- input checks ---------------------------------------------------------------------------------


def _scores(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{what}: need one score per problem and at least one problem, got "
                         f"{'a single number' if x.ndim == 0 else 'none'}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: per-problem scores must be finite numbers; got NaN or inf")
    if np.any((x < 0) | (x > 1)):
        bad = x[(x < 0) | (x > 1)].ravel()[0]
        raise ValueError(f"{what}: per-problem scores must lie in [0, 1] (accuracies), got {bad}")
    return x


def _cluster_matrix(clusters, num: int, what: str) -> np.ndarray | None:
    """Problems x clusters 0/1 matrix; None without clusters (each problem its own)."""
    if clusters is None:
        return None
    ids = list(clusters)
    if len(ids) != num:
        raise ValueError(f"{what}: {len(ids)} cluster ids for {num} problems; give one id per problem, in order")
    index: dict[Hashable, int] = {}
    codes = [index.setdefault(c, len(index)) for c in ids]
    m = np.zeros((num, len(index)))
    m[np.arange(num), codes] = 1.0
    return m


def _check_level(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    return float(level)


def _out(v):
    v = np.asarray(v, dtype=float)
    return float(v) if v.ndim == 0 else v


# --- standard errors and intervals ----------------------------------------------------------------


def _cov(x: np.ndarray, y: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """Cluster-robust covariance of the means of x and y (the squared SE when x is y), Bessel-corrected:
    G/(G-1) * sum_c Sx_c Sy_c / N^2, with S_c the cluster's sum of deviations from the mean."""
    n = x.shape[-1]
    sx = x - x.mean(-1, keepdims=True)
    sy = y - y.mean(-1, keepdims=True)
    if m is not None:
        sx, sy = sx @ m, sy @ m
    g = sx.shape[-1]
    if g < 2:
        return np.zeros(x.shape[:-1])
    return g / (g - 1) * (sx * sy).sum(-1) / n ** 2


def _quantiles(level, df: int):
    """Two-sided normal and t_{df} quantiles for `level` (a number or an array of levels)."""
    tail = 0.5 + np.asarray(level, dtype=float) / 2
    return _sp.norm.ppf(tail), _sp.t.ppf(tail, df)


def _wilson(mean, se2, n: int, g: int, level) -> tuple[np.ndarray, np.ndarray]:
    """Wilson interval of a mean of [0, 1] scores on N_eff = m(1-m)/SE^2 (N when SE is 0), times (z/t)^2."""
    if g < 2:  # one problem or one cluster: no spread to learn from
        return np.zeros_like(mean), np.ones_like(mean)
    z, t = _quantiles(level, g - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(se2 > 0, mean * (1 - mean) / se2, float(n))
    n_eff = np.where(np.isfinite(n_eff) & (n_eff > 0), n_eff, float(n)) * (z / t) ** 2
    a = z * z / n_eff
    center = (mean + a / 2) / (1 + a)
    half = z / (1 + a) * np.sqrt(mean * (1 - mean) / n_eff + z * z / (4 * n_eff ** 2))
    return np.clip(np.minimum(center - half, mean), 0, 1), np.clip(np.maximum(center + half, mean), 0, 1)


def estimate(values, clusters: Sequence[Hashable] | None = None, level: float = 0.95) -> Estimate:
    """Mean of per-problem scores in [0, 1] (greedy 0/1, pass@k estimates, maj@k values), its standard error
    over problems (cluster-robust with `clusters`, one id per problem) and its Wilson interval (module doc)."""
    level = _check_level(level)
    x = _scores(values, "estimate")
    n = x.shape[-1]
    m = _cluster_matrix(clusters, n, "estimate")
    g = n if m is None else m.shape[1]
    mean = x.mean(-1)
    se2 = _cov(x, x, m)
    low, high = _wilson(mean, se2, n, g, level)
    return Estimate(_out(mean), _out(np.sqrt(se2)), _out(low), _out(high), n, g, level)


MIN_DIFFERING = 3
"""Below this many problems whose scores differ between the two evaluations, the paired t-interval has
almost no spread to estimate a variance from, and the MOVER-Wilson interval widens it (module doc)."""


def _paired_bounds(xa, xb, m, n: int, g: int, level) -> tuple[np.ndarray, np.ndarray]:
    """The paired t-interval of mean(B) - mean(A); its union with the MOVER-Wilson interval when fewer than
    MIN_DIFFERING problems differ."""
    ma, mb = xa.mean(-1), xb.mean(-1)
    delta = mb - ma
    if g < 2:
        return np.full_like(delta, -1.0), np.full_like(delta, 1.0)
    d = xb - xa
    se = np.sqrt(_cov(d, d, m))
    _, t = _quantiles(level, g - 1)
    va, vb = _cov(xa, xa, m), _cov(xb, xb, m)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where((va > 0) & (vb > 0), _cov(xa, xb, m) / np.sqrt(va * vb), 0.0)
    la, ua = _wilson(ma, va, n, g, level)
    lb, ub = _wilson(mb, vb, n, g, level)
    low = delta - np.sqrt(np.maximum((mb - lb) ** 2 + (ua - ma) ** 2 - 2 * r * (mb - lb) * (ua - ma), 0.0))
    high = delta + np.sqrt(np.maximum((ub - mb) ** 2 + (ma - la) ** 2 - 2 * r * (ub - mb) * (ma - la), 0.0))
    t_low, t_high = delta - t * se, delta + t * se
    few = (d != 0).sum(-1) < MIN_DIFFERING
    low = np.where(few, np.minimum(t_low, low), t_low)
    high = np.where(few, np.maximum(t_high, high), t_high)
    return np.clip(low, -1, 1), np.clip(high, -1, 1)


def _p_value(xa, xb, m, n: int, g: int, iters: int = 50) -> np.ndarray:
    """Two-sided p-value matching the interval: the paired t-test where the t-interval is used; elsewhere
    1 - the largest level whose interval still excludes 0, by bisection on the level."""
    d = xb - xa
    delta = d.mean(-1)
    if g < 2:
        return np.ones(delta.shape)
    se = np.sqrt(_cov(d, d, m))
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(se > 0, 2 * _sp.t.sf(np.abs(delta) / se, g - 1), np.where(delta == 0, 1.0, 0.0))
    few = (d != 0).sum(-1) < MIN_DIFFERING
    if np.any(few):
        sub = (lambda v: v[few]) if few.ndim else (lambda v: v)
        fa, fb, fdelta = sub(xa), sub(xb), sub(delta)

        def excludes(level):
            low, high = _paired_bounds(fa, fb, m, n, g, level)
            return (low > 0) | (high < 0)

        a = np.full(fdelta.shape, 1e-12)  # a level whose interval excludes 0 (if not even this one: p = 1)
        b = np.full(fdelta.shape, 1 - 1e-15)  # a level whose interval holds 0
        for _ in range(iters):
            mid = (a + b) / 2
            ex = excludes(mid)
            a, b = np.where(ex, mid, a), np.where(ex, b, mid)
        pf = np.where(excludes(np.full(fdelta.shape, 1e-12)) & (fdelta != 0), np.clip(1 - (a + b) / 2, 0, 1), 1.0)
        if few.ndim:
            p = p.copy()
            p[few] = pf
        else:
            p = pf
    return np.clip(p, 0.0, 1.0)


def paired_change(values_a, values_b, clusters: Sequence[Hashable] | None = None, level: float = 0.95) -> Change:
    """Paired change B - A of per-problem scores in [0, 1] on the same problems (same order): the mean
    difference, its SE over problems (cluster-robust with `clusters`), the interval and the two-sided p-value
    of the module doc."""
    level = _check_level(level)
    xa, xb = _scores(values_a, "paired change (A)"), _scores(values_b, "paired change (B)")
    if xa.shape != xb.shape:
        raise ValueError(f"paired change: A has {xa.shape[-1]} problems and B {xb.shape[-1]}; a paired comparison "
                         f"needs the same problems in the same order")
    n = xa.shape[-1]
    m = _cluster_matrix(clusters, n, "paired change")
    g = n if m is None else m.shape[1]
    d = xb - xa
    low, high = _paired_bounds(xa, xb, m, n, g, level)
    return Change(_out(d.mean(-1)), _out(np.sqrt(_cov(d, d, m))), _out(low), _out(high),
                  _out(_p_value(xa, xb, m, n, g)), n, g, level)


# --- pass@k from correct counts -------------------------------------------------------------------


def pass_at_k_values(correct, n: int | Sequence[int], k: int) -> np.ndarray:
    """Per-problem unbiased pass@k (loop.evaluation.metrics.pass_at_k) from each problem's correct count and samples.

    `correct`: one count per problem (last axis; leading batch axes allowed); `n`: samples per problem, one
    int for all or one per problem."""
    c = np.asarray(correct)
    if c.ndim == 0 or c.shape[-1] == 0:
        raise ValueError("pass@k: `correct` needs one count per problem and at least one problem")
    if not np.all(np.asarray(c, dtype=float) == np.round(np.asarray(c, dtype=float))):
        raise ValueError("pass@k: `correct` holds counts of correct samples: whole numbers")
    c = c.astype(int)
    num = c.shape[-1]
    ns = np.broadcast_to(np.asarray(n), (num,)) if np.ndim(n) == 0 else np.asarray(n)
    if ns.ndim != 1 or len(ns) != num:
        raise ValueError(f"pass@k: {len(ns) if ns.ndim == 1 else ns.shape} sample counts `n` for {num} problems "
                         f"(`correct`); give one n for all problems or one per problem, in the same order")
    if not np.all(ns == np.round(ns)) or np.any(ns < 1):
        raise ValueError(f"pass@k: samples per problem `n` must be whole numbers >= 1, got {ns.tolist()[:10]}")
    ns = ns.astype(int)
    if k < 1:
        raise ValueError(f"pass@k: k must be >= 1, got {k}")
    if np.any(ns < k):
        i = int(np.argmax(ns < k))
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem; problem {i} has n={ns[i]}")
    bad = (c < 0) | (c > ns)
    if np.any(bad):
        idx = np.argwhere(bad)[0]
        raise ValueError(f"pass@k: problem {idx[-1]} has {c[tuple(idx)]} correct of n={ns[idx[-1]]} samples; "
                         f"need 0 <= correct <= n")
    out = np.empty(c.shape)
    for n_i in np.unique(ns):  # one table of pass@k per sample count, from the estimator itself
        table = np.array([pass_at_k(int(n_i), j, k) for j in range(n_i + 1)])
        cols = ns == n_i
        out[..., cols] = table[c[..., cols]]
    return out


def pass_at_k_interval(correct, n: int | Sequence[int], k: int, level: float = 0.95,
                       clusters: Sequence[Hashable] | None = None) -> tuple[float, float, float]:
    """(mean, low, high) of pass@k over problems: the per-problem unbiased estimates, their mean and its
    interval (module doc). `correct`: each problem's number of correct samples; `n`: samples per problem."""
    e = estimate(pass_at_k_values(correct, n, k), clusters, level)
    return e.mean, e.low, e.high


def paired_difference(correct_a, correct_b, n: int | Sequence[int], k: int, level: float = 0.95,
                      clusters: Sequence[Hashable] | None = None) -> tuple[float, float, float, float]:
    """(delta, low, high, p_value) of pass@k(B) - pass@k(A) over the same problems in the same order, paired
    by problem (module doc). `n`: samples per problem, the same in both evaluations."""
    ca, cb = np.asarray(correct_a), np.asarray(correct_b)
    if ca.shape != cb.shape:
        raise ValueError(f"paired pass@k: correct_a has {ca.shape[-1] if ca.ndim else 0} problems and correct_b "
                         f"{cb.shape[-1] if cb.ndim else 0}; a paired comparison needs the same problems in the "
                         f"same order")
    ch = paired_change(pass_at_k_values(ca, n, k), pass_at_k_values(cb, n, k), clusters, level)
    return ch.delta, ch.low, ch.high, ch.p_value


# --- power ----------------------------------------------------------------------------------------


def _smallest_detectable(gap, top: float) -> float:
    """The smallest delta in (0, top] with gap(delta) >= 0 (gap: delta minus the margin it must clear); inf if none."""
    if gap(top) < 0:
        return math.inf
    if gap(1e-12) >= 0:
        return 0.0
    return float(optimize.brentq(gap, 1e-12, top, xtol=1e-10))

def detectable_change(num_problems: int, n: int, base_rate: float = 0.5, power: float = 0.8,
                      alpha: float = 0.05, change_sd: float = 0.0, clusters: int | None = None) -> float:
    """The smallest rise of pass@1 above `base_rate` that a paired comparison of two evaluations on the same
    `num_problems` problems with `n` samples each detects with probability `power` at two-sided level `alpha`:
    the delta with delta = (t_{1-alpha/2} + t_{power}) * sqrt(Var(d_i) / N), df = N - 1.

    Assumption (stated wherever the figure is printed): the per-problem difference d_i has variance
    Var(d_i) = [p0(1-p0) + p1(1-p1)] / n + change_sd^2, p1 = p0 + delta: the n samples of each round are
    independent, each problem's own rate is taken at the mean (every problem at base_rate: the largest
    sampling variance for that mean, so heterogeneous problems only make it smaller), and the problem
    difficulties carry over between rounds, so pairing cancels them (Miller 2024). change_sd is the spread
    of the true change across problems (0: every problem moves alike); a training round that helps some
    problems and not others adds it, so the default is a lower bound in that respect. base_rate 0.5 is the
    worst case. Returns inf when no rise up to 1 - base_rate is detectable.
    """
    if num_problems < 2 or n < 1:
        raise ValueError(f"detectable change: need at least 2 problems and 1 sample each, got {num_problems} x {n}")
    if not 0 <= base_rate < 1:
        raise ValueError(f"detectable change: base_rate must be in [0, 1), got {base_rate}")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"detectable change: power and alpha must be in (0, 1), got power={power}, alpha={alpha}")
    df = (clusters or num_problems) - 1
    q = float(_sp.t.ppf(1 - alpha / 2, df) + _sp.t.ppf(power, df))

    def gap(delta: float) -> float:
        p1 = base_rate + delta
        var = (base_rate * (1 - base_rate) + p1 * (1 - p1)) / n + change_sd ** 2
        return delta - q * math.sqrt(var / num_problems)

    return _smallest_detectable(gap, 1 - base_rate)


def detectable_change_note(num_problems: int, n: int, power: float = 0.8, alpha: float = 0.05,
                           clusters: int | None = None) -> str:
    """One line for users to size the evaluation before anything expensive runs. With `clusters` (fewer than the
    problems: variants of shared templates), the headline counts the clusters, as the intervals do: the detectable
    change if a cluster's problems behaved as one problem; the figure if every problem behaved on its own follows
    in brackets. Which is nearer depends on how much a round's change differs between clusters (the intervals
    measure it; nothing before the run does), so plan with the headline."""
    def at(units: int, **kw) -> dict[float, str]:
        out = {p: detectable_change(units, n, p, power, alpha, **kw) for p in (0.1, 0.5)}
        return {p: "none" if math.isinf(d) else f"+{d:.3f}" for p, d in out.items()}

    if clusters is None or clusters >= num_problems:
        d = at(num_problems)
        if set(d.values()) == {"none"}:
            return (f"evaluation set: {num_problems} problems x {n} samples: too small for any change of pass@1 to be "
                    f"detected with {power:.0%} power at {alpha:.0%}; every comparison between rounds will read as "
                    "within noise (use more problems or samples)")
        return (f"evaluation set: {num_problems} problems x {n} samples. Smallest change of pass@1 detectable with "
                f"{power:.0%} power at {alpha:.0%} (paired, every problem shifting alike): {d[0.5]} at pass@1 "
                f"0.5, {d[0.1]} at 0.1; smaller changes between rounds will read as within noise")
    if clusters < 2:
        return (f"evaluation set: {num_problems} problems in {clusters} cluster: the clustered intervals have no "
                "spread to learn from; use tasks from more clusters (e.g. more templates)")
    whole, apart = at(clusters), at(num_problems, clusters=clusters)
    return (f"evaluation set: {num_problems} problems in {clusters} clusters x {n} samples. Smallest change of pass@1 "
            f"detectable with {power:.0%} power at {alpha:.0%} (paired, clustered as the intervals are): "
            f"{whole[0.5]} at pass@1 0.5, {whole[0.1]} at 0.1 counting the {clusters} clusters "
            f"({apart[0.5]} / {apart[0.1]} if every problem counted on its own); smaller changes between "
            "rounds will read as within noise")


def detectable_change_from_rates(rows: Sequence[Mapping], power: float = 0.8, alpha: float = 0.05) -> float | None:
    """The smallest rise of pass@1 that a paired comparison with a later round detects with probability `power` at
    two-sided level `alpha`, sized with this round's per-problem rates as the pilot (rows of eval_per_prompt.jsonl:
    task_id, cluster, n, correct); the problems, the clusters and n as in the rows.

    `detectable_change` puts every problem at the mean rate, the worst case for that mean. Here problem i keeps its
    own rate p_i: Var(d_i) = [s_i^2 + s_i^2 + delta(1 - 2 p_i) - delta^2] / n (the second term at least 0), where
    s_i^2 = p_i(1 - p_i) n / (n - 1) is the unbiased variance of one sample's outcome; df = clusters - 1, as the
    intervals use. Problems that are always or never solved add no noise, so this figure is usually much smaller.
    It assumes the later round's samples are drawn independently of this round's (common seeds make the change
    smaller still: a sample that comes out the same adds no noise) and that every problem moves alike (a change
    that differs between problems makes it larger); the rates are estimates, so averaged over the round 0s that
    could have sized it the power is as stated (tests/test_stats.py). None when the rows have fewer than 2
    problems with n >= 2 or fewer than 2 clusters (no spread to learn from); inf when no rise up to 1 is
    detectable."""
    usable = [r for r in rows if r["n"] >= 2]
    if len(usable) < 2:
        return None
    p = np.array([r["correct"] / r["n"] for r in usable])
    n = np.array([r["n"] for r in usable], dtype=float)
    s2 = p * (1 - p) * n / (n - 1)
    clusters = len(set(problem_clusters(usable).values()))
    if clusters < 2:
        return None
    df = clusters - 1
    q = float(_sp.t.ppf(1 - alpha / 2, df) + _sp.t.ppf(power, df))

    def gap(delta: float) -> float:
        # (p + delta)(1 - p - delta) = p(1 - p) + delta(1 - 2p) - delta^2, with s2 for p(1 - p): unbiased as s2 is
        s2_after = np.maximum(s2 + delta * (1 - 2 * p) - delta ** 2, 0.0)
        return delta - q * math.sqrt(float(np.sum((s2 + s2_after) / n))) / len(usable)

    return _smallest_detectable(gap, 1.0)


def detectable_change_from_rates_note(delta: float, power: float = 0.8, alpha: float = 0.05) -> str:
    """The line that reports `detectable_change_from_rates` after a base evaluation."""
    return (f"sized with these per-problem rates, a later round's change of pass@1 is detectable with {power:.0%} "
            f"power at {alpha:.0%} from +{delta:.3f} (independent draws, every problem moving alike; common seeds "
            "narrow it, a change that differs between problems widens it)")


# --- a round's statistics from its per-prompt rows ------------------------------------------------


def accuracy_names(rows: Iterable[Mapping]) -> list[str]:
    """The accuracy metrics the rows carry: pass@k (each k), maj@k (each k), greedy_acc."""
    names: dict[str, None] = {}
    for r in rows:
        for key, v in r.items():
            if key.startswith(("pass@", "maj@")) and key.split("@", 1)[1].isdigit() and v is not None:
                names[key] = None
        if r.get("greedy_correct") is not None:
            names["greedy_acc"] = None
    return sorted(names, key=lambda s: (s == "greedy_acc", s.split("@")[0], int(s.split("@")[1]) if "@" in s else 0))


def _values(rows: Sequence[Mapping], name: str) -> dict[str, float]:
    field = "greedy_correct" if name == "greedy_acc" else name
    return {r["task_id"]: float(r[field]) for r in rows if r.get(field) is not None}


def problem_clusters(rows: Sequence[Mapping]) -> dict[str, str]:
    """task id -> cluster id, from the rows' 'cluster' field (loop.tasks.base.Task.cluster: the template of
    gsm-symbolic variants); a row without one is its own cluster."""
    return {r["task_id"]: r.get("cluster") or r["task_id"] for r in rows}


def round_statistics(rows: Sequence[Mapping], base: Sequence[Mapping] | None = None,
                     prev: Sequence[Mapping] | None = None, level: float = 0.95) -> dict[str, float]:
    """Uncertainty of a round's accuracies from its per-prompt rows (eval_per_prompt.jsonl).

    For every accuracy metric M (pass@k, maj@k, greedy_acc): 'eval/M_se', 'eval/M_low', 'eval/M_high' (the
    mean itself is 'eval/M' of the summary), and, against round 0 (`base`) and the previous round (`prev`),
    'vs_round0/M' (the paired change), 'vs_round0/M_low', '_high', '_p', and the same under 'vs_prev/'. Pairs
    are the problems both rounds have a value for; problems are clustered by gsm-symbolic template where the
    tasks are template variants ('eval/num_clusters' then says into how many). Without `base` (round 0, or
    `ratchet eval`), 'eval/pass@1_detectable': the change of pass@1 a later round needs to be detected, sized with
    these rows' per-problem rates (`detectable_change_from_rates`).
    """
    clusters = problem_clusters(rows)
    out: dict[str, float] = {}
    if len(set(clusters.values())) < len(clusters):
        out["eval/num_clusters"] = float(len(set(clusters.values())))
    if base is None and any(r.get("pass@1") is not None for r in rows):
        detectable = detectable_change_from_rates([r for r in rows if r.get("pass@1") is not None])
        if detectable is not None and math.isfinite(detectable):  # a base round sizes the comparisons to come
            out["eval/pass@1_detectable"] = detectable
    for name in accuracy_names(rows):
        vals = _values(rows, name)
        ids = list(vals)
        cl = [clusters[t] for t in ids]
        e = estimate([vals[t] for t in ids], cl, level)
        out.update({f"eval/{name}_se": e.se, f"eval/{name}_low": e.low, f"eval/{name}_high": e.high})
        for prefix, other in (("vs_round0", base), ("vs_prev", prev)):
            if other is None:
                continue
            before = _values(other, name)
            common = [t for t in ids if t in before]
            if not common:
                continue
            ch = paired_change([before[t] for t in common], [vals[t] for t in common],
                               [clusters[t] for t in common], level)
            out.update({f"{prefix}/{name}": ch.delta, f"{prefix}/{name}_low": ch.low,
                        f"{prefix}/{name}_high": ch.high, f"{prefix}/{name}_p": ch.p_value})
    return out


def round_statistics_from_dirs(round_dir: Path, base_dir: Path | None = None, prev_dir: Path | None = None,
                               level: float = 0.95) -> dict[str, float]:
    """`round_statistics` from the eval_per_prompt.jsonl of a round's directory, of round 0's and of the
    previous round's (a directory without one is left out); {} when the round has none."""
    def rows(d: Path | None) -> list[dict] | None:
        path = None if d is None else Path(d) / PER_PROMPT
        return list(read_jsonl(path)) if path is not None and path.exists() else None

    current = rows(round_dir)
    return {} if current is None else round_statistics(current, rows(base_dir), rows(prev_dir), level)


# --- the training samples of a round ---------------------------------------------------------------


def _cluster_shares(graded: Sequence, tasks: Mapping[str, object]) -> dict[str, list[float]]:
    """cluster id -> the per-sample 0/1 correctness of its samples."""
    out: dict[str, list[float]] = {}
    for g in graded:
        task = tasks[g.trajectory.task_id]
        out.setdefault(task.cluster or task.id, []).append(float(g.correct))
    return out


def training_statistics(graded: Sequence, tasks: Mapping[str, object], previous: Sequence | None = None,
                        previous_tasks: Mapping[str, object] | None = None,
                        level: float = 0.95) -> tuple[list[dict], dict[str, float]]:
    """What a round's graded training samples (loop.records.Graded, of `tasks` by id) say about the policy that drew
    them: per cluster (Task.cluster; the task itself without one) its samples, right ones and right share; and, under
    train_samples/, the right share with its clustered interval, the cut-off share, the mean model tokens and the
    right share among finished samples. With the previous round's samples (`previous`, of `previous_tasks`), the
    paired change of the per-cluster right share over the clusters both rounds drew ('vs_prev_correct_frac'): with
    fresh tasks every round these are new problems of the clusters trained on, so the change is near transfer, not
    memory of the answers."""
    if not graded:
        return [], {}
    shares = _cluster_shares(graded, tasks)
    rows = [{"cluster": c, "samples": len(v), "correct": int(sum(v)), "correct_frac": sum(v) / len(v)}
            for c, v in shares.items()]
    per_task: dict[str, list[float]] = {}
    for g in graded:
        per_task.setdefault(g.trajectory.task_id, []).append(float(g.correct))
    ids = list(per_task)
    e = estimate([sum(per_task[t]) / len(per_task[t]) for t in ids],
                 [getattr(tasks[t], "cluster", None) or t for t in ids], level)
    finished = [g for g in graded if not g.trajectory.cut_off]
    out = {"train_samples/correct_frac": sum(g.correct for g in graded) / len(graded),
           "train_samples/correct_frac_low": e.low, "train_samples/correct_frac_high": e.high,
           "train_samples/cutoff_frac": 1 - len(finished) / len(graded),
           "train_samples/model_tokens_mean": sum(g.trajectory.num_model_tokens for g in graded) / len(graded)}
    if finished:
        out["train_samples/finished_acc"] = sum(g.correct for g in finished) / len(finished)
    if previous and previous_tasks is not None:
        before = _cluster_shares(previous, previous_tasks)
        common = [c for c in shares if c in before]
        if len(common) >= 2:
            ch = paired_change([sum(before[c]) / len(before[c]) for c in common],
                               [sum(shares[c]) / len(shares[c]) for c in common], None, level)
            out.update({"train_samples/vs_prev_correct_frac": ch.delta, "train_samples/vs_prev_correct_frac_low": ch.low,
                        "train_samples/vs_prev_correct_frac_high": ch.high,
                        "train_samples/vs_prev_correct_frac_p": ch.p_value})
    return rows, out


# --- text -----------------------------------------------------------------------------------------


def format_estimate(mean: float | None, se: float | None = None) -> str:
    """'0.155 ± 0.035' (mean ± standard error); '0.155' without an SE; '-' without a mean."""
    if mean is None:
        return "-"
    return f"{mean:.3f}" if se is None else f"{mean:.3f} ± {se:.3f}"


def format_p(p: float | None) -> str:
    """A p-value as a reader takes it: '0.012', '3e-04', '<1e-4' (never '0.0000'); '-' without one."""
    if p is None or p != p:
        return "-"
    return "<1e-4" if p < 1e-4 else (f"{p:.2g}" if p < 0.01 else f"{p:.3f}")


def format_change(delta: float | None, low: float | None = None, high: float | None = None,
                  p: float | None = None) -> str:
    """'+0.060 [+0.010, +0.110]' (paired change and its interval), with ' within noise' when the interval
    holds 0; '-' without a change."""
    if delta is None:
        return "-"
    if low is None or high is None:
        return f"{delta:+.3f}"
    text = f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"
    if p is not None:
        text += f" p={format_p(p)}"
    return text + (" within noise" if low <= 0 <= high else "")
