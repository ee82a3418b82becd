"""Evaluation metrics over graded samples: pass@k, maj@k, greedy accuracy, diversity, and breakdowns.

`summarise(tasks, graded, greedy)` returns one row per prompt and an aggregate dict whose keys are
metric names ("pass@4", "maj@4", "greedy_acc", "distinct_2", ...; the tracker turns '@' into '_at_').
Aggregates are means over prompts (each prompt weighs the same), skipping prompts where a metric is
undefined (None in its row).

Definitions:
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. (2021) for n samples of
  which c are correct, in the stable product form 1 - prod_{i=n-c+1}^{n} (1 - k/i). Reported for
  k = 1, 2, 4, ... <= n and k = n, where n is the smallest sample count over the prompts.
- maj@k (math tasks only): the expected accuracy of a majority vote over a uniformly random k-subset
  of the n samples, computed exactly (no sampling). Votes are the extracted answers, clustered by the
  math verifier's own equivalence (answer_votes; "0.5" and "1/2" are one answer, right or wrong);
  samples without an answer abstain. All correct samples form one answer (the verifier judged them
  equal to the gold answer). The vote is right when the correct answer has the most votes; a tie
  between t answers gives 1/t (a fair coin among them); a subset where every sample abstains is
  wrong. Code tasks have no maj@k: majority over program texts is not a meaningful vote.
- greedy_acc: the fraction of prompts whose greedy sample is correct.
- Diversity, per prompt over its n samples, on the model-written text (tool observations excluded),
  tokenised by whitespace:
  distinct_answers: number of distinct extracted answers; for math, answers the verifier judges
  equivalent are one (answer_votes), for code, distinct normalised program texts;
  answer_pairs_undecided (math): answer comparisons of the clustering that timed out or could not be
  decided, each counted as "different" (so distinct_answers is then an upper bound);
  distinct_1..4: distinct n-grams / all n-grams, pooled over the samples (n-grams do not cross samples);
  pairwise_jaccard: mean Jaccard similarity of the word-trigram sets over all pairs of samples.
  Chosen over self-BLEU: symmetric, in [0, 1], O(length) per pair, and without BLEU's brevity and
  smoothing choices, which dominate on short completions;
  nll_per_token: mean over samples of -cumulative_logprob / model tokens (an entropy proxy);
  response_tokens, tool_calls, tool_errors: means over samples;
  cutoff_frac (cut off by any budget: tokens, context, tool calls), tool_use_frac (called the tool at least
  once), no_answer_frac, timeout_frac: fractions of samples.
- Pooled over all samples (in the aggregate only): finished_acc, the accuracy of the samples that were not cut
  off; acc_with_tool and acc_without_tool, of the samples that did and did not call the tool; tool_errors/<kind>,
  the count of failed tool calls of each kind (loop.generation.environments.TOOL_ERROR_KINDS).
"""
from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from itertools import combinations

import numpy as np

from loop.records import Graded
from loop.tasks.base import Task
from verifiers.math import clusters as math_clusters

log = logging.getLogger(__name__)

# --- pass@k ---------------------------------------------------------------------------------------


def _check_counts(n: int, c: int, k: int, what: str) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"{what}: need 0 <= correct <= n, got n={n}, correct={c}")
    if k < 1:
        raise ValueError(f"{what}: k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"{what}@{k} needs at least k={k} samples per prompt, got n={n}; "
                         f"raise the sampling n or ask for a smaller k")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    _check_counts(n, c, k, "pass")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i): no huge binomials, no cancellation.
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    if n < 1:
        raise ValueError(f"need at least one sample per prompt, got n={n}")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


# --- maj@k ----------------------------------------------------------------------------------------


