"""loop/evaluation/stats.py: coverage of the intervals by simulation, the clustered SE, the p-value, power, validation.

Each coverage check draws R synthetic evaluations: N problems with true success rates from a Beta
distribution (the population of problems), n samples per problem, and the 95% interval of each evaluation
is checked against the population value (for pass@k the mean of 1 - (1 - p)^k, which the per-problem
unbiased estimator targets). With R = 4000 the coverage's own standard error is 0.0034, so the 93-97% band is
about +-6 of them: a real miss of nominal by 2 points fails, noise does not.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, special

from loop.evaluation import stats
from loop.evaluation.metrics import pass_at_k
from loop.evaluation.stats import paired_difference, pass_at_k_interval

R = 4000
LOW, HIGH = 0.93, 0.97
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(40)
_GH_W = _GH_W / _GH_W.sum()


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _expit(x):
    return 1 / (1 + np.exp(-x))


def _true_pass(a: float, b: float, k: int) -> float:
    """Population pass@k for p ~ Beta(a, b): 1 - E[(1 - p)^k] = 1 - B(a, b + k) / B(a, b)."""
    return 1 - math.exp(special.betaln(a, b + k) - special.betaln(a, b))


def _true_delta(a: float, b: float, shift: float, noise: float, k: int) -> float:
    """Population change of pass@k when logit p moves by shift + noise * N(0, 1) per problem."""
    def f(p):
        after = np.sum(_GH_W * (1 - (1 - _expit(_logit(p) + shift + noise * _GH_X)) ** k))
        dens = math.exp((a - 1) * math.log(p) + (b - 1) * math.log1p(-p) - special.betaln(a, b))
        return (after - (1 - (1 - p) ** k)) * dens
    return integrate.quad(f, 0, 1, limit=200, points=[1e-6, 1e-3, 0.5, 1 - 1e-3])[0]


def _rates(rng, a, b, shape):
    return np.clip(rng.beta(a, b, shape), 1e-12, 1 - 1e-12)


# (Beta a, b) of the problems' rates, problems N, samples n, k. Means 0.05 (most problems never solved),
# 0.1 (very uneven), 0.5 and 0.9; greedy-like 0/1 scores (n = 1); pass@1 and pass@k > 1.
MARGINAL = {
    "low-0.05 pass@1 n4": (0.5, 9.5, 50, 4, 1),
    "low-0.05 pass@4 n4": (0.5, 9.5, 50, 4, 4),
    "low-0.05 greedy-like n1": (0.5, 9.5, 50, 1, 1),
    "uneven-0.1 pass@1 n4": (0.2, 1.8, 50, 4, 1),
    "uneven-0.1 pass@2 n8": (0.2, 1.8, 50, 8, 2),
    "mid-0.5 pass@1 n4": (1.0, 1.0, 50, 4, 1),
    "mid-0.5 pass@4 n4": (1.0, 1.0, 50, 4, 4),
    "high-0.9 pass@1 n4": (4.5, 0.5, 50, 4, 1),
    "low-0.05 pass@1 n4 N100": (0.5, 9.5, 100, 4, 1),
}


@pytest.mark.parametrize("name", list(MARGINAL))
def test_pass_at_k_interval_covers_the_population_value(name):
    a, b, num, n, k = MARGINAL[name]
    rng = np.random.default_rng(list(MARGINAL).index(name))
    correct = rng.binomial(n, _rates(rng, a, b, (R, num)))
    e = stats.estimate(stats.pass_at_k_values(correct, n, k))
    true = _true_pass(a, b, k)
    coverage = float(np.mean((e.low <= true) & (true <= e.high)))
    print(f"{name}: true {true:.3f}, coverage {coverage:.3f}")
    assert LOW <= coverage <= HIGH, (name, true, coverage)
    # The batched call is the public one, evaluation by evaluation.
    assert pass_at_k_interval(correct[0], n, k) == pytest.approx((e.mean[0], e.low[0], e.high[0]), abs=1e-12)


# (Beta a, b) of round A's rates; round B's logit rate = A's + shift + noise * N(0, 1); N, n, k.
PAIRED = {
    "low-0.05 null pass@1 n4": (0.5, 9.5, 0.0, 0.5, 50, 4, 1),
    "low-0.05 up pass@1 n4": (0.5, 9.5, 0.5, 0.5, 50, 4, 1),
    "low-0.05 up pass@4 n4": (0.5, 9.5, 0.5, 0.5, 50, 4, 4),
    "low-0.05 up greedy-like n1": (0.5, 9.5, 0.5, 0.5, 50, 1, 1),
    "uneven-0.1 up pass@2 n8": (0.2, 1.8, 1.0, 1.0, 50, 8, 2),
    "mid-0.5 up pass@1 n4": (1.0, 1.0, 0.5, 0.5, 50, 4, 1),
    "mid-0.5 null pass@4 n4": (1.0, 1.0, 0.0, 0.5, 50, 4, 4),
    "high-0.9 up pass@1 n4": (4.5, 0.5, 1.0, 1.0, 50, 4, 1),
    "high-0.9 null greedy-like n1": (4.5, 0.5, 0.0, 0.5, 50, 1, 1),
}


def _paired_draws(rng, a, b, shift, noise, num, n):
    pa = _rates(rng, a, b, (R, num))
    pb = _expit(_logit(pa) + shift + noise * rng.standard_normal(pa.shape))
    return rng.binomial(n, pa), rng.binomial(n, pb)


@pytest.mark.parametrize("name", list(PAIRED))
def test_paired_difference_covers_the_population_change(name):
    a, b, shift, noise, num, n, k = PAIRED[name]
    rng = np.random.default_rng(100 + list(PAIRED).index(name))
    ca, cb = _paired_draws(rng, a, b, shift, noise, num, n)
    ch = stats.paired_change(stats.pass_at_k_values(ca, n, k), stats.pass_at_k_values(cb, n, k))
    true = _true_delta(a, b, shift, noise, k)
    coverage = float(np.mean((ch.low <= true) & (true <= ch.high)))
    print(f"{name}: true change {true:+.4f}, coverage {coverage:.3f}")
    assert LOW <= coverage <= HIGH, (name, true, coverage)
    # p < 0.05 exactly when the 95% interval excludes 0.
    excludes = (ch.low > 0) | (ch.high < 0)
    assert np.array_equal(ch.p_value < 0.05, excludes)
    assert paired_difference(ca[0], cb[0], n, k) == pytest.approx(
        (ch.delta[0], ch.low[0], ch.high[0], ch.p_value[0]), abs=1e-9)


def test_paired_difference_at_the_ceiling_is_not_falsely_certain():
    # pass@4 with 4 samples at rates around 0.9: most problems solved in both rounds, so usually no problem
    # differs. A paired t-interval is then [0, 0] and covers a true change of ~0.002 about 30% of the time;
    # the interval here falls back on the MOVER-Wilson width instead (conservative: nothing to learn from).
    rng = np.random.default_rng(7)
    ca, cb = _paired_draws(rng, 4.5, 0.5, 0.5, 0.5, 50, 4)
    ch = stats.paired_change(stats.pass_at_k_values(ca, 4, 4), stats.pass_at_k_values(cb, 4, 4))
    true = _true_delta(4.5, 0.5, 0.5, 0.5, 4)
    assert np.mean((ch.low <= true) & (true <= ch.high)) >= 0.95
    assert np.all(ch.high - ch.low > 0.02)


def test_null_rejection_rate_is_about_alpha():
    # Both rounds from the same rates (no change at all): the two-sided test rejects about 5% of the time.
    rng = np.random.default_rng(11)
    p = _rates(rng, 1.0, 3.0, (R, 60))
    ca, cb = rng.binomial(4, p), rng.binomial(4, p)
    ch = stats.paired_change(stats.pass_at_k_values(ca, 4, 1), stats.pass_at_k_values(cb, 4, 1))
    rate = float(np.mean(ch.p_value < 0.05))
    print(f"null rejection rate {rate:.3f}")
    assert 0.035 <= rate <= 0.065
    assert np.all((ch.p_value >= 0) & (ch.p_value <= 1))


# --- clusters -------------------------------------------------------------------------------------


def test_clustered_se_by_hand_and_singletons_equal_the_plain_se():
    x = [1.0, 1.0, 0.0, 0.0]
    # mean 0.5; cluster sums of deviations +1, -1; SE^2 = G/(G-1) * (1 + 1) / N^2 = 2 * 2 / 16.
    assert stats.estimate(x, ["a", "a", "b", "b"]).se == pytest.approx(0.5)
    plain = stats.estimate(x)
    assert plain.se == pytest.approx(np.std(x, ddof=1) / 2)
    assert stats.estimate(x, ["a", "b", "c", "d"]).se == pytest.approx(plain.se)
    assert stats.estimate(x, ["a", "a", "b", "b"]).clusters == 2
    ch = stats.paired_change([0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 1], ["a", "a", "b", "b", "c", "c"])
    # d = 1 1 0 0 0 1, mean 1/2; cluster sums +1, -1, 0: SE^2 = 3/2 * 2 / 36.
    assert ch.delta == pytest.approx(0.5) and ch.se == pytest.approx(math.sqrt(1.5 * 2 / 36))


def test_clustered_interval_covers_template_correlated_problems():
    # 20 templates x 5 variants: a template's variants share most of their difficulty. Treated as 100
    # independent problems the interval is far too narrow; clustered by template it covers.
    rng = np.random.default_rng(21)
    g, per, n, mu, sd_template, sd_variant = 20, 5, 4, -1.5, 1.5, 0.4
    clusters = np.repeat(np.arange(g), per)
    eta = mu + sd_template * rng.standard_normal((R, g))[:, clusters] + sd_variant * rng.standard_normal((R, g * per))
    correct = rng.binomial(n, _expit(eta))
    sd = math.hypot(sd_template, sd_variant)
    for k in (1, 4):
        true = float(np.sum(_GH_W * (1 - (1 - _expit(mu + sd * _GH_X)) ** k)))
        vals = stats.pass_at_k_values(correct, n, k)
        clustered = stats.estimate(vals, clusters)
        plain = stats.estimate(vals)
        cov_cl = float(np.mean((clustered.low <= true) & (true <= clustered.high)))
        cov_plain = float(np.mean((plain.low <= true) & (true <= plain.high)))
        print(f"pass@{k}: true {true:.3f}, clustered coverage {cov_cl:.3f}, unclustered {cov_plain:.3f}")
        assert LOW <= cov_cl <= HIGH, (k, cov_cl)
        assert cov_plain < 0.88, (k, cov_plain)
    # Paired, clustered: a template-level change.
    eta_b = eta + 0.3 + 0.5 * rng.standard_normal((R, g))[:, clusters]
    correct_b = rng.binomial(n, _expit(eta_b))
    ch = stats.paired_change(stats.pass_at_k_values(correct, n, 1), stats.pass_at_k_values(correct_b, n, 1), clusters)
    big = rng.standard_normal(400_000)
    tmpl, var, chg = big[:100_000], big[100_000:200_000], big[200_000:300_000]
    base = mu + sd_template * tmpl + sd_variant * var
    true = float(np.mean(_expit(base + 0.3 + 0.5 * chg) - _expit(base)))
    cov = float(np.mean((ch.low <= true) & (true <= ch.high)))
    print(f"paired clustered: true change {true:+.3f}, coverage {cov:.3f}")
    assert LOW <= cov <= HIGH


# --- power ----------------------------------------------------------------------------------------


def test_detectable_change_has_the_stated_power():
    # Under the documented assumption (every problem at the base rate, every problem moving alike), a
    # change of the detectable size is detected about 80% of the time.
    rng = np.random.default_rng(31)
    for num, n, p0 in ((50, 4, 0.3), (100, 4, 0.1), (40, 8, 0.5)):
        delta = stats.detectable_change(num, n, base_rate=p0)
        ca, cb = rng.binomial(n, p0, (R, num)), rng.binomial(n, p0 + delta, (R, num))
        ch = stats.paired_change(stats.pass_at_k_values(ca, n, 1), stats.pass_at_k_values(cb, n, 1))
        power = float(np.mean((ch.p_value < 0.05) & (ch.delta > 0)))
        print(f"{num} x {n} at {p0}: detectable +{delta:.3f}, simulated power {power:.3f}")
        assert 0.75 <= power <= 0.85, (num, n, p0, delta, power)
    assert stats.detectable_change(50, 4, 0.5) > stats.detectable_change(50, 4, 0.1)
    assert stats.detectable_change(200, 4) < stats.detectable_change(50, 4)
    assert stats.detectable_change(50, 16) < stats.detectable_change(50, 4)
    assert stats.detectable_change(50, 4, change_sd=0.1) > stats.detectable_change(50, 4)
    assert stats.detectable_change(3, 1, 0.9) == math.inf
    note = stats.detectable_change_note(50, 4)
    assert "50 problems x 4 samples" in note and f"+{stats.detectable_change(50, 4):.3f}" in note
    # A set too small to detect anything says so instead of printing +inf.
    assert "too small for any change" in stats.detectable_change_note(2, 1) and "inf" not in stats.detectable_change_note(2, 1)
    assert "none at pass@1 0.5, +" in stats.detectable_change_note(4, 2)  # nothing at 0.5, something at 0.1


def test_the_detectable_change_counts_the_clusters_the_intervals_use():
    # 100 problems in 50 templates: the headline counts the 50 templates (as if a template's variants were one
    # problem), the bracket the 100 problems with the intervals' 49 degrees of freedom (every problem on its own).
    note = stats.detectable_change_note(100, 4, clusters=50)
    whole, apart = stats.detectable_change(50, 4), stats.detectable_change(100, 4, clusters=50)
    assert "100 problems in 50 clusters x 4 samples" in note
    assert note.index(f"+{whole:.3f} at pass@1 0.5") < note.index(f"(+{apart:.3f}")
    assert whole > apart > stats.detectable_change(100, 4)  # fewer units, fewer degrees of freedom
    assert stats.detectable_change_note(100, 4, clusters=100) == stats.detectable_change_note(100, 4)


def test_the_detectable_change_sized_with_a_base_rounds_rates_has_its_power():
    # Problems of different difficulty (many never or always solved, as real evaluations are): a round 0 drawn from
    # them sizes the change from its observed rates; a change of that size, every problem moving alike and fresh
    # draws in each round, is detected about 80% of the time, averaged over the round 0s that could have sized it
    # (one round 0's rates are estimates: its figure is a little low or high). The worst case, every problem at
    # the mean rate, asks for a larger change.
    rng = np.random.default_rng(7)
    for num, n, per_cluster in ((150, 2, 3), (100, 4, 1)):
        p = np.clip(rng.beta(0.4, 1.2, num), 0, 0.75)  # room above every problem for the rise
        cluster = [f"c{i // per_cluster}" for i in range(num)]
        hits, deltas = [], []
        for _ in range(30):
            pilot = rng.binomial(n, p)
            rows = [{"task_id": f"t{i}", "cluster": cluster[i], "n": n, "correct": int(c)} for i, c in enumerate(pilot)]
            delta = stats.detectable_change_from_rates(rows)
            deltas.append(delta)
            ca, cb = rng.binomial(n, p, (80, num)), rng.binomial(n, p + delta, (80, num))
            a, b = stats.pass_at_k_values(ca, n, 1), stats.pass_at_k_values(cb, n, 1)
            for i in range(len(a)):  # the clustered change, as the flow computes it
                ch = stats.paired_change(a[i], b[i], cluster)
                hits.append(ch.p_value < 0.05 and ch.delta > 0)
        power = float(np.mean(hits))
        print(f"{num} x {n} in {num // per_cluster} clusters: detectable +{np.mean(deltas):.3f} "
              f"(+{min(deltas):.3f} to +{max(deltas):.3f}), simulated power {power:.3f}")
        assert 0.75 <= power <= 0.85, (num, n, power)
        assert max(deltas) < stats.detectable_change(num // per_cluster, n, float(p.mean())), (deltas, p.mean())
    assert stats.detectable_change_from_rates([{"task_id": "a", "n": 1, "correct": 1}] * 3) is None  # n = 1: no spread
    assert stats.detectable_change_from_rates(rows[:1]) is None
    base = stats.round_statistics([{**r, "pass@1": r["correct"] / r["n"]} for r in rows])
    assert base["eval/pass@1_detectable"] == pytest.approx(stats.detectable_change_from_rates(rows))
    later = stats.round_statistics([{**r, "pass@1": r["correct"] / r["n"]} for r in rows],
                                   base=[{**r, "pass@1": r["correct"] / r["n"]} for r in rows])
    assert "eval/pass@1_detectable" not in later  # only a base round sizes the comparisons to come

# --- API and validation ---------------------------------------------------------------------------


def test_api_values_and_edges():
    correct = [0, 1, 2, 4, 3]
    mean, low, high = pass_at_k_interval(correct, 4, 1)
    assert mean == pytest.approx(np.mean([pass_at_k(4, c, 1) for c in correct]))
    assert 0 <= low < mean < high <= 1
    mean2, _, _ = pass_at_k_interval(correct, 4, 2)
    assert mean2 == pytest.approx(np.mean([pass_at_k(4, c, 2) for c in correct]))
    # n per problem.
    m, _, _ = pass_at_k_interval([1, 3], [2, 6], 2)
    assert m == pytest.approx((pass_at_k(2, 1, 2) + pass_at_k(6, 3, 2)) / 2)
    # Nothing solved: the interval still has width (a plain Wilson interval over the problems).
    m, low, high = pass_at_k_interval([0] * 50, 4, 1)
    assert (m, low) == (0.0, 0.0) and high == pytest.approx(1.96 ** 2 / (50 + 1.96 ** 2), rel=0.1)
    m, low, high = pass_at_k_interval([4] * 50, 4, 1)
    assert (m, high) == (1.0, 1.0) and low < 1
    delta, low, high, p = paired_difference([0] * 30, [0] * 30, 4, 1)
    assert delta == 0 and low < 0 < high and p == 1.0
    delta, low, high, p = paired_difference([0] * 40, [2] * 40, 4, 1)
    assert delta == 0.5 and 0 < low <= 0.5 <= high and p < 1e-6
    # Levels: a wider interval at 99%.
    lo95, hi95 = pass_at_k_interval(correct, 4, 1)[1:]
    lo99, hi99 = pass_at_k_interval(correct, 4, 1, level=0.99)[1:]
    assert lo99 < lo95 and hi99 > hi95
    # Any per-problem score: greedy 0/1, maj@k values.
    e = stats.estimate([1, 0, 0, 1, 0.5])
    assert e.mean == pytest.approx(0.5) and e.problems == 5
    ch = stats.paired_change([0, 0, 1, 0], [1, 1, 1, 0])
    assert ch.delta == 0.5 and ch.problems == 4
    assert stats.format_estimate(0.155, 0.0351) == "0.155 ± 0.035"
    assert stats.format_change(0.06, 0.01, 0.11) == "+0.060 [+0.010, +0.110]"
    assert stats.format_change(0.02, -0.01, 0.05).endswith("within noise")


def test_input_validation():
    with pytest.raises(ValueError, match="same problems in the same order"):
        paired_difference([1, 2], [1, 2, 3], 4, 1)
    with pytest.raises(ValueError, match="problem 1 has 5 correct of n=4"):
        pass_at_k_interval([1, 5], 4, 1)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        pass_at_k_interval([-1, 2], 4, 1)
    with pytest.raises(ValueError, match=r"pass@8 needs at least k=8 samples per problem; problem 0 has n=4"):
        pass_at_k_interval([1, 2], 4, 8)
    with pytest.raises(ValueError, match="k must be >= 1"):
        pass_at_k_interval([1, 2], 4, 0)
    with pytest.raises(ValueError, match="3 sample counts `n` for 2 problems"):
        pass_at_k_interval([1, 2], [4, 4, 4], 1)
    with pytest.raises(ValueError, match="whole numbers"):
        pass_at_k_interval([1.5, 2], 4, 1)
    with pytest.raises(ValueError, match="at least one problem"):
        pass_at_k_interval([], 4, 1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        stats.estimate([0.5, 1.5])
    with pytest.raises(ValueError, match="3 cluster ids for 2 problems"):
        stats.estimate([0.5, 1.0], clusters=["a", "b", "c"])
    with pytest.raises(ValueError, match="level must be in"):
        pass_at_k_interval([1, 2], 4, 1, level=95)
    with pytest.raises(ValueError, match="at least 2 problems"):
        stats.detectable_change(1, 4)


# --- a round's statistics from per-prompt rows ----------------------------------------------------


def _rows(correct: list[int], n: int = 4, greedy: list[int] | None = None, family: str = "arithmetic",
          ids: list[str] | None = None) -> list[dict]:
    ids = ids or [f"t/{i}" for i in range(len(correct))]
    # gsm-symbolic rows carry their template as the cluster (loop.tasks.base.Task.cluster).
    cluster = (lambda t: t.rsplit("/", 1)[0]) if family == "gsm-symbolic" else (lambda t: t)
    return [{"task_id": t, "cluster": cluster(t), "family": family, "n": n, "correct": c,
             **{f"pass@{k}": pass_at_k(n, c, k) for k in (1, 2, 4)},
             "maj@1": pass_at_k(n, c, 1), "greedy_correct": None if greedy is None else float(greedy[i])}
            for i, (t, c) in enumerate(zip(ids, correct))]


def test_round_statistics_from_per_prompt_rows():
    rng = np.random.default_rng(41)
    c0 = rng.binomial(4, 0.15, 50).tolist()
    c1 = np.minimum(np.array(c0) + rng.binomial(1, 0.4, 50), 4).tolist()
    c2 = np.minimum(np.array(c1) + rng.binomial(1, 0.3, 50), 4).tolist()
    g0, g2 = rng.binomial(1, 0.2, 50).tolist(), rng.binomial(1, 0.5, 50).tolist()
    r0, r1, r2 = _rows(c0, greedy=g0), _rows(c1, greedy=g0), _rows(c2, greedy=g2)
    # Round 2 lists its problems in another order: pairs go by task id.
    out = stats.round_statistics(list(reversed(r2)), base=r0, prev=r1)
    assert stats.accuracy_names(r2) == ["maj@1", "pass@1", "pass@2", "pass@4", "greedy_acc"]
    e = stats.estimate(stats.pass_at_k_values(c2, 4, 1))
    got = (out["eval/pass@1_se"], out["eval/pass@1_low"], out["eval/pass@1_high"])
    assert got == pytest.approx((e.se, e.low, e.high))
    delta, low, high, p = paired_difference(c0, c2, 4, 4)
    assert (out["vs_round0/pass@4"], out["vs_round0/pass@4_low"], out["vs_round0/pass@4_high"],
            out["vs_round0/pass@4_p"]) == pytest.approx((delta, low, high, p))
    delta, low, high, p = paired_difference(c1, c2, 4, 1)
    assert (out["vs_prev/pass@1"], out["vs_prev/pass@1_low"], out["vs_prev/pass@1_high"],
            out["vs_prev/pass@1_p"]) == pytest.approx((delta, low, high, p))
    ch = stats.paired_change(g0, g2)
    assert (out["vs_round0/greedy_acc"], out["vs_round0/greedy_acc_p"]) == pytest.approx((ch.delta, ch.p_value))
    assert out["vs_round0/pass@1"] > 0 and "eval/num_clusters" not in out
    assert "eval/greedy_acc_se" in out and "eval/maj@1_high" in out
    # Round 0 has no change to report.
    assert not any(k.startswith("vs_") for k in stats.round_statistics(r0))


def test_round_statistics_cluster_gsm_symbolic_variants_by_template():
    ids = [f"gsm-symbolic/{t:04d}/{v}" for t in range(50, 60) for v in ("orig", "v000", "v001")]
    c0 = [0, 0, 0, 4, 4, 3, 0, 1, 0, 2, 2, 2, 0, 0, 0, 4, 3, 4, 1, 0, 0, 0, 0, 0, 3, 3, 3, 0, 0, 1]
    c1 = [min(c + 1, 4) if i % 3 == 0 else c for i, c in enumerate(c0)]
    out = stats.round_statistics(_rows(c1, ids=ids, family="gsm-symbolic"),
                                 base=_rows(c0, ids=ids, family="gsm-symbolic"))
    assert out["eval/num_clusters"] == 10
    templates = [i.rsplit("/", 1)[0] for i in ids]
    e = stats.estimate(stats.pass_at_k_values(c1, 4, 1), templates)
    assert out["eval/pass@1_se"] == pytest.approx(e.se) and e.se != pytest.approx(stats.estimate(
        stats.pass_at_k_values(c1, 4, 1)).se)
    assert out["vs_round0/pass@1"] == pytest.approx(paired_difference(c0, c1, 4, 1, clusters=templates)[0])
    assert out["vs_round0/pass@1_p"] == pytest.approx(paired_difference(c0, c1, 4, 1, clusters=templates)[3])


def test_p_values_read_as_a_reader_takes_them():
    from loop.evaluation.stats import format_p

    assert [format_p(p) for p in (0.0, 3e-9, 9.9e-5, 1e-4, 0.0034, 0.0123, 0.5, None)] == \
        ["<1e-4", "<1e-4", "<1e-4", "0.0001", "0.0034", "0.012", "0.500", "-"]
