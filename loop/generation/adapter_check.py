"""The adapter check: does vLLM serve a LoRA adapter as the trainer that wrote it had it?

The trainer records its log-probs of a short probe text beside the adapter (`write_probe`, ratchet_probe.json);
`check_adapter_applied` scores the same tokens in vLLM with and without the adapter and compares the shifts;
`compare_probe`, a pure function, decides. It fails closed: vLLM's shift must match the trainer's within a tolerance
and follow it token by token, and when the numerical noise (bf16) hides whether it does, the check refuses as
uninformative unless engine.adapter_check_uninformative says warn. Nothing here imports vLLM: the engine is passed
in (it needs `model_path`, `tokenizer` and `prompt_logprobs`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loop.models.weights import model_weight_shapes, tensor_shapes

log = logging.getLogger(__name__)


class AdapterNotApplied(RuntimeError):
    pass


def check_adapter_applied(engine, adapter: Path, adapter_id: int,
                          uninformative: Literal["stop", "warn"] | None = None) -> "AdapterCheck":
    """Stop with AdapterNotApplied unless `engine` (a loop.generation.engine.VLLMEngine) serves `adapter` (as LoRA id
    `adapter_id`) as its trainer had it.

    vLLM silently ignores adapter weights whose module names do not match the model (vllm#34186), so first
    every adapted module must exist in the base model. Then the equality check: vLLM's log-probs of a probe
    text, with and without the adapter, against the trainer's peft model on the same text (the adapter's
    ratchet_probe.json, written by train_round from the in-memory model it saved); `compare_probe` decides. An
    adapter without a record (not written by the loop) is compared with peft's reading of the same folder, computed
    here on CPU: that catches vLLM serving it wrongly, not a folder edited after training.

    `uninformative` (default: the engine's `adapter_check_uninformative`, else stop): what to do when the probe
    cannot tell whether vLLM serves the adapter; warn logs it and returns the check (`informative` false).
    """
    if uninformative is None:
        uninformative = getattr(getattr(engine, "cfg", None), "adapter_check_uninformative", "stop")
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
                          record["adapter_logprobs"], adapter_id=adapter_id, model=engine.model_path,
                          uninformative=uninformative)
    if not check.informative:
        log.warning(_uninformative_message(check, adapter_id) + " (engine.adapter_check_uninformative: warn, so the "
                    "round goes on)")
    return check


PROBE_FILE = "ratchet_probe.json"
"""The trainer's log-probs of a probe text, beside the adapter it wrote (see write_probe)."""
PROBE_MAX_TOKENS = 128
_PROBE_TEXT = ("Question: Tom has 12 apples and buys 30 more. How many apples does he have now?\n"
               "Answer: He has 12 + 30 = 42 apples. The answer is 42.")
BASE_MISMATCH_LIMIT = 0.25
"""Mean |vLLM base - trainer base| log-prob per probe token above which the base models are not the same: an order
of magnitude above what bf16 against fp32 differs by on the same model (bench/RESULTS.md)."""


def adapter_tolerance(expected_shift: float, noise: float) -> float:
    """How far (mean nats/token) vLLM's shift may be from the trainer's: 10% of the trainer's shift, plus three
    times the numerical difference of the two implementations on the base model (`noise`, measured on the same
    probe), plus 0.005. The shift's error adds the noise of two forwards (with and without the adapter). So in bf16
    a mis-scaled adapter is caught only when its shift is well above ~3x the noise, and an adapter that moves the
    probe by less passes this tolerance even when vLLM does not apply it at all (its error is then the whole
    shift): `compare_probe` therefore also asks that vLLM's shift follow the trainer's token by token
    (`agreement`). With engine.dtype float32 the noise is tiny and the tolerance tight (bench/RESULTS.md has the
    measured noise)."""
    return 0.1 * expected_shift + 3 * noise + 0.005


DECISION_Z = 4.0
"""How many standard errors above 0 the agreement of vLLM's per-token shift with the reference's must be."""
MIN_PROBE_TOKENS = 8
"""Fewer probe log-probs than this cannot show agreement: the check is uninformative."""
ZERO_SHIFT = 0.1
"""vLLM's shift counts as none when its size (root mean square) is below this share of the base models'
numerical difference: below what the two implementations differ by, so vLLM does not apply the adapter."""


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
    agreement: float = 1.0
    """Cosine of vLLM's per-token shift with the reference's: near 1 when vLLM serves the adapter, about 0 (within
    1/sqrt(tokens)) when its shift is unrelated noise."""
    agreement_z: float = math.inf
    """`agreement` in standard errors above 0 (Fisher's z)."""
    informative: bool = True
    """The agreement is at least DECISION_Z standard errors above 0: vLLM's shift follows the reference's."""


def _mean_abs(xs) -> float:
    xs = list(xs)
    return sum(abs(x) for x in xs) / len(xs)


def _rms(xs) -> float:
    xs = list(xs)
    return math.sqrt(sum(x * x for x in xs) / len(xs))


def agreement(dv: list[float], dr: list[float]) -> tuple[float, float]:
    """(cosine, z) of vLLM's per-token shift `dv` with the reference's `dr`. A vLLM that does not apply the adapter
    shifts by its own numerical noise, unrelated to dr: the cosine is then about 0, within 1/sqrt(n). Noise on either
    side (bf16 in vLLM or in the trainer) lowers the cosine but cannot make unrelated shifts agree, so z, the cosine
    in standard errors (Fisher's atanh(r) sqrt(n - 3)), is evidence that vLLM applies the adapter however small its
    shift, given enough tokens. (A regression slope would not do: noise in the reference's shift biases it to 0.)"""
    sv, sr = sum(v * v for v in dv), sum(r * r for r in dr)
    if sv == 0.0 or sr == 0.0:
        return 0.0, 0.0
    r = max(-0.999999, min(0.999999, sum(v * r for v, r in zip(dv, dr)) / math.sqrt(sv * sr)))
    return r, math.atanh(r) * math.sqrt(max(len(dr) - 3, 0))


def compare_probe(adapter: Path, reference: str, vllm_base: list[float], vllm_adapter: list[float],
                  ref_base: list[float], ref_adapter: list[float], *, adapter_id: int | None = None,
                  model: str | None = None, uninformative: Literal["stop", "warn"] = "stop") -> AdapterCheck:
    """Decide from the probe's log-probs (vLLM's and the reference's, each with and without the adapter) whether
    vLLM serves the adapter as the reference had it; AdapterNotApplied for every refusal, in this order:
    - log-probs of different lengths or not finite;
    - the base models differ (mean |vLLM base - reference base| over BASE_MISMATCH_LIMIT);
    - vLLM's shift is not the reference's (mean error over `adapter_tolerance`): stale, partial or mis-scaled;
    - vLLM's shift does not follow the reference's token by token (`agreement` under DECISION_Z standard errors):
      refused as not served when vLLM's shift is below ZERO_SHIFT of the implementations' difference (it answers
      with the base model), else as uninformative (the shift is too small against the noise to tell), which
      `uninformative="warn"` turns into a returned check with informative false. A small shift in bf16 passes the
      tolerance whether or not vLLM applies it, so the tolerance alone is no evidence that it does.
    """
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
    diff = [a - b for a, b in zip(vllm_base, ref_base)]
    expected, noise = _mean_abs(dr), _mean_abs(diff)
    r, z = agreement(dv, dr)
    check = AdapterCheck(adapter, reference, n, _mean_abs(dv), expected, _mean_abs(a - b for a, b in zip(dv, dr)),
                         noise, adapter_tolerance(expected, noise), r, z,
                         informative=n >= MIN_PROBE_TOKENS and z >= DECISION_Z)
    named = f"adapter {adapter}" + (f" (LoRA id {adapter_id})" if adapter_id is not None else "")
    source = "trainer" if reference == "trainer" else "peft model"
    if noise > BASE_MISMATCH_LIMIT:
        raise AdapterNotApplied(
            f"adapter {adapter}: vLLM's base model{f' {model}' if model else ''} gives the probe text log-probs "
            f"{noise:.3f} nats/token away from the model the adapter was trained on (limit "
            f"{BASE_MISMATCH_LIMIT}); the adapter belongs to another base model")
    if check.error > check.tolerance:
        raise AdapterNotApplied(
            f"{named}: vLLM's log-prob shift of the probe text differs from the {source}'s by {check.error:.4f} "
            f"nats/token, over the tolerance {check.tolerance:.4f} (vLLM shift {check.shift:.4f}, expected "
            f"{expected:.4f}, over {n} tokens). The served adapter is not the trained one: stale (vLLM still serves "
            "an older adapter under this LoRA id), partial (weights missing from adapter_model.safetensors) or "
            "mis-scaled (r or lora_alpha in adapter_config.json changed after training)")
    if check.informative:
        return check
    if expected > 0 and _rms(dv) <= ZERO_SHIFT * _rms(diff):
        raise AdapterNotApplied(
            f"{named}: vLLM does not serve the adapter: its log-prob shift of the probe text is {check.shift:.2g} "
            f"nats/token, below what vLLM and the {source} differ by on the base model ({noise:.2g}), where the "
            f"{source}'s is {expected:.4f} over {n} tokens. vLLM answers under the adapter's name with the base "
            "model: e.g. a LoRA lost after the engine's sleep/wake_up, or an adapter whose weights it did not load; "
            "restart the engine (rerun the same run id) and check vLLM's log for LoRA errors")
    if uninformative == "stop":
        raise AdapterNotApplied(_uninformative_message(check, adapter_id) + "; set "
                                "engine.adapter_check_uninformative: warn to go on with a warning instead")
    return check


def _uninformative_message(check: AdapterCheck, adapter_id: int | None) -> str:
    named = f"adapter {check.adapter}" + (f" (LoRA id {adapter_id})" if adapter_id is not None else "")
    why = (f"only {check.tokens} probe tokens" if check.tokens < MIN_PROBE_TOKENS else
           f"its shift of the probe text ({check.expected_shift:.4f} nats/token in the {check.reference}, "
           f"{check.shift:.4f} in vLLM) is too small against the numerical noise ({check.noise:.4f}): vLLM's shift "
           f"agrees with it at cosine {check.agreement:.2f}, {check.agreement_z:.1f} standard errors above none "
           f"(needed: {DECISION_Z:g})")
    return (f"{named}: the adapter check cannot tell whether vLLM serves the adapter: {why}. With engine.dtype: "
            "float32 (and the trainer in fp32) the noise is tiny and any trained adapter is decided")


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