def maj_at_k(gold: int, others: Sequence[int], abstain: int, ks: Iterable[int]) -> dict[int, float]:
    """Expected majority-vote accuracy over uniformly random k-subsets, for each k in `ks`.

    `gold` samples hold the correct answer, `others[g]` samples hold wrong answer g, `abstain`
    samples hold none. Ties among t answers give 1/t; see the module docstring.
    """
    if gold < 0 or abstain < 0 or any(m < 1 for m in others):
        raise ValueError(f"maj@k: counts must be gold >= 0, abstain >= 0 and each wrong answer >= 1 "
                         f"(got gold={gold}, others={list(others)}, abstain={abstain})")
    n = gold + sum(others) + abstain
    ks = list(ks)
    for k in ks:
        _check_counts(n, gold, k, "maj")
    # ways[s, t] = number of s-subsets in which the gold answer ties with t wrong answers for the most
    # votes (t = 0: it wins outright). For each count j >= 1 of gold votes in the subset, a polynomial
    # counts the ways to draw the rest: poly[d, t] = ways to draw d non-gold samples with every wrong
    # answer below j votes except t of them at exactly j.
    ways = np.zeros((n + 1, len(others) + 1), dtype=object)  # Python ints: exact, no overflow
    for j in range(1, gold + 1):
        depth = n - j + 1
        tie_max = sum(1 for m in others if m >= j)
        poly = np.zeros((depth, tie_max + 1), dtype=object)
        poly[0, 0] = 1
        for m in others:
            new = np.zeros_like(poly)
            for i in range(min(j - 1, m, depth - 1) + 1):
                new[i:, :] += math.comb(m, i) * poly[:depth - i, :]
            if m >= j and j < depth:
                new[j:, 1:] += math.comb(m, j) * poly[:depth - j, :-1]
            poly = new
        new = np.zeros_like(poly)
        for i in range(min(abstain, depth - 1) + 1):  # abstainers never change the winner
            new[i:, :] += math.comb(abstain, i) * poly[:depth - i, :]
        ways[j:, :tie_max + 1] += math.comb(gold, j) * new
    return {k: float(sum(Fraction(int(ways[k, t]), t + 1) for t in range(ways.shape[1])) / math.comb(n, k))
            for k in ks}


