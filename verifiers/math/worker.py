"""Entry point of a comparison worker process (python -m verifiers.math.worker --memory-limit-mb N).

Protocol: one JSON object per line. The worker first writes {"ready": true}; then, for every request
{"pred": str, "gold": str} on stdin, exactly one reply on stdout:
  {"kind": "ok", "equal": bool, "how": str}
  {"kind": "resource", "message": str, "recycle": true}  memory or recursion bound hit
  {"kind": "error", "message": str, "gold": bool}        a comparison crash, or (gold: true) a bad gold answer
The parent enforces the deadline by killing this process; its address space is capped with
RLIMIT_AS so that a runaway comparison ends in MemoryError instead of swapping the machine.
The worker exits when stdin closes or its parent process is gone (a watchdog thread checks, since
a worker deep in a runaway comparison does not read stdin).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import traceback


def _write(fd: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def _handle(request: dict, compare, gold_unparseable) -> dict:
    try:
        result = compare(request["pred"], request["gold"])
    except gold_unparseable as e:
        return {"kind": "error", "message": str(e), "gold": True}
    except (MemoryError, RecursionError) as e:
        # The interpreter may be left fragmented after this: the parent replaces the worker.
        return {"kind": "resource", "recycle": True,
                "message": f"{type(e).__name__}: the comparison exceeded the worker's memory/recursion bound"}
    except Exception as e:  # noqa: BLE001 - the protocol boundary: every crash is reported, not hidden
        frames = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-3))[-1500:]
        return {"kind": "error", "message": f"the comparison crashed: {type(e).__name__}: {e}\n{frames}"}
    return {"kind": "ok", "equal": bool(result.equal), "how": result.how}


def _exit_when_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit-mb", type=int, required=True)
    args = parser.parse_args(argv)
    limit = args.memory_limit_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()

    # Replies go to the original stdout only; anything a library prints lands on stderr.
    reply_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    from verifiers.math.symbolic import GoldUnparseable, compare  # heavy (SymPy): after the limit is set

    _write(reply_fd, {"ready": True})
    for line in sys.stdin.buffer:
        if line.strip():
            _write(reply_fd, _handle(json.loads(line), compare, GoldUnparseable))


if __name__ == "__main__":
    main()
