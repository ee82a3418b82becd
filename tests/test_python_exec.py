"""verifiers/python_exec: every threat is a real attempt by real code in a real sandbox (no mocks).

Each escape test asserts on the host side where it can (the canary still exists, the listener saw no
connection, the secret is absent), not only on what the sandboxed program claims.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from verifiers.python_exec import (ExecPool, close_idle_checkers, Isolation, SandboxError, SandboxUnavailable, Session,
                                   detect_isolation, isolation_available, run, run_tests)
from verifiers.python_exec.interpreter import SandboxedInterpreter
from verifiers.python_exec.isolation import ENV_VAR, UNSAFE, require_isolation
from verifiers.python_exec.limits import MAX_CODE_BYTES, Limits
from verifiers.python_exec.outcome import classify


@pytest.fixture(scope="module", autouse=True)
def sandbox_required():
    """These tests are about the sandbox: a machine that cannot build it fails them, loudly."""
    assert isolation_available() is not None, detect_isolation().problems


def own_cgroups() -> list[str]:
    """Per-execution cgroups of this test process still present (each must be gone after its run; the idle
    checkers that run_tests keeps for reuse are stopped first)."""
    close_idle_checkers()
    left = []
    for home in detect_isolation().cgroups:
        left += [p.name for p in home.directory.iterdir() if p.is_dir() and p.name.startswith(f"{os.getpid()}-")]
    return left


def host_processes_with_argv(argv: list[str]) -> list[int]:
    wanted = ("\0".join(argv) + "\0").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == wanted:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited while we looked
    return found


# ---------------------------------------------------------------- normal programs

def test_normal_code_stdlib_sympy_numpy_fractions_bigints():
    code = """
import fractions, math, json, itertools, collections
import numpy as np
import sympy as sp
x = sp.symbols('x')
print(sp.solve(x**2 - 5*x + 6, x))
print(sp.integrate(sp.sin(x)**2, (x, 0, sp.pi)))
print(np.linalg.det(np.array([[2.0, 1.0], [1.0, 3.0]])).round(6))
print(fractions.Fraction(1, 3) + fractions.Fraction(1, 6))
print(math.factorial(500) % 1_000_003, len(str(2**100_000)))
"""
    r = run(code, timeout_s=30)
    assert r.status == "ok", r.stderr
    assert r.stdout.splitlines() == ["[2, 3]", "pi/2", "5.0", "1/2", str(__import__("math").factorial(500) % 1_000_003)
                                     + " 30103"]
    assert r.exit_code == 0 and not r.truncated and r.reason == ""


def test_stdin_reaches_input_sys_stdin_and_fd0():
    r = run("a = input()\nimport sys\nprint(a.upper(), sys.stdin.read().count('z'))", stdin="hello\n" + "z" * 200_000)
    assert r.status == "ok", r.stderr
    assert r.stdout == "HELLO 200000\n"
    r = run("print(len(open(0).read()))", stdin="y" * 300_000)  # larger than a pipe: fed by a thread
    assert r.stdout == "300000\n"


def test_exit_codes_and_exceptions():
    r = run("import sys\nprint('before')\nsys.exit(3)")
    assert (r.status, r.exit_code, r.stdout) == ("error", 3, "before\n")
    assert run("import sys; sys.exit(0)").status == "ok"
    r = run("def f():\n    return 1 / 0\nf()")
    assert (r.status, r.exit_code) == ("error", 1)
    assert 'File "/tmp/main.py", line 2, in f' in r.stderr and "ZeroDivisionError" in r.stderr
    assert "<string>" not in r.stderr  # the runner's own frames are hidden
    r = run("def broken(:\n  pass")
    assert r.status == "error" and "SyntaxError" in r.stderr


def test_deep_recursion_is_an_error_or_a_kill_never_a_hang():
    r = run("def f(n): return f(n + 1)\nf(0)")
    assert r.status == "error" and "RecursionError" in r.stderr
    r = run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n): return f(n + 1)\nf(0)", memory_mb=256)
    assert r.status == "killed", (r.status, r.reason)


def test_oversized_code_is_blocked_without_running():
    r = run("print(1)\n" + "#" * MAX_CODE_BYTES)
    assert r.status == "blocked" and "limit" in r.reason and r.stdout == ""


def test_bad_arguments_fail_fast_with_the_fix():
    with pytest.raises(ValueError, match="timeout_s"):
        run("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run("print(1)", memory_mb=1)
    with pytest.raises(TypeError, match="code must be a str"):
        run(b"print(1)")  # type: ignore[arg-type]


# ---------------------------------------------------------------- filesystem

def test_writes_outside_the_workdir_and_host_deletes_fail(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    repo_file = Path(__file__).resolve()
    code = f"""