_WS = re.compile(r"\s+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def normalize_answer(answer: str) -> str:
    """A canonical string for comparing answers as text (code answers, reports): case, spacing, '$',
    thousands commas, trailing '.' and numeric spelling ("42.0" -> "42") do not make two answers
    different. Math votes use the verifier's equivalence instead (answer_votes)."""
    s = _WS.sub(" ", answer.strip().lower()).replace("$", "").strip().rstrip(".").strip()
    s = _THOUSANDS.sub("", s)
    try:
        x = float(s)
    except ValueError:
        return s
    if math.isfinite(x):
        return str(int(x)) if x.is_integer() else repr(x)
    return s


# Bounds of the answer clustering behind maj@k and distinct_answers (verifiers/math/clusters.py): per
# worker comparison, and for all worker comparisons of one prompt. Most answers are plain numbers,
# decided in-process; what runs past these bounds is counted in answer_pairs_undecided.
ANSWER_COMPARISON_TIMEOUT_S = 2.0
ANSWER_CLUSTERING_BUDGET_S = 20.0


@dataclass(frozen=True)
class AnswerVotes:
    """One math prompt's samples as votes: the gold answer's votes, each wrong answer's votes (answers
    clustered by the verifier's equivalence), abstentions, and the comparisons left undecided."""
    gold: int
    wrong: tuple[int, ...]
    abstain: int
    undecided: int

    @property
    def distinct(self) -> int:
        return int(self.gold > 0) + len(self.wrong)


def answer_votes(samples: Sequence[Graded]) -> AnswerVotes:
    """Cluster one math prompt's extracted answers by the math verifier's equivalence.

    The votes follow the verdicts, as pass@k does: correct samples are one answer (the gold), however written;
    incorrect ones are clustered with verifiers.math.cluster_answers ("1/2" and "0.5" are one wrong answer, so are
    "x = 2" and "2"); samples without a verdict (no answer, a verifier timeout) abstain, so maj@1 equals pass@1.
    Each comparison has ANSWER_COMPARISON_TIMEOUT_S and all of a prompt's share ANSWER_CLUSTERING_BUDGET_S; one
    that times out (or errs) counts as different and is counted in `undecided`.
    """
    return votes_of(tuple((g.status, g.extracted) for g in samples))


# prompt_row asks twice (votes, distinct answers), and the verifier caches no timed-out comparison.
@lru_cache(maxsize=256)
def votes_of(samples: tuple[tuple[str, str | None], ...]) -> AnswerVotes:
    """`answer_votes` of (status, extracted answer) pairs."""
    gold = sum(status == "correct" for status, _ in samples)
    others = [x for status, x in samples if status == "incorrect" and x is not None]
    abstain = len(samples) - gold - len(others)
    clusters = math_clusters.cluster_answers(others, timeout_s=ANSWER_COMPARISON_TIMEOUT_S,
                                             budget_s=ANSWER_CLUSTERING_BUDGET_S)
    if clusters.undecided:
        log.warning("answer clustering: %d comparison(s) undecided, counted as different answers; first: %s",
                    clusters.undecided, clusters.notes[0])
    return AnswerVotes(gold, tuple(Counter(clusters.labels).values()), abstain, clusters.undecided)


def vote_counts(samples: Sequence[Graded]) -> tuple[int, list[int], int]:
    """(gold, wrong answer counts, abstentions) of one math prompt's samples, for maj_at_k (see
    answer_votes for how answers are clustered)."""
    votes = answer_votes(samples)
    return votes.gold, list(votes.wrong), votes.abstain


def distinct_answers(task: Task, samples: Sequence[Graded]) -> float:
    """Distinct extracted answers of one prompt: by the math verifier's equivalence for math tasks,
    by normalised text for code (programs)."""
    if task.verifier == "math":
        return float(answer_votes(samples).distinct)
    return float(len({normalize_answer(g.extracted) for g in samples
                      if g.extracted is not None and g.status in ("correct", "incorrect")}))


# --- diversity ------------------------------------------------------------------------------------


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct whitespace-token n-grams / all n-grams, pooled over `texts`; None when there are none."""
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else None


def pairwise_jaccard(texts: Sequence[str], n: int = 3) -> float | None:
    """Mean Jaccard similarity of word n-gram sets over pairs of texts; None with no comparable pair."""
    sets = [set(_ngrams(t.split(), n)) for t in texts]
    sims = [len(a & b) / len(a | b) for a, b in combinations(sets, 2) if a | b]
    return sum(sims) / len(sims) if sims else None


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


# --- per prompt and aggregate ---------------------------------------------------------------------

_NOT_AGGREGATED = {"task_id", "cluster", "family", "difficulty", "verifier", "n", "correct", "greedy_correct",
                   "finished", "finished_correct"}


def prompt_row(task: Task, samples: Sequence[Graded], ks: Sequence[int], greedy: Graded | None) -> dict:
    """All metrics of one prompt (None where undefined)."""
    n = len(samples)
    c = sum(g.correct for g in samples)
    trajs = [g.trajectory for g in samples]
    texts = [t.model_text for t in trajs]
    row: dict = {"task_id": task.id, "cluster": task.cluster or task.id, "family": task.family,
                 "difficulty": task.difficulty, "verifier": task.verifier, "n": n, "correct": c}
    row.update({f"pass@{k}": pass_at_k(n, c, k) for k in ks})
    if task.verifier == "math":
        row.update({f"maj@{k}": v for k, v in maj_at_k(*vote_counts(samples), ks).items()})
    row["greedy_correct"] = None if greedy is None else float(greedy.correct)
    row["distinct_answers"] = distinct_answers(task, samples)
    row["answer_pairs_undecided"] = float(answer_votes(samples).undecided) if task.verifier == "math" else None
    for m in range(1, 5):
        row[f"distinct_{m}"] = distinct_n(texts, m)
    row["pairwise_jaccard"] = pairwise_jaccard(texts)
    row["nll_per_token"] = _mean(-t.cumulative_logprob / t.num_model_tokens for t in trajs if t.num_model_tokens)
    row["response_tokens"] = _mean(t.num_model_tokens for t in trajs)
    row["tool_calls"] = _mean(t.num_tool_calls for t in trajs)
    row["cutoff_frac"] = _mean(float(t.cut_off) for t in trajs)
    finished = [g for g in samples if not g.trajectory.cut_off]
    row["finished"], row["finished_correct"] = len(finished), sum(g.correct for g in finished)
    row["tool_use_frac"] = _mean(float(t.num_tool_calls > 0) for t in trajs)
    row["tool_errors"] = _mean(len(t.tool_errors) for t in trajs)
    row["no_answer_frac"] = _mean(float(g.status == "no_answer") for g in samples)
    row["timeout_frac"] = _mean(float(g.status == "timeout") for g in samples)
    return row


def aggregate(rows: Sequence[dict]) -> dict[str, float]:
    """Means over prompts of every per-prompt metric; greedy_acc; prompt and sample counts."""
    out: dict[str, float] = {"num_prompts": float(len(rows))}
    if not rows:
        return out
    out["samples_per_prompt"] = float(min(r["n"] for r in rows))
    names = [k for r in rows for k in r if k not in _NOT_AGGREGATED]
    for name in dict.fromkeys(names):  # first-seen order: pass@k, maj@k, diversity
        mean = _mean(r.get(name) for r in rows)
        if mean is not None:
            out[name] = mean
    greedy = _mean(r.get("greedy_correct") for r in rows)
    if greedy is not None:
        out["greedy_acc"] = greedy
    return out


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def _is_accuracy(name: str) -> bool:
    return name.startswith(("pass@", "maj@")) or name == "greedy_acc"


def breakdown(rows: Sequence[dict], by: str | Callable[[dict], str | None] = "difficulty",
              keep: Callable[[str], bool] = _is_accuracy) -> dict[str, float]:
    """Aggregates per group of prompts: keys '<by>/<group>/<metric>' (e.g. 'difficulty/L2/pass@1').

    `by` is a row field ("difficulty", "family") or a function of the row (named "group"); rows whose
    group is None are left out. `keep` picks the metrics (default: pass@k, maj@k, greedy_acc), plus
    each group's num_prompts.
    """
    name = by if isinstance(by, str) else "group"
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        g = r.get(by) if isinstance(by, str) else by(r)
        if g is not None:
            groups[_KEY_UNSAFE.sub("_", str(g))].append(r)
    out: dict[str, float] = {}
    for g in sorted(groups):
        for metric, value in aggregate(groups[g]).items():
            if metric == "num_prompts" or keep(metric):
                out[f"{name}/{g}/{metric}"] = value
    return out


def pooled(graded: Sequence[Graded]) -> dict[str, float]:
    """Accuracies over samples rather than prompts (the module doc); a share with no sample is left out."""
    out: dict[str, float] = {}
    for name, keep in (("finished_acc", lambda g: not g.trajectory.cut_off),
                       ("acc_with_tool", lambda g: g.trajectory.num_tool_calls > 0),
                       ("acc_without_tool", lambda g: g.trajectory.num_tool_calls == 0)):
        kept = [g.correct for g in graded if keep(g)]
        if kept and (name == "finished_acc" or any(g.trajectory.num_tool_calls for g in graded)):
            out[name] = sum(kept) / len(kept)
    kinds = Counter(kind for g in graded for kind in g.trajectory.tool_errors)
    out.update({f"tool_errors/{kind}": float(count) for kind, count in sorted(kinds.items())})
    return out


def summarise(tasks: Sequence[Task], graded: Sequence[Graded],
              greedy: Sequence[Graded] | None = None) -> tuple[list[dict], dict[str, float]]:
    """Per-prompt rows and the aggregate of `graded` samples (and greedy samples, one per task).

    The aggregate adds per-family and per-difficulty breakdowns of the accuracy metrics when the
    tasks span more than one family or difficulty.
    """
    by_task: dict[str, list[Graded]] = {t.id: [] for t in tasks}
    for g in graded:
        if g.trajectory.task_id not in by_task:
            raise ValueError(f"a graded sample belongs to task {g.trajectory.task_id!r}, which is not among "
                             f"the {len(by_task)} tasks evaluated; pass the task list the samples came from")
        by_task[g.trajectory.task_id].append(g)
    empty = [tid for tid, s in by_task.items() if not s]
    if empty:
        raise ValueError(f"{len(empty)} task(s) have no graded samples (first: {', '.join(empty[:5])}); "
                         f"every evaluated task needs at least one sample")
    greedy_by_task: dict[str, Graded] = {}
    if greedy is not None:
        for g in greedy:
            tid = g.trajectory.task_id
            if tid not in by_task:
                raise ValueError(f"a greedy sample belongs to task {tid!r}, which is not among the tasks evaluated")
            if tid in greedy_by_task:
                raise ValueError(f"task {tid!r} has more than one greedy sample; expected exactly one per task")
            greedy_by_task[tid] = g
        missing = [tid for tid in by_task if tid not in greedy_by_task]
        if missing:
            raise ValueError(f"{len(missing)} task(s) have no greedy sample (first: {', '.join(missing[:5])})")
    ks = k_values(min(len(s) for s in by_task.values())) if by_task else []
    rows = [prompt_row(t, by_task[t.id], ks, greedy_by_task.get(t.id)) for t in tasks]
    summary = aggregate(rows)
    summary.update(pooled(graded))
    for field in ("family", "difficulty"):
        if len({r[field] for r in rows if r[field] is not None}) > 1:
            summary.update(breakdown(rows, field))
    return rows, summary
