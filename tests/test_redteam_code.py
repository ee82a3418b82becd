"""Red team, second round, code side: what a program can do to the host that grades it.

Every case is real code in the real sandboxes. Each must come back as a result (never an exception out of
run_tests, Session.run or run), within a bound, and graded right: a wrong program never passes, and a right
one written in the same style keeps passing.
"""
from __future__ import annotations

import time
import tracemalloc

import pytest

from verifiers.python_exec import ExecResult, Session, isolation_available, run, run_tests


@pytest.fixture(scope="module", autouse=True)
def sandbox_required():
    assert isolation_available() is not None


ADD_TESTS = "def check(c):\n    assert c(2, 3) == 5\n    assert c(-1, 1) == 0\n"
RIGHT = "def add(a, b):\n    return a + b\n"

# Finds the id of the request being served (a local of runner.serve, up the stack) and writes `frame`, with that
# id, to every descriptor: one of them is the reply pipe.
_FORGE = """
import json, os, sys
def _forge(frame):
    f, rid = sys._getframe(), None
    while f is not None and rid is None:
        r = f.f_locals.get('request')
        rid = r.get('id') if isinstance(r, dict) else None
        f = f.f_back
    body = json.dumps(dict(frame, id=rid)).encode()
    for fd in range(3, 64):
        try:
            os.write(fd, len(body).to_bytes(4, 'big') + body)
        except OSError:
            pass
"""

FORGED = {
    "no exit code": {"kind": "ok"},
    "no function list": {"kind": "ok", "exit_code": 0},
    "exit code a string": {"kind": "exit", "exit_code": "0"},
    "exit code a list": {"kind": "exception", "exit_code": [1]},
    "kind a list": {"kind": ["ok"], "exit_code": 0, "callables": ["add"]},
    "kind unknown": {"kind": "done", "exit_code": 0, "callables": ["add"]},
    "callables a dict": {"kind": "ok", "exit_code": 0, "callables": {"add": 1}},
    "huge exit code": {"kind": "exit", "exit_code": 10 ** 30},
}


def _bounded(fn, *args, limit_s: float = 20, **kwargs) -> ExecResult:
    start = time.monotonic()
    result = fn(*args, **kwargs)  # raising fails the test: nothing a program writes may raise in the host
    assert isinstance(result, ExecResult)
    assert time.monotonic() - start < limit_s
    return result


@pytest.mark.parametrize("frame", list(FORGED.values()), ids=list(FORGED))
def test_a_forged_reply_frame_is_a_failed_grading_not_a_host_error(frame):
    loading = _FORGE + f"_forge({frame!r})\n" + RIGHT
    r = _bounded(run_tests, loading, ADD_TESTS, entry_point="add", timeout_s=10)
    assert r.status != "ok", r
    in_call = _FORGE + f"def add(a, b):\n    _forge({frame!r})\n    return a + b\n"
    assert _bounded(run_tests, in_call, ADD_TESTS, entry_point="add", timeout_s=10).status != "ok"
    assert _bounded(run, loading, timeout_s=10).status in ("ok", "error")  # a one-shot run: any verdict, no raise
    with Session(timeout_s=10) as session:
        first = _bounded(session.run, loading)
        # a well-formed frame is one the program could have earned by finishing; a malformed one is a violation
        assert first.ok or (first.status == "error" and "forged" in first.reason), first
        assert _bounded(session.run, "print(1 + 1)").stdout == "2\n"  # the session goes on


def test_forged_call_replies_are_failed_gradings():
    for frame in ({"kind": "value"}, {"kind": "value", "value": ["i", "zz"]}, {"kind": "raised", "type": 5},
                  {"kind": "raised", "type": "ValueError", "message": None}, {"kind": "invalid"},
                  {"kind": "value", "value": ["l", []], "args_after": ["t", []], "kwargs_after": ["d", []]},
                  {"kind": "value", "value": ["n"], "same_as": 7}):
        program = _FORGE + f"def add(a, b):\n    _forge({frame!r})\n    import time; time.sleep(0.05)\n" \
                           "    return a + b\n"
        r = _bounded(run_tests, program, ADD_TESTS, entry_point="add", timeout_s=10)
        assert r.status in ("ok", "error"), r  # the forged frame wins the race, or the real reply does: no raise


EXIT_AFTER_REPLY = """
import os, threading, time
def _later():
    time.sleep(0.2)
    os._exit(0)
def add(a, b):
    threading.Thread(target=_later).start()
    return a + b
"""


def test_a_program_exiting_right_after_a_right_reply_fails_without_raising():
    tests = "import time\ndef check(c):\n    assert c(2, 3) == 5\n    time.sleep(0.6)\n    assert c(1, 1) == 2\n"
    r = _bounded(run_tests, EXIT_AFTER_REPLY, tests, entry_point="add", timeout_s=10)
    assert r.status == "error" and "ended" in r.reason, r
    with Session(timeout_s=10) as session:
        assert _bounded(session.run, EXIT_AFTER_REPLY + "add(1, 2)").stdout == "3\n"
        time.sleep(0.6)
        second = _bounded(session.run, "print(add(2, 2))")
        assert second.status == "error" and second.reset, second
        assert _bounded(session.run, "print(5)").stdout == "5\n"


