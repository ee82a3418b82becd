"""Red team, second round, math side: answers written to crash, stall or game the math grader.

New cases of each class (the held-out ones stay unseen). Every sample is graded (a Verdict, never an
exception), within a bound, and graded right: none of these wrong or hedged answers is "correct", and a
crash of the comparison on the prediction's side is "incorrect" with its reason, not an "error".
"""
from __future__ import annotations

import time

import pytest

from loop.grading import VerifyConfig, grade_trajectories
from loop.records import Segment, Trajectory
from loop.tasks.base import Task
from verifiers.math import grade, grade_many
from verifiers.math.pool import default_pool

BOUND_S = 5.0


@pytest.fixture(scope="module", autouse=True)
def warm_workers():
    default_pool().warm_up()  # the bound below is the grading's, not a worker's start-up


def graded(completion: str, gold: str):
    start = time.monotonic()
    v = grade(completion, gold)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND_S, (elapsed, v.reason[:200])
    return v


# --- comparisons that raise inside math-verify -------------------------------------------------------

@pytest.mark.parametrize("pred,gold", [
    ("-1 < y < 2 < z", "-1 < y < 2"),
    ("0 < t < 1", "0 < t < 1 < 2"),
    (r"0 \le t \le 1 \le s", r"0 \le t \le 1"),
    ("y > 0", r"y \neq 0"),
    (r"t \ge -2", r"t \ne -2"),
    (r"y < 0 \text{ or } y > 0", r"y \neq 0"),
])
def test_a_comparison_that_raises_on_the_prediction_is_incorrect_not_an_error(pred, gold):
    v = graded(rf"So \boxed{{{pred}}}.", gold)
    assert v.status == "incorrect", v.reason


def test_a_raising_comparison_does_not_stop_the_round():
    task = Task("t", "q", "math", "train", answer=r"y \neq 0")
    trajs = [Trajectory("t", s, [1], [Segment("model", text, [2])])
             for s, text in enumerate([r"\boxed{y > 0}", r"\boxed{y \neq 0}", r"\boxed{-3 < y < 0 < z}"])]
    statuses = [g.status for g in grade_trajectories({"t": task}, trajs, VerifyConfig(workers=1))]
    assert statuses == ["incorrect", "correct", "incorrect"]


# --- inputs built to stall extraction and normalisation -----------------------------------------------

STALLS = {
    "whitespace run, one letter": " " * 20000 + "q",
    "tabs and newlines, one digit": "\t\n " * 7000 + "7",
    "whitespace inside the box": r"\boxed{3" + " " * 20000 + "z}",
    "whitespace before a percent word": r"\boxed{3" + " " * 20000 + "percent of z}",
    "whitespace before a unit": r"The answer is 3" + " " * 20000 + r"\text{kg} q",
    "whitespace before times ten": r"\boxed{3" + "\t" * 20000 + r"\times 10^{2} w}",
    "unclosed display math": r"\[" * 20000,
    "unclosed inline math": r"\(" * 20000 + "3",
    "unclosed dollars": "$3 " * 10000,
    "fences": "```" * 15000,
    "nested braces": r"\boxed{" + "{" * 5000 + "3" + "}" * 5000 + "}",
    "nested parentheses": r"\boxed{" + "(" * 5000 + "3" + ")" * 5000 + "}",
    "nested fractions": r"\boxed{" + r"\frac{1}{" * 800 + "3" + "}" * 800 + "}",
    "nested square roots": r"\boxed{" + "sqrt(" * 3000 + "3" + ")" * 3000 + "}",
    "nested boxes": r"\boxed{" * 3000 + "4" + "}" * 3000,
    "answer said ten thousand times": "the answer " * 10000 + "is 3",
    "a page of number words": r"\boxed{" + "three " * 5000 + "}",
    "a page of units": r"\boxed{3" + " kg" * 5000 + "}",
}


@pytest.mark.parametrize("text", list(STALLS.values()), ids=list(STALLS))
def test_stalling_inputs_are_graded_within_the_bound(text):
    v = graded(text, "5")
    assert v.status in ("incorrect", "no_answer", "timeout"), v.reason[:200]


