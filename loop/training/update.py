"""One round's update of the LoRA adapter: multi-turn DPO on preference pairs (or KTO on graded samples, or RFT:
SFT on one correct sample per prompt).

TRL's DPOTrainer/KTOTrainer/SFTTrainer do the optimisation on a frozen base with a peft LoRA adapter. What this
module adds:
- token-space rows with tool observations masked out of the policy and reference log-probs (loop/training/batches.py);
  TRL 1.16's DPO/KTO trainers only take text datasets, so a two-line subclass (loop/training/trainers.py) skips their
  tokenisation step (`_prepare_dataset`), and the masked rows reach TRL's loss through its `data_collator` argument; its
  SFTTrainer takes token rows as they are and turns their `completion_mask` into the labels (-100 on prompt and
  observations);
- the reference policy: the base model (adapter disabled, TRL's default for a fresh adapter) or the previous
  round's adapter, loaded frozen as the "ref" adapter that TRL's DPO/KTO look for;
- the start point: the previous round's adapter weights (continue_adapter) or a fresh adapter. The two choices are
  independent: reference previous with a fresh start pulls the new adapter, starting from the base model, towards
  the previous round's policy (the same DPO/KTO optimum, pi_ref * exp(reward / beta), from farther away);
- a probe record (ratchet_probe.json): the trained model's log-probs of a training text, against which
  `loop.generation.adapter_check.check_adapter_applied` checks what vLLM serves;
- memory: the model and trainer are freed when the round ends (the flow trains every round in one process);
- a divergence guard: a non-finite loss, gradient norm or adapter weight stops the round, and the adapter is only
  written (atomically renamed into place) when training finished, so the previous adapter stays current.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loop.generation.adapter_check import PROBE_MAX_TOKENS, write_probe
from loop.pairs import PreferencePair
from loop.records import Graded, Trajectory
from loop.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    adapter_dir: Path
    metrics: dict[str, float]
    """Round summary, MLflow-ready keys under train/ (means over optimizer steps unless named otherwise)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """TRL's log of every optimizer step (loss, rewards/*, logps/*, grad_norm, ...)."""


def _use_bf16(cfg: TrainConfig) -> bool:
    from loop.models.hardware import native_bf16

    native = native_bf16()
    if cfg.bf16 is True and not native:
        log.warning("train.bf16 is true but this machine has no bf16 arithmetic (no AMX/AVX512-BF16 CPU, no bf16 "
                    "GPU): training will be many times slower than with train.bf16: native (fp32 here)")
    if cfg.bf16 is None:
        import torch

        return native and torch.cuda.is_available()
    return native if cfg.bf16 == "native" else cfg.bf16


