"""Grade completions against gold answers: extraction, then equivalence, as a Verdict."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from verifiers.math.deadline import GradingTimeout, within
from verifiers.math.equivalence import Judgement, decide_in_process, judge_in_worker
from verifiers.math.extract import Extraction, find_answer
from verifiers.math.pool import DEFAULT_SIZE, default_pool


# The statuses of loop.records.GradeStatus, spelled out here: verifiers/ imports nothing from loop/.
GradeStatus = Literal["correct", "incorrect", "no_answer", "timeout", "error"]


@dataclass(frozen=True)
class Verdict:
    status: GradeStatus  # "correct" | "incorrect" | "no_answer" | "timeout" | "error"
    extracted: str | None  # the answer the completion states, as written
    reason: str  # why, in words: which rule extracted the answer and how it was compared
    gold_error: bool = False  # an "error" caused by the gold answer (unparseable): the data needs fixing

    @property
    def correct(self) -> bool:
        return self.status == "correct"


_STATUS = {"equal": "correct", "different": "incorrect", "timeout": "timeout", "error": "error"}
# The in-process steps (extraction, normalisation, the fast paths) of one sample take milliseconds; their
# budget only stops text built to make a pattern backtrack. A hit is a "timeout" verdict, counted as such.
IN_PROCESS_BUDGET_S = 2.0


def _verdict(answer: str, rule: str, gold: str, j: Judgement) -> Verdict:
    return Verdict(_STATUS[j.outcome], answer, f"answer {answer!r} found by rule {rule}; gold {gold!r}; {j.how}",
                   gold_error=j.gold)


def _check_gold(gold) -> None:
    if gold is None:
        raise TypeError("the gold answer is None: a math task needs Task.answer")


def grade(completion: str, gold: str, *, timeout_s: float = 5.0, fallback_last_number: bool = True) -> Verdict:
    """Grade one completion against its gold answer.

    timeout_s bounds the comparison (it runs in a killable worker process); fallback_last_number
    lets a completion without an explicit answer be graded on its last number (see extract.py).
    A timeout or crash is reported as such, never as "incorrect".
    """
    _check_gold(gold)
    found, decided = _in_process(completion, gold, fallback_last_number, timeout_s)
    if isinstance(decided, Verdict):
        return decided
    if isinstance(decided, Judgement):
        return _verdict(found.answer, found.rule, gold, decided)
    return _verdict(found.answer, found.rule, gold, judge_in_worker(*decided, timeout_s))


def _in_process(completion: str, gold: str, fallback_last_number: bool, timeout_s: float
                ) -> tuple[Extraction | None, Verdict | Judgement | tuple[str, str]]:
    """Extraction and the in-process decision for one sample, under its deadline: a final Verdict, a
    Judgement, or the normalised pair a worker must compare."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a str, got {type(completion).__name__}")
    budget = min(IN_PROCESS_BUDGET_S, timeout_s)
    try:
        with within(budget):
            found = find_answer(completion, fallback_last_number=fallback_last_number)
            if found.answer is None:
                return found, Verdict("no_answer", None, found.rule)
            return found, decide_in_process(found.answer, gold)
    except GradingTimeout:
        return None, Verdict("timeout", None, f"reading the completion ran past its {budget:g}s deadline "
                                              f"({len(completion)} characters): text built to stall the grader")


def grade_many(items: list[tuple[str, str]], *, workers: int = DEFAULT_SIZE, timeout_s: float = 5.0,
               fallback_last_number: bool = True) -> list[Verdict]:
    """grade() over (completion, gold) pairs, in order, with up to `workers` comparisons in parallel.

    The cheap part (extraction, in-process decisions) runs in the calling thread; only comparisons
    that need a worker process are spread over threads, which then mostly wait on their pipes (so
    they do not fight over the GIL with the in-process work).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    verdicts: list[Verdict | None] = [None] * len(items)
    pending: list[tuple[int, str, str, str, tuple[str, str]]] = []
    for i, (completion, gold) in enumerate(items):
        _check_gold(gold)
        found, decided = _in_process(completion, gold, fallback_last_number, timeout_s)
        if isinstance(decided, Verdict):
            verdicts[i] = decided
        elif isinstance(decided, Judgement):
            verdicts[i] = _verdict(found.answer, found.rule, gold, decided)
        else:
            pending.append((i, found.answer, found.rule, gold, decided))

    def compare(job: tuple[int, str, str, str, tuple[str, str]]) -> None:
        i, answer, rule, gold, (p, g) = job
        verdicts[i] = _verdict(answer, rule, gold, judge_in_worker(p, g, timeout_s))

    if workers == 1 or len(pending) <= 1:
        for job in pending:
            compare(job)
    else:
        default_pool().ensure_size(workers)
        with ThreadPoolExecutor(min(workers, len(pending)), thread_name_prefix="math-grade") as pool:
            list(pool.map(compare, pending))
    return verdicts  # type: ignore[return-value] - every slot is filled above