def test_a_stalled_sample_is_a_timeout_verdict_and_the_batch_goes_on():
    from verifiers.math import grading

    # A budget far below what extracting from 400k characters takes on any machine (40k took under 0.05 s in CI).
    old, grading.IN_PROCESS_BUDGET_S = grading.IN_PROCESS_BUDGET_S, 0.01
    try:
        items = [("#### 5", "5"), (r"\(" * 400000 + "3", "5"), ("#### 6", "5")]
        start = time.monotonic()
        verdicts = grade_many(items, workers=1)
        assert time.monotonic() - start < BOUND_S
    finally:
        grading.IN_PROCESS_BUDGET_S = old
    assert [v.status for v in verdicts] == ["correct", "timeout", "incorrect"]
    assert "deadline" in verdicts[1].reason


# --- roundings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", [r"9.8765\times 10^{8}", "9.8765e8", "9.877e+8", r"9.87654 \times 10^8", "987650000",
                                  "987654320.0", "987654321.000000001"])
def test_a_rounded_large_integer_never_matches_an_integer_gold(pred):
    for gold in ("987654321", "987650000" if "e" not in pred and "times" not in pred else "987649999",
                 "987651234", "987654320"):
        v = graded(rf"\boxed{{{pred}}}", gold)
        assert v.status == "incorrect" or pred.replace(".0", "") == gold, (pred, gold, v.reason)


def test_exact_scientific_notation_still_matches():
    assert graded(r"\boxed{9.87654321\times10^{8}}", "987654321").correct
    assert graded(r"\boxed{1.5e3}", "1500").correct


@pytest.mark.parametrize("pred,gold", [
    ("0.1429", r"\frac{1}{7}"), ("2.2361", r"\sqrt{5}"), ("1.6180", r"\frac{1+\sqrt{5}}{2}"),
    ("0.0909", r"\frac{1}{11}"), ("14.1421", r"10\sqrt{2}"), ("1.0472", r"\frac{\pi}{3}"),
    ("0.14285714", r"\frac{1}{7}"), (r"14.29\%", r"\frac{1}{7}"), ("42.000000000000001", "42"),
    ("41.99999999999999", "42"),
])
def test_a_rounded_decimal_does_not_match_an_exact_value(pred, gold):
    assert graded(rf"\boxed{{{pred}}}", gold).status == "incorrect"


@pytest.mark.parametrize("pred,gold", [
    ("0.14285714285714285", r"\frac{1}{7}"), ("2.23606797749979", r"\sqrt{5}"),
    ("1.0471975511965976", r"\frac{\pi}{3}"), ("0.09090909090909091", r"\frac{1}{11}"),
])
def test_a_decimal_at_full_float_precision_matches(pred, gold):
    assert graded(rf"\boxed{{{pred}}}", gold).correct


def test_a_decimal_gold_still_states_its_rounding():
    assert graded(r"\boxed{\frac{1}{7}}", "0.1429").correct
    assert graded(r"\boxed{0.14286}", "0.1429").correct


# --- hedges: text tails and disjunctions ---------------------------------------------------------------

@pytest.mark.parametrize("answer,gold", [
    (r"7 \text{, or 8 if x is negative}", "7"),
    (r"7 \text{ (8 when n is odd)}", "7"),
    (r"7\mathrm{~or~}8", "7"),
    (r"7 \text{ if } n > 0", "7"),
    (r"x = 7 \text{ unless } a = 0", "7"),
    (r"7 \textbf{ probably}", "7"),
    (r"7 \text{ or } 8 \text{ depending on } n", "8"),
    ("7, or 8 if n is odd", "7"),
    ("7, or 8 if n is odd", "8"),
    ("x = 7 or x = 8 when n is odd", "8"),
])
def test_an_answer_with_an_unparsed_remainder_is_not_a_clean_answer(answer, gold):
    assert graded(rf"\boxed{{{answer}}}", gold).status == "incorrect"


@pytest.mark.parametrize("answer,gold", [
    (r"7 \text{ meters}", "7"), (r"7\,\mathrm{kg}", "7"), (r"12 \text{ cm}^2", "12"), (r"\text{Mary}", "Mary"),
    (r"x = 7 \text{ or } x = 8", r"\{7, 8\}"),
])
def test_units_text_answers_and_parsed_lists_still_match(answer, gold):
    assert graded(rf"\boxed{{{answer}}}", gold).correct


def test_math_verifys_own_grader_is_left_alone():
    import math_verify.grader

    from verifiers.math import symbolic

    assert math_verify.grader.sympy_numeric_eq is not symbolic.sound_numeric_eq
    assert math_verify.grader.sympy_numeric_eq.__module__ == "math_verify.grader"