def _check_adapter_dir(path: Path, what: str) -> None:
    if not (path / "adapter_config.json").is_file() or not any(
            (path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{what} {path} is not a saved peft adapter (adapter_config.json and "
                                "adapter_model.safetensors expected); pass the adapter folder a previous round wrote")


def _check_inputs(base_model_path: Path, data: list, cfg: TrainConfig, init_adapter: Path | None) -> None:
    """Everything that can be wrong with the inputs, checked before loading any weights."""
    from loop.training.batches import trajectories_of

    if not (base_model_path / "config.json").is_file():
        raise FileNotFoundError(f"base model {base_model_path} has no config.json (a Hugging Face model folder is "
                                "expected; loop.models.resolve.resolve_model gives one)")
    if not data:
        raise ValueError("nothing to train on: the round has no preference pairs / graded samples "
                         "(skip training for such rounds; the previous adapter stays current)")
    want = PreferencePair if cfg.algorithm == "dpo" else Graded
    if not all(isinstance(x, want) for x in data):
        raise TypeError(f"algorithm {cfg.algorithm} trains on {want.__name__} items (got "
                        f"{type(next(x for x in data if not isinstance(x, want))).__name__}); DPO takes "
                        "loop.pairs.build_pairs output, KTO the graded samples (loop.pairs.select_samples), SFT the "
                        "correct ones (loop.pairs.rft_samples)")
    if cfg.algorithm == "sft" and not all(g.correct for g in data):
        wrong = next(g for g in data if not g.correct)
        raise ValueError(f"algorithm sft imitates correct samples only, but task {wrong.trajectory.task_id} sample "
                         f"{wrong.trajectory.sample} is graded {wrong.status}; pass loop.pairs.rft_samples output")
    if cfg.max_length is not None:
        longest = max(len(t.prompt_token_ids) for t in trajectories_of(data))
        if longest >= cfg.max_length:
            raise ValueError(f"a prompt has {longest} tokens, which leaves no completion token within "
                             f"train.max_length = {cfg.max_length}; raise train.max_length")
    if init_adapter is not None:
        _check_adapter_dir(init_adapter, "previous adapter")
        prev = json.loads((init_adapter / "adapter_config.json").read_text())
        if cfg.continue_adapter and (prev.get("r"), prev.get("lora_alpha")) != (cfg.lora_r, cfg.lora_alpha):
            raise ValueError(f"cannot continue the adapter {init_adapter}: it has r={prev.get('r')}, "
                             f"lora_alpha={prev.get('lora_alpha')} but train asks r={cfg.lora_r}, "
                             f"lora_alpha={cfg.lora_alpha}; match them or set train.continue_adapter: false")


def _token_counts(trajs: list[Trajectory], max_length: int | None) -> dict[str, float]:
    """Per epoch: model tokens trained on, observation tokens masked, sequences cut at max_length."""
    model = masked = cut = 0
    for t in trajs:
        room = len(t.completion_mask) if max_length is None else max_length - len(t.prompt_token_ids)
        kept = t.completion_mask[:room]
        model += sum(kept)
        masked += len(kept) - sum(kept)
        cut += len(kept) < len(t.completion_mask)
    return {"train/model_tokens": float(model), "train/observation_tokens": float(masked),
            "train/truncated_sequences": float(cut)}


def _summarise(history: list[dict[str, float]], cfg: TrainConfig) -> dict[str, float]:
    """Means over the optimizer steps; a metric no step measured (e.g. KTO margins when no batch held both kinds)
    is left out rather than reported as NaN."""
    steps = [h for h in history if "loss" in h]
    per_step: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        per_step.setdefault(key, []).append(value)

    for h in steps:
        for ours, trl in (("loss", "loss"), ("grad_norm", "grad_norm"), ("reward_margin", "rewards/margins"),
                          ("reward_accuracy", "rewards/accuracies"), ("logps_chosen", "logps/chosen"),
                          ("logps_rejected", "logps/rejected"), ("kl", "kl"), ("rehearsal_nll", "rehearsal_nll"),
                          ("token_accuracy", "mean_token_accuracy"), ("entropy", "entropy")):
            if trl in h:
                add(ours, h[trl])
        # TRL logs rewards = beta * (policy - reference) log-probs, so the reference log-probs follow exactly.
        for side in ("chosen", "rejected"):
            if f"rewards/{side}" in h:
                add(f"ref_logps_{side}", h[f"logps/{side}"] - h[f"rewards/{side}"] / cfg.beta)
    if cfg.algorithm == "kto":
        per_step.pop("reward_accuracy", None)  # not logged by KTO; no pairs to rank
    m = {f"train/{k}": sum(v) / len(v) for k, v in per_step.items()}
    # Policy minus reference log-prob of the chosen and rejected completions: a chosen shift that falls below 0
    # while the margin grows is likelihood displacement (both sides pushed down, the rejected faster).
    for side in ("chosen", "rejected"):
        if f"train/logps_{side}" in m and f"train/ref_logps_{side}" in m:
            m[f"train/{side}_logp_shift"] = m[f"train/logps_{side}"] - m[f"train/ref_logps_{side}"]
    m.update({"train/loss_first": steps[0]["loss"], "train/loss_last": steps[-1]["loss"],
              "train/steps": float(len(steps))})
    return m


def train_round(base_model_path: str | Path, data: list[PreferencePair] | list[Graded], cfg: TrainConfig, *,
                init_adapter: Path | None = None, out_dir: Path, rehearsal: list[Trajectory] = (),
                callbacks: Sequence = ()) -> TrainResult:
    """Train the round's adapter and save it to `out_dir` (peft format, loadable by vLLM's LoRARequest).

    `init_adapter` is the previous round's adapter, the current policy (None in the first round): the start
    point when `cfg.continue_adapter`, the reference when `cfg.reference == "previous"`, unused otherwise. `data`
    is the round's preference pairs (DPO), graded samples (KTO: `loop.pairs.select_samples` output; samples
    without a verdict are left out) or one correct sample per prompt (SFT: `loop.pairs.rft_samples` output).
    `rehearsal` (DPO only): the trajectories of `loop.pairs.rehearsal_samples`, at most one per pair, trained on
    with an NLL term of weight `cfg.rehearsal_coef`. `callbacks`: extra transformers
    `TrainerCallback`s (e.g. bench/train_profile.py's phase timer). On failure nothing is written to `out_dir`.
    """
    # Imported here, not with the module: importing the stage (the flow imports train_round) must not pay for
    # torch, transformers, peft, TRL and datasets (~10 s).
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, KTOConfig, SFTConfig, SFTTrainer

    from loop.training.batches import (MaskedPreferenceCollator, MaskedUnpairedCollator, dpo_rows, kto_rows,
                                       sft_rows, trajectories_of)
    from loop.training.trainers import (StopOnNonFinite, TokenDPOTrainer, TokenKTOTrainer, cpu_lm_head,
                                        load_previous_weights)

    base_model_path, out_dir = Path(base_model_path), Path(out_dir)
    init_adapter = Path(init_adapter) if init_adapter is not None else None
    _check_inputs(base_model_path, data, cfg, init_adapter)
    extra: dict[str, float] = {}
    if cfg.algorithm == "kto":
        usable = [g for g in data if g.gradeable]
        extra["train/dropped_ungradeable"] = float(len(data) - len(usable))
        if not usable:
            raise ValueError("no graded sample has a verdict (all timed out or errored): nothing to train on")
        data = usable
    if rehearsal and cfg.algorithm != "dpo":
        raise ValueError(f"rehearsal samples are trained beside DPO pairs; with algorithm: {cfg.algorithm} set "
                         "pairs.rehearsal: 0")
    extra.update(_token_counts(trajectories_of(data), cfg.max_length))
    extra["train/examples"] = float(len(data))
    if rehearsal:
        extra["train/rehearsal_samples"] = float(len(rehearsal))
        extra["train/rehearsal_model_tokens"] = _token_counts(list(rehearsal), cfg.max_length)["train/model_tokens"]

    bf16 = _use_bf16(cfg)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id in the vocabulary will do
    model = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")

    scratch = Path(tempfile.mkdtemp(prefix="ratchet-train-"))
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    # CPU: TRL's fused LM head with cache-sized tiles, scoring only the labelled positions (loop/training/trainers.py).
    with contextlib.nullcontext() if torch.cuda.is_available() else cpu_lm_head():
        try:
            common = dict(output_dir=str(scratch), learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
                          per_device_train_batch_size=cfg.per_device_batch_size,
                          gradient_accumulation_steps=cfg.grad_accumulation, max_length=cfg.max_length,
                          gradient_checkpointing=cfg.gradient_checkpointing, bf16=bf16,
                          max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, data_seed=cfg.seed,
                          # Every step is logged (and checked by the guard); NaNs must reach the log unfiltered.
                          logging_steps=1, logging_nan_inf_filter=False, save_strategy="no", report_to="none",
                          disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0,
                          dataloader_pin_memory=torch.cuda.is_available(),
                          use_cpu=not torch.cuda.is_available())  # without it transformers refuses bf16 on CPU
            if cfg.algorithm == "dpo":
                losses, weights = [cfg.loss], [1.0]
                if cfg.nll_coef:
                    losses, weights = [cfg.loss, "sft"], [1.0, cfg.nll_coef]  # TRL's "sft" = NLL of chosen tokens
                divergence = {"f_divergence_type": cfg.divergence}
                if cfg.alpha_divergence_coef is not None:
                    divergence["f_alpha_divergence_coef"] = cfg.alpha_divergence_coef
                args = DPOConfig(loss_type=losses, loss_weights=weights, **divergence, beta=cfg.beta,
                                 disable_dropout=cfg.lora_dropout == 0, **common)
                collator = MaskedPreferenceCollator(tokenizer.pad_token_id, cfg.max_length)
                trainer_cls, rows = TokenDPOTrainer, dpo_rows(data, list(rehearsal))
                trainer_kwargs = {"rehearsal_coef": cfg.rehearsal_coef or 1.0}
            elif cfg.algorithm == "kto":
                args = KTOConfig(desirable_weight=cfg.kto_desirable_weight,
                                 undesirable_weight=cfg.kto_undesirable_weight, beta=cfg.beta,
                                 disable_dropout=cfg.lora_dropout == 0, train_sampling_strategy="sequential", **common)
                collator = MaskedUnpairedCollator(tokenizer.pad_token_id, cfg.max_length)
                trainer_cls, rows = TokenKTOTrainer, kto_rows(data, cfg.per_device_batch_size, cfg.seed)
                trainer_kwargs = {}
            else:
                # TRL's SFT on token rows: completion_only_loss turns each row's completion_mask into its labels, so
                # the loss is the mean NLL over the step's model-written tokens (TRL's collator pads the rows).
                args = SFTConfig(completion_only_loss=True, **common)
                collator, trainer_cls, rows, trainer_kwargs = None, SFTTrainer, sft_rows(data), {}
            trainer = trainer_cls(model=model, args=args, data_collator=collator, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer, peft_config=lora,
                                  callbacks=[StopOnNonFinite(cfg.lr), *callbacks],
                                  **trainer_kwargs)
            policy = trainer.model
            start = init_adapter if init_adapter is not None and cfg.continue_adapter else None
            reference = init_adapter if init_adapter is not None and cfg.reference == "previous" else None
            if start is not None:
                load_previous_weights(policy, start)
            if reference is not None:
                # TRL computes the reference with the adapter named "ref" when there is one, else with adapters off.
                policy.load_adapter(str(reference), adapter_name="ref", is_trainable=False)

            t0 = time.perf_counter()  # the reference precompute counts as training time: it replaces per-step forwards
            if cfg.algorithm == "dpo" and cfg.precompute_ref_log_probs is not False:
                trainer.precompute_reference(cfg.per_device_batch_size)
                extra["train/ref_precompute_s"] = time.perf_counter() - t0
            trainer.train()
            seconds = time.perf_counter() - t0

            policy.save_pretrained(partial, selected_adapters=["default"])
            policy.set_adapter("default")  # the saved adapter, not the "ref" copy
            first = trajectories_of(data)[0]  # a text the adapter was trained on: where it moves the log-probs most
            write_probe(policy, (first.prompt_token_ids + first.completion_token_ids)[-PROBE_MAX_TOKENS:], partial)
            history = [dict(h) for h in trainer.state.log_history]
            metrics = {**_summarise(history, cfg), **extra, "train/time_s": seconds,
                       "train/examples_per_s": len(rows) * cfg.epochs / seconds}
            logged_tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
            if logged_tokens:  # TRL's running count of tokens seen; left out if it logged none
                metrics.update({"train/tokens": float(max(logged_tokens)),
                                "train/tokens_per_s": max(logged_tokens) / seconds})
            (partial / "ratchet_train.json").write_text(json.dumps(
                {"config": cfg.model_dump(mode="json"), "base_model": str(base_model_path),
                 "init_adapter": str(init_adapter) if init_adapter else None,
                 "start_adapter": str(start) if start else None,
                 "reference_adapter": str(reference) if reference else None,
                 "metrics": metrics}, indent=1))
            _replace_dir(partial, out_dir)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            # The trainer, its optimizer and the model hold reference cycles (callbacks, accelerate's hooks): without a
            # collection they outlive the round, and the next round's model is loaded beside them.
            trainer = policy = model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return TrainResult(out_dir, metrics, history)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move `new` to `dest`; an existing `dest` (a re-run of the stage) is swapped out, never half-written."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)
