"""Ctrl-C on `ratchet run`, as a terminal sends it (SIGINT to the command's whole process group), at three moments:
before vLLM starts, while it starts, and during a round's stage. Each time the command ends within seconds, says it
was interrupted and how to resume, exits 130, and leaves no process of its own running (the real CLI, vLLM on CPU
and Prefect's temporary server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import VLLM_PROCESSES, tiny_config

RATCHET = str(Path(sys.executable).parent / "ratchet")


def interrupt_when(tmp: Path, marker: str, delay: float) -> tuple[int, str, float, list[psutil.Process]]:
    """Start `ratchet run` in its own process group, send SIGINT to the group `delay` seconds after `marker`
    appears in its output; (exit code, output, seconds from the SIGINT to the exit, the processes it had)."""
    config = tiny_config(tmp, rounds=1)
    proc = subprocess.Popen([RATCHET, "run", "--config", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp,
                            env={**os.environ, "COLUMNS": "200", **VLLM_PROCESSES})
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert seen.wait(timeout=600), f"{marker!r} never appeared:\n{''.join(lines)}"
        time.sleep(delay)
        assert proc.poll() is None, f"the run ended before the interrupt:\n{''.join(lines)}"
        had = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
        took = time.perf_counter() - t0
        reader.join(timeout=10)
        return rc, "".join(lines), took, had
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("marker,delay", [
    ("log:", 0.5),                 # preflight done, the loop process importing Prefect and vLLM
    ("starting vLLM", 3.0),        # vLLM's engine processes starting
    ("vLLM started", 2.0),         # round 0's stage running
], ids=["before-vllm", "vllm-starting", "in-a-stage"])
def test_ctrl_c_ends_the_run_within_seconds_with_exit_130(tmp_path: Path, marker: str, delay: float):
    rc, out, took, had = interrupt_when(tmp_path, marker, delay)
    assert rc == 130, out
    assert "interrupted" in out and "resume" in out, out
    assert "ConnectError" not in out, out
    # Seconds, not the minute it took when Prefect's server died under the same Ctrl-C (60-75 s).
    assert took < 45, f"{took:.0f} s from Ctrl-C to exit:\n{out}"
    left = [p for p in had if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after the run ended: {[p.cmdline()[:3] for p in left]}"
