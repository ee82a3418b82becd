"""On-policy generation with vLLM: n samples per task, LoRA adapters hot-loaded, tool turns in a sandbox.

One `vllm.LLM` is started per process and reused for every round; each round's adapter is served per
request with `LoRARequest(name, int_id, path)` (no merge, no engine restart). Trajectories are built in
token space: every turn sends the exact token ids so far (prompt + model turns + observations) and keeps
which spans the model wrote, so training can mask the observations without re-tokenising anything.

Tool use: when a turn ends with a complete ```python block, the code runs in that trajectory's sandbox
`Session` (definitions persist across its cells) and the output is appended as a ```output block; the
model then continues. All live trajectories of a round go through the engine together, turn by turn, and
each turn's tool calls run concurrently.

Seeds: every sampled request has its own seed, `sample_seed(sampling seed, round, task id, sample, turn)`, on
every device, so the draws differ between rounds, samples and turns and do not depend on how vLLM batches the
requests: re-running a round (a resumed run id) samples the same tokens, as far as the engine's numerics repeat
(the same machine and vLLM build; tests/test_generate.py checks it on CPU). On CPU, chunked prefill is off: a
seeded request whose prefill is split over steps makes vLLM rewind its generator, which CPU generators cannot do
("CPU Generator does not use offset" kills the engine). Without chunking a prompt is prefilled in one step
(measured on 2 cores: the same throughput, 192-200 vs 182-188 tok/s with chunking and unseeded requests). vLLM
logs that disabling chunked prefill is not officially supported for the model; for these decoder-only models
the tests (batches past one step's token budget, tool turns, adapters) pass with it off.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loop.records import Segment, Trajectory
from loop.tasks.base import Task
from loop.weights import model_weight_shapes, tensor_shapes

TOOL_SYSTEM_PROMPT = (
    "You can run Python: write a ```python code block and stop; its printed output will be shown to you in a "
    "```output block, and you can continue. Give the final answer as the instructions ask.")
_PY_BLOCK_AT_END = re.compile(r"```python[ \t]*\n(.*?)```\s*$", re.S)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_model_len: int = Field(2048, ge=64)
    """Prompt + all turns + observations; a trajectory that would exceed it ends with finish_reason 'context'."""
    dtype: str = "bfloat16"
    seed: int = 0
    """vLLM's engine seed (its default generator); sampled requests carry their own seeds (see SamplingConfig.seed)."""
    max_lora_rank: int = Field(16, ge=1)
    """Must be >= the training config's lora_r, and one of the ranks vLLM accepts (VLLM_LORA_RANKS)."""
    max_loras: int = Field(1, ge=1)
    kv_cache_memory_bytes: int = Field(2 << 30, ge=1 << 24)
    """KV cache size on CPU (vLLM-CPU needs it explicitly)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Share of GPU memory vLLM may take (training shares the GPU with it)."""
    enforce_eager: bool = False
    enable_sleep_mode: bool = False
    """GPU only: free vLLM's memory while training runs (sleep/wake)."""
    cpu_threads: Literal["all", "vllm"] = "all"
    """CPU only. all: vLLM's OpenMP threads run on every CPU this process may use, none reserved for its scheduler;
    vllm: vLLM's own binding (one CPU reserved per engine, one logical CPU per physical core). `all` was faster on
    the 2-core machine (bench/cpu_binding.py, bench/RESULTS.md). VLLM_CPU_OMP_THREADS_BIND or
    VLLM_CPU_NUM_OF_RESERVED_CPU set in the environment win over either."""


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    """Per model turn."""
    seed: int = 0
    """Every sampled request's seed derives from it, the round, the task, the sample and the turn (`sample_seed`)."""
    tools: bool = False
    """Multi-turn tool-integrated reasoning: run the model's ```python blocks and show it the output."""
    max_turns: int = Field(4, ge=1)
    """Tool calls per trajectory; a trajectory that asks for one more ends with finish_reason 'max_turns'."""
    observation_max_chars: int = Field(1024, ge=16)
    tool_timeout_s: float = Field(10.0, gt=0)
    system_prompt: str | None = None
    """None: none for plain chain of thought, TOOL_SYSTEM_PROMPT when tools are on."""

    def greedy(self) -> "SamplingConfig":
        return self.model_copy(update={"n": 1, "temperature": 0.0, "top_p": 1.0})


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


