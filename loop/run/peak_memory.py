"""Peak memory of one stage of a round, for the round's metrics (`memory/<stage>_...`).

- `peak_rss_mb`: this process's resident memory at its highest during the stage (the flow, the trainer, the
  verifiers' pools; vLLM's engine runs in a process of its own). Sampled by a thread every `interval_s`, since the
  kernel's own maximum (ru_maxrss) is the process's whole life, not the stage's.
- on CUDA, `peak_cuda_allocated_mb`: torch's peak allocation in this process during the stage (the trainer; reset
  when the stage starts).
"""
from __future__ import annotations

import sys
import threading

import psutil

_MB = 2 ** 20


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.metrics(stage)`."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak_rss = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_cuda_allocated: int | None = None

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        if _cuda_torch() is not None:
            _cuda_torch().cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        # Reset when the stage started, or CUDA came up during the stage: either way the peak is the stage's.
        torch = _cuda_torch()
        self.peak_cuda_allocated = None if torch is None else torch.cuda.max_memory_allocated()

    def metrics(self, stage: str) -> dict[str, float]:
        out = {f"memory/{stage}_peak_rss_mb": self.peak_rss / _MB}
        if self.peak_cuda_allocated is not None:
            out[f"memory/{stage}_peak_cuda_allocated_mb"] = self.peak_cuda_allocated / _MB
        return out


def _cuda_torch():
    """torch, when this process imported it and uses CUDA (a stage that never needed torch does not import it)."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None
