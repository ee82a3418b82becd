"""Memory across rounds (loop/run/peak_memory.py, loop/training/update.py): the trainer's memory is freed after each
round, so rounds trained one after another in one process (as the flow does) do not grow the process; each stage's peak
is measured. Real SmolLM2-135M training on CPU, a few steps per round."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import psutil
import pytest

from loop.run.peak_memory import PeakMemory

pytestmark = pytest.mark.slow
MB = 2 ** 20
ROUNDS = 4
GROWTH_MB = 270
"""Allowed RSS growth per round after the first two (which import and warm up torch, TRL and the allocator): half of
what a round that kept its model (135M parameters in fp32, about 540 MB) would add. RSS is not flat: after rounds 1-4
it was 1460, 1688, 1690, 1726 MB in one run and 2007, 2025, 2097, 2241 MB (+72, +144) in a clean clone's `make test`;
whether that is the allocator or a leak is not settled, so this guards against a kept model, not against all growth."""


def test_peak_memory_of_a_stage():
    with PeakMemory(interval_s=0.01) as peak:
        block = bytearray(200 * MB)  # touched: resident
        time.sleep(0.1)
        del block
    after = psutil.Process().memory_info().rss / MB
    m = peak.metrics("stage")
    assert set(m) == {"memory/stage_peak_rss_mb"}  # no CUDA here
    assert m["memory/stage_peak_rss_mb"] > after + 150  # the peak, not the end


def test_training_rounds_in_one_process_do_not_grow_memory(tmp_path):
    from test_train import FAST, tool_pair
    from transformers import AutoTokenizer

    from loop.models.resolve import resolve_model
    from loop.training.config import TrainConfig
    from loop.training.update import train_round

    model_path = Path(resolve_model("smollm2-135m-instruct").path)
    tok = AutoTokenizer.from_pretrained(model_path)
    pairs = [tool_pair(tok, "2+3", "5", "6"), tool_pair(tok, "4*5", "20", "9")]
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss / MB
    adapter, rss, peaks = None, [], []
    for r in range(1, ROUNDS + 1):
        with PeakMemory() as peak:
            res = train_round(model_path, pairs, TrainConfig(**FAST, reference="previous"), init_adapter=adapter,
                              out_dir=tmp_path / f"round-{r}")
        adapter = res.adapter_dir
        gc.collect()
        rss.append(process.memory_info().rss / MB)
        peaks.append(peak.metrics("train")["memory/train_peak_rss_mb"])
    print("RSS after each round (MB):", [round(x) for x in rss], "peaks (MB):", [round(x) for x in peaks])
    # The peak is taken while the round trains: the first round's holds the model (~540 MB in fp32), which this process
    # did not have before; no round ends above its peak. (The allocator keeps freed memory, so RSS does not fall back
    # to the start, and later rounds reuse it: their peaks need not exceed what stays resident by a model's size.)
    assert peaks[0] > before + 400, (before, peaks)
    assert all(p >= x for p, x in zip(peaks, rss)), (peaks, rss)
    growth = (rss[-1] - rss[1]) / (ROUNDS - 2)
    assert growth < GROWTH_MB, f"RSS grew {growth:.0f} MB per round over rounds 3-{ROUNDS} (limit {GROWTH_MB}): {rss}"
