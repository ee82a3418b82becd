"""docs/configuration.md is generated from the config models (loop/config_docs.py) and must not be stale."""
from __future__ import annotations

from pathlib import Path

from loop.config import RunConfig
from loop.config_docs import render, rows

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_committed_reference_is_what_the_models_generate():
    assert DOC.read_text() == render(), ("docs/configuration.md is stale: regenerate it with "
                                        "`.venv/bin/python -m loop.config_docs > docs/configuration.md`")


def test_every_key_is_documented_with_its_type_and_default():
    table = rows(RunConfig)
    keys = [k for k, _, _, _ in table]
    assert {"eval.sampling.n", "train.algorithm", "pairs.keep_truncated", "train_tasks.fresh_per_round",
            "verify.cutoff_is_wrong", "eval.every"} <= set(keys)
    # Every field of every section has a docstring, except the engine's (documented in loop/generation/engine.py's own
    # words).
    undocumented = [k for k, _, _, doc in table if not doc and not k.startswith("engine.")]
    assert undocumented == [], undocumented
