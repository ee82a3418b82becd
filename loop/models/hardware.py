"""What the machine computes natively, for the settings whose best value depends on it.

bf16 pays only where the hardware has bf16 arithmetic: a CUDA GPU with bf16 (compute capability 8.0 and up), or an
x86 CPU with AMX or AVX512-BF16. Elsewhere (AVX2-only CPUs, e.g. many AMD EPYC and older Intel machines) PyTorch and
vLLM emulate it, which is many times slower than fp32 (bench/RESULTS.md, "bf16 on a CPU without bf16 arithmetic").

Nothing here creates a CUDA context in this process. The flow decides the engine's dtype before vLLM starts its
workers; a parent that has initialised CUDA forces vLLM to spawn them instead of forking, and keeps a context (GPU
memory) of its own for the whole run. So the GPU is asked through NVML (the library nvidia-smi uses), or, where
NVML cannot say, by a child process.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CUDA_BF16_CAPABILITY = (8, 0)
"""Ampere and later compute bf16 natively (what torch.cuda.is_bf16_supported checks)."""


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


def gpu_visible(environ: dict[str, str] | None = None, device: Path = Path("/dev/nvidia0")) -> bool:
    """An NVIDIA GPU that CUDA would give this process, without importing torch: a device node exists, and
    CUDA_VISIBLE_DEVICES, when set, starts with a device (an index or a GPU-/MIG- UUID). `CUDA_VISIBLE_DEVICES=""`,
    `-1` or `NoDevFiles` hide every GPU, and training then runs on the CPU."""
    env = os.environ if environ is None else environ
    if not device.exists():
        return False
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return True
    first = visible.split(",")[0].strip()
    return first.isdigit() or first.startswith(("GPU-", "MIG-"))


def cuda_available() -> bool:
    """torch.cuda.is_available() without initialising CUDA: torch counts devices through NVML first (the CUDA
    runtime's count initialises the driver in this process, which a forked vLLM worker cannot survive)."""
    import torch

    return torch.cuda.device_count() > 0


@functools.lru_cache(maxsize=1)
def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) compute capability of the first GPU CUDA gives this process; None without one."""
    if not cuda_available():
        return None
    cap = _nvml_capability()
    return cap if cap is not None else child_capability()


def _nvml(query):
    """`query(pynvml, handle)` on the first GPU CUDA gives this process; None where NVML cannot say. NVML numbers
    the GPUs physically and CUDA_VISIBLE_DEVICES renumbers them: an index or a GPU UUID is mapped, a MIG slice is
    not (None)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        if first.isdigit():
            handle = pynvml.nvmlDeviceGetHandleByIndex(int(first))
        elif first.startswith("GPU-"):
            handle = pynvml.nvmlDeviceGetHandleByUUID(first)
        else:
            return None
        return query(pynvml, handle)
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvml_capability() -> tuple[int, int] | None:
    cap = _nvml(lambda nvml, h: nvml.nvmlDeviceGetCudaComputeCapability(h))
    return None if cap is None else (int(cap[0]), int(cap[1]))


def gpu_memory_used() -> int | None:
    """Memory in use (bytes, every process) on the first GPU CUDA gives this process, through NVML."""
    used = _nvml(lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used)
    return None if used is None else int(used)


def gpu_memory_total() -> int | None:
    """Total memory (bytes) of the first GPU CUDA gives this process, through NVML; None where it cannot say."""
    if not gpu_visible():
        return None
    total = _nvml(lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).total)
    return None if total is None else int(total)


def child_capability() -> tuple[int, int] | None:
    """The capability as torch reports it, asked in a child process (whose CUDA context ends with it)."""
    code = "import torch; print(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else print()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    parts = done.stdout.split()
    return (int(parts[0]), int(parts[1])) if done.returncode == 0 and len(parts) == 2 else None


def native_bf16() -> bool:
    """bf16 arithmetic where the work runs: the CUDA GPU when one is visible, else the CPU."""
    if cuda_available():
        cap = cuda_capability()
        return cap is not None and cap >= CUDA_BF16_CAPABILITY
    return cpu_has_bf16()
