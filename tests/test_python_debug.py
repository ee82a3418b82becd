"""python-debug: bugged HumanEval solutions to fix (loop/tasks/python_debug.py), and code answers read as a user reads
them (loop.grading.extract_program)."""
from __future__ import annotations

import ast
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from loop.grading import VerifyConfig, extract_program, grade_trajectories
from loop.records import Segment, Trajectory
from loop.tasks import TaskSetConfig, check_disjoint, count_clusters, humaneval, load_tasks
from loop.tasks import python_debug as debug
from verifiers.python_exec import run_tests


@pytest.fixture(scope="module")
def splits():
    return {s: load_tasks(TaskSetConfig(family="python-debug", split=s)) for s in ("train", "eval")}


def _first_block(prompt: str) -> str:
    return re.search(r"```python\n(.*?)```", prompt, re.S).group(1)


def test_splits_are_disjoint_by_problem_and_large_enough(splits):
    train, evaluation = splits["train"], splits["eval"]
    assert len(train) >= 50 and len(evaluation) >= 50
    number = lambda t: int(t.id.split("/")[1])  # noqa: E731
    assert all(number(t) % 2 == 1 for t in train) and all(number(t) % 2 == 0 for t in evaluation)
    check_disjoint(train, evaluation)
    assert {t.cluster for t in train}.isdisjoint({t.cluster for t in evaluation})
    assert count_clusters(evaluation) == len({number(t) for t in evaluation}) >= 40
    assert len({t.difficulty for t in evaluation}) >= 5  # bugs of several kinds
    assert max(Counter(t.cluster for t in evaluation).values()) <= debug.MAX_BUGS_PER_PROBLEM
    for t in train + evaluation:
        assert t.verifier == "code" and t.entry_point and f"def {t.entry_point}(" in _first_block(t.prompt)
        assert "Running the tests" in t.prompt and "```python" in t.prompt


def test_every_held_out_bug_fails_its_tests_and_the_canonical_solution_passes(splits):
    # All of them, not a sample: a "bug" the tests do not catch would be a free reward for copying the prompt.
    evaluation = splits["eval"]
    rows = {humaneval.number_of(r): r for r in humaneval.rows()}

    def check(task):
        bugged = run_tests(_first_block(task.prompt), task.tests, entry_point=task.entry_point).ok
        return task.id, bugged

    with ThreadPoolExecutor(2) as ex:
        passed = [tid for tid, ok in ex.map(check, evaluation) if ok]
    assert passed == [], passed[:5]
    for number in {int(t.id.split("/")[1]) for t in evaluation}:
        row = rows[number]
        canonical = ast.unparse(ast.parse(row["prompt"] + row["canonical_solution"]))
        assert run_tests(canonical, humaneval.grading_tests(row), entry_point=row["entry_point"]).ok, number


def test_bugs_are_single_site_changes_of_the_named_kinds():
    row = next(r for r in humaneval.rows() if r["task_id"] == "HumanEval/0")
    source = row["prompt"] + row["canonical_solution"]
    original = ast.unparse(ast.parse(source)).splitlines()
    bugs = list(debug.bugged_programs(source, row["entry_point"]))
    kinds = [k for k, _ in bugs]
    assert {"comparison", "arithmetic"} <= set(kinds) and len(set(p for _, p in bugs)) == len(bugs)
    assert kinds[:2] == sorted(kinds[:2], key=debug.KINDS.index)  # kinds alternate, in KINDS order
    for kind, program in bugs:
        changed = [(a, b) for a, b in zip(original, program.splitlines()) if a != b]
        if kind != "dropped_check":
            assert len(changed) == 1, (kind, changed)
        if kind == "comparison":
            a, b = changed[0]
            assert re.sub(r"[<>=!]=?", "", a) == re.sub(r"[<>=!]=?", "", b)


def _graded(text: str, task) -> str:
    t = Trajectory(task.id, 0, [1], [Segment("model", text, [1])])
    return grade_trajectories({task.id: task}, [t], VerifyConfig(workers=1))[0].status


def test_code_answers_are_read_as_a_user_reads_them(splits):
    task = splits["eval"][0]
    row = next(r for r in humaneval.rows() if humaneval.number_of(r) == int(task.id.split("/")[1]))
    fix = ast.unparse(ast.parse(row["prompt"] + row["canonical_solution"]))
    tests_block = f"```python\nassert {task.entry_point} is not None\nprint('tests')\n```"
    # The fix, then a block of tests: graded on the fix (before, the last block was taken, the tests).
    assert extract_program(f"Fixed:\n```python\n{fix}\n```\nCheck:\n{tests_block}", task.entry_point) == fix + "\n"
    assert _graded(f"Fixed:\n```python\n{fix}\n```\nCheck:\n{tests_block}<|im_end|>", task) == "correct"
    # An unfenced answer ending in the chat token, and a fence that was never closed.
    assert _graded(fix + "<|im_end|>", task) == "correct"
    assert _graded(f"```python\n{fix}\n<|im_end|>", task) == "correct"
    # Two attempts at the function: the last one is the answer.
    bugged = _first_block(task.prompt)
    assert _graded(f"```python\n{fix}\n```\nNo, rather:\n```python\n{bugged}```", task) == "incorrect"
    assert _graded(f"```python\n{bugged}```\nNo, rather:\n```python\n{fix}\n```", task) == "correct"
