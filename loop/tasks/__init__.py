"""Task families and their explicit, deterministic splits, behind one config model and one loader.

| family       | train                                   | eval                                     |
|--------------|-----------------------------------------|------------------------------------------|
| arithmetic   | generated, hash bucket != 0 (1000)      | generated, hash bucket 0 of 10 (200)     |
| gsm-symbolic | 20 variants of templates 0-49 (1000)    | GSM8K originals of templates 50-99 (50)  |
| champ        | refused (held-out set)                  | all 270 problems                         |
| humaneval    | odd task numbers (82)                   | even task numbers (82)                   |
| python-debug | bugged solutions of odd task numbers    | bugged solutions of even task numbers    |
| jsonl        | the whole file at `path`                | the whole file at `path`                 |
| hf           | the `dataset_split` of `dataset`        | the `dataset_split` of `dataset`         |

Counts are the defaults; `limit` and the family options change them (see TaskSetConfig).

Training tasks may be drawn afresh for every round (`fresh_per_round`, `load_round_tasks`), as the published
iterative DPO loops do: a generated family (arithmetic, gsm-symbolic) draws round r's problems as the r-th block of
its seeded streams, so no round sees a problem an earlier round trained on; a fixed family (jsonl, humaneval) takes
the r-th disjoint slice of a seeded shuffle while it lasts, then reuses, and says so.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import random

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loop.tasks import arithmetic, champ, gsm_symbolic, hf, humaneval, jsonl, python_debug
from loop.tasks.base import Task
from loop.tasks.splits import check_disjoint, check_unique_ids, count_clusters, take_subset

__all__ = ["Family", "TaskSetConfig", "Task", "load_tasks", "load_round_tasks", "check_disjoint", "count_clusters"]

Family = Literal["arithmetic", "gsm-symbolic", "champ", "humaneval", "python-debug", "jsonl", "hf"]
Level = Annotated[int, Field(ge=1, le=max(arithmetic.LEVELS))]

# Options that only one family reads: setting one for another family is a mistake worth reporting.
_FAMILY_OPTIONS: dict[str, str] = {"difficulty": "arithmetic", "variants_per_template": "gsm-symbolic",
                                   "path": "jsonl", "dataset": "hf", "dataset_config": "hf", "dataset_split": "hf",
                                   "columns": "hf"}


class TaskSetConfig(BaseModel):
    """Which tasks a stage uses: a family, a split, and how many."""

    model_config = ConfigDict(extra="forbid")

    family: Family
    """arithmetic | gsm-symbolic | champ | humaneval | python-debug | jsonl | hf (a Hugging Face dataset)."""
    split: Literal["train", "eval"]
    """Which side of the family's fixed split (see the table in loop/tasks/__init__.py)."""
    limit: int | None = Field(None, ge=1)
    """At most this many tasks, drawn with `seed` and kept in order. For arithmetic, the number of
    problems generated (default 1000 for train, 200 for eval)."""
    seed: int = 0
    """Seeds the generated families (arithmetic problems, gsm-symbolic variants) and the `limit` draw."""
    instruction: str | None = None
    """The answer-format instruction after each problem; None: the family default
    (loop/tasks/instructions.py); "": none."""
    difficulty: Level | list[Level] | None = None
    """arithmetic only: level 1-5, or a list of levels to mix evenly (default 1)."""
    variants_per_template: int | None = Field(None, ge=0)
    """gsm-symbolic only: generated variants per template (default 20 for train, 0 for eval, where
    the 50 GSM8K originals are always included)."""
    path: Path | None = None
    """jsonl only: the task file (one JSON object a line; see loop/tasks/jsonl.py)."""
    dataset: str | None = None
    """hf only: a hub id (e.g. openai/gsm8k), a local dataset folder, or a parquet / JSON / JSONL / CSV file
    (loop/tasks/hf.py)."""
    dataset_config: str | None = None
    """hf only: the dataset's configuration (subset), e.g. main for openai/gsm8k."""
    dataset_split: str | None = None
    """hf only: which of the dataset's splits (default: train for the train side, test for eval)."""
    columns: dict[str, str] | None = None
    """hf only: which column holds what: prompt and answer (math), or prompt, tests and entry_point (code); optional
    id and difficulty."""
    fresh_per_round: bool = False
    """Training tasks only: every round draws new tasks (`load_round_tasks`) instead of sampling the same ones again.
    Generated families: `limit` (or the default size) new problems a round, never one an earlier round saw; fixed
    families: the next disjoint slice of `limit` tasks, reused from the start once the set is spent."""

    @model_validator(mode="after")
    def _check_family_options(self) -> "TaskSetConfig":
        for option, family in _FAMILY_OPTIONS.items():
            if getattr(self, option) is not None and self.family != family:
                raise ValueError(f"'{option}' is an option of family '{family}', not of '{self.family}'; remove it")
        if self.family == "jsonl" and self.path is None:
            raise ValueError("family 'jsonl' needs 'path': the JSONL task file")
        if self.family == "hf":
            self._check_hf()
        if self.family == "champ" and self.split == "train":
            raise ValueError("champ is a held-out evaluation set (split: eval only); train on arithmetic, "
                             "gsm-symbolic, humaneval or a jsonl file")
        if self.family == "gsm-symbolic" and self.split == "train" and self.variants_per_template == 0:
            raise ValueError("gsm-symbolic train tasks are template variants: variants_per_template must be >= 1")
        if self.fresh_per_round and self.split != "train":
            raise ValueError("fresh_per_round draws new training tasks each round; the evaluation set must stay the "
                             "same in every round (so rounds compare on the same problems): remove it here")
        if isinstance(self.difficulty, list) and not self.difficulty:
            raise ValueError("'difficulty' is an empty list; give a level 1-5 or a list of levels")
        return self

    def _check_hf(self) -> None:
        if not self.dataset:
            raise ValueError("family 'hf' needs 'dataset': a hub id, a dataset folder or a parquet/JSON/CSV file")
        cols = self.columns or {}
        unknown = sorted(set(cols) - set(hf.ROLES))
        if unknown:
            raise ValueError(f"columns: {unknown} are not roles a column can play ({', '.join(hf.ROLES)})")
        math, code = "answer" in cols, "tests" in cols
        if "prompt" not in cols or math == code or (code and "entry_point" not in cols):
            raise ValueError("columns must name the prompt column and either answer (math) or tests and entry_point "
                             "(code), e.g. {prompt: question, answer: answer}")

    def hf_split(self) -> str:
        """hf: the dataset split this side reads."""
        return self.dataset_split or ("train" if self.split == "train" else "test")

    def levels(self) -> list[int]:
        """arithmetic: the difficulty levels as a list."""
        if self.difficulty is None:
            return [1]
        return [self.difficulty] if isinstance(self.difficulty, int) else list(self.difficulty)


