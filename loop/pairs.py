"""Preference pairs from one round's graded samples (the data of the M-DPO update).

Samples are grouped by task: a pair is a correct trajectory (chosen) and a wrong one (rejected) for the same
prompt, as in iterative M-DPO (Xiong et al. 2024, arXiv:2409.02392). A prompt whose usable samples are all
correct or all wrong gives no pair: with a binary verifier there is no preference to learn there.

A trajectory cut off by the token, context or turn budget is never a chosen sample, whatever its verdict: it did
not finish. It is a rejected candidate (the loop grades it incorrect, verify.cutoff_is_wrong), which is the only
signal against answers that grow past the budget; `keep_truncated: false` leaves it out altogether. Verifier
timeouts (no verdict) are left out unless `timeout_as_incorrect`. `chosen_needs_marker` keeps a chosen sample to
those that state their answer explicitly ('####', \\boxed{}) rather than through the last-number fallback. Pairs
keep the trajectories in token space, segments and all, so training sees exactly the tokens the policy sampled and
can mask the tool observations.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loop.records import Graded, Trajectory
from loop.run.directory import read_jsonl, write_jsonl


class PairsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    strategy: Literal["random", "best_worst", "all"] = "random"
    """random: one random correct vs one random wrong sample per prompt (as in M-DPO);
    best_worst: one pair per prompt, chosen and rejected picked by `by`;
    all: every correct x wrong combination, at most `max_pairs_per_prompt` of them (a seeded random subset)."""
    by: Literal["length", "logprob"] = "length"
    """best_worst only. length: the shortest correct vs the longest wrong sample (in model-written tokens), which
    also teaches brevity; logprob: the correct sample the policy found least likely vs the wrong one it found most
    likely (mean log-prob per model token), the pair the policy ranks most wrongly."""
    max_pairs_per_prompt: int = Field(8, ge=1)
    """Cap for `all`, so prompts with many samples do not dominate the round."""
    prompt_weight: Literal["uniform", "rarity"] = "uniform"
    """How much each prompt's pairs count. uniform: as the strategy picks them. rarity: weight 1 - c/n for a prompt
    with c correct of its n usable samples, so prompts the policy rarely solves teach more than ones it nearly
    always solves (the cheapest pass@k-aware lever: those rare answers are what pass@k at large k keeps; cf. PKPO,
    Walder & Karkhanis 2025, arXiv:2505.15201). TRL's DPO has no per-pair loss weight, so the weight is applied as
    a count: a prompt's pairs are repeated or thinned to K * w / mean(w) of them (K: the strategy's count; the
    fraction by a seeded coin), which gives each pair that weight in expectation and keeps the round's total."""
    rehearsal: float = Field(0.0, ge=0, le=1)
    """Rehearsal samples per pair (0 = off; DPO only): correct samples of the base model (round 1's samples) for
    prompts every usable sample of this round already gets right, trained on with an NLL term (weight
    `train.rehearsal_coef`) beside the DPO loss. Such prompts give no pair, so DPO alone is free to narrow them to one
    answer; rehearsing the base model's own solutions keeps their mass where it was (the DPO analogue of DPH-RL's
    mass-covering term on solved prompts, arXiv:2509.07430). round(rehearsal * pairs) samples, one per prompt at most
    (a seeded choice of prompt and sample)."""
    seed: int = 0
    """Seeds the random choices; the same graded samples and seed give the same pairs."""
    keep_truncated: bool = True
    """Keep trajectories cut off by the budget (finish_reason length, context or max_turns) as rejected candidates
    (they are never chosen); false leaves them out of the pairs."""
    chosen_needs_marker: bool = False
    """A chosen sample must state its answer explicitly ('####' or \\boxed{}); one graded correct through the
    last-number fallback may only be left out (math tasks; code answers are programs)."""
    timeout_as_incorrect: bool = False
    """Count a "timeout" verdict as a wrong answer instead of leaving the sample out. Code timeouts already come
    graded incorrect (verify.code_timeout_is_incorrect), so this is about math timeouts: an answer the checker
    could not compare in time, which is why it is off by default."""


