"""The training stage's torch-free types: its config model (the `train:` section) and its divergence error.

loop/config.py imports `TrainConfig` from here, and loop/training/trainers.py (TRL's side) raises `TrainingDiverged`,
which loop/training/update.py's callers catch; neither module has to import the other for them, and loading a
config imports none of torch, transformers, peft or TRL.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["dpo", "kto", "sft"] = "dpo"
    """dpo: preference pairs (M-DPO); kto: every usable graded sample, desirable when correct (multi-turn KTO);
    sft: rejection-sampling fine-tuning (RFT, Yuan et al. 2023, arXiv:2308.01825), the mean NLL of the model-written
    tokens of one correct sample per prompt (`sft_pick`), with no reference model: the baseline that DPO's pairs
    should beat."""
    sft_pick: Literal["shortest", "random"] | None = None
    """sft only: which correct sample of a prompt is trained on (loop.pairs.rft_samples). shortest: the fewest
    model-written tokens (ties: the earlier sample); random: a coin seeded by pairs.seed and the task. None:
    shortest."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss: sigmoid (Rafailov et al. 2023) or ipo (Azar et al. 2023; TRL normalises it per model token)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference policy (IPO: its tau); sft has no reference and ignores it."""
    nll_coef: float = Field(0.0, ge=0)
    """Weight of an NLL term on the chosen completions' model tokens (RPO, Pang et al. 2024); 0 = off. DPO only."""
    divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """The f-divergence that DPO's implicit reward regularises with (f-DPO, Wang et al. 2023, arXiv:2309.16240;
    TRL's `f_divergence_type`). reverse_kl is standard DPO and mode-seeking; forward_kl and js_divergence are more
    mass-covering, which f-DPO finds keeps more diversity at some cost in reward. DPO only."""
    alpha_divergence_coef: float | None = Field(None, gt=0)
    """alpha of alpha_divergence (TRL's `f_alpha_divergence_coef`; None: TRL's 0.5); only with that divergence."""
    rehearsal_coef: float | None = Field(None, gt=0)
    """Weight of the NLL term on the rehearsal samples (pairs.rehearsal); None: 1.0. Set it only with rehearsal on."""
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate of the LoRA weights (LoRA needs ~10x the full fine-tuning rate)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the round's pairs (or samples)."""
    per_device_batch_size: int = Field(4, ge=1)
    """Pairs (DPO) or samples (KTO, SFT) per forward pass; KTO needs >= 2 (its KL estimate uses the other samples)."""
    grad_accumulation: int = Field(1, ge=1)
    """Forward passes per optimizer step (the step sees per_device_batch_size x grad_accumulation examples)."""
    max_length: int | None = Field(2048, ge=2)
    """Prompt + completion tokens kept per sequence (the end is cut); None: no limit."""
    precompute_ref_log_probs: bool | None = None
    """Compute the reference log-probs of every pair once, before training (TRL's option), instead of a reference
    forward in every step of every epoch: the reference is fixed within a round, so the loss is the same and each
    epoch after the first saves a forward pass. None: on for DPO; KTO computes its reference (and KL term) per step."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~25% slower; for long sequences or big models."""
    bf16: bool | Literal["native"] | None = None
    """bf16 weights and autocast. None: on a CUDA GPU with bf16, fp32 on CPU (bf16 LoRA training on CPU has not been
    compared with fp32 on a loop's results). native: wherever the hardware computes bf16 (also a CPU with AMX or
    AVX512-BF16; loop/models/hardware.py), fp32 elsewhere, where bf16 is emulated and many times slower."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank (engine.max_lora_rank must be at least this)."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """0 keeps the policy and reference forwards comparable (TRL disables dropout for that reason)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get LoRA weights; all-linear: every linear layer but the LM head (vLLM serves all of them)."""
    reference: Literal["base", "previous"] = "base"
    """pi_ref: the base model (adapter disabled, pi_0) or the previous round's adapter, frozen (the base in the
    first round, which has no previous adapter)."""
    continue_adapter: bool = True
    """Start from the previous round's adapter weights instead of a fresh (zero-effect) adapter. Independent of
    `reference`."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """KTO's weight of correct (desirable) samples; see kto_undesirable_weight."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """KTO loss weights; the KTO paper advises weight x count to be similar for both kinds (ratio 1 to 4/3)."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this norm."""
    seed: int = 0
    """Seeds the adapter's initialisation and the order of the examples."""

    @model_validator(mode="after")
    def _check_combination(self) -> "TrainConfig":
        if self.algorithm == "kto" and self.per_device_batch_size < 2:
            raise ValueError("KTO estimates its KL term from the other samples of a batch: "
                             "set per_device_batch_size >= 2")
        if self.algorithm != "dpo" and (self.loss != "sigmoid" or self.nll_coef or self.divergence != "reverse_kl"
                                        or self.precompute_ref_log_probs):
            raise ValueError(f"loss, nll_coef, divergence and precompute_ref_log_probs are DPO options; with "
                             f"algorithm: {self.algorithm} leave them at their defaults")
        if self.algorithm == "sft" and self.reference != "base":
            raise ValueError("algorithm: sft trains without a reference model; remove train.reference (or set it to "
                             "base) or use algorithm: dpo / kto")
        if self.sft_pick is not None and self.algorithm != "sft":
            raise ValueError(f"train.sft_pick chooses the samples of algorithm: sft (algorithm is {self.algorithm}); "
                             "remove it or set algorithm: sft")
        if self.alpha_divergence_coef is not None and self.divergence != "alpha_divergence":
            raise ValueError(f"train.alpha_divergence_coef applies to divergence: alpha_divergence only (divergence is "
                             f"{self.divergence}); remove it or set divergence: alpha_divergence")
        return self


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient norm or adapter weight stopped the round (loop/training/trainers.py
    StopOnNonFinite); no adapter was written, so the previous one stays current."""
