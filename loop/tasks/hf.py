"""Tasks from a Hugging Face dataset, named the way TRL and verl users name their data: a hub id, a local dataset
folder, or a local parquet / JSON / JSONL / CSV file, one of its splits, and which columns hold what.

    train_tasks:
      family: hf
      split: train                      # the loop's side: train or eval
      dataset: openai/gsm8k             # or data/train.parquet, or a folder saved with save_to_disk / a dataset repo
      dataset_config: main              # the dataset's configuration (subset), if it has several
      dataset_split: train              # which of the dataset's splits
      columns: {prompt: question, answer: answer}          # math; code: {prompt: ..., tests: ..., entry_point: ...}

Math answers are read the way the datasets write them: a column that ends with GSM8K's '#### 42' gives 42, one
with MATH's \\boxed{...} the box's content, anything else is taken as it is. Code tasks need `tests` (defining
check(candidate)) and `entry_point` columns. Optional columns: `id` (else the row's index) and `difficulty`.
Offline, a hub id loads only from the local Hugging Face cache; a local file always works. Every bad row is reported
at once, with its index and column.
"""
from __future__ import annotations

from pathlib import Path

from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt
from loop.tasks.splits import list_problems

FAMILY = "hf"
ROLES = ("prompt", "answer", "tests", "entry_point", "id", "difficulty")
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


class DatasetError(ValueError):
    """A dataset that cannot give tasks; the message names the setting or the rows and columns at fault."""


def gold_answer(text: str) -> str:
    """The final answer a dataset's answer column states: after GSM8K's '####', inside MATH's \\boxed{}, else the
    text itself."""
    from verifiers.math.extract import find_answer

    found = find_answer(text, fallback_last_number=False)
    if found.answer is not None and found.rule in ("gsm8k_hashes", "boxed"):
        return found.answer
    return text.strip()


def _load_rows(dataset: str, config: str | None, split: str):
    import datasets

    local = Path(dataset).expanduser()
    try:
        if local.is_file():
            builder = _FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DatasetError(f"dataset: {local} is a {local.suffix or 'suffix-less'} file; give a "
                                   f"{', '.join(_FILE_BUILDERS)} file, a dataset folder or a hub id")
            # A single file is the dataset's only split, whatever the file calls it.
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        if local.is_dir() and (local / "dataset_info.json").exists():
            saved = datasets.load_from_disk(str(local))
            return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        return datasets.load_dataset(str(local) if local.is_dir() else dataset, config, split=split)
    except DatasetError:
        raise
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as e:
        raise DatasetError(f"dataset {dataset!r} (split {split!r}{f', config {config!r}' if config else ''}) could "
                           f"not be loaded: {type(e).__name__}: {str(e)[:300]}") from None


def load(dataset: str, config: str | None, split: str, columns: dict[str, str], instruction: str | None) -> list[Task]:
    rows = _load_rows(dataset, config, split)
    missing = [f"{role} -> {col!r}" for role, col in columns.items() if col not in rows.column_names]
    if missing:
        raise DatasetError(f"columns: {', '.join(missing)} not in dataset {dataset!r} (its columns: "
                           f"{', '.join(rows.column_names)})")
    verifier = "math" if "answer" in columns else "code"
    name = Path(dataset).stem if Path(dataset).expanduser().exists() else dataset.replace("/", "_")
    tasks: list[Task] = []
    errors: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        values = {role: row[col] for role, col in columns.items()}
        bad = [role for role in ("prompt", "answer", "tests", "entry_point") if role in values
               and (values[role] is None or not str(values[role]).strip())]
        if bad:
            errors += [f"row {i}: column {columns[role]!r} ({role}) is empty" for role in bad]
            continue
        ident = f"{FAMILY}/{name}/{values.get('id', i)}"
        if ident in seen:
            errors.append(f"row {i}: id {values.get('id', i)!r} occurs twice (column {columns.get('id')!r})")
            continue
        seen.add(ident)
        tasks.append(Task(
            id=ident, prompt=render_prompt(str(values["prompt"]), FAMILY, verifier, instruction), verifier=verifier,
            family=FAMILY, answer=gold_answer(str(values["answer"])) if verifier == "math" else None,
            tests=values.get("tests"), entry_point=values.get("entry_point"),
            difficulty=None if values.get("difficulty") is None else str(values["difficulty"])))
    if errors:
        raise DatasetError(list_problems(errors, f"dataset {dataset!r} (split {split!r})"))
    if not tasks:
        raise DatasetError(f"dataset {dataset!r} (split {split!r}) has no rows")
    return tasks