@dataclass
class PreferencePair:
    task_id: str
    prompt_token_ids: list[int]
    chosen: Trajectory
    rejected: Trajectory
    strategy: str

    def __post_init__(self) -> None:
        # Both completions must continue the very same prompt tokens, or the DPO log-ratios compare different contexts.
        for name, t in (("chosen", self.chosen), ("rejected", self.rejected)):
            if t.prompt_token_ids != self.prompt_token_ids:
                raise ValueError(f"pair for task {self.task_id}: the {name} trajectory (sample {t.sample}) has other "
                                 "prompt tokens than the pair; both completions must continue the same prompt")

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, "strategy": self.strategy, "prompt_token_ids": self.prompt_token_ids,
                "chosen": self.chosen.to_dict(), "rejected": self.rejected.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "PreferencePair":
        return cls(d["task_id"], d["prompt_token_ids"], Trajectory.from_dict(d["chosen"]),
                   Trajectory.from_dict(d["rejected"]), d["strategy"])


@dataclass
class PairStats:
    """Counts for one round; `to_dict` gives MLflow-ready numbers. Every prompt lands in exactly one of
    prompts_with_pairs (before any prompt weighting), prompts_all_correct, prompts_all_wrong and prompts_ungradeable."""

    prompts: int = 0
    prompts_with_pairs: int = 0
    prompts_all_correct: int = 0
    prompts_all_wrong: int = 0
    prompts_ungradeable: int = 0  # no usable sample left (all cut off, timed out or conflicting)
    samples: int = 0
    samples_used: int = 0  # samples that took part in the pairing (after the drops below)
    dropped_truncated: int = 0
    dropped_cut_off_correct: int = 0  # graded correct but cut off: not a finished answer, never chosen
    dropped_unmarked_correct: int = 0  # chosen_needs_marker: correct through the last-number fallback only
    dropped_ungradeable: int = 0
    dropped_duplicates: int = 0
    dropped_conflicting: int = 0  # identical completions graded differently (e.g. a flaky timeout)
    pairs: int = 0
    pairs_before_weighting: int | None = None  # with prompt_weight rarity: the strategy's count before the weighting
    chosen_model_tokens_mean: float | None = None  # None (left out of to_dict) when there is no pair to average
    rejected_model_tokens_mean: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None}


@dataclass
class _Usable:
    """The samples of one prompt that can be paired, split by verdict."""

    correct: list[Graded] = field(default_factory=list)
    wrong: list[Graded] = field(default_factory=list)


def _usable_samples(samples: list[Graded], cfg: PairsConfig, stats: PairStats) -> _Usable:
    kept: list[Graded] = []
    for g in samples:
        if g.trajectory.cut_off and not cfg.keep_truncated:
            stats.dropped_truncated += 1
        elif g.trajectory.cut_off and g.correct:
            stats.dropped_cut_off_correct += 1
        elif cfg.chosen_needs_marker and g.correct and is_fallback(g):
            stats.dropped_unmarked_correct += 1
        elif g.status == "timeout" and cfg.timeout_as_incorrect:
            kept.append(replace(g, status="incorrect", reason=f"verifier timeout counted as incorrect: {g.reason}"))
        elif not g.gradeable:
            stats.dropped_ungradeable += 1
        else:
            kept.append(g)
    # Exact duplicates would give pairs that repeat one completion; keep one of each. Duplicates graded
    # differently have no trustworthy verdict, so all copies go.
    groups: dict[tuple[int, ...], list[Graded]] = {}
    for g in kept:
        groups.setdefault(tuple(g.trajectory.completion_token_ids), []).append(g)
    out = _Usable()
    for group in groups.values():
        if len({g.correct for g in group}) > 1:
            stats.dropped_conflicting += len(group)
            continue
        stats.dropped_duplicates += len(group) - 1
        (out.correct if group[0].correct else out.wrong).append(group[0])
    stats.samples_used += len(out.correct) + len(out.wrong)
    return out


def is_fallback(g: Graded) -> bool:
    """Whether a math verdict's answer came from the last-number fallback (verifiers.math names its rule in the
    reason) rather than from an explicit '####' or \\boxed{}."""
    return any(f"found by rule {rule};" in g.reason for rule in ("last_number", "last_math"))


def _mean_logprob(g: Graded) -> float:
    t = g.trajectory
    if t.cumulative_logprob is None or not t.num_model_tokens:
        raise ValueError(f"pairs.by: logprob needs every sample's log-prob, but task {t.task_id} sample {t.sample} has "
                         f"{'none' if t.cumulative_logprob is None else 'no model token'}; use by: length")
    return t.cumulative_logprob / t.num_model_tokens