import os
results = {{}}
for target in ['../x', '/x', '/usr/x', {str(tmp_path / 'new.txt')!r}, {str(repo_file.parent / 'pwned.txt')!r}]:
    try:
        open(target, 'w').write('pwned'); results[target] = 'WROTE'
    except OSError as e:
        results[target] = type(e).__name__
for target in [{str(canary)!r}, {str(repo_file)!r}]:
    try:
        os.remove(target); results[target] = 'DELETED'
    except OSError as e:
        results[target] = type(e).__name__
open('inside.txt', 'w').write('fine')  # the private working directory is writable
print(results)
print(open('inside.txt').read())
"""
    r = run(code)
    assert r.status == "ok", r.stderr
    assert "WROTE" not in r.stdout and "DELETED" not in r.stdout
    assert r.stdout.endswith("fine\n")
    assert canary.read_text() == "still here" and repo_file.exists()
    assert not (tmp_path / "new.txt").exists() and not (repo_file.parent / "pwned.txt").exists()
    assert not Path("/x").exists()


PROJECT_FILE = Path(__file__).resolve().parents[1] / "pyproject.toml"
VENV_TOP = Path(sysconfig.get_paths()["purelib"]).resolve().parts[1]  # e.g. 'work' for /work/main/.venv


def test_symlink_escape_and_reading_host_files(tmp_path):
    secret = f"host-secret-{secrets.token_hex(8)}"
    host_file = tmp_path / "secret.txt"
    host_file.write_text(secret)
    code = f"""
import os
os.symlink({str(host_file)!r}, 'link')
os.symlink('/', 'root')
for path in ['link', {str(host_file)!r}, '/etc/passwd', '/root/.bashrc', '/proc/1/root/etc/passwd']:
    try:
        print(path, open(path).read()[:100])
    except OSError as e:
        print(path, type(e).__name__)
print(sorted(os.listdir('root')))
print(os.path.exists({str(PROJECT_FILE)!r}), os.path.exists('/etc'))
"""
    r = run(code)
    assert r.status == "ok", r.stderr
    assert secret not in r.stdout and "root:" not in r.stdout
    assert "link FileNotFoundError" in r.stdout
    assert "False False" in r.stdout  # neither the project nor /etc exists in there
    listing = r.stdout.splitlines()[-2]
    # The venv's top folder is there (holding only its site-packages), /etc is not.
    assert f"'{VENV_TOP}'" in listing and "'etc'" not in listing


def test_environment_is_scrubbed_and_parent_environ_unreachable(monkeypatch):
    token = f"tok-{secrets.token_hex(12)}"
    monkeypatch.setenv("RATCHET_TEST_SECRET", token)
    code = f"""
import os, glob
print(dict(os.environ))
for path in ['/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ'] + glob.glob('/proc/*/environ'):
    try:
        print(path, open(path, 'rb').read())
    except OSError as e:
        print(path, type(e).__name__)
"""
    r = run(code)
    assert r.status == "ok", r.stderr
    assert token not in r.stdout and "RATCHET_TEST_SECRET" not in r.stdout
    assert f"/proc/{os.getpid()}/environ FileNotFoundError" in r.stdout  # host pids are not visible
    assert "HOME" in r.stdout


# ---------------------------------------------------------------- processes, network, ctypes

def test_network_cannot_reach_a_host_listener():
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        stop = threading.Event()

        def accept():
            while not stop.is_set():
                try:
                    accepted.append(server.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            probe = socket.create_connection(("127.0.0.1", port), timeout=2)  # the listener does work
            probe.close()
            time.sleep(0.3)
            assert len(accepted) == 1
            code = f"""
import socket
for host in ['127.0.0.1', 'localhost', '8.8.8.8']:
    try:
        socket.create_connection((host, {port}), timeout=2); print(host, 'CONNECTED')
    except OSError as e:
        print(host, type(e).__name__)
"""
            r = run(code)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join()
            for conn in accepted:
                conn.close()
    assert r.status == "ok", r.stderr
    assert "CONNECTED" not in r.stdout
    assert len(accepted) == 1  # only our own probe ever got through


def test_subprocesses_are_sandboxed_too():
    code = """
