"""The package layout of loop/ (docs/layout.md), read from the source with `ast` (nothing is imported):

- no import circle between modules, counting the imports inside functions too (a lazy import still makes two modules
  depend on each other);
- no upward import in loop/: the shared packages import only each other, and a stage imports the shared packages,
  loop/config.py and the stages before it in round order (generation -> grading -> pairs -> training -> evaluation);
  loop/cluster/, loop/report/ and the config modules may import anything in loop/;
- loop/ never imports flows/ (how a run is started, watched and shown), and verifiers/ never imports loop/;
- loop/generation/__init__.py and loop/training/__init__.py stay empty: vLLM imports the CPU LoRA plugin
  (loop/generation/vllm_cpu_lora.py) in every engine process, and loading a config imports loop/training/config.py;
  neither may pull anything else in.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loop", "flows", "verifiers")

SHARED = ("loop.records", "loop.tasks", "loop.models", "loop.run")
"""What every stage may use: the records a round passes on, the tasks, the model and the run directory/tracking."""
STAGES = ("loop.generation", "loop.grading", "loop.pairs", "loop.training", "loop.evaluation")
"""The stages in round order: each may import the ones before it, never one after it."""
ANYWHERE = ("loop.config", "loop.config_docs", "loop.cluster", "loop.report")
"""May import anything in loop/: the config composes every stage's config model, the cluster runs the stages on Ray,
the report reads what they logged."""
EMPTY_INITS = ("loop/generation/__init__.py", "loop/training/__init__.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    assert "loop.config" in found and "verifiers.math" in found, "the packages were not found"
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of this repository that `name` imports anywhere in its source (function bodies included). `from
    a.b import c` is an import of the module a.b.c when there is one, else of a.b."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package of this module
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` of a module of ours; a name that is not a module is resolved to its closest module
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (as [a, b, ..., a]), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def group(module: str) -> str:
    """The package (or top-level module) of loop/ that `module` is in (loop.generation.engine: loop.generation)."""
    return ".".join(module.split(".")[:2])


def allowed(importer: str, imported: str) -> bool:
    """May `importer` (a module of loop/) import `imported`?"""
    src, dst = group(importer), group(imported)
    if imported.startswith("verifiers.") or imported == "verifiers":
        return True
    if not imported.startswith("loop") or src == dst or src in ANYWHERE or src == "loop":
        return not imported.startswith("flows")
    if src in SHARED:
        return dst in SHARED
    if src in STAGES:
        return dst in SHARED or dst == "loop.config" or (dst in STAGES and STAGES.index(dst) <= STAGES.index(src))
    raise AssertionError(f"{importer} is in no group of the layout (add its package to SHARED, STAGES or ANYWHERE)")


def layout_problems(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, targets in sorted(graph.items()):
        for imported in sorted(targets):
            if importer.startswith("loop") and (imported.startswith("flows") or not allowed(importer, imported)):
                problems.append(f"{importer} imports {imported}")
            if importer.startswith("verifiers") and imported.startswith("loop"):
                problems.append(f"{importer} imports {imported} (verifiers/ is independent of loop/)")
    return problems


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_import_no_flows_in_loop_no_loop_in_verifiers():
    assert layout_problems(import_graph()) == []


def test_every_module_of_loop_belongs_to_the_layout():
    for name in modules():
        if name.startswith("loop.") and name != "loop":
            assert group(name) in SHARED + STAGES + ANYWHERE, f"{name}: put it in a package of docs/layout.md"


@pytest.mark.parametrize("path", EMPTY_INITS)
def test_the_packages_vllm_and_the_config_pass_through_stay_empty(path):
    assert ast.parse((ROOT / path).read_text()).body == [], f"{path} must stay empty"


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The checks can fail: an import inside a function counts, and the rollout importing the evaluation (a later
    stage, which imports the rollout) is an upward import and an import circle."""
    known = set(modules())
    lazy = tmp_path / "rollout.py"
    lazy.write_text((ROOT / "loop" / "generation" / "rollout.py").read_text()
                    + "\n\ndef _late():\n    from loop.evaluation import evaluate\n")
    graph = import_graph()
    graph["loop.generation.rollout"] = imports_of("loop.generation.rollout", lazy, known)
    assert "loop.evaluation.evaluate" in graph["loop.generation.rollout"]
    assert find_cycle(graph) is not None
    assert layout_problems(graph) == ["loop.generation.rollout imports loop.evaluation.evaluate"]
    assert not allowed("loop.records", "loop.generation.engine")
    assert not allowed("loop.pairs", "flows.console")
