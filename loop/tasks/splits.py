"""Deterministic split helpers shared by the task families: stable hashing, seeded subsets, leak checks."""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

from loop.tasks.base import Task


def stable_digest(text: str) -> str:
    """Hex SHA-256 of `text`: unlike hash(), the same in every process (PYTHONHASHSEED does not touch it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_bucket(text: str, buckets: int) -> int:
    """A bucket in [0, buckets) fixed by the text alone, so a text always lands in the same split."""
    return int(stable_digest(text)[:16], 16) % buckets


def take_subset(tasks: list[Task], limit: int | None, seed: int | str) -> list[Task]:
    """At most `limit` tasks, chosen by a seeded draw and kept in their original order.

    A draw rather than the first `limit`: the fixed datasets are ordered by category (CHAMP starts with
    all its combinatorics problems), so a prefix would not be representative.
    """
    if limit is None or limit >= len(tasks):
        return list(tasks)
    keep = set(random.Random(f"subset/{seed}").sample(range(len(tasks)), limit))
    return [t for i, t in enumerate(tasks) if i in keep]


def check_unique_ids(tasks: Iterable[Task], where: str) -> None:
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise ValueError(f"{where}: task id {t.id!r} occurs twice; task ids must be unique within a task set")
        seen.add(t.id)


def check_disjoint(train: Iterable[Task], evaluation: Iterable[Task]) -> None:
    """Raise if any training prompt is also an evaluation prompt (an evaluation leak)."""
    train_prompts = {t.prompt.strip(): t.id for t in train}
    leaks = [(train_prompts[t.prompt.strip()], t.id) for t in evaluation if t.prompt.strip() in train_prompts]
    if leaks:
        shown = ", ".join(f"{a} = {b}" for a, b in leaks[:5])
        raise ValueError(f"{len(leaks)} evaluation prompt(s) also appear in the training tasks ({shown}"
                         f"{', ...' if len(leaks) > 5 else ''}); use disjoint splits or files")


def count_clusters(tasks: Iterable[Task]) -> int:
    """How many clusters the tasks fall into (Task.cluster; a task without one is its own)."""
    return len({t.cluster or t.id for t in tasks})


MAX_REPORTED = 20
"""Problems listed in one error about a task source (a file or dataset); the rest are counted."""


def list_problems(errors: list[str], where: str) -> str:
    """One message for every problem found in a task source: the count, then each on its line (at most
    MAX_REPORTED), so a user fixes them all at once."""
    more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
    return f"{len(errors)} problem(s) in {where}:\n  " + "\n  ".join(errors[:MAX_REPORTED]) + more
