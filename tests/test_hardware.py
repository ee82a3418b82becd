"""bf16 only where the hardware computes it (loop/hardware.py), for engine.dtype auto and train.bf16 unset."""
from __future__ import annotations

import logging

import pytest

from loop import engine, hardware, train

AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2\n"


def test_cpu_bf16_comes_from_the_flags():
    assert hardware.cpu_has_bf16(AMX) and not hardware.cpu_has_bf16(AVX2)
    assert hardware.cpu_has_bf16("flags : avx512_bf16") and not hardware.cpu_has_bf16("flags : avx512f")
    assert hardware.cpu_flags("no flags line") == frozenset()
    assert "avx2" in hardware.cpu_flags(AVX2)


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_hardware_and_explicit_bf16_warns_where_emulated(monkeypatch, caplog, native):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda cpuinfo=None: native)
    assert engine.resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert train._use_bf16(train.TrainConfig(bf16="native")) is native
    assert train._use_bf16(train.TrainConfig()) is False  # the CPU default stays fp32
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_dtype("bfloat16") == "bfloat16" and train._use_bf16(train.TrainConfig(bf16=True))
        assert engine.resolve_dtype("float32") == "float32" and not train._use_bf16(train.TrainConfig(bf16=False))
    warned = [r.getMessage() for r in caplog.records if "no bf16 arithmetic" in r.getMessage()]
    assert len(warned) == (0 if native else 2)


def test_this_machines_flags_decide_auto():
    # The same rule on the real /proc/cpuinfo (whatever this machine is).
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    assert (engine.resolve_dtype("auto") == "bfloat16") == hardware.cpu_has_bf16()