import subprocess, sys
print(subprocess.run(['ls', '/'], capture_output=True, text=True).stdout.split())
print(subprocess.run([sys.executable, '-c', 'import os; print(os.getuid(), os.path.exists("/etc"))'],
                     capture_output=True, text=True).stdout.strip())
"""
    r = run(code)
    assert r.status == "ok", r.stderr
    listing = r.stdout.splitlines()[0]
    assert "'etc'" not in listing and "'home'" not in listing and "'tmp'" in listing
    assert r.stdout.splitlines()[1].endswith("False")


def test_ctypes_cannot_regain_privileges_or_remount():
    code = """
import ctypes, os
libc = ctypes.CDLL('libc.so.6', use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, MS_REMOUNT, MS_BIND = 0x10000000, 0x00020000, 32, 4096
print('unshare', libc.unshare(CLONE_NEWUSER), libc.unshare(CLONE_NEWNS))
print('remount', libc.mount(None, b'/usr', None, MS_REMOUNT | MS_BIND, None))
print('setuid', libc.setuid(0), 'caps', open('/proc/self/status').read().split('CapEff:')[1].split()[0])
fd = libc.open(b'/usr/pwned', os.O_CREAT | os.O_WRONLY, 0o644)
print('open', fd)
"""
    r = run(code)
    assert r.status == "ok", r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "unshare -1 -1" and lines[1] == "remount -1"
    assert lines[2].endswith("caps 0000000000000000")
    assert lines[3] == "open -1" and not Path("/usr/pwned").exists()
    r = run("import ctypes\nctypes.string_at(0)")  # a crash in C is reported, not raised in the host
    assert r.status == "killed" and r.exit_code == -11 and "SIGSEGV" in r.reason


def test_process_cap_and_fork_bomb_are_contained():
    r = run("""
import os, time
n = 0
try:
    while n < 500:
        if os.fork() == 0:
            time.sleep(5)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
""")
    assert r.status == "ok", r.stderr
    spawned, errno_ = map(int, r.stdout.split())
    assert spawned < Limits().max_processes and errno_ == 11  # EAGAIN from the pids cgroup
    start = time.monotonic()
    r = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout_s=2)
    assert r.status == "timeout" and time.monotonic() - start < 8
    assert own_cgroups() == []  # removal requires an empty cgroup: every bomb process is dead
    assert subprocess.run(["true"]).returncode == 0  # the host can still make processes


# ---------------------------------------------------------------- limits and kills

def test_sigterm_ignoring_loop_and_sleep_and_c_loop_time_out():
    cases = ["import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('looping')\nwhile True: pass",
             "import time\nprint('looping')\ntime.sleep(60)",
             "import re\nprint('looping')\nre.match(r'(a+)+$', 'a' * 64 + 'b')"]  # backtracking inside C
    for code in cases:
        start = time.monotonic()
        r = run(code, timeout_s=1)
        assert r.status == "timeout" and r.exit_code is None, (code, r)
        assert r.stdout == "looping\n"  # output from before the kill is kept
        assert time.monotonic() - start < 5


def daemon_code(marker: str) -> str:
    return f"""
import os
if os.fork() == 0:
    os.setsid()  # leaves the process group, as a daemon would
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '{marker}'])  # inherits, and keeps open, stdout and stderr
    os._exit(0)
