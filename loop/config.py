"""The loop's configuration: one YAML file, validated into typed models before any expensive work.

Each stage owns its config model (in the stage's module); this file only composes them. Unknown or
invalid keys are errors that name the key, where it is, and what is allowed.
"""
from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loop.generate import EngineConfig, SamplingConfig
from loop.pairs import PairsConfig
from loop.tasks import TaskSetConfig
from loop.tracking import TrackingConfig
from loop.train import TrainConfig
from loop.verify import VerifyConfig


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: TaskSetConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """n samples per held-out prompt for pass@k (k = 1, 2, 4, ... n)."""
    greedy: bool = True
    """Also decode each prompt greedily, for greedy accuracy."""


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    """Names the MLflow runs and the default run id."""
    model: str
    """A built-in model name (see `ratchet models list`), a local Hugging Face folder, or a hub id."""
    rounds: int = Field(3, ge=0)
    run_dir: Path = Path("runs")
    train_tasks: TaskSetConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """On-policy sampling of training prompts (n samples each)."""
    eval: EvalConfig
    engine: EngineConfig = Field(default_factory=EngineConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _splits(self) -> "RunConfig":
        # Training on the evaluation split would make every held-out figure meaningless.
        if self.train_tasks.split != "train":
            raise ValueError(f"train_tasks.split must be 'train' (got {self.train_tasks.split!r})")
        if self.eval.tasks.split != "eval":
            raise ValueError(f"eval.tasks.split must be 'eval' (got {self.eval.tasks.split!r})")
        return self


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
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if model is None:
                    break
            allowed = ", ".join(model.model_fields) if model else "see the docs"
            lines.append(f"  unknown key '{where}' (allowed here: {allowed})")
        else:
            lines.append(f"  {where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path, **overrides) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (the configs/ folder has examples)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping of keys")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, path)) from None
