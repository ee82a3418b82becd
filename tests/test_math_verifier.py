"""verifiers.math: answer extraction, sound equivalence, bounded comparisons in worker processes.

Sources of the cases (each case's id names it):
  mv/...    huggingface/Math-Verify tests (tests/data/math_verify_public_cases.json holds the cases of
            tests/test_all.py, test_boxed.py, test_numina_cases.py and test_yujianll.py at commit
            5d148cf; where our verdict differs from upstream's on purpose, the case carries a note)
  mv-new/.. huggingface/Math-Verify tests added later: tests/test_all.py::test_trailing_punctuation
            (commit cf14bc4) and tests/test_mixed_number_extraction.py (commit 05aa3a6)
  qwen/...  QwenLM/Qwen2.5-Math evaluation/grader.py (commit 29a82a8): TestMathEquality and the
            examples in _test_math_equal
  fp/...    false positives of the best graders, listed in the task
  own/...   ours
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import signal
import threading
import time
import typing
from pathlib import Path

import pytest

from loop.grading import VerifyConfig, grade_trajectories, model_written_text
from loop.records import Graded, GradeStatus, Segment, Trajectory
from loop.tasks.base import Task
from verifiers.math import (ComparisonError, ComparisonTimeout, Verdict, extract_answer, grade, grade_many,
                            is_equivalent)
from verifiers.math import grading as math_grading
from verifiers.math.equivalence import judge
from verifiers.math.extract import find_answer
from verifiers.math.magnitude import magnitudes_apart
from verifiers.math.normalize import strip_delimiters
from verifiers.math.pool import WorkerCrashed, WorkerPool, default_pool

PUBLIC_CASES = json.loads((Path(__file__).parent / "data" / "math_verify_public_cases.json").read_text())


def judged(pred: str, gold: str) -> bool:
    return is_equivalent(pred, gold, timeout_s=20)


# --- public test suites -------------------------------------------------------------------------

@pytest.mark.parametrize("case", PUBLIC_CASES, ids=[c["id"] for c in PUBLIC_CASES])
def test_math_verify_public_cases(case):
    if case["pred_kind"] == "answer":
        got = judged(strip_delimiters(case["pred"]), case["gold"])
    else:
        v = grade(case["pred"], case["gold"], timeout_s=20)
        assert v.status in ("correct", "incorrect", "no_answer"), v.reason
        got = v.correct
    assert got is case["expected"], case.get("note", case["source"])


@pytest.mark.parametrize("pred,gold,expected", [
    pytest.param(r"$\frac{1}{3}.$", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[0]"),
    pytest.param(r"The answer is $\frac{1}{3}.$", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[1]"),
    pytest.param(r"$$\frac{1}{3}.$$", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[2]"),
    pytest.param(r"\[\frac{1}{3}.\]", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[3]"),
    pytest.param(r"$\frac{1}{3},$", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[4]"),
    pytest.param(r"$\frac{1}{3} .$", r"\frac{1}{3}", True, id="mv-new/trailing_punctuation[5]"),
    pytest.param(r"$\sqrt{2}.$", r"\sqrt{2}", True, id="mv-new/trailing_punctuation[6]"),
    pytest.param(r"$(1,2).$", r"(1,2)", True, id="mv-new/trailing_punctuation[7]"),
    pytest.param(r"$5 \text{ cm}.$", "5", True, id="mv-new/trailing_punctuation[8]"),
    pytest.param(r"$42.$", "42", True, id="mv-new/trailing_punctuation[9]"),
    pytest.param(r"$2^{10}.$", "2", False, id="mv-new/trailing_punctuation[10]"),
    pytest.param(r"The answer is $1/3.$", "1", False, id="mv-new/trailing_punctuation[11]"),
    pytest.param(r"$1, 2, 3, ...$", "1, 2, 3", False, id="mv-new/trailing_punctuation[12]"),
    pytest.param("The answer is 4 4/9.", "40/9", True, id="mv-new/mixed_number_is_equivalent_to_improper_fraction"),
    pytest.param("The answer is 4 4/9.", "4", False,
                 id="mv-new/mixed_number_does_not_match_only_its_whole_number_prefix"),
    pytest.param("-4 4/9", "-40/9", True, id="mv-new/parse_negative_mixed_number"),
    pytest.param("11 5/6", "71/6", True, id="mv-new/parse_mixed_number_unsigned"),
    pytest.param("0 4/9", "4/9", True, id="mv-new/parse_mixed_number_with_zero_whole_part"),
    pytest.param("4 0/9", "4", True, id="mv-new/parse_mixed_number_with_zero_numerator"),
    pytest.param("11 + 4/9", "11 - 4/9", False, id="mv-new/explicit_addition_and_subtraction_remain_distinct"),
    pytest.param("4 4/9%", "40/900", True, id="mv-new/mixed_number_percentage_applies_to_complete_value"),
    pytest.param("28%", "7/25", True, id="mv-new/existing_expression_syntax[percentage]"),
    pytest.param("$5.00", "5", True, id="mv-new/existing_expression_syntax[currency-decimal]"),
])
def test_math_verify_newer_public_cases(pred, gold, expected):
    assert grade(pred, gold, timeout_s=20).correct is expected


@pytest.mark.parametrize("pred,gold,expected", [
    pytest.param("10", "10", True, id="qwen/test_math_equal[0]"),
    pytest.param("10%", "0.1", True, id="qwen/test_math_equal[1]"),
    pytest.param("[1, 2, 3]", "[1, 2, 3]", True, id="qwen/test_math_equal[2]"),
    pytest.param(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", True,
                 id="qwen/test_math_equal[3]"),
    pytest.param("x = y", "x = y", True, id="qwen/test_math_equal[4]"),
    pytest.param("10", "20", False, id="qwen/test_math_equal[5]"),
    pytest.param("x = y", "x = z", False, id="qwen/test_math_equal[6]"),
    pytest.param("10%", "0.2", False, id="qwen/test_is_numerical_equal[5]"),
    pytest.param("[1, 2, 3]", "[1, 2, 4]", False, id="qwen/test_compare_lists[1]"),
    pytest.param("(1, 2, 3)", "(1, 2, 3)", True, id="qwen/test_compare_lists[2]"),
    pytest.param(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1&2\\3&5\end{pmatrix}", False,
                 id="qwen/test_compare_matrices[1]"),
    pytest.param("x = 10", "10", True, id="qwen/test_compare_equations[1]"),
    pytest.param("10", "x = 10", True, id="qwen/test_compare_equations[2]"),
    pytest.param("0.0833333333333333", r"\frac{1}{12}", True, id="qwen/_test_math_equal[decimal-vs-fraction]"),
    pytest.param("(1,4.5)", r"(1,\frac{9}{2})", True, id="qwen/_test_math_equal[tuple-decimal]"),
    pytest.param(r"\frac{x}{7}+\frac{2}{7}", r"\frac{x+2}{7}", True, id="qwen/_test_math_equal[algebra]"),
    pytest.param(r"\sec^2(y)", r"\tan^2(y)+1", True, id="qwen/_test_math_equal[trig]"),
    pytest.param(r"-\frac{8x^2}{9(x^2-2)^{5/3}}+\frac{2}{3(x^2-2)^{2/3}}",
                 r"-\frac{2(x^2+6)}{9(x^2-2)\sqrt[3]{x^2-2}^2}", True, id="qwen/_test_math_equal[radical-rational]"),
    pytest.param("-34x-45y+20z-100=0", "34x+45y-20z+100=0", True, id="qwen/_test_math_equal[plane]"),
    # Qwen accepts through rounding; a gold written with 3 significant digits is read as exact here.
    pytest.param(r"\frac{100}{3}", "33.3", False, id="qwen/_test_math_equal[rounded-gold]"),
    pytest.param(r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{2\sqrt{33}+15}",
                 r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{15+2\sqrt{33}}", True, id="qwen/_test_math_equal[order]"),
    pytest.param("(+5)(b+2)", "(a+5)(b+2)", False, id="qwen/_test_math_equal[missing-symbol]"),
    pytest.param(r"\frac{1+\sqrt{5}}{2}", "2", False, id="qwen/_test_math_equal[golden-ratio]"),
    pytest.param(r"\frac{34}{16}+\frac{\sqrt{1358}}{16}", "4", False, id="qwen/_test_math_equal[near-4]"),
    pytest.param("1", r"1\sqrt{19}", False, id="qwen/_test_math_equal[sqrt19]"),
    # Qwen accepts a 5-digit rounding of 8/3; our convention (docs/verifiers.md) does not
    pytest.param("(0.6,2.6667]", r"(\frac{3}{5},\frac{8}{3}]", False, id="qwen/_test_math_equal[interval-decimals]"),
    pytest.param("x+1", "x+2n+1", False, id="qwen/_test_math_equal[last]"),
])
def test_qwen_grader_cases(pred, gold, expected):
    assert judged(pred, gold) is expected


# --- soundness ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,gold", [
    pytest.param(r"\frac{1}{2006!}", r"\frac{1}{2004!}", id="fp/tiny-factorials"),
    pytest.param("4e-7", "1e-7", id="fp/tiny-scientific"),
    pytest.param("2021", r"\pm 2021", id="fp/plus-minus"),
    pytest.param("[1,2]", "(1,2)", id="fp/open-vs-closed-interval"),
    pytest.param("x<5", "x>5", id="fp/flipped-inequality"),
    pytest.param("123456788", "123456789", id="fp/large-integers"),
    pytest.param("0.0000004", "0.0000001", id="own/tiny-decimals"),
    pytest.param(r"10^{-100}", "0", id="own/tiny-not-zero"),
    pytest.param(r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}", id="own/tiny-powers"),  # yujianll's commented case
    pytest.param("123456789.5", "123456789.4", id="own/large-decimals"),
    pytest.param("16386.24", "16386.20", id="own/cents"),
    pytest.param("0.46", "0.5", id="own/short-gold-decimal"),
    pytest.param("0.49999", "0.5", id="own/not-rounded-to-gold"),
    pytest.param("0.333", r"\frac{1}{3}", id="own/three-digits-too-few"),
    pytest.param("0.3333", r"\frac{1}{3}", id="own/rounded-repeating"),
    pytest.param("3.1416", r"\pi", id="own/rounded-pi"),
    pytest.param("1.414", r"\sqrt{2}", id="own/rounded-root"),
    pytest.param("2.718", "e", id="own/rounded-e"),
    pytest.param(r"33.33\%", r"\frac13", id="own/rounded-percent"),
    pytest.param("3.1415926535898", r"\pi", id="own/one-digit-short-of-a-double"),
    pytest.param("0.08333333333333", r"\frac{1}{12}", id="own/fourteen-digits"),
    pytest.param("3.14", r"\pi", id="own/pi-three-digits"),
    pytest.param("1.415", r"\sqrt{2}", id="own/misrounded-root"),
    pytest.param("5 or 6", "5", id="own/two-answers"),
    pytest.param(r"\boxed{5, 6, 7}", "5", id="own/answer-list"),
    pytest.param(r"\pm 5", "5", id="own/pm-answer"),
    pytest.param("5 squared", "5", id="own/value-word"),
    pytest.param("3 million", "3", id="own/scale-word"),
    pytest.param("one half", "1", id="own/fraction-word"),
    pytest.param("0.12%", "12%", id="own/percent-both-sides"),
    pytest.param("(1,2]", "(1,2)", id="own/half-open"),
    pytest.param("[1,2)", "(1,2]", id="own/other-half-open"),
    pytest.param("(2,1)", "(1,2)", id="own/tuple-order"),
    pytest.param(r"\{1,2\}", r"\{1,2,3\}", id="own/missing-element"),
    pytest.param(r"x \ge 5", "x > 5", id="own/strict-vs-non-strict"),
    pytest.param(r"x \ne 5", "x = 5", id="own/not-equal"),
    pytest.param("y = 5", "x = 5", id="own/other-variable"),
    pytest.param("2y+1", "2x+1", id="own/renamed-variable"),
    pytest.param("3-4i", "3+4i", id="own/conjugate"),
    pytest.param(r"\begin{pmatrix}2\\1\end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", id="own/vector-order"),
    pytest.param("1,2", "12", id="own/list-not-thousands"),
    pytest.param("1, 2, 3, \\ldots", "1, 2, 3", id="own/ellipsis"),
    pytest.param("1 + \\frac{1}{\\mathrm{e}}", "1 - \\frac{1}{\\mathrm{e}}", id="own/upright-e"),
    pytest.param("28", "0.28", id="own/no-percent-sign"),
    pytest.param("1:00", "12:00", id="own/times"),
])
def test_rejects_false_positives(pred, gold):
    assert judged(pred, gold) is False


@pytest.mark.parametrize("pred,gold", [
    # integers, decimals, fractions, mixed numbers
    ("42", "42"), ("042", "42"), ("42.0", "42"), ("-7", "-7"), ("0.5", r"\frac{1}{2}"), (r"\dfrac{6}{8}", "3/4"),
    ("6/8", r"\frac34"), ("2 1/2", "5/2"), (r"2\frac{1}{2}", "2.5"), (r"-\frac{3}{4}", r"\frac{-3}{4}"),
    # thousands separators, currency, units, degrees
    ("1,000", "1000"), ("12,000,023", "12000023"), (r"1{,}000", "1000"), (r"1,\!000", "1000"), ("1 000 000", "10^6"),
    (r"\$1,000.50", "1000.5"), ("25 dollars", "25"), ("5 apples", "5"), (r"15\text{ cm}^2", "15"), (r"90^\circ", "90"),
    ("90 degrees", "90"), ("18 dollars per week", "18"),
    # percentages
    ("28%", "28"), ("28", r"28\%"), ("28 percent", "0.28"), (r"12.5\%", r"\frac{1}{8}"),
    (r"33.33333333333333\%", r"\frac13"),
    # scientific notation
    ("1e-7", r"10^{-7}"), (r"6.02\times10^{23}", "6.02e23"), ("6.02 × 10^23", "602000000000000000000000"),
    ("1.0004e-7", "1.000e-7"), ("2.5E3", "2500"),
    # a decimal gold states its rounding; an exact gold is matched by a decimal only at full float precision
    ("16386.169", "16386.17"), ("3.14159", "3.1416"), ("0.3333333333333333", r"\frac{1}{3}"),
    ("0.6666666666666666", r"\frac{2}{3}"), ("3.141592653589793", r"\pi"), ("1.4142135623730951", r"\sqrt{2}"),
    ("6.283185307179586", r"2\pi"), ("2.718281828459045", "e"), ("3.14159265358979", r"\pi"),
    # x = 5 forms, equations, inequalities and their set forms
    ("x = 5", "5"), ("5", "k=5"), ("y = 2x + 1", "y = 1 + 2x"), ("x > 5", "5 < x"), ("x > 5", r"(5, \infty)"),
    (r"[5,\infty)", r"x \ge 5"), (r"-2 \le x \le 7", "[-2, 7]"), (r"x < 1", r"(-\infty, 1)"),
    # radicals, pi, e, complex numbers
    (r"\sqrt{8}", r"2\sqrt{2}"), (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt2}{2}"), (r"\sqrt[3]{8}", "2"),
    (r"\pi/2", r"\frac{\pi}{2}"), ("pi/2", r"\frac{\pi}{2}"), ("e^2", r"e \cdot e"), ("3+4i", "4i+3"),
    ("(1+i)^2", "2i"), ("sqrt(2)/2", r"\frac{\sqrt{2}}{2}"), ("2**10", "1024"),
    # intervals, tuples (ordered), solution sets (unordered), matrices
    ("(1, 2]", "(1,2]"), ("(1, 2, 3)", "(1,2,3)"), ("2, 1", "1, 2"), (r"\{3, 2, 1\}", r"\{1,2,3\}"),
    (r"x = 1 \text{ or } x = 2", "1, 2"), ("1 and 2", r"\{1, 2\}"),
    (r"\begin{bmatrix}1&0\\0&1\end{bmatrix}", r"\begin{pmatrix}1&0\\0&1\end{pmatrix}"),
    # unicode forms
    ("½", r"\frac{1}{2}"), ("2½", "5/2"), ("√2/2", r"\frac{\sqrt{2}}{2}"), ("3√2", r"3\sqrt{2}"), ("(5, ∞)", "x > 5"),
    ("90°", "90"), ("−3", "-3"), ("x² + 1", "x^2+1"), ("3π", r"3\pi"), ("x ≤ 5", r"(-\infty, 5]"), ("1⁄4", "0.25"),
    # number words
    ("five", "5"), ("Twenty-one apples", "21"), ("one hundred and five", "105"), ("negative three", "-3"),
    ("three million", "3000000"), ("two thousand three hundred", "2300"),
    # text answers, times
    (r"\text{Evelyn}", "Evelyn"), (r"\text{(C)}", "C"), ("9:30 p.m.", "9:30 PM"),
])
def test_accepts_what_a_mathematician_accepts(pred, gold):
    assert judged(pred, gold) is True


# --- extraction -----------------------------------------------------------------------------------

@pytest.mark.parametrize("completion,answer,rule", [
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72", "72", "gsm8k_hashes"),
    ("She pays 5*$5 = $25.\n#### $25", "$25", "gsm8k_hashes"),
    ("#### 540.", "540", "gsm8k_hashes"),
    ("So 1,000 in total.\n#### 1,000", "1,000", "gsm8k_hashes"),
    ("#### 18\n\nQuestion: what is 2+2?\nAnswer: 4\n#### 4", "18", "gsm8k_hashes"),  # few-shot continuation cut
    ("The answer is 42.\n\nQuestion: John has 3 apples. The answer is 7.", "42", "answer_phrase"),
    ("It sold 24 clips.<|im_end|><|im_start|>user\nWhat is 2+2? The answer is 4", "24", "last_number"),
    (r"Thus $x = \boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}", "boxed"),
    (r"so \boxed{\{1, \{2\}\}} at last", r"\{1, \{2\}\}", "boxed"),
    (r"The roots are \boxed{-2} and \boxed{1}.", "-2,1", "boxed"),
    (r"$\boxed{1}\boxed{2}$", "1,2", "boxed"),
    (r"first \boxed{3}. Much later, after a long detour through many other steps and checks, we get \boxed{5}",
     "5", "boxed"),
    (r"Hence \boxed 5.", "5", "boxed"),
    (r"\fbox{12}", "12", "boxed"),
    (r"I think the answer is 5, but checking again gives \boxed{6}.", "6", "boxed"),
    (r"Boxes: \boxed{200} then \boxed{255}. Final Answer: The final answer is $10,455$. I hope it is correct.",
     "10,455", "answer_phrase"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", r"\frac{1}{2}", "answer_phrase"),
    ("Answer: 17", "17", "answer_phrase"),
    ("**Final Answer:**\n42", "42", "answer_phrase"),
    ("Final Answer: The largest $n$ is 34.", "34", "answer_phrase"),
    ("The answer is: $x = 5$.", "x = 5", "answer_phrase"),
    ("She has 3 left, so she has **73**", "73", "bold"),
    ("So she keeps **$25** in total.", "$25", "bold"),
    ("<think>2+2=4, so maybe 5?</think>The answer is 4.", "4", "answer_phrase"),
    ("Let's compute.\n```python\nx = 3*4\nprint(f'\\\\boxed{{{x}}}')\n```\n```output\n12\n```\nDone.", "12",
     "tool_output"),
    ("```python\nprint(1/3)\n```\n```output\n0.3333333333333333\n```", "0.3333333333333333", "tool_output"),
    ("```python\nprint('The answer is', 7)\n```\n```output\nThe answer is 7\n```\nok", "7", "tool_output"),
    ("```python\nprint(2+2)\n```\n```output\n4\n```\nThe answer is \\boxed{4}.", "4", "boxed"),
    ("She has 3 apples and buys 5 more, so she has 8 apples.", "8", "last_number"),
    ("She pays $5 for each and $3 for the rest, total $8.", "8", "last_number"),
    ("Therefore $x \\geq 5$ is the solution.", r"x \geq 5", "last_math"),
    ("AZYUK2A is not a number, but 7 is", "7", "last_number"),
])
def test_extraction_rules(completion, answer, rule):
    found = find_answer(completion)
    assert (found.answer, found.rule) == (answer, rule)
    assert extract_answer(completion) == answer


@pytest.mark.parametrize("completion,why", [
    ("<think>Let me think about 12 and 13", "inside <think>"),
    ("<think>hmm</think>", "no answer marker"),
    ("There are no numbers here.", "no answer marker"),
    (r"so the answer is \boxed{12", "cut off inside \\boxed"),
])
def test_no_answer(completion, why):
    v = grade(completion, "12")
    assert v.status == "no_answer" and v.extracted is None and why in v.reason
    assert extract_answer(completion) is None


def test_last_number_fallback_is_optional():
    assert grade("so she has 8 apples", "8").correct
    v = grade("so she has 8 apples", "8", fallback_last_number=False)
    assert v.status == "no_answer" and "fallback is off" in v.reason
    assert extract_answer("so she has 8 apples", fallback_last_number=False) is None


def test_verdict_shape_and_reason():
    v = grade("Thus \\boxed{\\frac{2}{4}}.", "0.5")
    assert isinstance(v, Verdict) and v.status == "correct" and v.correct and v.extracted == r"\frac{2}{4}"
    assert "boxed" in v.reason
    w = grade("#### 43", "42")
    assert (w.status, w.correct, w.extracted) == ("incorrect", False, "43") and "gsm8k_hashes" in w.reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.status = "incorrect"
    assert set(typing.get_args(GradeStatus)) == {"correct", "incorrect", "no_answer", "timeout", "error"}
    assert typing.get_args(math_grading.GradeStatus) == typing.get_args(GradeStatus)  # verifiers/ has its own copy


def test_bad_input_and_bad_gold():
    with pytest.raises(TypeError, match="gold answer is None"):
        grade("#### 4", None)
    with pytest.raises(ValueError, match="empty"):
        grade("#### 4", "  ")
    with pytest.raises(TypeError, match="completion must be a str"):
        grade(None, "4")
    v = grade(r"\boxed{x+1}", r"\frac{")  # a gold the parser cannot read is an error, not "incorrect"
    assert v.status == "error" and "gold answer" in v.reason
    with pytest.raises(ComparisonError):
        is_equivalent("x+1", r"\frac{")


# --- held-out misses, fixed as classes ------------------------------------------------------------

@pytest.mark.parametrize("completion", [
    "Answer \\[ 9 \\]",
    "Answer:\n\\[\n9\n\\]",
    "Final Answer\n\\[\n9\n\\]",
    "So the answer\n\\[\n  9\n\\]\nsince 3^2 = 9 and 10 > 9, not 10",  # prose with numbers after the display
    "Answer \\(\n9\n\\)\nwhich checks out for all 12 cases",
    "Answer $$\n9\n$$ and 4 others were wrong",
    "Answer - \\[ 9 \\]",
    "Answer \\quad $$9$$",
])
def test_display_math_after_the_word_answer(completion):
    found = find_answer(completion)
    assert (found.answer, found.rule) == ("9", "answer_phrase")
    assert grade(completion, "9").correct
    assert not grade(completion, "10").correct


@pytest.mark.parametrize("pred,gold,expected", [
    (r"\varnothing", r"\emptyset", True), (r"\emptyset", r"\varnothing", True), (r"\{\}", r"\varnothing", True),
    (r"\{ \}", r"\emptyset", True), (r"\left\{ \right\}", r"\varnothing", True), ("∅", r"\varnothing", True),
    (r"\{\varnothing\}", r"\{\emptyset\}", True),
    # near misses: a set holding 0, or holding the empty set, is not empty; 0 is not a set
    (r"\varnothing", r"\{0\}", False), (r"\{0\}", r"\varnothing", False), (r"\varnothing", "0", False),
    (r"\{\varnothing\}", r"\varnothing", False), (r"\{\{\}\}", r"\emptyset", False), (r"\varnothing", r"\{x\}", False),
])
def test_empty_set_spellings(pred, gold, expected):
    assert judged(pred, gold) is expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("|3+4i|", "5", True), ("5", "|3+4i|", True), (r"\left|3-4i\right|", "5", True), (r"\lvert 3+4i \rvert", "5", True),
    ("|4i|", "4", True), ("|3+4i|^2", "25", True), (r"|2+2i|", r"2\sqrt{2}", True), (r"\frac{1}{2}i", "0.5i", True),
    # near misses
    ("|3+4i|", "7", False), ("|3+4i|", "-5", False), ("|3+4i|", "5i", False), ("|3+4i|", "3+4i", False),
    ("|3+5i|", "5", False), ("3i", "3", False), ("3+4i", "5", False),
])
def test_complex_modulus(pred, gold, expected):
    assert judged(pred, gold) is expected


@pytest.mark.parametrize("pred,gold", [
    (r"2^{2^{100}}", "5"), (r"10^{10^{10^{10}}}", "7"), ("100000!", "5"), (r"(10^{100})!", "120"),
    (r"-2^{2^{100}}", "5"), (r"2^{-2^{100}}", "5"), (r"2^{-2^{100}}", "0"), (r"\frac{1}{10^{10^{10}}}", "0"),
    ("5", r"2^{2^{100}}"), (r"x = 2^{2^{100}}", "5"), (r"\sqrt{2^{2^{100}}}", "3"), (r"2^{2^{100}} + 5", "5"),
    (r"0.5^{10^{400}}", "1"), ("1000!", "1"),
])
def test_huge_numbers_are_rejected_at_once_by_magnitude(pred, gold):
    start = time.monotonic()
    j = judge(pred, gold, timeout_s=5.0)
    assert (j.outcome, j.how.startswith("compared by magnitude")) == ("different", True), j
    assert time.monotonic() - start < 0.5
    assert grade(rf"\boxed{{{pred}}}", gold, timeout_s=5.0).status == "incorrect"


@pytest.mark.parametrize("pred,gold", [
    # equal in value: never rejected by magnitude (the worker decides, and says equal)
    (r"2^{2^{2}}", "16"), (r"2^{2^{2^{2}}}", "65536"), (r"2^{10}", "1024"), ("5!", "120"), (r"(2^{2})!", "24"),
    (r"\frac{2^{100}}{2^{98}}", "4"), (r"\sqrt[3]{8}", "2"), (r"10^{-3}", "0.001"),
])
def test_equal_values_pass_the_magnitude_check(pred, gold):
    assert magnitudes_apart(pred, gold) is None
    assert judged(pred, gold) is True


@pytest.mark.parametrize("pred,gold", [
    # equal or possibly close in value, or outside the grammar: left to the worker, not rejected
    (r"4^{2^{99}}", r"2^{2^{100}}"),  # the same number
    (r"2^{2^{100}} - 2^{2^{100}} + 5", "5"),  # cancels: no term dominates
    (r"\frac{2^{2^{100}}}{2^{2^{100}}}", "1"),
    (r"2^{2^{100}}", r"2^{2^{100}} + 1"),  # one apart out of 10^(3.8e29): no decade between them
    ("2^22", "5"), (r"2^{3}!", "5"), ("3!!", "5"), (r"2\pi", "5"), (r"10^{10^{10}} + x", "5"),
    ("20", "2"),  # a factor of 10 is not "more than a decade"
    (r"1^{10^{10^{10}}}", "1"), (r"(-2)^{10^{10^{10}}}", "1"),
])
def test_magnitude_check_never_rejects_what_it_cannot_prove(pred, gold):
    assert magnitudes_apart(pred, gold) is None


# --- grading the model's own words (tool-integrated trajectories) ---------------------------------

def _trajectory(*segments: tuple[str, str]) -> Trajectory:
    return Trajectory("t/1", 0, [1], [Segment(kind, text, [7] * max(1, len(text) // 4)) for kind, text in segments])


def _grade_trajectories(*trajectories: Trajectory, answer: str = "42") -> list[Graded]:
    task = Task("t/1", "What is 6*7?", "math", "t", answer=answer)
    return grade_trajectories({task.id: task}, list(trajectories), VerifyConfig(workers=1))


CODE = "Let me compute it.\n```python\nprint(6*7)\n```\n"
OUTPUT = "```output\n42\n```\n"


def test_an_answer_only_the_sandbox_printed_earns_nothing():
    silent = _trajectory(("model", CODE), ("observation", OUTPUT))
    vague = _trajectory(("model", CODE), ("observation", OUTPUT), ("model", "So that is the result above."))
    printed_statement = _trajectory(("model", "```python\nprint('The answer is 42. #### 42')\n```\n"),
                                    ("observation", "```output\nThe answer is 42. #### 42\n```\n"),
                                    ("model", "Done."))
    graded = _grade_trajectories(silent, vague, printed_statement)
    assert [g.status for g in graded] == ["no_answer", "no_answer", "no_answer"], [g.reason for g in graded]


def test_the_model_stating_the_observed_answer_is_graded():
    stated = _trajectory(("model", CODE), ("observation", OUTPUT), ("model", "The product is 42.\n#### 42"))
    wrong = _trajectory(("model", CODE), ("observation", OUTPUT), ("model", "#### 41"))
    # A ```output block the model types itself is its own text, graded as such.
    typed = _trajectory(("model", "6*7 is\n```output\n42\n```\n"))
    graded = _grade_trajectories(stated, wrong, typed)
    assert [g.status for g in graded] == ["correct", "incorrect", "correct"], [g.reason for g in graded]


def test_text_around_an_observation_does_not_fuse():
    # "#### 4" before the tool call and "2" after it are two statements, not "#### 42".
    split = _trajectory(("model", "#### 4```python\nprint(2)\n```\n"), ("observation", "```output\n2\n```\n"),
                        ("model", "2"))
    assert model_written_text(split) == "#### 4```python\nprint(2)\n```\n\n2"
    assert _grade_trajectories(split)[0].status == "incorrect"


def test_model_written_text_keeps_consecutive_model_turns_intact():
    t = _trajectory(("model", "The answer"), ("model", " is 42."), ("observation", OUTPUT))
    assert model_written_text(t) == "The answer is 42."
    assert _grade_trajectories(t)[0].status == "correct"


def test_a_cut_off_trajectory_is_graded_incorrect_whatever_it_states():
    # A sample the budget cut off did not finish: a right last number in a ramble is not an answer (verify.
    # cutoff_is_wrong, on by default, for training and evaluation alike); a crash is still reported as one.
    finished = _trajectory(("model", "6 * 7 = 42"))
    cut = Trajectory("t/1", 1, [1], [Segment("model", "6 * 7 = 42 and then", [7] * 5)], finish_reason="length")
    turns = Trajectory("t/1", 2, [1], [Segment("model", "#### 42", [7])], finish_reason="max_turns")
    graded = _grade_trajectories(finished, cut, turns)
    assert [g.status for g in graded] == ["correct", "incorrect", "incorrect"]
    assert graded[1].reason.startswith("cut off (length)") and graded[1].extracted == "42"
    task = Task("t/1", "What is 6*7?", "math", "t", answer="42")
    lenient = grade_trajectories({task.id: task}, [cut, turns], VerifyConfig(workers=1, cutoff_is_wrong=False))
    assert [g.status for g in lenient] == ["correct", "correct"]


# --- bounded, concurrent comparisons ---------------------------------------------------------------

GRADED = [("#### 72", "72", "correct"), (r"so \boxed{\frac{\sqrt2}{2}}", r"\frac{1}{\sqrt{2}}", "correct"),
          (r"\boxed{(1,2)}", "[1,2]", "incorrect"), ("The answer is x > 5", r"(5,\infty)", "correct"),
          (r"\boxed{\frac{1}{2006!}}", r"\frac{1}{2004!}", "incorrect"), ("I give up", "3", "no_answer")]


def test_grade_from_eight_threads():
    results: dict[tuple[int, int], str] = {}

    def work(t: int) -> None:
        for i, (completion, gold, _) in enumerate(GRADED):
            results[(t, i)] = grade(completion, gold, timeout_s=20).status

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert results == {(t, i): status for t in range(8) for i, (_, _, status) in enumerate(GRADED)}


def test_grade_from_asyncio():
    async def main() -> list[Verdict]:
        return await asyncio.gather(*(asyncio.to_thread(grade, c, g, timeout_s=20) for c, g, _ in GRADED))

    assert [v.status for v in asyncio.run(main())] == [s for _, _, s in GRADED]


def test_grade_many_keeps_order():
    items = [(c, g) for c, g, _ in GRADED] * 3
    assert [v.status for v in grade_many(items, workers=2, timeout_s=20)] == [s for _, _, s in GRADED] * 3


def test_grade_inside_a_daemonic_process_pool():
    # multiprocessing.Pool workers are daemonic and may not start multiprocessing children.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        verdicts = pool.starmap(grade, [(c, g) for c, g, _ in GRADED[:4]])
    assert [v.status for v in verdicts] == [s for _, _, s in GRADED[:4]]


def test_power_tower_times_out_within_bound():
    # "+ x": outside the magnitude check's grammar, so the tower reaches a worker, which runs out of time.
    assert grade(r"\boxed{\sqrt{4}}", "2").correct  # a warm worker: the bound below is the comparison's
    start = time.monotonic()
    v = grade(r"\boxed{10^{10^{10^{10}}} + x}", "5", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert v.status == "timeout" and not v.correct, v.reason
    assert elapsed < 4.0, elapsed
    with pytest.raises(ComparisonTimeout):
        is_equivalent("10^{10^{10^{10}}} + x", "7", timeout_s=1.0)
    assert grade(r"\boxed{\frac{6}{4}}", "1.5").correct  # the pool has replaced the killed worker


def test_pool_survives_a_killed_worker():
    pool = default_pool()
    assert grade(r"\boxed{\sqrt{9}}", "3").correct
    for pid in pool.worker_pids():
        os.kill(pid, signal.SIGKILL)  # idle workers die between calls
    time.sleep(0.2)
    assert grade(r"\boxed{2\sqrt{4}}", "4").correct


def test_pool_reports_a_worker_killed_mid_comparison():
    pool = WorkerPool(1)
    try:
        pool.warm_up()  # started and ready: the kill below lands in the comparison, not in a slow start-up
        outcome: list[BaseException | dict] = []
        caller = threading.Thread(target=lambda: outcome.append(_call(pool, "10^{10^{10^{10}}}", "5")))
        caller.start()
        deadline = time.monotonic() + 60
        while not pool.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # let it start the comparison
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        caller.join(30)
        assert isinstance(outcome[0], WorkerCrashed), outcome
        assert _call(pool, "1/2", "0.5") == {"kind": "ok", "equal": True,
                                             "how": "equal by math-verify (sound numeric step)"}
    finally:
        pool.close()


def _call(pool: WorkerPool, pred: str, gold: str):
    try:
        return pool.call({"pred": pred, "gold": gold}, 30)
    except WorkerCrashed as e:
        return e


def test_an_answer_long_enough_to_exhaust_the_parser_is_rejected_in_process():
    # It used to reach a worker and end in RecursionError (a timeout); a final answer is never that long.
    # The worker's mapping of RecursionError is tested below.
    v = grade(r"\boxed{" + "x+" * 3000 + "1}", "5", timeout_s=20)
    assert v.status == "incorrect" and "characters long" in v.reason, v.reason


def test_worker_maps_resource_exhaustion_and_crashes():
    from verifiers.math.worker import _handle

    class GoldUnparseable(ValueError):  # stands in for symbolic's (importing symbolic patches math-verify)
        pass

    def compare_raising(exc):
        def compare(pred, gold):
            raise exc
        return compare

    assert _handle({"pred": "1", "gold": "1"}, compare_raising(MemoryError()), GoldUnparseable)["kind"] == "resource"
    crash = _handle({"pred": "1", "gold": "1"}, compare_raising(KeyError("boom")), GoldUnparseable)
    assert crash["kind"] == "error" and "KeyError" in crash["message"]
    bad_gold = _handle({"pred": "1", "gold": "1"}, compare_raising(GoldUnparseable("fix it")), GoldUnparseable)
    assert bad_gold == {"kind": "error", "message": "fix it", "gold": True}