print('parent done')
"""


def new_marker() -> str:
    return f"{1000 + secrets.randbelow(9000)}.{secrets.randbelow(10**6)}"


def test_daemon_child_holding_the_pipe_does_not_hang_the_reader():
    marker = new_marker()
    start = time.monotonic()
    r = run(daemon_code(marker), timeout_s=5)
    assert r.status == "ok" and r.stdout == "parent done\n", r
    assert time.monotonic() - start < 3
    assert host_processes_with_argv(["sleep", marker]) == []  # the daemon died with the sandbox


def test_output_flood_is_capped_and_killed():
    start = time.monotonic()
    r = run("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.write(chunk)")
    assert r.status == "killed" and r.truncated and "output" in r.reason
    assert len(r.stdout) == Limits().max_output_bytes
    assert time.monotonic() - start < 5


def test_memory_blowup_is_killed():
    r = run("b = bytearray(2 * 1024**3)\nprint('survived')", memory_mb=256)
    assert r.status == "killed" and "memory" in r.reason and "survived" not in r.stdout
    r = run("x = [1] * 10**9", memory_mb=256)
    assert r.status == "killed" and "memory" in r.reason


# ---------------------------------------------------------------- Session

def test_session_keeps_state_and_echoes_trailing_expression():
    with Session() as s:
        r1 = s.run("import math\nx = 41\ndef inc(v):\n    return v + 1")
        assert (r1.status, r1.stdout) == ("ok", "")
        r2 = s.run("print('x is', x)\ninc(x)")
        assert r2.status == "ok" and r2.stdout == "x is 41\n42\n"
        assert s.run("math.sqrt(16) if inc(0) else None").stdout == "4.0\n"
        assert s.run("y = None\ny").stdout == ""  # None is not echoed, like a notebook
        r = s.run("print(input())", stdin="per-cell stdin")
        assert r.stdout == "per-cell stdin\n"
        r = s.run("undefined_name")
        assert r.status == "error" and "NameError" in r.stderr and 'File "<cell 6>"' in r.stderr
        assert s.run("x").stdout == "41\n"  # an exception does not lose the state
        open_files = s.run("open('notes.txt', 'w').write('kept')\nopen('notes.txt').read()")
        assert open_files.stdout == "'kept'\n"
        r = s.run("import pickle, __main__\npickle.loads(pickle.dumps(inc)) is inc is __main__.inc")
        assert r.stdout == "True\n", r.stderr  # cells live in a real __main__ module
        assert s.restarts == 0


def test_session_survives_a_timeout_and_a_crash_with_a_clear_reset():
    with Session(timeout_s=1) as s:
        s.run("x = 1")
        r = s.run("while True: pass")
        assert r.status == "timeout" and r.reset and "restarted" in r.stderr
        r = s.run("x")
        assert r.status == "error" and "NameError" in r.stderr and not r.reset  # usable, state gone
        assert s.run("x = 2\nx").stdout == "2\n"
        r = s.run("import os\nos._exit(7)")
        assert r.status == "error" and r.exit_code == 7 and r.reset
        assert s.run("1 + 1").stdout == "2\n" and s.restarts == 2
        assert s.run("print(1)", timeout_s=5).status == "ok"  # per-cell override
    with pytest.raises(SandboxError, match="after close"):
        s.run("1")


# ---------------------------------------------------------------- run_tests

TESTS = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert candidate(-1, 1) == 0
"""


def test_run_tests_pass_and_fail():
    r = run_tests("def add(a, b):\n    return a + b", TESTS, entry_point="add")
    assert r.status == "ok" and r.exit_code == 0, r
    r = run_tests("def add(a, b):\n    return a - b", TESTS, entry_point="add")
    assert r.status == "error" and "AssertionError" in r.stderr and r.reason.startswith("check failed")
    r = run_tests("def add(a, b):\n    while True: pass", TESTS, entry_point="add", timeout_s=1)
    assert r.status == "timeout"
    r = run_tests("def add(a, b):\n    return a + b", TESTS + "\ncheck(add)\n")  # tests that call check themselves
    assert r.status == "ok"
    with pytest.raises(ValueError, match="entry_point"):
        run_tests("x = 1", TESTS, entry_point="not valid")


def test_run_tests_cannot_be_passed_by_exiting_early_or_faking_output():
    hacks = ["import sys\nsys.exit(0)",
             "import os\nprint('all tests passed')\nos._exit(0)",
             "def add(a, b):\n    raise SystemExit(0)"]
    for program in hacks:
        r = run_tests(program, TESTS, entry_point="add")
        assert r.status != "ok", program


def test_run_tests_leaves_no_sandbox_behind_whatever_the_verdict():
    for program in ["import sys\nsys.exit(0)", "def add(a, b):\n    return a - b", "def add(a, b):\n    return a + b",
                    "import os\ndef add(a, b):\n    os._exit(1)"]:
        run_tests(program, TESTS, entry_point="add")
    assert own_cgroups() == []  # the checkers kept for reuse are stopped by own_cgroups(); nothing else is left


# ---------------------------------------------------------------- pool, policy, fallback

