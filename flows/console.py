"""Where a supervised loop's output goes (flows/supervise.py sets it up, the loop process reads it from here).

By default the loop process's stdout and stderr are the run's log file (runs/<id>/loop.log): vLLM's and TRL's
per-step chatter, Prefect's task logs and tracebacks, and those of the processes they start, all land there. The
terminal is passed on as one more file descriptor, and only the progress lines (`say`), the final tables and the
one-line errors are written to it. With `--verbose` nothing is redirected: the terminal gets everything, as
Prefect's log lines, and `say` writes nothing (the same line would show twice).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

CONSOLE_FD_ENV = "RATCHET_CONSOLE_FD"  # the terminal's descriptor in a loop process whose output goes to the log
LOG_ENV = "RATCHET_LOG_FILE"  # the log file, where the loop process also writes a failure's traceback
DEBUG_ENV = "RATCHET_DEBUG"
VERBOSE_ENV = "RATCHET_VERBOSE"

_console: TextIO | None = None


def flag(env: str) -> bool:
    return os.environ.get(env, "") not in ("", "0")


def redirected() -> bool:
    return CONSOLE_FD_ENV in os.environ


def console() -> TextIO:
    """The terminal: its own descriptor when the output goes to the log file, else stdout."""
    global _console
    if _console is None:
        fd = os.environ.get(CONSOLE_FD_ENV)
        _console = os.fdopen(int(fd), "w", buffering=1, closefd=False) if fd else sys.stdout
    return _console


def say(line: str) -> None:
    """A progress line for the terminal, when the rest of the output goes to the log file."""
    if redirected():
        print(line, file=console(), flush=True)


def log_file() -> Path | None:
    path = os.environ.get(LOG_ENV)
    return Path(path) if path else None


def _secs(s: float) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{s // 60:.0f} min {s % 60:.0f} s"


def _count(m: dict, key: str) -> str:
    return f"{int(m[key]):,}" if m.get(key) is not None else "?"


def stage_line(r: int, rounds: int, stage: str, m: dict, seconds: float) -> str:
    """One line for a finished stage, from the round's metrics so far, e.g.
    `round 2/3 · generate 96 samples · 41 s · 5,203 tokens`."""
    if stage == "generate":
        what = [f"generate {_count(m, 'generate/samples')} samples", _secs(seconds),
                f"{_count(m, 'generate/tokens')} tokens"]
    elif stage == "verify":
        what = [f"verify {_count(m, 'train_samples/correct')}/{_count(m, 'generate/samples')} correct"
                + (f", {_count(m, 'train_samples/timeout')} timed out" if m.get("train_samples/timeout") else ""),
                _secs(seconds)]
    elif stage == "pairs":
        what = [f"pairs {_count(m, 'pairs/pairs')} from {_count(m, 'pairs/prompts_with_pairs')}/"
                f"{_count(m, 'pairs/prompts')} prompts", _secs(seconds)]
    elif stage == "train" and m.get("train/skipped"):
        what = ["train skipped (nothing to train on; the previous adapter stays current)"]
    elif stage == "train":
        what = [f"train {_count(m, 'train/examples')} examples, {_count(m, 'train/steps')} steps", _secs(seconds)]
        if m.get("train/loss_first") is not None:
            what.append(f"loss {m['train/loss_first']:.3f} → {m['train/loss_last']:.3f}")
    elif stage == "evaluate":
        what = [f"evaluate {_count(m, 'eval/num_prompts')} prompts", _secs(seconds)]
        what += [f"{label} {m[f'eval/{k}']:.3f}" for k, label in (("pass@1", "pass@1"), ("greedy_acc", "greedy"))
                 if m.get(f"eval/{k}") is not None]
    else:
        what = [stage.replace("_", " "), _secs(seconds)]
    return " · ".join([f"round {r}/{rounds}", *what])


def round_line(r: int, rounds: int, m: dict) -> str:
    """One line for a finished round: pass@1 with its 95% interval, pairs, loss, stage time."""
    what = [f"round {r}/{rounds} done" + (" (base model)" if r == 0 else "")]
    if m.get("eval/pass@1") is not None:
        low, high = m.get("eval/pass@1_low"), m.get("eval/pass@1_high")
        what.append(f"pass@1 {m['eval/pass@1']:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else ""))
    if r > 0:
        what.append(f"{_count(m, 'pairs/pairs')} pairs")
        if m.get("train/loss") is not None:
            what.append(f"loss {m['train/loss']:.3f}")
    if m.get("time/stages_s") is not None:
        what.append(_secs(m["time/stages_s"]))
    return " · ".join(what)
