"""Math answer verification: extract the final answer of a completion and decide, soundly and within
bounded time and memory, whether it is the gold answer.

    extract_answer(completion) -> str | None
    is_equivalent(pred, gold) -> bool           (raises ComparisonTimeout / ComparisonError)
    grade(completion, gold) -> Verdict          (status: correct/incorrect/no_answer/timeout/error)
    grade_many([(completion, gold), ...], workers=N) -> list[Verdict]
    cluster_answers([answer, ...], timeout_s=, budget_s=) -> Clusters  (answers grouped by equivalence)

Callers pass the text the model wrote: tool observations are not the model's statement of an answer.

Modules: extract (answer rules), normalize (+ unicode_math, number_words), plain_numbers and
precision (the in-process fast path and the decimal-precision rule), magnitude (in-process rejection
of numbers far apart in size: power towers, huge factorials), symbolic (math-verify with a sound
numeric step, worker-side), worker and pool (killable worker processes), equivalence, grading,
clusters (for maj@k and distinct-answer counts).
"""
from verifiers.math.clusters import Clusters, cluster_answers
from verifiers.math.equivalence import ComparisonError, ComparisonTimeout, is_equivalent
from verifiers.math.extract import RULES, extract_answer
from verifiers.math.grading import Verdict, grade, grade_many

__all__ = ["extract_answer", "is_equivalent", "grade", "grade_many", "Verdict", "RULES",
           "ComparisonError", "ComparisonTimeout", "cluster_answers", "Clusters"]
