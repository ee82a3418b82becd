"""Token-space training rows and batches for TRL's DPO, KTO and SFT trainers, with tool observations masked.

TRL scores a token only where the batch's `completion_mask` is 1 (its label is -100 elsewhere), for the policy
and the reference alike. TRL's own collators set that mask to "every token after the prompt"; these set it from
the trajectory's segments instead: 1 for model-written tokens, 0 for the prompt and for tool observations. The
observations stay in the input, as context for the turns after them. This is the multi-turn masking of M-DPO
(Xiong et al. 2024, "Building Math Agents with Multi-Turn Iterative Preference Learning", arXiv:2409.02392): the
environment's tokens are not the policy's actions, so they cancel out of the policy/reference log-ratio.

Rows hold the exact token ids the sampler produced (no re-tokenisation of text).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from loop.pairs import PreferencePair
from loop.records import Graded, Trajectory


def dpo_rows(pairs: list[PreferencePair], rehearsal: list[Trajectory] = ()) -> list[dict[str, list[int] | None]]:
    """One row per pair; the i-th rehearsal trajectory (pairs.rehearsal) rides on the i-th pair's row, so every
    batch holds at least one pair and the rehearsal share of each epoch is exact (the trainer shuffles rows)."""
    if len(rehearsal) > len(pairs):
        raise ValueError(f"{len(rehearsal)} rehearsal samples for {len(pairs)} pairs: at most one per pair "
                         "(pairs.rehearsal <= 1)")
    rows = [{"prompt_ids": p.prompt_token_ids,
             "chosen_ids": p.chosen.completion_token_ids, "chosen_mask": p.chosen.completion_mask,
             "rejected_ids": p.rejected.completion_token_ids, "rejected_mask": p.rejected.completion_mask,
             "rehearsal_prompt_ids": None, "rehearsal_ids": None, "rehearsal_mask": None}
            for p in pairs]
    for row, t in zip(rows, rehearsal):
        row.update(rehearsal_prompt_ids=t.prompt_token_ids, rehearsal_ids=t.completion_token_ids,
                   rehearsal_mask=t.completion_mask)
    return rows


def kto_rows(samples: list[Graded], batch_size: int, seed: int) -> list[dict[str, Any]]:
    """One row per sample (desirable when correct), shuffled, each with the mismatched completion that TRL's KTO
    uses to estimate its KL term: within each block of `batch_size` rows, the previous row's completion (TRL's own
    rotation, which its `_prepare_dataset` would do on text). Shuffling first keeps neighbours from sharing a
    prompt, which would make the "mismatched" completion an answer to the same question. Train with sequential
    sampling so the blocks stay the batches."""
    samples = list(samples)
    random.Random(seed).shuffle(samples)
    rows = [{"prompt_ids": g.trajectory.prompt_token_ids, "completion_ids": g.trajectory.completion_token_ids,
             "completion_mask": g.trajectory.completion_mask, "label": g.correct} for g in samples]
    for start in range(0, len(rows), batch_size):
        block = rows[start:start + batch_size]
        for row, other in zip(block, block[-1:] + block[:-1]):
            row["KL_completion_ids"] = other["completion_ids"]
            row["KL_completion_mask"] = other["completion_mask"]
    return rows


def sft_rows(samples: list[Graded]) -> list[dict[str, list[int]]]:
    """One row per sample in the form TRL's SFTTrainer takes as already tokenised: the whole sequence and its
    `completion_mask` (0 on the prompt and the observations), which TRL turns into the labels (-100 where 0) when
    `completion_only_loss` is on, truncates to `max_length` (keeping the start) and pads with its own collator."""
    return [{"input_ids": g.trajectory.prompt_token_ids + g.trajectory.completion_token_ids,
             "completion_mask": [0] * len(g.trajectory.prompt_token_ids) + g.trajectory.completion_mask}
            for g in samples]


def trajectories_of(data: list[PreferencePair] | list[Graded]) -> list[Trajectory]:
    if data and isinstance(data[0], PreferencePair):
        return [t for p in data for t in (p.chosen, p.rejected)]
    return [g.trajectory for g in data]


def _batch(prompts: list[list[int]], completions: list[list[int]], masks: list[list[int]], pad_token_id: int,
           max_length: int | None, pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    ids = [p + c for p, c in zip(prompts, completions)]
    completion_mask = [[0] * len(p) + m for p, m in zip(prompts, masks)]
    if max_length is not None:  # keep the start, as TRL does: the prompt must stay whole
        ids = [x[:max_length] for x in ids]
        completion_mask = [m[:max_length] for m in completion_mask]

    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        return pad([torch.tensor(r, dtype=torch.long) for r in rows], padding_value=value, padding_side="right",
                   pad_to_multiple_of=pad_to_multiple_of)

    return {"input_ids": padded(ids, pad_token_id), "attention_mask": padded([[1] * len(x) for x in ids], 0),
            "completion_mask": padded(completion_mask, 0)}


@dataclass
class MaskedPreferenceCollator(DataCollatorMixin):
    """Drop-in for TRL's DataCollatorForPreference on `dpo_rows`: the same layout (all chosen sequences, then all
    rejected ones) with observation tokens masked."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        side = [(ex["prompt_ids"], ex[f"{k}_ids"], ex[f"{k}_mask"]) for k in ("chosen", "rejected") for ex in examples]
        prompts, completions, masks = (list(x) for x in zip(*side))
        out = _batch(prompts, completions, masks, self.pad_token_id, self.max_length, self.pad_to_multiple_of)
        rehearsal = [ex for ex in examples if ex.get("rehearsal_ids") is not None]
        if rehearsal:  # their own sequences, read by TokenDPOTrainer.compute_loss (rehearsal_ keys)
            batch = _batch([ex["rehearsal_prompt_ids"] for ex in rehearsal], [ex["rehearsal_ids"] for ex in rehearsal],
                           [ex["rehearsal_mask"] for ex in rehearsal], self.pad_token_id, self.max_length,
                           self.pad_to_multiple_of)
            out.update({f"rehearsal_{k}": v for k, v in batch.items()})
        for key in ("ref_chosen_logps", "ref_rejected_logps"):  # TRL's precomputed reference, when it is on
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples])
        return out


@dataclass
class MaskedUnpairedCollator(DataCollatorMixin):
    """Drop-in for TRL's DataCollatorForUnpairedPreference on `kto_rows`, with observation tokens masked in both
    the matched and the KL (mismatched) sequences."""

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [ex["prompt_ids"] for ex in examples]
        out = _batch(prompts, [ex["completion_ids"] for ex in examples], [ex["completion_mask"] for ex in examples],
                     self.pad_token_id, self.max_length, self.pad_to_multiple_of)
        if "KL_completion_ids" in examples[0]:
            kl = _batch(prompts, [ex["KL_completion_ids"] for ex in examples],
                        [ex["KL_completion_mask"] for ex in examples],
                        self.pad_token_id, self.max_length, self.pad_to_multiple_of)
            out.update({f"KL_{k}": v for k, v in kl.items()})
        out["label"] = torch.tensor([ex["label"] for ex in examples])
        return out
