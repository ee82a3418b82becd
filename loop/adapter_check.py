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

from loop.weights import model_weight_shapes, tensor_shapes

log = logging.getLogger(__name__)


class AdapterNotApplied(RuntimeError):
    pass


def check_adapter_applied(engine, adapter: Path, adapter_id: int,
                          uninformative: Literal["stop", "warn"] | None = None) -> "AdapterCheck":
    """Stop with AdapterNotApplied unless `engine` (a loop.engine.VLLMEngine) serves `adapter` (as LoRA id
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
    (`direction`). With engine.dtype float32 the noise is tiny and the tolerance tight (bench/RESULTS.md has the
    measured noise)."""
    return 0.1 * expected_shift + 3 * noise + 0.005


DECISION_Z = 4.0
"""How many standard errors separate "served" from "not served" before the check decides (see `compare_probe`)."""
MIN_PROBE_TOKENS = 8
"""Fewer probe log-probs than this cannot estimate the direction's noise: the check is uninformative."""


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
    along: float = 1.0
    """vLLM's per-token shift projected on the reference's, as a fraction of it (least squares through 0): about 1
    when vLLM serves the adapter, about 0 when it serves the base model under the adapter's name."""
    along_se: float = 0.0
    """Standard error of `along`, from the per-token scatter of vLLM's shift around along x the reference's."""
    informative: bool = True
    """The probe separates served (along 1) from not served (along 0) by DECISION_Z standard errors either way."""


def _mean_abs(xs) -> float:
    xs = list(xs)
    return sum(abs(x) for x in xs) / len(xs)


def direction(dv: list[float], dr: list[float]) -> tuple[float, float]:
    """(along, its standard error): the least-squares fit dv = along x dr over the probe's tokens. A vLLM that does
    not apply the adapter has dv ~ 0 whatever dr is, so along ~ 0 even when the shift is as small as the numerical
    noise per token: the fit pools every token, which the mean-error tolerance cannot. The standard error comes
    from the fit's own residuals (the noise of vLLM's shift around the reference's), not from an assumed noise."""
    n, ss = len(dr), sum(r * r for r in dr)
    if ss == 0.0:
        return 0.0, math.inf
    along = sum(v * r for v, r in zip(dv, dr)) / ss
    residual = sum((v - along * r) ** 2 for v, r in zip(dv, dr)) / max(n - 1, 1)
    return along, math.sqrt(residual / ss)


def compare_probe(adapter: Path, reference: str, vllm_base: list[float], vllm_adapter: list[float],
                  ref_base: list[float], ref_adapter: list[float], *, adapter_id: int | None = None,
                  model: str | None = None, uninformative: Literal["stop", "warn"] = "stop") -> AdapterCheck:
    """Decide from the probe's log-probs (vLLM's and the reference's, each with and without the adapter) whether
    vLLM serves the adapter as the reference had it; AdapterNotApplied for every refusal, in this order:
    - log-probs of different lengths or not finite;
    - the base models differ (mean |vLLM base - reference base| over BASE_MISMATCH_LIMIT);
    - vLLM's shift is not the reference's (mean error over `adapter_tolerance`): stale, partial or mis-scaled;
    - the probe cannot tell served from not served (`direction`'s standard error over 0.5 / DECISION_Z, or fewer
      than MIN_PROBE_TOKENS tokens): refused unless `uninformative` is warn, which returns the check with
      informative false. A small shift in bf16 passes the tolerance whether or not vLLM applies it, so the
      tolerance alone cannot be the evidence that it does;
    - vLLM's shift does not follow the reference's (along < 0.5): vLLM serves (about) the base model.
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
    expected, noise = _mean_abs(dr), _mean_abs(a - b for a, b in zip(vllm_base, ref_base))
    along, se = direction(dv, dr)
    check = AdapterCheck(adapter, reference, n, _mean_abs(dv), expected, _mean_abs(a - b for a, b in zip(dv, dr)),
                         noise, adapter_tolerance(expected, noise), along, se,
                         informative=n >= MIN_PROBE_TOKENS and DECISION_Z * se <= 0.5)
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
    if not check.informative:
        if uninformative == "stop":
            raise AdapterNotApplied(_uninformative_message(check, adapter_id) + "; set "
                                    "engine.adapter_check_uninformative: warn to go on with a warning instead")
        return check
    if along < 0.5:
        raise AdapterNotApplied(
            f"{named}: vLLM does not serve the adapter: its log-prob shift of the probe text follows the {source}'s "
            f"at {along:.2f} +- {se:.2f} of it per token (1 when served, 0 when not; vLLM shift {check.shift:.4f}, "
            f"expected {expected:.4f} nats/token over {n} tokens). vLLM answers under the adapter's name with "
            "(about) the base model: e.g. a LoRA lost after the engine's sleep/wake_up, or an adapter whose weights "
            "it did not load; restart the engine (rerun the same run id) and check vLLM's log for LoRA errors")
    return check


def _uninformative_message(check: AdapterCheck, adapter_id: int | None) -> str:
    named = f"adapter {check.adapter}" + (f" (LoRA id {adapter_id})" if adapter_id is not None else "")
    why = (f"only {check.tokens} probe tokens" if check.tokens < MIN_PROBE_TOKENS else
           f"its shift of the probe text ({check.expected_shift:.4f} nats/token in the {check.reference}) is "
           f"too small against the numerical noise: vLLM's shift follows it at {check.along:.2f} +- "
           f"{check.along_se:.2f} of it, which cannot separate 1 (served) from 0 (not served) by "
           f"{DECISION_Z:g} standard errors")
    return (f"{named}: the adapter check cannot tell whether vLLM serves the adapter: {why}. With engine.dtype: "
            "float32 the noise is ~1e-5 and any trained adapter is decided")


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
