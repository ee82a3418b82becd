"""What a live tool session costs: start-up time and memory of N sandboxed Python sessions open at once (one per
trajectory that has called the tool; loop/generation/rollout.py keeps at most sampling.max_live_sessions of them).

For each N: open N sessions (each runs one cell, `import math`, as a first tool call would), measure the wall time
to have them all ready and the memory they hold (the sum of their processes' proportional set size, PSS, so shared
library pages count once), then the same after a cell that imports numpy and sympy (what a math trajectory often
does). Also the host's memory available before and after, as the kernel reports it.

    .venv/bin/python bench/tool_sessions.py [--sessions 1 8 32 64]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402

from verifiers.python_exec import Session  # noqa: E402


def _pss_mb(session: Session) -> float:
    """PSS of a session's sandbox processes (the launcher, bwrap and the interpreter)."""
    root = psutil.Process(session._interpreter._proc.pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2 ** 20


def measure(n: int) -> dict:
    avail0 = psutil.virtual_memory().available
    t0 = time.perf_counter()
    with ThreadPoolExecutor(min(16, n)) as ex:
        sessions = list(ex.map(lambda _: Session(timeout_s=60), range(n)))
        list(ex.map(lambda s: s.run("import math"), sessions))
    ready_s = time.perf_counter() - t0
    bare = sum(_pss_mb(s) for s in sessions)
    with ThreadPoolExecutor(min(16, n)) as ex:
        list(ex.map(lambda s: s.run("import numpy, sympy"), sessions))
    loaded = sum(_pss_mb(s) for s in sessions)
    avail1 = psutil.virtual_memory().available
    for s in sessions:
        s.close()
    return {"sessions": n, "ready_s": ready_s, "pss_mb_per_session": bare / n,
            "pss_mb_per_session_numpy_sympy": loaded / n,
            "host_available_drop_mb": (avail0 - avail1) / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 64])
    args = ap.parse_args()
    rows = [measure(n) for n in args.sessions]
    for r in rows:
        print(f"{r['sessions']:>4} sessions: ready in {r['ready_s']:.2f} s, {r['pss_mb_per_session']:.1f} MB each "
              f"(PSS), {r['pss_mb_per_session_numpy_sympy']:.1f} MB each after numpy+sympy; host available memory "
              f"{r['host_available_drop_mb']:.0f} MB lower")
    out = Path(__file__).resolve().parent / "results" / "tool_sessions.json"
    out.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=1))
    print(f"written to {out}")


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")
    return f"{model}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2 ** 30:.0f} GiB"


if __name__ == "__main__":
    main()