def test_pool_runs_many_in_parallel():
    with ExecPool(workers=8) as pool:
        start = time.monotonic()
        results = pool.map([f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(16)])
        elapsed = time.monotonic() - start
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(16)]
        assert elapsed < 16 * 0.5 / 2  # serial would take 8 s
        tests = pool.submit_tests("def add(a, b):\n    return a + b", TESTS, entry_point="add")
        with Session() as s:
            cell = pool.submit_cell(s, "6 * 7")
            assert cell.result().stdout == "42\n"
        assert tests.result().ok
        with pytest.raises(TypeError):
            pool.submit("print(1)", timeout=3)  # misspelt keyword: refused at submit time
    with pytest.raises(ValueError, match="workers"):
        ExecPool(workers=0)


def test_refuses_without_isolation_unless_explicitly_accepted(monkeypatch):
    weak = Isolation(bwrap=None, cgroups=(), problems=("bubblewrap is not installed",))
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(SandboxUnavailable, match=f"{ENV_VAR}={UNSAFE}"):
        require_isolation(weak)
    monkeypatch.setenv(ENV_VAR, "yes please")
    with pytest.raises(ValueError, match=ENV_VAR):
        require_isolation(weak)
    monkeypatch.setenv(ENV_VAR, UNSAFE)
    assert require_isolation(weak) is weak


def run_without_bwrap(code: str, timeout_s: float):
    """The weaker mode: a plain subprocess with rlimits, its own process group, cgroups, a temp dir."""
    fallback = Isolation(bwrap=None, cgroups=detect_isolation().cgroups, problems=("simulated: no bwrap",))
    limits = Limits(timeout_s=timeout_s)
    with SandboxedInterpreter(limits, one_shot=True, isolation=fallback) as interpreter:
        report = interpreter.execute(code, stdin="", filename="main.py", echo=False, final=True, timeout_s=timeout_s)
        return classify(report, limits, via_bwrap=False)


def test_unsafe_fallback_limits_time_scrubs_env_and_reaps_daemons(monkeypatch):
    monkeypatch.setenv(ENV_VAR, UNSAFE)
    monkeypatch.setenv("RATCHET_TEST_SECRET", "fallback-secret")
    r = run_without_bwrap("import os\nprint(os.getcwd(), dict(os.environ))\nwhile True: pass", timeout_s=1)
    assert r.status == "timeout" and "fallback-secret" not in r.stdout
    workdir = r.stdout.split()[0]
    assert workdir.startswith("/tmp/ratchet-exec-") and not os.path.exists(workdir)  # private, then removed
    # No pid namespace here: the daemon really outlives the program and holds the pipes.
    marker = new_marker()
    start = time.monotonic()
    r = run_without_bwrap(daemon_code(marker), timeout_s=5)
    assert r.status == "ok" and r.stdout == "parent done\n" and time.monotonic() - start < 3
    assert host_processes_with_argv(["sleep", marker]) == []  # killed through its cgroup
    assert own_cgroups() == []


def test_a_session_outlives_the_threads_that_ran_its_cells():
    # bwrap's --die-with-parent follows the thread that started the sandbox. A rollout opens sessions and runs
    # cells in short-lived worker threads: the interpreter (and a replacement started after a crash) must survive
    # them, or a trajectory's state is lost between turns and a dead replacement fails to start (issue 31).
    from concurrent.futures import ThreadPoolExecutor

    def in_thread(fn, *args):
        with ThreadPoolExecutor(1) as ex:
            return ex.submit(fn, *args).result()

    def open_and_run(code):  # as environments.PythonSession.step does: open the session and run its first cell
        s = Session(timeout_s=20)
        assert s.run(code).ok
        return s

    session = in_thread(open_and_run, "x = 41")
    try:
        r = in_thread(session.run, "print(x + 1)")
        assert (r.stdout, r.reset, session.restarts) == ("42\n", False, 0)
        crashed = in_thread(session.run, "import os\nos._exit(3)")
        assert crashed.reset and session.restarts == 1
        r = in_thread(session.run, "print('fresh')")  # the replacement, started in the previous thread
        assert (r.status, r.stdout, r.reset) == ("ok", "fresh\n", False)
        # An interpreter killed from outside between two cells is restarted, and the next cell says its state is
        # gone (before, the restart was silent: the model saw a NameError it could not explain).
        in_thread(session.run, "y = 1")
        os.kill(session._interpreter._proc.pid, 9)
        time.sleep(0.2)
        r = in_thread(session.run, "print(y)")
        assert r.reset and "stopped between cells" in r.stderr and session.restarts == 2
    finally:
        session.close()
