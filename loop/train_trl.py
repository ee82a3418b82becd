"""The parts of loop/train.py that subclass or call TRL, transformers and peft types: imported by `train_round`
only, so that loading a config (which imports loop/train.py for `TrainConfig`) imports none of them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import load_peft_weights, set_peft_model_state_dict
from transformers import TrainerCallback
from trl import DPOTrainer, KTOTrainer

from loop.train import TrainingDiverged


class StopOnNonFinite(TrainerCallback):
    """Raise at the first non-finite loss, gradient norm or adapter weight (checked every step)."""

    def __init__(self, lr: float):
        self.lr = lr

    def _fail(self, step: int, what: str) -> None:
        raise TrainingDiverged(f"training diverged at step {step}: {what}. No adapter was written; the previous "
                               f"adapter stays current. Lower train.lr (now {self.lr:g}) or check the pairs.")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                self._fail(state.global_step, f"{key} = {value}")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # A huge but finite step leaves weights that overflow only in the next forward, possibly next round's.
        for name, p in model.named_parameters():
            if p.requires_grad and not torch.isfinite(p).all():
                self._fail(state.global_step, f"adapter weight {name} is not finite")


class TokenDPOTrainer(DPOTrainer):
    """TRL's DPO on token-space rows, plus the rehearsal term (pairs.rehearsal): the mean NLL of the batch's
    rehearsal sequences' model tokens, times `rehearsal_coef`, added to TRL's loss; the same form as TRL's own "sft"
    term (loss_type "sft"), on sequences outside the pairs."""

    def __init__(self, *args, rehearsal_coef: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rehearsal_coef = rehearsal_coef

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # rows are token ids already (dpo_rows); TRL would re-tokenise text here

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rehearsal = {k[len("rehearsal_"):]: inputs.pop(k) for k in list(inputs) if k.startswith("rehearsal_")}
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not rehearsal:
            return result
        mask = rehearsal["completion_mask"]
        labels = rehearsal["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=rehearsal["input_ids"], attention_mask=rehearsal["attention_mask"], labels=labels,
                    use_cache=False, fused_lm_head=True)
        shift_mask = mask[..., 1:]
        nll = -out.log_probs[:, -shift_mask.size(1):][shift_mask.bool()].mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rehearsal_nll"].append(self.accelerator.gather_for_metrics(nll.detach()).mean().item())
        if return_outputs:
            loss, outputs = result
            return loss + self.rehearsal_coef * nll, outputs
        return result + self.rehearsal_coef * nll


class TokenKTOTrainer(KTOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # rows are token ids with their KL completions already (kto_rows)


def load_previous_weights(model, init_adapter: Path) -> None:
    """Copy the previous round's LoRA weights into the fresh "default" adapter TRL created."""
    result = set_peft_model_state_dict(model, load_peft_weights(str(init_adapter)), adapter_name="default")
    missing = [k for k in result.missing_keys if ".default." in k and "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"the previous adapter {init_adapter} does not fit this LoRA config "
                         f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected weights, e.g. "
                         f"{(missing + list(result.unexpected_keys))[0]}); match train.target_modules to it "
                         "or set train.continue_adapter: false")
