"""The loop's configuration: one YAML file, validated into typed models before any expensive work.

Each stage owns its config model (in the stage's module); this file only composes them. Unknown or
invalid keys are errors that name the key, where it is, and what is allowed. Settings of different stages that
cannot work together are refused here too, when vLLM or peft would only refuse them after a whole round of
sampling and grading (`RunConfig._engine_serves_training`); `check_model` adds the checks that need the model's
weights, before the engine starts. Nothing here imports torch, vLLM or TRL.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loop.cluster.driver import ClusterConfig
from loop.generation.engine import VLLM_LORA_RANKS, EngineConfig
from loop.generation.rollout import SamplingConfig
from loop.grading import VerifyConfig
from loop.models.weights import model_weight_shapes
from loop.pairs import PairsConfig
from loop.run.tracking import TrackingConfig
from loop.tasks import TaskSetConfig
from loop.training.config import TrainConfig

# Modules the loop never adapts: vLLM serves LoRA on the embeddings and the LM head only for some architectures
# (Llama, not Qwen2, in vLLM 0.32) and refuses the adapter at load time otherwise.
_EMBEDDING_MODULES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out"})


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: TaskSetConfig
    """The held-out tasks (split: eval), the same in every round."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """n samples per held-out prompt for pass@k (k = 1, 2, 4, ... n)."""
    greedy: bool = True
    """Also decode each prompt greedily, for greedy accuracy."""
    every: Annotated[int, Field(ge=1)] | Literal["last"] = 1
    """Which rounds are evaluated: 1, every round; k, rounds 0, k, 2k, ... and the last; "last", round 0 and the last
    round only. A round left out has no eval/ metrics; its successor is compared with the last evaluated round."""
    common_seeds: bool = True
    """Evaluate every round with the same sampling seeds (common random numbers: round r's sample i of a problem
    starts from the same random draws as round 0's), which narrows the paired intervals at no cost. False: the
    seeds change with the round."""
    primary: str = "pass@1"
    """The one comparison the run is judged by: this accuracy (pass@k, maj@k or greedy_acc), last evaluated round
    against round 0. The round table marks it; its other changes are descriptive (among 20-30 paired tests one or
    two fall below p 0.05 by chance)."""

    @model_validator(mode="after")
    def _primary_exists(self) -> "EvalConfig":
        m = re.fullmatch(r"(pass|maj)@(\d+)|greedy_acc", self.primary)
        if m is None:
            raise ValueError(f"eval.primary: {self.primary!r} is not an accuracy the evaluation reports; use pass@k, "
                             "maj@k (k up to eval.sampling.n) or greedy_acc")
        if m.group(2) and not 1 <= int(m.group(2)) <= self.sampling.n:
            raise ValueError(f"eval.primary: {self.primary} needs k <= eval.sampling.n ({self.sampling.n})")
        if self.primary == "greedy_acc" and not self.greedy:
            raise ValueError("eval.primary: greedy_acc needs eval.greedy: true")
        return self

    def evaluates(self, r: int, rounds: int) -> bool:
        """Whether round `r` of a `rounds`-round loop is evaluated (round 0 and the last always are)."""
        if r == 0 or r == rounds:
            return True
        return self.every != "last" and r % self.every == 0


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    """Names the MLflow runs and the default run id."""
    model: str
    """A built-in model name (see `ratchet models list`), a local Hugging Face folder, or a hub id."""
    rounds: int = Field(3, ge=0)
    """Training rounds after round 0 (which evaluates the base model); a resumed run may raise it."""
    run_dir: Path = Path("runs")
    """Where each run id's folder (config, round folders, log, lock) is written."""
    train_tasks: TaskSetConfig
    """The prompts sampled and trained on (split: train)."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """On-policy sampling of training prompts (n samples each)."""
    eval: EvalConfig
    """The held-out evaluation of round 0 and the rounds eval.every names."""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    """The vLLM engine that samples every round (loop/generation/engine.py)."""
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    """Grading (loop/grading.py; the verifiers' rules: docs/verifiers.md)."""
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    """Which graded samples become preference pairs (loop/pairs.py)."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """The update of the LoRA adapter each round (loop/training/update.py)."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Where metrics and artifacts go (MLflow; loop/run/tracking.py)."""
    cluster: ClusterConfig | None = None
    """Run on a Ray cluster (loop/cluster/driver.py); None: everything in this process."""

    @model_validator(mode="after")
    def _splits(self) -> "RunConfig":
        # Training on the evaluation split would make every held-out figure meaningless.
        if self.train_tasks.split != "train":
            raise ValueError(f"train_tasks.split must be 'train' (got {self.train_tasks.split!r})")
        if self.eval.tasks.split != "eval":
            raise ValueError(f"eval.tasks.split must be 'eval' (got {self.eval.tasks.split!r})")
        return self

    @model_validator(mode="after")
    def _fresh_tasks(self) -> "RunConfig":
        if self.train_tasks.fresh_per_round and self.pairs.rehearsal:
            raise ValueError("pairs.rehearsal replays the base model's samples of round 1's prompts, which "
                             "train_tasks.fresh_per_round replaces every round; use one of the two")
        return self

    @model_validator(mode="after")
    def _rehearsal(self) -> "RunConfig":
        if self.pairs.rehearsal and self.train.algorithm != "dpo":
            raise ValueError("pairs.rehearsal adds an NLL term beside the DPO loss; with train.algorithm: "
                             f"{self.train.algorithm} set pairs.rehearsal: 0")
        if self.train.rehearsal_coef is not None and not self.pairs.rehearsal:
            raise ValueError("train.rehearsal_coef weighs the rehearsal samples, but pairs.rehearsal is 0 (none are "
                             "drawn); set pairs.rehearsal (e.g. 0.25) or remove train.rehearsal_coef")
        return self

    @model_validator(mode="after")
    def _engine_serves_training(self) -> "RunConfig":
        # What vLLM checks when it loads a round's adapter (vllm/lora/peft_helper.py, lora_model.py), which happens
        # only after the round's sampling, grading and training.
        rank, r = self.engine.max_lora_rank, self.train.lora_r
        fits = [x for x in VLLM_LORA_RANKS if x >= r]
        if rank not in VLLM_LORA_RANKS:
            up = [x for x in fits if x >= rank] or VLLM_LORA_RANKS[-1:]
            raise ValueError(f"engine.max_lora_rank: {rank} is not a rank vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))}); "
                             f"vLLM would refuse to start. Set engine.max_lora_rank: {up[0]}")
        if rank < r:
            fix = (f"set engine.max_lora_rank: {fits[0]} or lower train.lora_r to {rank}" if fits else
                   f"lower train.lora_r to at most {VLLM_LORA_RANKS[-1]}")
            raise ValueError(f"engine.max_lora_rank ({rank}) is below train.lora_r ({r}): vLLM refuses to load an adapter "
                             f"of rank {r} (\"LoRA rank {r} is greater than max_lora_rank {rank}\"), which it would "
                             f"only find after round 1 had sampled, graded and trained; {fix}")
        targets = self.train.target_modules
        if targets != "all-linear":
            if not targets:
                raise ValueError("train.target_modules is empty: no module would get LoRA weights; name some "
                                 "(e.g. [q_proj, v_proj]) or use all-linear")
            embedding = sorted(set(targets) & _EMBEDDING_MODULES)
            if embedding:
                raise ValueError(f"train.target_modules names {embedding}: vLLM serves LoRA on embeddings and the LM "
                                 "head only for some architectures and refuses the adapter after round 1's training "
                                 "otherwise; adapt linear layers only (all-linear leaves the LM head out)")
        return self


def check_train_memory(cfg: RunConfig, model_dir: Path, available: int | None = None,
                       gpu_total: int | None = None) -> None:
    """A training step of the configured size fits beside the vLLM engine (loop/training/memory_estimate.py: an upper
    bound for the configured lengths): on a CPU machine in the memory left beside the engine, on a GPU in the GPU memory
    that vLLM leaves while it sleeps (or beside its share, without sleep mode). The GPU is the device where CUDA gives
    this process one (`CUDA_VISIBLE_DEVICES=""` trains on the CPU even where a GPU is installed) or where `gpu_total`
    (bytes) is given; `available` (bytes) replaces the CPU memory the machine reports."""
    from loop.models.hardware import CUDA_BF16_CAPABILITY, cpu_has_bf16, cuda_capability, gpu_memory_total, gpu_visible
    from loop.training import memory_estimate

    if cfg.cluster is not None:
        return  # the trainer runs in a Ray actor, on its node's memory
    on_gpu = gpu_total is not None or gpu_visible()
    if on_gpu and gpu_total is None:
        gpu_total = gpu_memory_total()
        if gpu_total is None:
            return  # NVML cannot say: nothing to check against
    t = cfg.train
    if on_gpu:  # train.bf16 unset or native: bf16 on a GPU that computes it (loop/training/update.py _use_bf16)
        native = (cuda_capability() or CUDA_BF16_CAPABILITY) >= CUDA_BF16_CAPABILITY
        bf16 = t.bf16 is True or (t.bf16 in (None, "native") and native)
    else:
        bf16 = t.bf16 is True or (t.bf16 == "native" and cpu_has_bf16())
    # DPO: chosen + rejected per pair; KTO: the sample + its KL completion; plus a rehearsal sequence per pair;
    # SFT (RFT): the sample alone.
    sequences = t.per_device_batch_size * (1 if t.algorithm == "sft" else 2 + bool(cfg.pairs.rehearsal))
    seq_len = min(t.max_length or cfg.engine.max_model_len, cfg.engine.max_model_len)
    need = memory_estimate.estimate(model_dir, sequences=sequences, seq_len=seq_len, bytes_per_value=2 if bf16 else 4,
                                 gradient_checkpointing=t.gradient_checkpointing,
                                 runtime=memory_estimate.GPU_RUNTIME_BYTES if on_gpu else memory_estimate.RUNTIME_BYTES)
    if need is None:
        return
    if on_gpu:
        sleeps = cfg.engine.enable_sleep_mode is not False
        engine = memory_estimate.engine_gpu_bytes(gpu_total, cfg.engine.gpu_memory_utilization, asleep=sleeps)
        free = gpu_total - engine
        where = (f"this GPU ({gpu_total / memory_estimate.GIB:.1f} GiB) has {free / memory_estimate.GIB:.1f} GiB "
                 f"beside the vLLM engine ({engine / memory_estimate.GIB:.1f} GiB "
                 + ("while asleep)" if sleeps else "awake: engine.enable_sleep_mode is false)"))
    else:
        engine_value = {"bfloat16": 2, "float16": 2, "float32": 4}.get(cfg.engine.dtype, 2 if cpu_has_bf16() else 4)
        engine = memory_estimate.engine_bytes(model_dir, cfg.engine.kv_cache_memory_bytes, engine_value)
        free = (memory_estimate.available_bytes() if available is None else available) - engine
        where = (f"this machine has {free / memory_estimate.GIB:.1f} GiB available beside the vLLM engine "
                 f"({engine / memory_estimate.GIB:.1f} GiB)")
    if need.total <= free:
        return
    g = memory_estimate.GIB
    fixes = [f"lower train.per_device_batch_size (now {t.per_device_batch_size}; raise train.grad_accumulation to keep "
             "the pairs per optimizer step)"]
    if not t.gradient_checkpointing:
        fixes.append("set train.gradient_checkpointing: true (activations ~1/20, ~25% slower)")
    fixes.append(f"lower train.max_length (now {t.max_length}; engine.max_model_len {cfg.engine.max_model_len})")
    if on_gpu and cfg.engine.enable_sleep_mode is False:
        fixes.append("set engine.enable_sleep_mode: true (vLLM frees its GPU memory while training runs) or lower "
                     "engine.gpu_memory_utilization")
    raise ConfigError(
        f"train: a training step may need about {need.total / g:.1f} GiB{' of GPU memory' if on_gpu else ''} "
        f"({sequences} sequences of up to {seq_len} tokens: {need.activations / g:.1f} GiB of activations, "
        f"{need.weights / g:.1f} GiB of weights), but {where}; it would run out of memory at the first training, "
        "after round 1's sampling. Either " + ", or ".join(fixes))


def check_model(cfg: RunConfig, model_path: str | Path) -> None:
    """Checks that need the model's weights (read from the safetensors headers; no weights are loaded), for the
    start of a loop, before the engine starts: a training step fits in memory (`check_train_memory`), and every
    `train.target_modules` name is a linear layer of the model (peft refuses unknown names, and vLLM serves LoRA on
    linear layers only). A hub id, whose weights are not on disk yet, is not checked."""
    check_train_memory(cfg, Path(model_path))
    shapes = model_weight_shapes(Path(model_path))
    targets = cfg.train.target_modules
    if shapes is None or targets == "all-linear":
        return
    linear = {name.rsplit(".", 2)[-2] for name, shape in shapes.items()
              if name.endswith(".weight") and len(shape) == 2 and name.count(".") >= 1}
    linear -= _EMBEDDING_MODULES
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ConfigError(f"train.target_modules names {unknown}, which the model {model_path} has no linear layer "
                          f"called (its linear layers: {', '.join(sorted(linear))}); peft would refuse them at the "
                          "first training, after round 1's sampling and grading. Use some of those names or all-linear")


class ConfigError(ValueError):
    pass


def _describe(err: ValidationError, path: Path) -> str:
    lines = [f"invalid config {path}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            model = RunConfig
            for part in e["loc"][:-1]:
                field = model.model_fields.get(str(part)) if isinstance(model, type) else None
                ann = field.annotation if field else None
                ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if model is None:
                    break
            allowed = ", ".join(model.model_fields) if model else "see the docs"
            lines.append(f"  unknown key '{where}' (allowed here: {allowed})")
        elif not e["loc"] or e["msg"].removeprefix("Value error, ").startswith(f"{where}."):
            # A check across sections, or across the keys of one section: the message names the keys.
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, **overrides) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs/ folder has examples)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as e:  # PyYAML's own message names "<unicode string>" and spans many lines
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{where}: YAML syntax error: {problem}"
                          + (f" ({e.context})" if e.context and e.problem else "")
                          + "; check the indentation, colons and quotes there") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping of keys")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from None
