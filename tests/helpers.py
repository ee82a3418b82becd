"""Shared by the end-to-end tests: the tiny loop configuration (SmolLM2-135M on arithmetic, a few prompts)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import yaml

VLLM_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
"""vLLM's default, as a user runs it: the engine core and its worker in processes of their own (the suite runs
engines in-process otherwise: tests/conftest.py). For the tests about the processes a run starts and leaves, and
for every engine started in the pytest process itself: an engine in-process binds its process's threads to the CPUs
it runs on, which would hold for every test after it."""


@contextlib.contextmanager
def vllm_processes():
    """Engines started inside the block run as a user's do, in vLLM's own processes (VLLM_PROCESSES)."""
    saved = {k: os.environ.get(k) for k in VLLM_PROCESSES}
    os.environ.update(VLLM_PROCESSES)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiny_config(tmp: Path, **over) -> Path:
    """Write a tiny loop config into `tmp` and return its path.

    Keyword arguments override top-level keys; a dict is merged into the section it overrides, and a
    None value removes the key (e.g. `tracking={"uri": None}` leaves the tracking URI to $MLFLOW_TRACKING_URI).
    """
    cfg = {
        "name": "e2e",
        "model": "smollm2-135m-instruct",
        "rounds": 2,
        "run_dir": str(tmp / "runs"),
        "train_tasks": {"family": "arithmetic", "split": "train", "limit": 6, "difficulty": 1},
        "sampling": {"n": 6, "temperature": 1.0, "max_tokens": 48, "seed": 0},
        "eval": {"tasks": {"family": "arithmetic", "split": "eval", "limit": 4, "difficulty": 1},
                 "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 48, "seed": 1}},
        "engine": {"max_model_len": 512},
        "pairs": {"strategy": "all", "max_pairs_per_prompt": 2, "keep_truncated": True},
        "train": {"lr": 5e-4, "per_device_batch_size": 4, "max_length": 256, "lora_r": 4, "lora_alpha": 8},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "e2e"},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {kk: vv for kk, vv in {**cfg[k], **v}.items() if vv is not None}
        elif v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
