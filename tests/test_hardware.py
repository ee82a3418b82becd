"""bf16 only where the hardware computes it (loop/models/hardware.py), for engine.dtype auto and train.bf16 unset."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from loop.generation import engine
from loop.models import hardware
from loop.training.config import TrainConfig
from loop.training.update import _use_bf16

REPO = Path(__file__).resolve().parents[1]
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
    assert _use_bf16(TrainConfig(bf16="native")) is native
    assert _use_bf16(TrainConfig()) is False  # the CPU default stays fp32
    with caplog.at_level(logging.WARNING):
        assert engine.resolve_dtype("bfloat16") == "bfloat16" and _use_bf16(TrainConfig(bf16=True))
        assert engine.resolve_dtype("float32") == "float32" and not _use_bf16(TrainConfig(bf16=False))
    warned = [r.getMessage() for r in caplog.records if "no bf16 arithmetic" in r.getMessage()]
    assert len(warned) == (0 if native else 2)


def test_this_machines_flags_decide_auto():
    # The same rule on the real /proc/cpuinfo (whatever this machine is).
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU rule")
    assert (engine.resolve_dtype("auto") == "bfloat16") == hardware.cpu_has_bf16()


def _no_cuda_context(monkeypatch):
    """torch's CUDA calls that create a context in this process fail the test if anything calls them."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("CUDA initialised in the driver before vLLM starts")

    for name in ("_lazy_init", "init", "current_device", "is_bf16_supported", "get_device_capability",
                 "get_device_properties", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, refuse)


@pytest.mark.parametrize("capability, dtype", [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float16")])
def test_the_gpu_dtype_is_decided_without_a_cuda_context(monkeypatch, capability, dtype):
    # A CUDA machine as the flow's process sees it before vLLM starts: devices counted through NVML, the capability
    # from NVML or a child process. Nothing may go through torch's CUDA context.
    import torch

    _no_cuda_context(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(hardware, "_nvml_capability", lambda: capability)
    hardware.cuda_capability.cache_clear()
    try:
        assert hardware.native_bf16() is (capability >= (8, 0))
        assert engine.resolve_dtype("auto") == dtype
        assert engine.resolve_dtype("float32") == "float32"
    finally:
        hardware.cuda_capability.cache_clear()
    assert not torch.cuda.is_initialized()


def test_without_nvml_the_capability_comes_from_a_child_process(monkeypatch):
    import torch

    # The real child on this machine first: a CUDA GPU's capability, or None here without one.
    assert (hardware.child_capability() is None) is (not torch.cuda.is_available())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(hardware, "_nvml_capability", lambda: None)
    monkeypatch.setattr(hardware, "child_capability", lambda: (8, 6))
    hardware.cuda_capability.cache_clear()
    try:
        assert hardware.cuda_capability() == (8, 6)
    finally:
        hardware.cuda_capability.cache_clear()


def test_loading_a_config_and_resolving_its_dtype_leaves_cuda_uninitialised():
    import torch

    from loop.config import load_config

    cfg = load_config(REPO / "configs" / "gsm-qwen1.5b-gpu.yaml")
    engine.resolve_dtype(cfg.engine.dtype)
    hardware.native_bf16()
    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("visible, seen", [(None, True), ("0", True), ("1,0", True), ("GPU-5f1c", True),
                                           ("MIG-2a", True), ("", False), ("-1", False), ("NoDevFiles", False)])
def test_gpu_visible_follows_cuda_visible_devices(tmp_path, visible, seen):
    node = tmp_path / "nvidia0"
    node.touch()
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert hardware.gpu_visible(env, node) is seen
    assert hardware.gpu_visible(env, tmp_path / "absent") is False


def test_torch_counts_cuda_devices_through_nvml_once_the_config_is_imported():
    # Every torch.cuda.is_available() in the process (preflight, the trainer) then leaves CUDA uninitialised.
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    code = "import os, loop.config; print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
