"""What the machine computes natively, for the settings whose best value depends on it.

bf16 pays only where the hardware has bf16 arithmetic: a CUDA GPU with bf16, or an x86 CPU with AMX or
AVX512-BF16. Elsewhere (AVX2-only CPUs, e.g. many AMD EPYC and older Intel machines) PyTorch and vLLM emulate it,
which is many times slower than fp32 (bench/RESULTS.md, "bf16 on a CPU without bf16 arithmetic").
"""
from __future__ import annotations

from pathlib import Path

CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (or of the given text); empty where there is none (not Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    return bool(cpu_flags(cpuinfo) & CPU_BF16_FLAGS)


def native_bf16() -> bool:
    """bf16 arithmetic where the work runs: the CUDA GPU when one is visible, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()
