"""pass@k, maj@k and diversity metrics against hand-computed values and brute-force enumeration."""
from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from fractions import Fraction

import pytest

from loop.evaluation import metrics
from loop.records import Graded, Segment, Trajectory
from loop.tasks.base import Task


def brute_pass(n: int, c: int, k: int) -> float:
    labels = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(labels, k))
    return sum(any(s) for s in subsets) / len(subsets)


def brute_maj(labels: list[str | None], k: int) -> Fraction:
    """Majority vote over every k-subset; 'G' is the correct answer, None abstains, ties split."""
    total, count = Fraction(0), 0
    for sub in itertools.combinations(labels, k):
        count += 1
        votes = Counter(v for v in sub if v is not None)
        if votes["G"] and votes["G"] == max(votes.values()):
            total += Fraction(1, sum(1 for v in votes.values() if v == votes["G"]))
    return total / count


def test_pass_at_k_hand_computed():
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(0.25, abs=1e-15)
    assert metrics.pass_at_k(4, 1, 2) == pytest.approx(0.5, abs=1e-15)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert metrics.pass_at_k(4, 1, 4) == 1.0
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-15)  # 1 - C(3,2)/C(5,2)


def test_pass_at_k_matches_enumeration():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 10)
        c = rng.randint(0, n)
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, c, k) == pytest.approx(brute_pass(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_stable_for_large_n():
    n, c, k = 1000, 3, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_edges():
    assert metrics.pass_at_k(8, 0, 4) == 0.0
    assert metrics.pass_at_k(8, 8, 1) == 1.0
    with pytest.raises(ValueError, match=r"k=8 samples per prompt, got n=4"):
        metrics.pass_at_k(4, 1, 8)
    with pytest.raises(ValueError, match="correct <= n"):
        metrics.pass_at_k(4, 5, 1)


def test_k_values():
    assert metrics.k_values(1) == [1]
    assert metrics.k_values(6) == [1, 2, 4, 6]
    assert metrics.k_values(8) == [1, 2, 4, 8]


def test_maj_at_k_hand_computed():
    # answers 4, 4, 5, (none); gold 4. maj@2 over the 6 pairs: {4,4} 1, {4,5} x2 ties 1/2, {4,-} x2 1, {5,-} 0.
    got = metrics.maj_at_k(gold=2, others=[1], abstain=1, ks=[1, 2, 3, 4])
    assert got[1] == pytest.approx(2 / 4)
    assert got[2] == pytest.approx(4 / 6)
    assert got[3] == pytest.approx(3 / 4)  # {4,4,5} {4,4,-} win; {4,5,-} x2 tie
    assert got[4] == 1.0
    assert metrics.maj_at_k(gold=0, others=[3], abstain=0, ks=[3]) == {3: 0.0}
    assert metrics.maj_at_k(gold=0, others=[], abstain=2, ks=[2]) == {2: 0.0}  # nobody votes: wrong
    assert metrics.maj_at_k(gold=2, others=[2], abstain=0, ks=[4]) == {4: 0.5}  # a 2-2 tie


def test_maj_at_k_matches_enumeration():
    rng = random.Random(1)
    for _ in range(40):
        n = rng.randint(1, 8)
        gold = rng.randint(0, n)
        abstain = rng.randint(0, n - gold)
        left, others = n - gold - abstain, []
        while left:
            others.append(rng.randint(1, left))
            left -= others[-1]
        labels = ["G"] * gold + [f"w{i}" for i, m in enumerate(others) for _ in range(m)] + [None] * abstain
        got = metrics.maj_at_k(gold, others, abstain, range(1, n + 1))
        for k in range(1, n + 1):
            assert got[k] == pytest.approx(float(brute_maj(labels, k)), abs=1e-12), (gold, others, abstain, k)


def test_distinct_n_and_jaccard():
    texts = ["a b a b", "a b c"]
    assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert metrics.distinct_n(texts, 4) == 1.0  # only "a b a b"
    assert metrics.distinct_n(["a"], 2) is None
    assert metrics.pairwise_jaccard(["a b c d", "a b c e"]) == pytest.approx(1 / 3)  # {abc,bcd} vs {abc,bce}
    assert metrics.pairwise_jaccard(["x y z", "x y z", "p q r"]) == pytest.approx(1 / 3)  # pairs: 1, 0, 0
    assert metrics.pairwise_jaccard(["one"]) is None


def test_normalize_answer():
    assert metrics.normalize_answer("1,000") == metrics.normalize_answer("1000") == "1000"
    assert metrics.normalize_answer(" $42.0. ") == "42"
    assert metrics.normalize_answer("X = 2") == "x = 2"


def _graded(task_id: str, sample: int, status: str, extracted: str | None, text: str = "w w",
            logprob: float = -2.0, finish: str = "stop", tools: int = 0) -> Graded:
    tokens = text.split()
    traj = Trajectory(task_id, sample, [1], [Segment("model", text, list(range(len(tokens)))),
                                             Segment("observation", " obs obs obs", [9, 9, 9])],
                      finish_reason=finish, cumulative_logprob=logprob, num_tool_calls=tools)
    return Graded(traj, status, extracted, "")


def test_evaluate_rows_and_summary():
    tasks = [Task("t/a", "A?", "math", "t", answer="0.5", difficulty="L1"),
             Task("t/b", "B?", "math", "t", answer="7", difficulty="L2")]
    graded = [
        # a: "0.5" and "1/2" are both correct and vote together; 2 correct of 4.
        _graded("t/a", 0, "correct", "0.5", "x y z", logprob=-3.0),
        _graded("t/a", 1, "correct", "1/2", "x y z", logprob=-6.0, tools=2),
        _graded("t/a", 2, "incorrect", "3", "p q", logprob=-1.0, finish="length"),
        _graded("t/a", 3, "no_answer", None, "p q", logprob=-1.0),
        # b: 0 of 4 correct.
        _graded("t/b", 0, "incorrect", "6", "a b c d"),
        _graded("t/b", 1, "incorrect", "6.0", "a b c d"),
        _graded("t/b", 2, "incorrect", "5", "a b c d"),
        _graded("t/b", 3, "timeout", "8", "a b c d"),
    ]
    greedy = [_graded("t/a", 0, "correct", "0.5"), _graded("t/b", 0, "incorrect", "6")]
    rows, summary = metrics.summarise(tasks, graded, greedy)
    a, b = rows
    assert (a["n"], a["correct"], b["correct"]) == (4, 2, 0)
    assert a["pass@1"] == pytest.approx(0.5) and a["pass@2"] == pytest.approx(1 - 1 / 6) and a["pass@4"] == 1.0
    assert a["maj@1"] == pytest.approx(0.5)
    assert a["maj@4"] == 1.0  # gold 2 votes vs "3" 1 vote
    assert b["maj@4"] == 0.0
    assert a["distinct_answers"] == 2.0  # "0.5" = "1/2" (both correct: one answer), "3"; no-answer has none
    assert b["distinct_answers"] == 2.0  # 6 = 6.0, 5; the timeout "8" has no verdict
    assert a["nll_per_token"] == pytest.approx((1.0 + 2.0 + 0.5 + 0.5) / 4)  # 3/3, 6/3, 1/2, 1/2
    assert a["response_tokens"] == pytest.approx((3 + 3 + 2 + 2) / 4)  # observation tokens excluded
    assert a["tool_calls"] == pytest.approx(0.5)
    assert a["cutoff_frac"] == 0.25 and a["no_answer_frac"] == 0.25 and b["timeout_frac"] == 0.25
    assert (a["finished"], a["finished_correct"]) == (3, 2) and a["tool_use_frac"] == 0.25
    assert b["maj@1"] == b["pass@1"] == 0.0
    assert b["distinct_1"] == pytest.approx(4 / 16) and b["pairwise_jaccard"] == 1.0
    assert summary["num_prompts"] == 2.0 and summary["samples_per_prompt"] == 4.0
    assert summary["pass@1"] == pytest.approx(0.25)
    assert summary["greedy_acc"] == 0.5
    assert summary["finished_acc"] == pytest.approx(2 / 7)  # pooled over the 7 samples not cut off
    assert summary["acc_with_tool"] == 1.0 and summary["acc_without_tool"] == pytest.approx(1 / 7)
    assert summary["difficulty/L1/pass@1"] == pytest.approx(0.5)
    assert summary["difficulty/L2/num_prompts"] == 1.0
    assert not any(k.startswith("family/") for k in summary)  # one family: no breakdown


def test_breakdown_by_function():
    rows = [{"task_id": "x/1", "n": 1, "pass@1": 1.0}, {"task_id": "x/2", "n": 1, "pass@1": 0.0},
            {"task_id": "y/1", "n": 1, "pass@1": 0.0}]
    out = metrics.breakdown(rows, lambda r: r["task_id"].split("/")[0])
    assert out == {"group/x/num_prompts": 2.0, "group/x/pass@1": 0.5,
                   "group/y/num_prompts": 1.0, "group/y/pass@1": 0.0}


def test_evaluate_rejects_inconsistent_input():
    tasks = [Task("t/a", "A?", "math", "t", answer="1")]
    with pytest.raises(ValueError, match="'t/zz', which is not among"):
        metrics.summarise(tasks, [_graded("t/zz", 0, "correct", "1")])
    with pytest.raises(ValueError, match="have no graded samples.*t/a"):
        metrics.summarise(tasks, [])
    with pytest.raises(ValueError, match="no greedy sample"):
        metrics.summarise(tasks, [_graded("t/a", 0, "correct", "1")], greedy=[])