STORM = """
import signal
class Storm(Exception):
    pass
def _raise(*_):
    raise Storm('tick')
signal.signal(signal.SIGALRM, _raise)
signal.signal(signal.SIGPIPE, _raise)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
"""


@pytest.mark.parametrize("attempt", range(6))
def test_an_aggressive_signal_handler_never_raises_in_the_host(attempt):
    wrong = STORM + "def add(a, b):\n    return a - b\n"
    assert _bounded(run_tests, wrong, ADD_TESTS, entry_point="add", timeout_s=5).status != "ok"
    _bounded(run_tests, STORM + RIGHT, ADD_TESTS, entry_point="add", timeout_s=5)  # any verdict, never a raise
    _bounded(run, STORM + "for i in range(10**5):\n    pass\n", timeout_s=5)
    with Session(timeout_s=5) as session:
        for cell in (STORM, "x = sum(range(10**5))", "print(x)"):
            _bounded(session.run, cell)


def test_output_is_capped_per_grading_not_per_call():
    cap = 64 << 10
    flood = f"def add(a, b):\n    print('x' * {cap - 100})\n    return a + b\n"
    tests = "def check(c):\n    for i in range(300):\n        assert c(i, 1) == i + 1\n"
    tracemalloc.start()
    try:
        r = _bounded(run_tests, flood, tests, entry_point="add", timeout_s=30, max_output_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.status == "killed" and r.truncated and "output" in r.reason, r
    assert len(r.stdout) <= cap
    assert peak < 40 * cap  # the host kept about one cap's worth, not 300 of them
    # under the cap over the whole grading: graded as usual
    quiet = "def add(a, b):\n    print('.')\n    return a + b\n"
    assert _bounded(run_tests, quiet, tests, entry_point="add", timeout_s=30, max_output_bytes=cap).ok


# --------------------------------------------------------------- by-value blind spots: identity and mutation

def _graded(program: str, tests: str, entry: str = "f") -> bool:
    return _bounded(run_tests, program, tests, entry_point=entry, timeout_s=10).ok


def test_in_place_mutation_reaches_the_tests():
    tests = "def check(c):\n    x = [3, 1, 2]\n    assert c(x) is None\n    assert x == [1, 2, 3]\n"
    assert _graded("def f(l):\n    l.sort()\n", tests)
    assert not _graded("def f(l):\n    sorted(l)\n", tests)
    nested = ("def check(c):\n    d = {'a': [2, 1]}\n    inner = d['a']\n    c(d)\n    assert inner == [1, 2]\n"
              "    t = ([1], {2})\n    c(t)\n    assert t[0] == [1]\n")
    assert _graded("def f(x):\n    if type(x) is dict:\n        x['a'].sort()\n", nested)
    assert not _graded("def f(x):\n    if type(x) is dict:\n        x['a'].append(0)\n", nested)
    assert not _graded("def f(x):\n    if type(x) is tuple:\n        x[0].append(2)\n", nested)


def test_a_function_must_not_mutate_what_the_tests_say_it_must_not():
    tests = "def check(c):\n    x = [3, 1, 2]\n    assert c(x) == [1, 2, 3]\n    assert x == [3, 1, 2]\n"
    assert _graded("def f(l):\n    return sorted(l)\n", tests)
    assert not _graded("def f(l):\n    l.sort()\n    return l\n", tests)
    sets = "def check(c):\n    s = {1, 2}\n    assert c(s) == 3\n    assert s == {1, 2}\n"
    assert _graded("def f(s):\n    return sum(s)\n", sets)
    assert not _graded("def f(s):\n    t = sum(s)\n    s.clear()\n    return t\n", sets)


def test_returning_the_argument_instead_of_a_copy_is_seen():
    tests = ("def check(c):\n    x = [1, 2]\n    r = c(x)\n    assert r == [1, 2]\n    assert r is not x\n"
             "    r.append(3)\n    assert x == [1, 2]\n")
    assert _graded("def f(l):\n    return list(l)\n", tests)
    assert not _graded("def f(l):\n    return l\n", tests)
    same = "def check(c):\n    x = {'k': 1}\n    assert c(x) is x\n"
    assert _graded("def f(d):\n    d['k'] += 1\n    return d\n", same)
    assert not _graded("def f(d):\n    return dict(d)\n", same)
    by_keyword = "def check(c):\n    x = [0]\n    assert c(l=x) is x and x == [0, 1]\n"
    assert _graded("def f(l):\n    l.append(1)\n    return l\n", by_keyword)


def test_an_exception_class_named_like_a_builtin_is_not_the_builtin():
    tests = ("def check(c):\n    try:\n        c(-1)\n    except ValueError:\n        pass\n"
             "    else:\n        raise AssertionError('no ValueError')\n")
    assert not _graded("class ValueError(Exception):\n    pass\ndef f(x):\n    raise ValueError('neg')\n", tests)
    assert not _graded("import builtins\nclass E(Exception):\n    pass\nE.__name__ = 'ValueError'\n"
                       "def f(x):\n    raise E('neg')\n", tests)
    # a subclass of the builtin is caught by `except ValueError`, as it would be in one process
    assert _graded("class Negative(ValueError):\n    pass\ndef f(x):\n    raise Negative('neg')\n", tests)
    assert _graded("def f(x):\n    raise ValueError('neg')\n", tests)
