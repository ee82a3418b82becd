"""The one interface every task family implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

VerifierKind = Literal["math", "code"]


@dataclass(frozen=True)
class Task:
    id: str  # unique across families, e.g. "gsm-symbolic/0042/orig"
    prompt: str  # the user message (the chat template is applied by the generator)
    verifier: VerifierKind
    family: str
    answer: str | None = None  # gold final answer (math)
    tests: str | None = None  # test code defining check(candidate) (code)
    entry_point: str | None = None  # function under test (code)
    difficulty: str | None = None  # level or template group, for per-difficulty breakdowns
    cluster: str | None = None
    """Tasks that share a cluster are not independent draws (the variants of one gsm-symbolic template): the
    intervals of loop/evaluation/stats.py count clusters, not tasks. None: the task is its own cluster."""
