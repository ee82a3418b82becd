"""The supervisor of `ratchet run`/`eval` (flows/supervise.py) with real processes: what a killed loop leaves
running is stopped, the kill is explained, a SIGTERM is passed on."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SUPERVISOR = "import sys; from flows.supervise import run_supervised; sys.exit(run_supervised(sys.argv[1:]))"

# Stands in for the loop: starts a helper in its own session (as vLLM's engine and Prefect's server outlive
# their parent), says so, then waits to be killed or terminated.
LOOP = """
import os, signal, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
signal.signal(signal.SIGTERM, lambda s, f: (open(sys.argv[1] + ".term", "w").close(), sys.exit(143)))
open(sys.argv[1], "w").write(f"{os.getpid()} {helper.pid}")
time.sleep(300)
"""


def start(tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    pids = tmp_path / "pids"
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, sys.executable, "-c", LOOP, str(pids)],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not pids.exists() or not pids.read_text():
        assert sup.poll() is None and time.time() < deadline, sup.stderr.read()
        time.sleep(0.1)
    loop, helper = map(int, pids.read_text().split())
    return sup, loop, helper


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_loop_leaves_nothing_running_and_is_explained(tmp_path: Path):
    sup, loop, helper = start(tmp_path)
    try:
        psutil.Process(loop).kill()  # what the OOM killer does to the biggest process
        assert sup.wait(timeout=60) == 128 + signal.SIGKILL
        assert gone(helper), "the loop's helper outlived it"
        assert "out-of-memory killer" in sup.stderr.read()  # after the check: a live helper keeps the pipe open
    finally:
        for pid in (loop, helper):
            if not gone(pid):
                psutil.Process(pid).kill()


def test_sigterm_to_the_supervisor_reaches_the_loop(tmp_path: Path):
    sup, loop, helper = start(tmp_path)
    try:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 143
        assert (tmp_path / "pids.term").exists()
        assert gone(loop) and gone(helper)
    finally:
        for pid in (loop, helper):
            if not gone(pid):
                psutil.Process(pid).kill()


def test_ctrl_c_reaches_the_loop_alone_and_is_explained(tmp_path: Path):
    sup, loop, helper = start(tmp_path)
    try:
        sup.send_signal(signal.SIGINT)  # the terminal's Ctrl-C reaches the supervisor's group only
        assert sup.wait(timeout=60) == 130
        assert gone(loop) and gone(helper)
        assert "out-of-memory" not in sup.stderr.read()
    finally:
        for pid in (loop, helper):
            if not gone(pid):
                psutil.Process(pid).kill()