def load_tasks(cfg: TaskSetConfig, block: int = 1) -> list[Task]:
    """The tasks `cfg` names, in a fixed order: the same config always gives the same list. `block` b > 1 (generated
    families): the b-th draw of the same size from the same seeded streams, disjoint from blocks 1..b-1."""
    if cfg.family == "arithmetic":
        count = cfg.limit or arithmetic.DEFAULT_SIZE[cfg.split]
        tasks = arithmetic.load(cfg.split, count, cfg.levels(), cfg.seed, cfg.instruction, block)
    else:
        if cfg.family == "gsm-symbolic":
            n = gsm_symbolic.DEFAULT_VARIANTS[cfg.split] if cfg.variants_per_template is None \
                else cfg.variants_per_template
            tasks = gsm_symbolic.load(cfg.split, n, cfg.seed, cfg.instruction, block)
        elif block > 1:
            raise ValueError(f"family {cfg.family} is a fixed set: it has no block {block} (load_round_tasks slices it)")
        elif cfg.family == "champ":
            tasks = champ.load(cfg.instruction)
        elif cfg.family == "humaneval":
            tasks = humaneval.load(cfg.split, cfg.instruction)
        elif cfg.family == "python-debug":
            tasks = python_debug.load(cfg.split, cfg.instruction)
        elif cfg.family == "hf":
            tasks = hf.load(cfg.dataset, cfg.dataset_config, cfg.hf_split(), cfg.columns, cfg.instruction)
        else:
            assert cfg.path is not None  # checked by the config
            tasks = jsonl.load(cfg.path, cfg.instruction)
        tasks = take_subset(tasks, cfg.limit, cfg.seed if block == 1 else f"{cfg.seed}/block{block}")
    check_unique_ids(tasks, f"{cfg.family} ({cfg.split})")
    return tasks


GENERATED = ("arithmetic", "gsm-symbolic")


def load_round_tasks(cfg: TaskSetConfig, round: int) -> tuple[list[Task], str | None]:
    """Round `round`'s training tasks (rounds count from 1) and a note when they repeat earlier rounds' tasks.

    Without `fresh_per_round`: `load_tasks(cfg)` every round. With it: a generated family's block `round` (new
    problems); a fixed family's `round`-th slice of `limit` tasks from a seeded shuffle of the whole set, continued
    from the start once the set is spent (the note says how many tasks an earlier round had)."""
    if round < 1:
        raise ValueError(f"training rounds count from 1, got round {round}")
    if not cfg.fresh_per_round:
        return load_tasks(cfg), None
    if cfg.family in GENERATED:
        return load_tasks(cfg, block=round), None
    everything = load_tasks(cfg.model_copy(update={"limit": None}))
    order = list(range(len(everything)))
    random.Random(f"fresh/{cfg.seed}").shuffle(order)
    per = min(cfg.limit or len(everything), len(everything))
    start = (round - 1) * per
    picked = sorted((start + i) % len(everything) for i in range(per))  # positions in the shuffled order
    tasks = [everything[i] for i in sorted(order[p] for p in picked)]
    reused = max(0, start + per - len(everything)) if start < len(everything) else per
    note = None
    if reused:
        note = (f"{cfg.family} has {len(everything)} training tasks and each round takes {per}: round {round} "
                f"samples {reused} task(s) an earlier round already trained on (lower train_tasks.limit or add tasks)")
    return tasks, note
