"""Seeded multi-step arithmetic word problems with exact integer answers (the fast default family).

Level 1 is one addition or subtraction with numbers up to 10 ("Tom has 7 apples and buys 5 more. How
many apples does Tom have now?"); each level adds a step and raises the number range, and from level 2
on the steps include multiplication ("buys 3 bags with 4 apples in each") and exact division ("puts
them into 4 equal piles and keeps one pile"). Intermediate counts stay positive integers.

Splits: a problem belongs to `eval` when the SHA-256 of its text falls in bucket 0 of 10, else to
`train`, so no problem text can ever be in both, whatever the seeds and sizes. Each split also draws
from its own seed stream, so the two lists are independent samples.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt
from loop.tasks.splits import stable_bucket, stable_digest

FAMILY = "arithmetic"
EVAL_BUCKETS = 10
"""One in EVAL_BUCKETS problem texts is an evaluation problem."""
DEFAULT_SIZE = {"train": 1000, "eval": 200}
"""Problems generated when the config sets no limit."""


@dataclass(frozen=True)
class Level:
    steps: int
    max_number: int
    ops: tuple[str, ...]


LEVELS: dict[int, Level] = {
    1: Level(1, 10, ("add", "sub")),
    2: Level(2, 20, ("add", "sub", "groups")),
    3: Level(3, 50, ("add", "sub", "groups", "share")),
    4: Level(4, 100, ("add", "sub", "groups", "share")),
    5: Level(5, 200, ("add", "sub", "groups", "share")),
}

PEOPLE = [("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lily", "she"),
          ("Omar", "he"), ("Grace", "she"), ("Leo", "he"), ("Zoe", "she"), ("Ravi", "he"), ("Emma", "she"),
          ("Jack", "he"), ("Mia", "she"), ("Noah", "he"), ("Sofia", "she")]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards",
         "balloons", "coins", "crayons", "beads", "oranges", "toy cars"]

# An operation turns the current count into a verb phrase and the new count, or None when it does not
# apply (no divisor to share by, nothing left to give away).
Op = Callable[[random.Random, int, Level, str, str], tuple[str, int] | None]


def _add(rng: random.Random, x: int, lv: Level, friend: str, item: str) -> tuple[str, int]:
    b = rng.randint(1, lv.max_number)
    phrase = rng.choice([f"buys {b} more", f"finds {b} more", f"gets {b} more from {friend}"])
    return phrase, x + b


def _sub(rng: random.Random, x: int, lv: Level, friend: str, item: str) -> tuple[str, int] | None:
    if x < 2:
        return None
    b = rng.randint(1, min(x - 1, lv.max_number))
    phrase = rng.choice([f"gives {b} to {friend}", f"loses {b}", f"sells {b}"])
    return phrase, x - b


def _groups(rng: random.Random, x: int, lv: Level, friend: str, item: str) -> tuple[str, int]:
    k = rng.randint(2, 5)
    b = rng.randint(2, max(2, lv.max_number // 5))
    return f"buys {k} bags with {b} {item} in each", x + k * b


def _share(rng: random.Random, x: int, lv: Level, friend: str, item: str) -> tuple[str, int] | None:
    divisors = [k for k in range(2, 7) if x % k == 0]
    if not divisors:
        return None
    k = rng.choice(divisors)
    return f"puts them into {k} equal piles and keeps one pile", x // k


_OPS: dict[str, Op] = {"add": _add, "sub": _sub, "groups": _groups, "share": _share}


def make_problem(rng: random.Random, level: int) -> tuple[str, int]:
    """One problem of `level`: its text and its exact answer."""
    lv = LEVELS[level]
    name, pronoun = rng.choice(PEOPLE)
    friend = rng.choice([p for p, _ in PEOPLE if p != name])
    item = rng.choice(ITEMS)
    x = rng.randint(2, lv.max_number)
    start = x
    phrases = []
    for _ in range(lv.steps):
        made = None
        while made is None:  # "add" always applies, so this ends
            made = _OPS[rng.choice(lv.ops)](rng, x, lv, friend, item)
        phrase, x = made
        phrases.append(phrase)
    sentences = [f"{name} has {start} {item} and {phrases[0]}."] + [f"Then {pronoun} {p}." for p in phrases[1:]]
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), x


def split_of(problem: str) -> str:
    return "eval" if stable_bucket(problem, EVAL_BUCKETS) == 0 else "train"


def load(split: str, count: int, levels: list[int], seed: int, instruction: str | None, block: int = 1) -> list[Task]:
    """`count` distinct problems of `split`, spread evenly over `levels` (listed level by level). `block` b > 1: the
    b-th `count` problems of the same seeded stream, none of which is among blocks 1..b-1 (fresh problems for each
    round of a loop)."""
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ValueError(f"arithmetic difficulty {unknown} does not exist; levels are {sorted(LEVELS)}")
    base, extra = divmod(count, len(levels))
    tasks: list[Task] = []
    for i, level in enumerate(levels):
        want = base + (i < extra)
        rng = random.Random(f"{FAMILY}/{split}/{seed}/L{level}")
        seen: set[str] = set()
        attempts = 0
        while len(seen) < want * block:
            attempts += 1
            if attempts > 100 * want * block + 1000:
                raise ValueError(f"arithmetic level {level} has too few distinct {split} problems for {want * block}"
                                 f"{f' ({block} rounds of {want})' if block > 1 else ''}; lower `limit` or add levels")
            problem, answer = make_problem(rng, level)
            if problem in seen or split_of(problem) != split:
                continue
            seen.add(problem)
            if len(seen) <= want * (block - 1):
                continue  # an earlier block's problem
            tasks.append(Task(id=f"{FAMILY}/L{level}/{stable_digest(problem)[:12]}",
                              prompt=render_prompt(problem, FAMILY, "math", instruction),
                              verifier="math", family=FAMILY, answer=str(answer), difficulty=f"L{level}"))
    return tasks