def _choose(u: _Usable, cfg: PairsConfig, rng: random.Random) -> list[tuple[Graded, Graded]]:
    if cfg.strategy == "random":
        return [(rng.choice(u.correct), rng.choice(u.wrong))]
    if cfg.strategy == "best_worst":
        if cfg.by == "length":
            # Ties (same length) go to the earlier sample, so the choice is deterministic.
            return [(min(u.correct, key=lambda g: g.trajectory.num_model_tokens),
                     max(u.wrong, key=lambda g: g.trajectory.num_model_tokens))]
        return [(min(u.correct, key=_mean_logprob), max(u.wrong, key=_mean_logprob))]
    combos = list(itertools.product(u.correct, u.wrong))
    if len(combos) > cfg.max_pairs_per_prompt:
        combos = rng.sample(combos, cfg.max_pairs_per_prompt)
    return combos


def _usable_by_task(graded: list[Graded], cfg: PairsConfig) -> tuple[dict[str, _Usable], PairStats]:
    by_task: dict[str, list[Graded]] = {}
    for g in graded:
        by_task.setdefault(g.trajectory.task_id, []).append(g)
    stats = PairStats(prompts=len(by_task), samples=len(graded))
    usable: dict[str, _Usable] = {}
    for task_id, samples in by_task.items():
        prompts = {tuple(g.trajectory.prompt_token_ids) for g in samples}
        if len(prompts) > 1:
            raise ValueError(f"task {task_id}: its {len(samples)} samples were generated from {len(prompts)} different "
                             "prompt token sequences; pairs need one prompt per task (were two rounds' samples mixed?)")
        # In sample order, so the (seeded) choices do not depend on the order of the input file.
        samples = sorted(samples, key=lambda g: g.trajectory.sample)
        u = usable[task_id] = _usable_samples(samples, cfg, stats)
        if not u.correct and not u.wrong:
            stats.prompts_ungradeable += 1
        elif not u.wrong:
            stats.prompts_all_correct += 1
        elif not u.correct:
            stats.prompts_all_wrong += 1
        else:
            stats.prompts_with_pairs += 1
    return usable, stats


def rarity_weight(u: _Usable) -> float:
    """1 - c/n: the share of a prompt's usable samples that are wrong."""
    return len(u.wrong) / (len(u.correct) + len(u.wrong))


def _weighted_counts(chosen: dict[str, list], usable: dict[str, _Usable], seed: int) -> dict[str, int]:
    """Pairs per prompt under rarity weighting: K_i * w_i / w_mean, where w_mean is the pair-weighted mean weight (so
    the total stays about sum K_i), its fraction rounded up with that probability (a coin seeded by prompt)."""
    weights = {t: rarity_weight(usable[t]) for t in chosen}
    total = sum(len(c) for c in chosen.values())
    mean = sum(len(c) * weights[t] for t, c in chosen.items()) / total
    counts = {}
    for t, c in chosen.items():
        target = len(c) * weights[t] / mean
        whole = int(target)
        counts[t] = whole + (random.Random(f"{seed}:{t}:weight").random() < target - whole)
    return counts


def build_pairs(graded: list[Graded], cfg: PairsConfig) -> tuple[list[PreferencePair], PairStats]:
    """Preference pairs for one round, in the order the tasks first appear, and the round's counts."""
    usable, stats = _usable_by_task(graded, cfg)
    # One generator per prompt, seeded by (seed, task): a prompt's pairs do not depend on the other prompts.
    chosen = {task_id: _choose(u, cfg, random.Random(f"{cfg.seed}:{task_id}"))
              for task_id, u in usable.items() if u.correct and u.wrong}
    if cfg.prompt_weight == "rarity" and chosen:
        stats.pairs_before_weighting = sum(len(c) for c in chosen.values())
        counts = _weighted_counts(chosen, usable, cfg.seed)
        # Repeating a pair gives it an integer weight in the loss; thinning keeps the first (seeded random) ones.
        chosen = {t: list(itertools.islice(itertools.cycle(c), counts[t])) for t, c in chosen.items()}
    pairs = [PreferencePair(task_id, list(c.trajectory.prompt_token_ids), c.trajectory, r.trajectory, cfg.strategy)
             for task_id, combos in chosen.items() for c, r in combos]
    stats.pairs = len(pairs)
    if pairs:
        stats.chosen_model_tokens_mean = sum(p.chosen.num_model_tokens for p in pairs) / len(pairs)
        stats.rejected_model_tokens_mean = sum(p.rejected.num_model_tokens for p in pairs) / len(pairs)
    return pairs, stats


