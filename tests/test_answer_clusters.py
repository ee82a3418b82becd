"""maj@k and distinct answers cluster answers by the math verifier's equivalence, not by their text."""
from __future__ import annotations

import time

import pytest

from loop.evaluation import metrics
from loop.records import Graded, Segment, Trajectory
from loop.tasks.base import Task
from verifiers.math import cluster_answers


def test_equivalent_spellings_are_one_answer():
    c = cluster_answers(["1/2", "0.5", r"\frac{1}{2}", "3", "x = 3", "2/4", r"\sqrt{4}", "2"],
                        timeout_s=20, budget_s=60)
    assert c.labels == [0, 0, 0, 1, 1, 0, 2, 2] and c.count == 3 and c.undecided == 0, c.notes


def test_different_answers_stay_apart():
    # Near misses the verifier tells apart: distinct answers, whatever their text has in common.
    answers = ["0.5", "0.50001", "-0.5", "1/3", "0.333", "(1,2)", "[1,2]", r"\{0\}", r"\varnothing", "2i", "2"]
    c = cluster_answers(answers, timeout_s=20, budget_s=60)
    assert c.count == len(answers) and c.undecided == 0, (c.labels, c.notes)


TOWER = r"10^{10^{10^{10}}} + x"  # outside the magnitude check's grammar: a worker tries, and runs out of time


def _warm_worker() -> None:
    assert cluster_answers([r"\sqrt{4}", "x"], timeout_s=60, budget_s=60).undecided == 0


def test_a_comparison_that_times_out_counts_as_different_and_is_reported():
    _warm_worker()
    c = cluster_answers([TOWER, "5"], timeout_s=0.5, budget_s=30)
    assert c.labels == [0, 1] and c.undecided == 1 and "timeout" in c.notes[0], c.notes


def test_the_time_budget_bounds_the_whole_clustering():
    _warm_worker()
    start = time.monotonic()
    c = cluster_answers([TOWER, "5", "6", "7", "8", "9"], timeout_s=0.5, budget_s=1.0)
    elapsed = time.monotonic() - start
    assert c.count == 6 and c.undecided == 5, c.notes
    # Five worker comparisons at 0.5 s each would take 2.5 s: the 1 s budget leaves room for two at most, and the
    # rest are skipped (counted by what the notes say, not by the wall clock, which a loaded machine stretches).
    skipped = sum("budget was spent" in n for n in c.notes)
    assert skipped >= 3, c.notes
    assert elapsed < 1.0 + 0.5 + 5.0  # the budget, one comparison running over it, and slack for a loaded machine


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s"):
        cluster_answers(["1"], timeout_s=0, budget_s=1)
    with pytest.raises(TypeError, match="must be a str"):
        cluster_answers([None], timeout_s=1, budget_s=1)
    assert cluster_answers([], timeout_s=1, budget_s=1).labels == []


def _graded(sample: int, status: str, extracted: str | None) -> Graded:
    traj = Trajectory("t/a", sample, [1], [Segment("model", f"answer {extracted}", [1, 2])], cumulative_logprob=-1.0)
    return Graded(traj, status, extracted, "")


def test_votes_cluster_wrong_answers_by_equivalence():
    samples = [_graded(0, "correct", "2"), _graded(1, "incorrect", "1/2"), _graded(2, "incorrect", "0.5"),
               _graded(3, "incorrect", "3"), _graded(4, "no_answer", None)]
    assert metrics.vote_counts(samples) == (1, [2, 1], 1)
    # "1/2" and "0.5" together outvote the gold answer: the vote of all five is wrong. By text it would
    # be a three-way tie 2 / 1/2 / 0.5 / 3 (a quarter right).
    assert metrics.maj_at_k(*metrics.vote_counts(samples), [5]) == {5: 0.0}
    assert metrics.answer_votes(samples).distinct == 3


def test_correct_spellings_are_one_answer_and_a_timeout_abstains():
    samples = [_graded(0, "correct", "0.5"), _graded(1, "correct", r"\frac{1}{2}"), _graded(2, "timeout", "0.5"),
               _graded(3, "timeout", "1/2"), _graded(4, "incorrect", "x = 1/2 + 1")]
    votes = metrics.answer_votes(samples)
    # A timeout has no verdict: pass@k does not count it as correct, so it is no vote for the gold answer either,
    # even written as the correct text (that maj@1 could exceed pass@1 on the same samples).
    assert (votes.gold, sorted(votes.wrong), votes.abstain) == (2, [1], 2)
    assert metrics.maj_at_k(*metrics.vote_counts(samples), [1]) == {1: 2 / 5}


def test_prompt_row_counts_distinct_answers_by_equivalence():
    task = Task("t/a", "A?", "math", "t", answer="2")
    samples = [_graded(0, "correct", "2"), _graded(1, "correct", "2.0"), _graded(2, "correct", "x = 2"),
               _graded(3, "incorrect", "1/2"), _graded(4, "incorrect", "0.5"), _graded(5, "incorrect", "3")]
    row = metrics.prompt_row(task, samples, [1, 2, 4], None)
    assert row["distinct_answers"] == 3.0  # {2}, {1/2, 0.5}, {3}
    assert row["answer_pairs_undecided"] == 0.0
    code = Task("c/a", "f?", "code", "c", tests="def check(f): pass", entry_point="f")
    programs = [Graded(Trajectory("c/a", i, [1], [Segment("model", p, [1])], cumulative_logprob=-1.0),
                       "incorrect", p, "")
                for i, p in enumerate(["def f(): return 1", "def f(): return 1", "def f(): return 2"])]
    row = metrics.prompt_row(code, programs, [1, 2], None)
    assert row["distinct_answers"] == 2.0 and row["answer_pairs_undecided"] is None
