"""The peak memory of a CPU training step, estimated from the config and the model's shapes before a loop starts.

A batch that cannot fit is refused at start (preflight and the flow's start-up checks, through loop/config.py
`check_model`), not found by the kernel's OOM killer after the first round's sampling. The estimate is an upper
bound for the configured sizes: every sequence of a micro-batch as long as the longest the loop can produce
(train.max_length, itself bounded by engine.max_model_len), which a real batch reaches when one sample runs to
its token budget, since the batch is padded to its longest sequence.

What it counts (fp32, or bf16 where training runs in bf16):
- the weights, once (a LoRA reference is the same weights with the adapter off);
- the activations autograd keeps for the backward: per token and layer about 4 x intermediate + 10 x hidden
  values (the MLP's gate, up and activation outputs, the norms' inputs, q/k/v and the attention output), or, with
  gradient checkpointing, each layer's input plus one layer's activations recomputed at a time. Measured on
  Qwen2.5-0.5B: 2.56-2.75 MiB per token without checkpointing, against 2.6 from this count (bench/RESULTS.md);
- the runtime (torch, tokenizer, the process): RUNTIME_BYTES.
On CPU the vLLM engine shares the machine's memory: its KV cache and a copy of the weights are set aside. On a GPU
the same count is the trainer's GPU memory (its CUDA runtime instead of the process's), against what vLLM leaves:
asleep (sleep mode level 1), its weights are in CPU memory and its KV cache is freed, but its CUDA context, the
memory pools of its CUDA graphs and its allocator's residue stay (ENGINE_ASLEEP_BYTES); awake, it holds its
gpu_memory_utilization share of the GPU. LoRA's optimizer state and gradients are not counted (a few MiB).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import psutil

from loop.models.weights import model_weight_shapes

GIB = 2 ** 30
RUNTIME_BYTES = int(1.5 * GIB)
ENGINE_RUNTIME_BYTES = 1 * GIB
GPU_RUNTIME_BYTES = int(1.5 * GIB)
"""The trainer's CUDA context, cuBLAS workspaces and the caching allocator's rounding, on the GPU."""
ENGINE_ASLEEP_BYTES = 2 * GIB
"""What a sleeping vLLM engine keeps on the GPU: its process's CUDA context, CUDA-graph pools and allocator residue
(an estimate to be replaced by the device check's measurement, scripts/gpu-check)."""
MARGIN = 1.15
"""Allocator fragmentation and the backward's temporaries, over the count above."""


@dataclass
class TrainMemory:
    weights: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return round((self.weights + self.activations + self.runtime) * MARGIN)


def activation_bytes_per_token(model_config: dict, bytes_per_value: int, gradient_checkpointing: bool) -> int:
    text = model_config.get("text_config", model_config)
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    inter = text.get("intermediate_size") or 4 * hidden
    layer = (4 * inter + 10 * hidden) * bytes_per_value
    if gradient_checkpointing:
        return layers * hidden * bytes_per_value + layer
    return layers * layer


def estimate(model_dir: Path, *, sequences: int, seq_len: int, bytes_per_value: int,
             gradient_checkpointing: bool, runtime: int = RUNTIME_BYTES) -> TrainMemory | None:
    """None when the model folder has no config.json or safetensors weights to read (a hub id not yet on disk)."""
    shapes = model_weight_shapes(model_dir)
    config = Path(model_dir) / "config.json"
    if shapes is None or not config.is_file():
        return None
    model_config = json.loads(config.read_text())
    params = _params(shapes, model_config)
    per_token = activation_bytes_per_token(model_config, bytes_per_value, gradient_checkpointing)
    return TrainMemory(weights=params * bytes_per_value, activations=sequences * seq_len * per_token,
                       runtime=runtime)


def engine_bytes(model_dir: Path, kv_cache_bytes: int, bytes_per_value: int) -> int:
    config = Path(model_dir) / "config.json"
    params = _params(model_weight_shapes(model_dir) or {}, json.loads(config.read_text()) if config.is_file() else {})
    return kv_cache_bytes + params * bytes_per_value + ENGINE_RUNTIME_BYTES


def engine_gpu_bytes(gpu_total: int, gpu_memory_utilization: float, asleep: bool) -> int:
    """GPU memory the vLLM engine holds while training runs: asleep, what sleep mode keeps; awake, its share."""
    return ENGINE_ASLEEP_BYTES if asleep else round(gpu_total * gpu_memory_utilization)


def available_bytes() -> int:
    return psutil.virtual_memory().available


def _params(shapes: dict[str, list[int]], model_config: dict) -> int:
    """Parameters held in memory: a tied LM head saved beside the embeddings shares their storage."""
    tied = model_config.get("tie_word_embeddings", False)
    return sum(_numel(s) for name, s in shapes.items() if not (tied and name.endswith("lm_head.weight")))


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
