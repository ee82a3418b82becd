"""The adapter check: does vLLM serve a LoRA adapter as the trainer that wrote it had it?

The trainer records its log-probs of a short probe text beside the adapter (`write_probe`, ratchet_probe.json);
`check_adapter_applied` scores the same tokens in vLLM with and without the adapter and compares the shifts. Nothing
here imports vLLM: the engine is passed in (it needs `model_path`, `tokenizer` and `prompt_logprobs`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from loop.weights import model_weight_shapes, tensor_shapes


class AdapterNotApplied(RuntimeError):
    pass


def check_adapter_applied(engine, adapter: Path, adapter_id: int) -> "AdapterCheck":
    """Stop with AdapterNotApplied unless `engine` (a loop.engine.VLLMEngine) serves `adapter` (as LoRA id
    `adapter_id`) as its trainer had it.

    vLLM silently ignores adapter weights whose module names do not match the model (vllm#34186), so first
    every adapted module must exist in the base model. Then the equality check: vLLM's log-probs of a probe
    text, with and without the adapter, against the trainer's peft model on the same text (the adapter's
    ratchet_probe.json, written by train_round from the in-memory model it saved). The adapter's shift
    (adapter minus base, per token) must match within `adapter_tolerance`; a stale copy (vLLM still serving
    an older adapter under this id), a partial one (weights missing) or a mis-scaled one (r or lora_alpha
    changed in adapter_config.json after training) does not. An adapter without a record (not written by
    the loop) is compared with peft's reading of the same folder, computed here on CPU: that catches vLLM
    serving it wrongly, not a folder edited after training.
    """
    adapter = Path(adapter)
    base_keys = _weight_names(Path(engine.model_path))
    lora_modules = _adapter_modules(adapter)
    if base_keys is not None:
        missing = sorted(m for m in lora_modules if f"{m}.weight" not in base_keys)
        if missing:
            raise AdapterNotApplied(
                f"adapter {adapter} targets modules the model {engine.model_path} does not have "
                f"(e.g. {missing[:3]}); vLLM would silently serve the base model. Was it trained on another model?")
    record, reference = read_probe(adapter), "trainer"
    if record is None:
        ids = engine.tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
        record, reference = _peft_probe(engine.model_path, adapter, ids), "peft"
    ids = record["token_ids"]
    check = compare_probe(adapter, reference, engine.prompt_logprobs(ids),
                          engine.prompt_logprobs(ids, adapter, adapter_id), record["base_logprobs"],
                          record["adapter_logprobs"])
    if check.noise > BASE_MISMATCH_LIMIT:
        raise AdapterNotApplied(
            f"adapter {adapter}: vLLM's base model {engine.model_path} gives the probe text log-probs "
            f"{check.noise:.3f} nats/token away from the model the adapter was trained on (limit "
            f"{BASE_MISMATCH_LIMIT}); the adapter belongs to another base model")
    if check.error > check.tolerance:
        raise AdapterNotApplied(
            f"adapter {adapter} (LoRA id {adapter_id}): vLLM's log-prob shift of the probe text differs from the "
            f"{'trainer' if reference == 'trainer' else 'peft model'}'s by {check.error:.4f} nats/token, over the "
            f"tolerance {check.tolerance:.4f} (vLLM shift {check.shift:.4f}, expected {check.expected_shift:.4f}, "
            f"over {check.tokens} tokens). The served adapter is not the trained one: stale (vLLM still serves an "
            "older adapter under this LoRA id), partial (weights missing from adapter_model.safetensors) or "
            "mis-scaled (r or lora_alpha in adapter_config.json changed after training)")
    return check



PROBE_FILE = "ratchet_probe.json"
"""The trainer's log-probs of a probe text, beside the adapter it wrote (see write_probe)."""
PROBE_MAX_TOKENS = 128
_PROBE_TEXT = ("Question: Tom has 12 apples and buys 30 more. How many apples does he have now?\n"
               "Answer: He has 12 + 30 = 42 apples. The answer is 42.")
BASE_MISMATCH_LIMIT = 0.25
"""Mean |vLLM base - trainer base| log-prob per probe token above which the base models are not the same
(bf16 vLLM against the fp32 trainer measured 0.022 on SmolLM2-135M; fp32 against fp32, 3e-6)."""


def adapter_tolerance(expected_shift: float, noise: float) -> float:
    """How far (mean nats/token) vLLM's shift may be from the trainer's: 10% of the trainer's shift, plus three
    times the numerical difference of the two implementations on the base model (`noise`, measured on the same
    probe), plus 0.005. The shift's error adds the noise of two forwards (with and without the adapter), about
    1.4 times `noise`. Measured on SmolLM2-135M with random-B adapters: bf16 vLLM errs by 0.025-0.033 against an
    fp32 trainer (noise 0.022), fp32 vLLM by < 1e-4; doubling lora_alpha errs by about the whole shift. So in bf16
    a mis-scaled adapter is caught when its shift is well above ~3x the noise (0.07 nats/token there); adapters
    that move the probe less (one tiny round: ~0.04) pass either way. With engine.dtype float32 the noise is
    ~1e-5 and the check is tight."""
    return 0.1 * expected_shift + 3 * noise + 0.005


