"""Group answers that the verifier judges to be the same mathematical object ("1/2" and "0.5").

For counting distinct answers and for majority votes: the answers of one prompt are clustered with the
same equivalence that grades them (equivalence.judge: the in-process fast path, then a worker with a
deadline). Greedy, in the order given: each answer joins the first cluster whose representative (its
first member) it is judged equal to, taking the representative as the reference side (whose decimal
precision decides, as the gold's does in grading); otherwise it opens a new cluster. Answers with the
same normalised text are one answer without any comparison.

Bounded: each worker comparison has `timeout_s`, and all of one call's worker comparisons share
`budget_s`. A comparison that times out, crashes, cannot read the representative, or is skipped
because the budget is spent counts as *different* (so undecided answers are never merged: the count of
distinct answers can only be too high, never too low), and is counted in `undecided` with the reason
in `notes`, so the caller can report it. A worker pool that cannot start at all (a broken
environment, WorkerStartupError) raises: that is no verdict on the answers. Reading each answer runs
under the grader's per-sample deadline (deadline.py): an answer that runs past it is one of a kind.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from verifiers.math.deadline import GradingTimeout, within
from verifiers.math.equivalence import Judgement, decide_in_process, judge_in_worker
from verifiers.math.grading import IN_PROCESS_BUDGET_S
from verifiers.math.normalize import normalize_answer


@dataclass(frozen=True)
class Clusters:
    labels: list[int]  # the cluster of each answer, numbered 0, 1, ... in order of first appearance
    undecided: int  # comparisons that could not be decided and were counted as "different"
    notes: list[str] = field(default_factory=list)  # why, one line per undecided comparison

    @property
    def count(self) -> int:
        return len(set(self.labels))


def answer_key(answer: str) -> str:
    """The verifier's normalised form: answers with the same key are the same answer."""
    if not isinstance(answer, str):
        raise TypeError(f"an answer must be a str, got {type(answer).__name__}")
    return normalize_answer(answer)


def cluster_answers(answers: Sequence[str], *, timeout_s: float, budget_s: float) -> Clusters:
    """Cluster `answers` by the verifier's equivalence (see the module docstring).

    timeout_s bounds each worker comparison, budget_s all of them together; both are required, so
    that the caller states what it can afford.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if not budget_s >= 0:
        raise ValueError(f"budget_s must be >= 0, got {budget_s}")
    deadline = time.monotonic() + budget_s
    notes: list[str] = []
    keys = [_key(a, i, notes) for i, a in enumerate(answers)]
    cluster_of_key: dict[str, int] = {}
    representatives: list[str] = []  # the first (normalised) answer of each cluster
    labels = []
    for key in keys:
        if key not in cluster_of_key:
            cluster_of_key[key] = _place(key, representatives, deadline, timeout_s, notes)
            if cluster_of_key[key] == len(representatives):
                representatives.append(key)
        labels.append(cluster_of_key[key])
    return Clusters(labels, len(notes), notes)


def _key(answer: str, index: int, notes: list[str]) -> str:
    try:
        with within(IN_PROCESS_BUDGET_S):
            return answer_key(answer)
    except GradingTimeout:
        notes.append(f"answer {index} ({len(answer)} characters): reading it ran past the deadline")
        return f"\0unread {index}"  # a key no normalised answer has: one of a kind


def _place(key: str, representatives: list[str], deadline: float, timeout_s: float, notes: list[str]) -> int:
    """The cluster `key` joins, or len(representatives) for a new one."""
    for index, rep in enumerate(representatives):
        if not key or not rep:
            continue  # an answer that normalises to nothing is one of a kind
        j = _compare(key, rep, deadline, timeout_s)
        if j.outcome == "equal":
            return index
        if j.outcome != "different":
            notes.append(f"{key!r} vs {rep!r}: {j.outcome}: {j.how}")
    return len(representatives)


def _compare(pred: str, reference: str, deadline: float, timeout_s: float) -> Judgement:
    if pred.startswith("\0") or reference.startswith("\0"):
        return Judgement("timeout", "an answer that could not be read in time")
    try:
        with within(IN_PROCESS_BUDGET_S):
            decided = decide_in_process(pred, reference)
    except GradingTimeout as e:
        return Judgement("timeout", str(e))
    if isinstance(decided, Judgement):
        return decided
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return Judgement("timeout", "not compared: the clustering's time budget was spent")
    return judge_in_worker(*decided, min(timeout_s, remaining))
