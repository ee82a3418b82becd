"""Many executions at once: a thread pool in which each worker drives one sandboxed subprocess at a time."""
from __future__ import annotations

import inspect
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable

from .isolation import require_isolation
from .oneshot import run, run_tests
from .result import ExecResult
from .session import Session


class ExecPool:
    def __init__(self, workers: int | None = None):
        """workers: executions running at once (default: the CPU count; they are CPU-bound)."""
        workers = (os.cpu_count() or 1) if workers is None else workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers={workers!r}: expected a positive integer")
        require_isolation()  # refuse now, not in every queued task
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="python-exec")

    def submit(self, code: str, **kwargs) -> Future[ExecResult]:
        """run(code, **kwargs) in the pool."""
        inspect.signature(run).bind(code, **kwargs)  # a misspelt keyword fails here, not in a worker
        return self._executor.submit(run, code, **kwargs)

    def submit_tests(self, program: str, tests: str, **kwargs) -> Future[ExecResult]:
        """run_tests(program, tests, **kwargs) in the pool."""
        inspect.signature(run_tests).bind(program, tests, **kwargs)
        return self._executor.submit(run_tests, program, tests, **kwargs)

    def submit_cell(self, session: Session, code: str, **kwargs) -> Future[ExecResult]:
        """session.run(code, **kwargs) in the pool (cells of one session still run one at a time)."""
        inspect.signature(session.run).bind(code, **kwargs)
        return self._executor.submit(session.run, code, **kwargs)

    def map(self, codes: Iterable[str], **kwargs) -> list[ExecResult]:
        """run() every program, in parallel; results in the order of `codes`."""
        futures = [self.submit(code, **kwargs) for code in codes]
        return [f.result() for f in futures]

    def close(self) -> None:
        """Wait for submitted executions to finish, then stop the workers."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "ExecPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
