"""Environments: what a trajectory interacts with between model turns (as OpenRLHF's agent `reset`/`step` and
verl's `BaseTool` create/execute/release).

The rollout (loop/rollout.py) gives each trajectory its own environment and drives it:
- `reset(task_id)` before the trajectory's first action;
- when a model turn ends on one of the environment's `stop` strings, `action(turn_text)`: what the model's text
  since the last observation asks for, or None (the model's turn goes on);
- `step(action)`: carry it out and return the observation the model sees next (run concurrently with the other
  trajectories' steps, so one environment is used by one thread at a time);
- `close()` when the trajectory ends.
The rollout keeps the budget of actions (`SamplingConfig.max_turns`) and the token records; an environment returns
text only.
"""
from __future__ import annotations

import re
from typing import Protocol

TOOL_SYSTEM_PROMPT = (
    "You can run Python: write a ```python code block and stop; its printed output will be shown to you in a "
    "```output block, and you can continue. Give the final answer as the instructions ask.")
_PY_BLOCK_AT_END = re.compile(r"```python[ \t]*\n(.*?)```\s*$", re.S)


class Environment(Protocol):
    system_prompt: str
    """The system prompt that tells the model how to act in this environment."""
    stop: list[str]
    """Strings that end a model turn so that the environment can act on it."""

    def reset(self, task_id: str) -> None: ...

    def action(self, turn_text: str) -> str | None: ...

    def step(self, action: str) -> str: ...

    def close(self) -> None: ...


class PythonSession:
    """A sandboxed Python session (verifiers.python_exec.Session, opened at the first step): the model writes a
    ```python block and stops; the block runs, definitions persisting across cells, and its output comes back
    as an ```output block, cut at `observation_max_chars`."""

    system_prompt = TOOL_SYSTEM_PROMPT
    stop = ["```\n", "```output"]  # the end of a fenced block, so a ```python cell can run before the model goes on

    def __init__(self, timeout_s: float, observation_max_chars: int):
        self.timeout_s = timeout_s
        self.observation_max_chars = observation_max_chars
        self.session = None

    def reset(self, task_id: str) -> None:
        self.close()

    def action(self, turn_text: str) -> str | None:
        """The code of a ```python block that ends the model's turn; None if it does not end with one."""
        m = _PY_BLOCK_AT_END.search(turn_text)
        return None if m is None else m.group(1)

    def step(self, code: str) -> str:
        from verifiers.python_exec import Session

        if self.session is None:
            self.session = Session(timeout_s=self.timeout_s)
        r = self.session.run(code, timeout_s=self.timeout_s)
        body = r.stdout if r.status == "ok" else (r.stdout + r.stderr).strip() or r.status
        if r.status == "timeout":
            body += f"\n(timed out after {self.timeout_s:g} s)"
        if len(body) > self.observation_max_chars:
            body = body[: self.observation_max_chars] + "\n... (output truncated)"
        return f"```output\n{body.rstrip()}\n```\n"

    def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()
