"""The parts of loop/training/update.py that subclass or call TRL, transformers and peft types: imported by
`train_round` only, so that importing the stage (the flow imports `train_round`) imports none of them."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import load_peft_weights, set_peft_model_state_dict
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import DPOTrainer, KTOTrainer

from loop.training.config import TrainingDiverged


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


# TRL's fused LM head (trl.kernels.chunked_logprob) tiles the logits as TOKEN_CHUNK_SIZE tokens x chunk_size vocabulary
# entries, sized for GPU (4096 x 32768, a 512 MB fp32 tile); its torch fallback, used on CPU, passes over each tile
# several times, so on CPU a tile that fits in cache runs near the matmul's speed. Off Triton devices TRL also
# projects every position, prompt and padding included; the compact path scores only the labelled positions, with the
# same result (zeros elsewhere). Measured in bench/train_profile.py and bench/RESULTS.md.
CPU_LM_HEAD: dict[str, int] | None = {"token_tile": 1024, "vocab_tile": 8192}
"""The CPU tiles of the fused LM head; None leaves TRL's (GPU-sized) tiles and its score-every-position path."""


@contextlib.contextmanager
def cpu_lm_head() -> Iterator[None]:
    """Within the block, TRL's fused LM head on CPU uses `CPU_LM_HEAD` tiles and scores only labelled positions."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as trl_utils

    if CPU_LM_HEAD is None:
        yield
        return
    saved = kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton
    on_triton = saved[2]
    kernel.TOKEN_CHUNK_SIZE = CPU_LM_HEAD["token_tile"]
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = CPU_LM_HEAD["vocab_tile"]
    # trl.trainer.utils reads `_use_triton` only to choose the compact path; the kernel keeps its own binding (torch
    # ops on CPU).
    trl_utils._use_triton = lambda device: device.type == "cpu" or on_triton(device)
    try:
        yield
    finally:
        kernel.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl_utils._use_triton = saved


class TokenDPOTrainer(DPOTrainer):
    """TRL's DPO on token-space rows, plus the rehearsal term (pairs.rehearsal): the mean NLL of the batch's
    rehearsal sequences' model tokens, times `rehearsal_coef`, added to TRL's loss; the same form as TRL's own "sft"
    term (loss_type "sft"), on sequences outside the pairs."""

    def __init__(self, *args, rehearsal_coef: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.rehearsal_coef = rehearsal_coef

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # rows are token ids already (dpo_rows); TRL would re-tokenise text here

    def precompute_reference(self, batch_size: int) -> None:
        """The reference log-probs of every training row, once, before training (TRL's precompute_ref_log_probs),
        instead of a reference forward in every step of every epoch. Called after the "ref" adapter is loaded:
        TRL's own precompute runs inside its constructor, before the caller can load one. TRL's loop, without its
        cache file: for an in-memory dataset `datasets` names that file at random in a per-process temporary
        folder, so under data-parallel training the other ranks look for a file only rank 0 wrote. Here every rank
        gathers every row's values (in dataset order) and adds them as columns."""
        loader = self.accelerator.prepare(DataLoader(
            self.train_dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory))
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(self.model, batch))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        self.train_dataset = self.train_dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist()) \
            .add_column("ref_rejected_logps", torch.cat(rejected).tolist())
        self.precompute_ref_logps = True

    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if not k.startswith("rehearsal_")}
        return super().compute_ref_log_probs(model, inputs)

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