@dataclass
class AdapterCheck:
    adapter: Path
    reference: str
    """trainer: the adapter's ratchet_probe.json; peft: computed in this process from the adapter folder."""
    tokens: int
    shift: float
    """Mean |log-prob with the adapter - without| per probe token, under vLLM."""
    expected_shift: float
    """The same under the reference."""
    error: float
    """Mean |vLLM shift - reference shift| per token."""
    noise: float
    """Mean |vLLM base - reference base| per token: how far the two implementations differ numerically."""
    tolerance: float


def _mean_abs(xs) -> float:
    xs = list(xs)
    return sum(abs(x) for x in xs) / len(xs)


def compare_probe(adapter: Path, reference: str, vllm_base: list[float], vllm_adapter: list[float],
                  ref_base: list[float], ref_adapter: list[float]) -> AdapterCheck:
    n = len(ref_base)
    if not (n and len(vllm_base) == len(vllm_adapter) == len(ref_adapter) == n):
        raise AdapterNotApplied(f"adapter {adapter}: probe log-probs of different lengths (vLLM {len(vllm_base)}/"
                                f"{len(vllm_adapter)}, reference {n}/{len(ref_adapter)})")
    values = [*vllm_base, *vllm_adapter, *ref_base, *ref_adapter]
    if not all(math.isfinite(v) for v in values):
        raise AdapterNotApplied(f"adapter {adapter}: a probe log-prob is not finite; the adapter or the engine "
                                "produces NaN/inf")
    dv = [a - b for a, b in zip(vllm_adapter, vllm_base)]
    dr = [a - b for a, b in zip(ref_adapter, ref_base)]
    expected, noise = _mean_abs(dr), _mean_abs(a - b for a, b in zip(vllm_base, ref_base))
    return AdapterCheck(adapter, reference, n, _mean_abs(dv), expected, _mean_abs(a - b for a, b in zip(dv, dr)),
                        noise, adapter_tolerance(expected, noise))


def probe_logprobs(model, token_ids: list[int]) -> tuple[list[float], list[float]]:
    """Log-probs of `token_ids` (each after the ones before) under a peft model: with its active adapter, and
    with adapters disabled (the base model)."""
    import torch

    was_training = model.training
    model.eval()
    x = torch.tensor([list(token_ids)], device=model.device)

    def logprobs() -> list[float]:
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
        return lp.gather(-1, x[0, 1:, None])[:, 0].tolist()

    try:
        with torch.no_grad():
            tuned = logprobs()
            with model.disable_adapter():
                base = logprobs()
    finally:
        model.train(was_training)
    return base, tuned


def write_probe(model, token_ids: list[int], adapter_dir: Path) -> Path:
    """Record `model`'s probe log-probs beside its saved adapter, for `check_adapter_applied`. Keep the
    probe short (PROBE_MAX_TOKENS): vLLM scores it twice per check."""
    token_ids = list(token_ids)
    if not 2 <= len(token_ids) <= PROBE_MAX_TOKENS:
        raise ValueError(f"a probe has 2 to {PROBE_MAX_TOKENS} tokens (got {len(token_ids)})")
    base, tuned = probe_logprobs(model, token_ids)
    path = Path(adapter_dir) / PROBE_FILE
    path.write_text(json.dumps({"token_ids": token_ids, "base_logprobs": base, "adapter_logprobs": tuned,
                                "dtype": str(next(model.parameters()).dtype), "device": str(model.device)}))
    return path


def read_probe(adapter: Path) -> dict | None:
    path = Path(adapter) / PROBE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ids = record.get("token_ids")
    if not (isinstance(ids, list) and len(ids) >= 2 and all(isinstance(t, int) for t in ids)
            and all(len(record.get(k) or []) == len(ids) - 1 for k in ("base_logprobs", "adapter_logprobs"))):
        raise AdapterNotApplied(f"{path} is not a probe record (token_ids and one base and adapter log-prob per "
                                "token after the first expected); re-train the adapter or delete the file")
    return record


def _peft_probe(model_path: str, adapter: Path, token_ids: list[int]) -> dict:
    """The probe record of an adapter folder as peft reads it, on CPU in fp32 (for adapters without a record)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      str(adapter))
    base, tuned = probe_logprobs(model, token_ids)
    return {"token_ids": list(token_ids), "base_logprobs": base, "adapter_logprobs": tuned}


def _weight_names(model_dir: Path) -> set[str] | None:
    """Parameter names of a local model folder (None for a hub id: nothing to check against)."""
    shapes = model_weight_shapes(model_dir)
    return None if shapes is None else set(shapes)


def _adapter_modules(adapter: Path) -> set[str]:
    """Module names a peft adapter adapts (peft's base_model.model. prefix removed)."""
    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        raise AdapterNotApplied(f"{adapter} has no adapter_model.safetensors (not a peft LoRA adapter folder)")
    return {k.removeprefix("base_model.model.").split(".lora_A")[0] for k in tensor_shapes(f) if ".lora_A" in k}
