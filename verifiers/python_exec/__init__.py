"""Sandboxed Python execution for tool calls and code grading.

    run(code, timeout_s=10, memory_mb=1024, stdin="") -> ExecResult      one program, fresh sandbox
    Session().run(code) -> ExecResult                                    notebook-style cells of one trajectory
    run_tests(program, tests, entry_point=...) -> ExecResult              HumanEval-style grading (see oneshot)
    close_idle_checkers()                                                stop the checkers run_tests keeps warm
    ExecPool(workers=N).submit / submit_tests / submit_cell / map         many at once
    isolation_available() -> str | None                                  what this machine can enforce

Isolation (bubblewrap namespaces + per-execution cgroups + setrlimit) is described in launch.py,
cgroups.py and isolation.py. Without it, executions are refused unless RATCHET_SANDBOX=unsafe-no-isolation.
"""
from .errors import SandboxError, SandboxUnavailable
from .isolation import ENV_VAR, UNSAFE, Isolation, detect as detect_isolation, isolation_available
from .limits import Limits
from .oneshot import close_idle_checkers, run, run_tests
from .pool import ExecPool
from .result import ExecResult, Status
from .session import Session

__all__ = [
    "ENV_VAR", "UNSAFE", "ExecPool", "ExecResult", "Isolation", "Limits", "SandboxError", "SandboxUnavailable",
    "Session", "Status", "close_idle_checkers", "detect_isolation", "isolation_available", "run", "run_tests",
]
