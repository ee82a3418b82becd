"""Environments: what a trajectory interacts with between model turns (as OpenRLHF's agent `reset`/`step` and
verl's `BaseTool` create/execute/release).

The rollout (loop/generation/rollout.py) gives each trajectory its own environment and drives it:
- `reset(task_id)` before the trajectory's first action;
- when a model turn ends on one of the environment's `stop` strings, `action(turn_text)`: what the model's text
  since the last observation asks for, or None (the model's turn goes on);
- `step(action)`: carry it out and return the observation the model sees next (run concurrently with the other
  trajectories' steps, so one environment is used by one thread at a time); a tool that fails (a sandbox that
  dies, runs out of memory or time) is an observation saying so, never an exception, and `last_error` names
  its kind for the round's counts;
- `close()` when the trajectory ends (or has no tool budget left).
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

TOOL_ERROR_KINDS = ("timeout", "memory", "output_limit", "killed", "sandbox_failed")
"""Tool failures the rollout counts (generate/tool_errors/<kind>): the cell hit its time, memory or output limit,
was killed by a signal, or the sandbox itself failed (its interpreter could not start or broke the protocol). A
program that raises is the model's code failing, not a tool error."""


def tool_error_kind(result) -> str | None:
    """The TOOL_ERROR_KINDS entry of a verifiers.python_exec.ExecResult, None when the tool itself worked."""
    if result.status == "timeout":
        return "timeout"
    if result.status != "killed":
        return None
    if "memory" in result.reason:
        return "memory"
    return "output_limit" if "output exceeded" in result.reason else "killed"


class Environment(Protocol):
    system_prompt: str
    """The system prompt that tells the model how to act in this environment."""
    stop: list[str]
    """Strings that end a model turn so that the environment can act on it."""
    last_error: str | None
    """The kind of tool failure of the last step (one of TOOL_ERROR_KINDS), None when the tool worked."""
    holds_session: bool
    """Whether it holds something alive (an interpreter) until `close()`: the rollout caps how many do at once."""

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
        self.last_error: str | None = None

    def reset(self, task_id: str) -> None:
        self.close()

    def action(self, turn_text: str) -> str | None:
        """The code of a ```python block that ends the model's turn; None if it does not end with one."""
        m = _PY_BLOCK_AT_END.search(turn_text)
        return None if m is None else m.group(1)

    def step(self, code: str) -> str:
        from verifiers.python_exec import SandboxError, Session

        try:
            if self.session is None:
                self.session = Session(timeout_s=self.timeout_s)
            r = self.session.run(code, timeout_s=self.timeout_s)
        except SandboxError as e:
            # The sandbox failed, not the program (SandboxUnavailable, a machine that cannot sandbox at all, is not
            # a SandboxError and stops the run). The trajectory goes on; its next cell gets a fresh interpreter.
            self.last_error = "sandbox_failed"
            self.close()
            return self._observation(f"[sandbox] the Python session failed and was restarted: {e}. Variables, "
                                     "functions and imports from earlier cells are gone.")
        self.last_error = tool_error_kind(r)
        body = r.stdout if r.status == "ok" else (r.stdout + r.stderr).strip() or r.status
        if r.status == "timeout":
            body += f"\n(timed out after {self.timeout_s:g} s)"
        elif r.status == "killed":
            body += f"\n(the cell was killed: {r.reason})"
        return self._observation(body)

    def _observation(self, body: str) -> str:
        if len(body) > self.observation_max_chars:
            body = body[: self.observation_max_chars] + "\n... (output truncated)"
        return f"```output\n{body.rstrip()}\n```\n"

    @property
    def holds_session(self) -> bool:
        return self.session is not None

    def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()