def sample_seed(seed: int, round: int, task_id: str, sample: int, turn: int) -> int:
    """The seed of one sampled request: sample `sample` of task `task_id`, model turn `turn` (0 = the first) of
    round `round`, under the sampling seed `seed`. A hash (blake2b), so it is the same in every process and on
    every machine, and distinct for every combination; 63 bits, which vLLM's generators take as is."""
    key = json.dumps([seed, round, task_id, sample, turn]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


class AdapterNotApplied(RuntimeError):
    pass


class _Live:
    """A trajectory being generated, with its sandbox session (opened at its first tool call)."""

    def __init__(self, traj: Trajectory, cfg: SamplingConfig, round: int):
        self.traj = traj
        self.cfg = cfg
        self.round = round
        self.session = None
        self.turn_text = ""  # model text since the last observation

    @property
    def ids(self) -> list[int]:
        return self.traj.prompt_token_ids + self.traj.completion_token_ids

    def seed(self) -> int | None:
        """This request's seed: the next model turn is the trajectory's n-th model segment (greedy: none)."""
        if self.cfg.temperature == 0:
            return None
        turn = sum(s.kind == "model" for s in self.traj.segments)
        return sample_seed(self.cfg.seed, self.round, self.traj.task_id, self.traj.sample, turn)


class Policy:
    def __init__(self, model_path: str | Path, cfg: EngineConfig):
        import torch
        from vllm import LLM

        self.cfg = cfg
        kwargs = dict(model=str(model_path), enable_lora=True, max_lora_rank=cfg.max_lora_rank,
                      max_loras=cfg.max_loras, max_model_len=cfg.max_model_len, dtype=cfg.dtype, seed=cfg.seed,
                      enforce_eager=cfg.enforce_eager)
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode)
        else:
            # Seeded requests need a generator vLLM can rewind when chunked prefill discards a sampled token; CPU
            # generators cannot, so on CPU prompts are prefilled whole (see the module docstring).
            kwargs.update(kv_cache_memory_bytes=cfg.kv_cache_memory_bytes, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(cfg.max_model_len, _CPU_BATCHED_TOKENS))
            apply_cpu_binding(cfg.cpu_threads)
        self.model_path = str(model_path)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._adapters: dict[int, str] = {}

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    # --- requests -------------------------------------------------------------------------------------
    def _lora(self, adapter: Path | None, adapter_id: int | None):
        from vllm.lora.request import LoRARequest

        if adapter is None:
            return None
        if adapter_id is None or adapter_id < 1:
            raise ValueError("an adapter needs a LoRA id >= 1 (one per distinct adapter, e.g. its round)")
        path = str(Path(adapter).resolve())
        if self._adapters.setdefault(adapter_id, path) != path:
            raise ValueError(f"LoRA id {adapter_id} already serves {self._adapters[adapter_id]}; give {path} a new id")
        return LoRARequest(f"adapter-{adapter_id}", adapter_id, path)

    def prompt_ids(self, task: Task, cfg: SamplingConfig) -> list[int]:
        system = cfg.system_prompt if cfg.system_prompt is not None else (TOOL_SYSTEM_PROMPT if cfg.tools else None)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": task.prompt}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, tasks: list[Task], cfg: SamplingConfig, *, round: int, adapter: Path | None = None,
                 adapter_id: int | None = None) -> list[Trajectory]:
        """n trajectories per task, in task order then sample order; `round` enters every request's seed."""
        [trajs] = self.generate_many([(tasks, cfg)], round=round, adapter=adapter, adapter_id=adapter_id)
        return trajs

    def generate_many(self, jobs: list[tuple[list[Task], SamplingConfig]], *, round: int,
                      adapter: Path | None = None, adapter_id: int | None = None) -> list[list[Trajectory]]:
        """Several `generate` calls in one pass through the engine (e.g. sampled and greedy evaluation).

        One batch keeps the engine full: separate calls each end in a tail where a few long answers decode
        alone, which on CPU runs at a fraction of the batched speed."""
        lora = self._lora(adapter, adapter_id)
        sets = []
        for tasks, cfg in jobs:
            lives = []
            for task in tasks:
                ids = self.prompt_ids(task, cfg)
                lives += [_Live(Trajectory(task.id, s, ids, cumulative_logprob=0.0), cfg, round) for s in range(cfg.n)]
            sets.append(lives)
        self._run([lv for lives in sets for lv in lives], lora)
        return [[lv.traj for lv in lives] for lives in sets]

    def continue_trajectories(self, trajectories: list[Trajectory], cfg: SamplingConfig, *, round: int,
                              adapter: Path | None = None, adapter_id: int | None = None) -> list[Trajectory]:
        """Go on from partial trajectories (e.g. a prefix ending in a ```python block, which runs first);
        returned in the order given. Each keeps its cumulative log-prob: None (a prefix not sampled here)
        stays None."""
        live = []
        for t in trajectories:
            lv = _Live(Trajectory.from_dict(t.to_dict()), cfg, round)
            after_obs = [s for s in lv.traj.segments[self._last_obs(lv.traj) + 1:] if s.kind == "model"]
            lv.turn_text = "".join(s.text for s in after_obs)
            live.append(lv)
        self._run(live, self._lora(adapter, adapter_id))
        return [lv.traj for lv in live]

    @staticmethod
    def _last_obs(t: Trajectory) -> int:
        return max((i for i, s in enumerate(t.segments) if s.kind == "observation"), default=-1)

    def _run(self, live: list[_Live], lora) -> None:
        """Generate every trajectory in `live` to its end, in place; each follows its own SamplingConfig."""
        from vllm import SamplingParams, TokensPrompt

        everyone = list(live)
        try:
            # Trajectories handed in ending with a Python block run it before generating.
            calls = [(lv, code) for lv in live if lv.cfg.tools and (code := self._pending_code(lv)) is not None]
            live = [lv for lv in live if lv.traj.finish_reason != "max_turns" and all(lv is not c[0] for c in calls)]
            while live or calls:
                if calls:
                    self._execute(calls)
                    live += [lv for lv, _ in calls]
                    calls = []
                requests, params, active = [], [], []
                for lv in live:
                    cfg = lv.cfg
                    budget = min(cfg.max_tokens, self.cfg.max_model_len - len(lv.ids))
                    if budget < 1:
                        lv.traj.finish_reason = "context"
                        continue
                    requests.append(TokensPrompt(prompt_token_ids=lv.ids))
                    params.append(SamplingParams(
                        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget, logprobs=0, seed=lv.seed(),
                        # Stop at the end of a fenced block so a ```python cell can run before the model goes on.
                        stop=["```\n", "```output"] if cfg.tools else None,
                        include_stop_str_in_output=True))
                    active.append(lv)
                live = []
                if not active:
                    break
                outs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=len(active) > 8)
                for lv, out in zip(active, outs):
                    c = out.outputs[0]
                    ids = list(c.token_ids)
                    text = self.tokenizer.decode(ids)
                    lp = c.cumulative_logprob
                    if lp is None or not math.isfinite(lp):
                        raise RuntimeError(f"vLLM returned the log-prob {lp} for task {lv.traj.task_id} sample "
                                           f"{lv.traj.sample} ({len(ids)} tokens); a sampled turn needs a finite "
                                           "log-prob (requested with logprobs=0)")
                    lv.traj.segments.append(Segment("model", text, ids))
                    if lv.traj.cumulative_logprob is not None:
                        lv.traj.cumulative_logprob += lp
                    lv.turn_text += text
                    if c.finish_reason == "length":
                        # Cut by max_tokens, or by the context window when that was the tighter budget.
                        lv.traj.finish_reason = "context" if len(lv.ids) >= self.cfg.max_model_len else "length"
                    elif lv.cfg.tools and isinstance(c.stop_reason, str):
                        code = self._pending_code(lv)
                        if code is not None:
                            calls.append((lv, code))
                        elif lv.traj.finish_reason != "max_turns":
                            live.append(lv)  # a non-Python block closed: let the model go on
                    else:
                        lv.traj.finish_reason = "stop"
        finally:
            for lv in everyone:
                if lv.session is not None:
                    lv.session.close()

    @staticmethod
    def _pending_code(lv: _Live) -> str | None:
        """The code of a ```python block that ends the current model turn; None if there is none, or
        if the tool budget is spent (then the trajectory ends with finish_reason 'max_turns')."""
        m = _PY_BLOCK_AT_END.search(lv.turn_text)
        if m is None:
            return None
        if lv.traj.num_tool_calls >= lv.cfg.max_turns:
            lv.traj.finish_reason = "max_turns"
            return None
        return m.group(1)

    def _execute(self, calls: list[tuple[_Live, str]]) -> None:
        with ThreadPoolExecutor(max_workers=min(16, len(calls))) as ex:
            observations = list(ex.map(lambda a: self._run_tool(a[0], a[1]), calls))
        for (lv, _), obs in zip(calls, observations):
            obs_ids = self.tokenizer(obs, add_special_tokens=False)["input_ids"]
            lv.traj.segments.append(Segment("observation", obs, obs_ids))
            lv.traj.num_tool_calls += 1
            lv.turn_text = ""

    def _run_tool(self, lv: _Live, code: str) -> str:
        from verifiers.python_exec import Session

        cfg = lv.cfg
        if lv.session is None:
            lv.session = Session(timeout_s=cfg.tool_timeout_s)
        r = lv.session.run(code, timeout_s=cfg.tool_timeout_s)
        body = r.stdout if r.status == "ok" else (r.stdout + r.stderr).strip() or r.status
        if r.status == "timeout":
            body += f"\n(timed out after {cfg.tool_timeout_s:g} s)"
        if len(body) > cfg.observation_max_chars:
            body = body[: cfg.observation_max_chars] + "\n... (output truncated)"
        return f"```output\n{body.rstrip()}\n```\n"

    # --- the adapter check -----------------------------------------------------------------------------
    def prompt_logprobs(self, token_ids: list[int], adapter: Path | None = None,
                        adapter_id: int | None = None) -> list[float]:
        """vLLM's log-prob of every token of `token_ids` after the ones before it (len(token_ids) - 1 values)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        [out] = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params,
                                  lora_request=self._lora(adapter, adapter_id), use_tqdm=False)
        return [pos[t].logprob for pos, t in zip(out.prompt_logprobs[1:], token_ids[1:])]

    def check_adapter_applied(self, adapter: Path, adapter_id: int) -> "AdapterCheck":
        """Stop with AdapterNotApplied unless vLLM serves `adapter` (as LoRA id `adapter_id`) as its trainer had it.

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
        base_keys = _weight_names(Path(self.model_path))
        lora_modules = _adapter_modules(adapter)
        if base_keys is not None:
            missing = sorted(m for m in lora_modules if f"{m}.weight" not in base_keys)
            if missing:
                raise AdapterNotApplied(
                    f"adapter {adapter} targets modules the model {self.model_path} does not have "
                    f"(e.g. {missing[:3]}); vLLM would silently serve the base model. Was it trained on another model?")
        record, reference = read_probe(adapter), "trainer"
        if record is None:
            ids = self.tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
            record, reference = _peft_probe(self.model_path, adapter, ids), "peft"
        ids = record["token_ids"]
        check = compare_probe(adapter, reference, self.prompt_logprobs(ids), self.prompt_logprobs(ids, adapter, adapter_id),
                              record["base_logprobs"], record["adapter_logprobs"])
        if check.noise > BASE_MISMATCH_LIMIT:
            raise AdapterNotApplied(
                f"adapter {adapter}: vLLM's base model {self.model_path} gives the probe text log-probs "
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
    """Record `model`'s probe log-probs beside its saved adapter, for `Policy.check_adapter_applied`. Keep the
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