def rehearsal_samples(graded: list[Graded], base: list[Graded], num_pairs: int, cfg: PairsConfig) -> list[Graded]:
    """`cfg.rehearsal` (see PairsConfig): base-model correct samples of the prompts this round solves every time.

    `graded` is this round's graded samples, `base` the base model's (round 1's; the same list in round 1). A
    prompt qualifies when it has usable samples this round and all of them are correct; its rehearsal sample is a
    usable correct base sample (the same drops as pairing: cut-off, ungradeable, conflicting), chosen by a coin
    seeded by (seed, task). At most round(rehearsal * num_pairs) prompts, a seeded random subset, in task order."""
    want = round(cfg.rehearsal * num_pairs)
    if want == 0:
        return []
    usable, _ = _usable_by_task(graded, cfg)
    solved = [t for t, u in usable.items() if u.correct and not u.wrong]
    base_usable, _ = _usable_by_task([g for g in base if g.trajectory.task_id in set(solved)], cfg)
    candidates = [t for t in solved if t in base_usable and base_usable[t].correct]
    for t in candidates:
        if base_usable[t].correct[0].trajectory.prompt_token_ids != usable[t].correct[0].trajectory.prompt_token_ids:
            raise ValueError(f"task {t}: the base model's samples were generated from other prompt tokens than this "
                             "round's; rehearsal needs the same prompts every round")
    picked = set(random.Random(f"{cfg.seed}:rehearsal").sample(candidates, min(want, len(candidates))))
    return [random.Random(f"{cfg.seed}:{t}:rehearsal").choice(base_usable[t].correct) for t in candidates if t in picked]


def select_samples(graded: list[Graded], cfg: PairsConfig) -> tuple[list[Graded], PairStats]:
    """The samples pairing would use (same drops as `build_pairs`, the same `_usable_by_task`), unpaired: the
    input of a KTO round, where each usable sample is an example of its own, desirable when correct. A verifier
    timeout kept by `timeout_as_incorrect` comes back graded "incorrect"."""
    usable, stats = _usable_by_task(graded, cfg)
    return [g for u in usable.values() for g in u.correct + u.wrong], stats


def save_pairs(path: str | Path, pairs: list[PreferencePair]) -> Path:
    """One JSON line per pair (written atomically); the trajectories keep their model/observation segments."""
    return write_jsonl(Path(path), (p.to_dict() for p in pairs))


def load_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pairs file at {path} (the round's 'pairs' stage writes it)")
    return [PreferencePair.from_dict(d) for d in read_jsonl(path)]


def rft_samples(graded: list[Graded], cfg: PairsConfig,
                pick: Literal["shortest", "random"] = "shortest") -> list[Graded]:
    """One correct sample per prompt, the data of an RFT round (train.algorithm: sft), in the order the tasks first
    appear; a prompt without a usable correct sample gives none. The same drops as pairing (`_usable_by_task`:
    ungradeable, conflicting, duplicates; cut-off unless `keep_truncated`). shortest: the fewest model-written tokens
    (ties: the earlier sample); random: a coin seeded by (seed, task), so a prompt's pick does not depend on the others.
    A cut-off sample is never picked, even with `keep_truncated`: like a pair's chosen side, an imitation target
    must be finished."""
    if pick not in ("shortest", "random"):
        raise ValueError(f"unknown RFT pick {pick!r} (train.sft_pick): use shortest or random")
    usable, _ = _usable_by_task(graded, cfg)
    picked = []
    for task_id, u in usable.items():
        correct = [g for g in u.correct if not g.trajectory.cut_off]
        if correct and pick == "shortest":
            picked.append(min(correct, key=lambda g: g.trajectory.num_model_tokens))
        elif correct:
            picked.append(random.Random(f"{cfg.seed}:{task_id}:rft").choice(correct))
    return picked
