"""Tasks from a user's JSONL file: one object a line.

Math: {"id": ..., "prompt": "...", "answer": "42"}
Code: {"id": ..., "prompt": "...", "tests": "def check(candidate): ...", "entry_point": "f"}
Optional on both: "difficulty" (a label for per-difficulty breakdowns).

The file is taken whole as the split the config names: use one file for training and another for
evaluation (`check_disjoint` in the flow refuses a shared prompt). Every problem in the file is
reported at once, each with its file, line and field, before any task is used.
"""
from __future__ import annotations

import json
from pathlib import Path

from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt
from loop.tasks.splits import list_problems

FAMILY = "jsonl"
FIELDS = ("id", "prompt", "answer", "tests", "entry_point", "difficulty")


class TaskFileError(ValueError):
    """A malformed task file; the message lists each problem as `file:line: field: what is wrong`."""


def _parse_line(raw: str, where: str, instruction: str | None, stem: str) -> tuple[Task | None, list[str]]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return None, [f"{where}: invalid JSON ({e.msg} at column {e.colno})"]
    if not isinstance(obj, dict):
        return None, [f"{where}: expected a JSON object, got {type(obj).__name__}"]
    errors = [f"{where}: unknown field {k!r} (allowed: {', '.join(FIELDS)})" for k in obj if k not in FIELDS]
    for key in ("id", "prompt"):
        if key not in obj:
            errors.append(f"{where}: field {key!r} is missing")
    if "id" in obj and (isinstance(obj["id"], bool) or not isinstance(obj["id"], (str, int)) or str(obj["id"]) == ""):
        errors.append(f"{where}: field 'id' must be a non-empty string or an integer")
    for key in ("prompt", "tests", "entry_point", "difficulty"):
        if key in obj and (not isinstance(obj[key], str) or not obj[key].strip()):
            errors.append(f"{where}: field {key!r} must be a non-empty string")
    if "answer" in obj and (isinstance(obj["answer"], bool) or not isinstance(obj["answer"], (str, int, float))
                            or str(obj["answer"]).strip() == ""):
        errors.append(f"{where}: field 'answer' must be a non-empty string or a number")
    has_answer, has_tests = "answer" in obj, "tests" in obj
    if has_answer == has_tests:
        errors.append(f"{where}: field 'answer'/'tests': give exactly one ('answer' for a math task, 'tests' for "
                      f"a code task), not {'both' if has_answer else 'neither'}")
    if "entry_point" in obj and not has_tests:
        errors.append(f"{where}: field 'entry_point' is only for code tasks (with 'tests')")
    if errors:
        return None, errors
    verifier = "math" if has_answer else "code"
    return Task(id=f"{FAMILY}/{stem}/{obj['id']}", prompt=render_prompt(obj["prompt"], FAMILY, verifier, instruction),
                verifier=verifier, family=FAMILY, answer=str(obj["answer"]).strip() if has_answer else None,
                tests=obj.get("tests"), entry_point=obj.get("entry_point"), difficulty=obj.get("difficulty")), []


def load(path: Path, instruction: str | None) -> list[Task]:
    """All tasks of `path`, in file order; TaskFileError lists every malformed line."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"task file not found: {path} (tasks.path in the config)")
    tasks: list[Task] = []
    errors: list[str] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            task, line_errors = _parse_line(raw, where, instruction, path.stem)
            errors += line_errors
            if task is None:
                continue
            if task.id in first_line:
                errors.append(f"{where}: field 'id': duplicate id {task.id.removeprefix(f'{FAMILY}/{path.stem}/')!r} "
                              f"(first on line {first_line[task.id]})")
                continue
            first_line[task.id] = lineno
            tasks.append(task)
    if errors:
        raise TaskFileError(list_problems(errors, f"task file {path}"))
    if not tasks:
        raise TaskFileError(f"{path} holds no tasks (one JSON object a line: id, prompt, answer or tests)")
    return tasks
