"""Whether two answers are the same mathematical object.

Cheap, bounded decisions are made in-process (identical normalised strings, plain numbers, numbers
provably far apart in size); anything that needs SymPy goes to a worker process with a deadline
(pool.py). Outcomes of worker comparisons are cached, since the n samples of a task often repeat an
answer.
"""
from __future__ import annotations

from verifiers.math import deadline as re  # every pattern under the sample's deadline
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from verifiers.math.magnitude import magnitudes_apart
from verifiers.math.normalize import normalize_answer, unparsed_remainder
from verifiers.math.plain_numbers import compare_plain
from verifiers.math.pool import WorkerCrashed, WorkerTimeout, default_pool

Outcome = Literal["equal", "different", "timeout", "error"]
_ELLIPSIS = re.compile(r"\\[lcv]?dots|\.\.\.")
_CACHE_SIZE = 8192
_CLOCK = re.compile(r"^0*(\d{1,2}):([0-5]\d)(?::([0-5]\d))?\s*(?:\\text\{\s*)?([AaPp])?\.?\s*(?:[Mm]\.?)?\s*\}?$")


class ComparisonTimeout(Exception):
    """The comparison exceeded its time or memory bound (is_equivalent cannot answer)."""


class ComparisonError(Exception):
    """The comparison crashed, or the gold answer is unreadable (is_equivalent cannot answer)."""


@dataclass(frozen=True)
class Judgement:
    outcome: Outcome
    how: str
    gold: bool = False  # an error that is the gold answer's fault (data to fix), not the prediction's


_cache: OrderedDict[tuple[str, str], Judgement] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget remembered worker outcomes (benchmarks measure cold comparisons)."""
    with _cache_lock:
        _cache.clear()


def _remember(key: tuple[str, str], judgement: Judgement) -> Judgement:
    with _cache_lock:
        _cache[key] = judgement
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return judgement


def judge_in_worker(pred: str, gold: str, timeout_s: float) -> Judgement:
    """Compare two normalised answers (see decide_in_process) in a worker process."""
    key = (pred, gold)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    try:
        reply = default_pool().call({"pred": pred, "gold": gold}, timeout_s)
    except WorkerTimeout as e:
        return Judgement("timeout", f"comparing {pred!r} with {gold!r}: {e}")
    except WorkerCrashed as first:
        # A worker can die for reasons outside the comparison (the OOM killer, an operator): try once
        # more on a fresh one; a second death is the comparison's doing.
        try:
            reply = default_pool().call({"pred": pred, "gold": gold}, timeout_s)
        except WorkerTimeout as e:
            return Judgement("timeout", f"comparing {pred!r} with {gold!r}: {e} (after a worker crash: {first})")
        except WorkerCrashed as second:
            return Judgement("error", f"comparing {pred!r} with {gold!r}: {second} (twice)")
    kind = reply["kind"]
    if kind == "ok":
        return _remember(key, Judgement("equal" if reply["equal"] else "different", reply["how"]))
    if kind == "resource":
        return Judgement("timeout", f"comparing {pred!r} with {gold!r}: {reply['message']}")
    return Judgement("error", reply["message"], gold=reply.get("gold") is True)


def _clock_time(s: str) -> tuple | None:
    """(hour, minutes, seconds, am/pm) for "9:30", "09:30 p.m."; None otherwise."""
    m = _CLOCK.match(s)
    if m is None or int(m[1]) > 24:
        return None
    return int(m[1]), m[2], m[3], (m[4] or "").lower()


MAX_ANSWER_CHARS = 1000  # a matrix or a long list fits; a page of text is not a final answer
MAX_NESTING = 50  # brackets within brackets: what no final answer needs and what stalls the parser


def _nesting(s: str) -> int:
    depth = deepest = 0
    for c in s:
        if c in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")}]":
            depth -= 1
    return deepest


def _not_an_answer_shape(p: str, g: str, slack: int = 1) -> str | None:
    """Why `p` is too long or too deeply nested to be a final answer (measured against the gold's own size,
    so a long gold keeps long answers comparable), or None. Such text would only run the worker into its
    deadline."""
    if len(p) > slack * max(MAX_ANSWER_CHARS, 2 * len(g)):
        return f"the answer is {len(p)} characters long: not a final answer"
    if (depth := _nesting(p)) > slack * max(MAX_NESTING, 2 * _nesting(g)):
        return f"the answer nests brackets {depth} deep: not a final answer"
    return None


def decide_in_process(pred: str, gold: str) -> Judgement | tuple[str, str]:
    """A decision when a cheap, bounded check settles it; otherwise the normalised (pred, gold)
    pair that judge_in_worker must compare."""
    for name, value in (("pred", pred), ("gold", gold)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    g = normalize_answer(gold)
    if not g:
        raise ValueError(f"the gold answer {gold!r} is empty; a math task needs a non-empty answer")
    # Raw text first, at twice the limits (normalising removes spacing and \left/\right): text that deep or
    # that long would spend the deadline in normalisation.
    if why := _not_an_answer_shape(pred, gold, slack=2):
        return Judgement("different", why)
    p = normalize_answer(pred)
    if not p:
        return Judgement("different", "the answer is empty")
    if p == g:
        return Judgement("equal", "identical after normalisation")
    if why := unparsed_remainder(p):
        return Judgement("different", why)
    if why := _not_an_answer_shape(p, g):
        return Judgement("different", why)
    if bool(_ELLIPSIS.search(p)) != bool(_ELLIPSIS.search(g)):
        return Judgement("different", "only one side continues with an ellipsis")
    # Two times of day: "12:00" is not the ratio 12/0 the parser would read. A ratio that looks
    # like a time on both sides ("3:15" vs "6:30") is a false reject we accept.
    if (gt := _clock_time(g)) and (pt := _clock_time(p)):
        return Judgement("equal" if gt == pt else "different", f"compared as times of day: {p} vs {g}")
    plain = compare_plain(p, g)
    if plain is not None:
        return Judgement("equal" if plain else "different", f"compared as plain numbers: {p} vs {g}")
    # A power tower or huge factorial against a small number: provably different by size alone,
    # decided here instead of timing out in a worker (magnitude.py only ever rejects).
    if (apart := magnitudes_apart(p, g)) is not None:
        return Judgement("different", f"compared by magnitude: {apart}")
    return p, g


def judge(pred: str, gold: str, *, timeout_s: float = 5.0) -> Judgement:
    """The outcome of comparing answer `pred` with answer `gold`, and how it was decided."""
    decided = decide_in_process(pred, gold)
    return decided if isinstance(decided, Judgement) else judge_in_worker(*decided, timeout_s)


def is_equivalent(pred: str, gold: str, *, timeout_s: float = 5.0) -> bool:
    """Whether answer `pred` is mathematically `gold` (both are final answers, not completions).

    Raises ComparisonTimeout when the comparison exceeds its bounds and ComparisonError when it
    crashes or `gold` cannot be read: a bool cannot say "undecided", and False would be a lie.
    """
    j = judge(pred, gold, timeout_s=timeout_s)
    if j.outcome == "timeout":
        raise ComparisonTimeout(j.how)
    if j.outcome == "error":
        raise ComparisonError(j.how)
    return j.outcome == "equal"
