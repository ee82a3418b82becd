"""CHAMP: 270 hard competition problems (number theory, polynomials, sequences, inequalities, combinatorics).

From the `champ-dataset==1.0.0` wheel (`champ_dataset/dataset_files/v0.json`, key "problems": one entry
per problem with `_text` (the statement, math markers removed), `_answer` and `category`). About a
third of the answers are plain numbers; the rest are expressions or short sentences ("It is not
possible"), which only a symbolic or lenient verifier can match.

Split: CHAMP is a held-out evaluation set only: `eval` is all 270 problems, and `train` is refused
(the config validation says so before any work).
"""
from __future__ import annotations

import json

from loop.models.wheels import fetch_wheel, read_member
from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt

FAMILY = "champ"
PACKAGE, VERSION = "champ-dataset", "1.0.0"
MEMBER = "champ_dataset/dataset_files/v0.json"
SIZE = 270


def load(instruction: str | None) -> list[Task]:
    wheel = fetch_wheel(PACKAGE, VERSION)
    problems = json.loads(read_member(wheel, MEMBER))["problems"]
    if len(problems) != SIZE:
        raise RuntimeError(f"{wheel}:{MEMBER} holds {len(problems)} problems, expected {SIZE}; "
                           f"the loader is written for {PACKAGE}=={VERSION}")
    return [Task(id=f"{FAMILY}/{key}", prompt=render_prompt(p["_text"], FAMILY, "math", instruction),
                 verifier="math", family=FAMILY, answer=p["_answer"].strip(), difficulty=p["category"])
            for key, p in problems.items()]
